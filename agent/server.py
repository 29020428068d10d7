"""The agent's Unix socket: bind it safely, accept connections, learn each caller from the
kernel (SO_PEERCRED), and drive one rpc.Connection per connection.

Every connection is a task in the server's TaskGroup, and every request a task in its
connection's TaskGroup, so nothing runs that nobody awaits. A protocol error closes that one
connection; the agent goes on serving everyone else. Before hello succeeds a connection may
send only small frames, so a stranger cannot make the agent buffer much.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.handlers import HANDLERS, Agent, Caller
from agent.protocol import messages
from agent.protocol.errors import (
    InternalError,
    LaunchError,
    RemoteProtocolError,
)
from agent.protocol.rpc import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    Connection,
    Request,
    Role,
    State,
)

log = logging.getLogger("launch-agent")

PRE_HELLO_MAX_FRAME = 64 * 1024
READ_SIZE = 256 * 1024


class SocketError(LaunchError):
    """The socket cannot be bound safely; the message says what to fix."""


def check_socket_dir(directory: Path) -> None:
    """Refuse a directory that anyone but us (or root) could change: another user could swap
    the socket for their own and receive every caller's requests."""
    st = directory.stat()
    if st.st_uid not in (0, os.geteuid()):
        raise SocketError(f"{directory} is owned by uid {st.st_uid}; it must be ours or root's")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SocketError(
            f"{directory} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "use a directory only its owner can write"
        )


def bind_socket(path: Path, mode: int) -> socket.socket:
    """Bind the listening socket and set its mode before anyone can be told it is ready."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_socket_dir(path.parent)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of an agent that is gone
        else:
            raise SocketError(f"another agent is already serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never visible with a wider mode than 0600, even briefly
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def peer_credentials(sock: socket.socket) -> Caller:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Caller(pid=pid, uid=uid, gid=gid)


async def serve(agent: Agent, sock: socket.socket, allowed_uid: int | None) -> None:
    """Accept connections until cancelled. allowed_uid None: any local user (system mode)."""
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        while True:
            conn, _ = await loop.sock_accept(sock)
            tg.create_task(_serve_connection(agent, conn, allowed_uid))


async def _serve_connection(agent: Agent, conn: socket.socket, allowed_uid: int | None) -> None:
    try:
        caller = peer_credentials(conn)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
    except OSError:
        conn.close()
        return
    try:
        if allowed_uid is not None and caller.uid != allowed_uid:
            log.warning("refused uid %d (this agent serves uid %d only)", caller.uid, allowed_uid)
            return
        await _drive(agent, caller, reader, writer)
    # except*: _drive's TaskGroup re-raises even its own body's error inside an ExceptionGroup,
    # and a peer that breaks the protocol or hangs up is no failure of ours (no traceback).
    except* (ConnectionError, RemoteProtocolError) as group:
        log.info("connection from pid %d closed: %s", caller.pid, group.exceptions[0])
    except* Exception:
        log.exception("connection from pid %d failed", caller.pid)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _drive(
    agent: Agent, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    rpc = Connection(Role.SERVER, max_frame=PRE_HELLO_MAX_FRAME)
    tasks: set[asyncio.Task[None]] = set()

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def notify(method: str, params: Any) -> None:
        await send(rpc.send_notification(method, params))

    async with asyncio.TaskGroup() as tg:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                # hello may have been answered (by its task) while we waited: lift the limit
                # before these bytes are judged, or the first large request is refused.
                if rpc.state is State.OPEN:
                    rpc.max_frame = DEFAULT_MAX_FRAME
                rpc.receive_data(data)
                while True:
                    event = rpc.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        return
                    if isinstance(event, Request):
                        task = tg.create_task(_answer(agent, caller, rpc, event, send, notify))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    # Clients send no notifications and no responses; the Connection refuses
                    # responses, and notifications are ignored.
        finally:
            # The peer is gone or broke the protocol: nobody is left to answer.
            for task in tasks:
                task.cancel()


async def _answer(
    agent: Agent,
    caller: Caller,
    rpc: Connection,
    request: Request,
    send: Callable[[bytes], Any],
    notify: Any,
) -> None:
    result: Any = None
    error: LaunchError | None = None
    try:
        params = messages.parse(request.method, request.params)
        result = await HANDLERS[request.method](agent, caller, params, notify)
    except LaunchError as exc:
        error = exc
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("%s failed", request.method)
        error = InternalError(
            f"{request.method} failed on the agent: {exc}", traceback.format_exc()
        )
    with contextlib.suppress(ConnectionError):
        await send(rpc.send_response(request.id, result, error))

"""The connection holder: a per-user background process that keeps SSH connections to the
nodes open between `launch` commands, as OpenSSH's ControlPersist does.

A command connects to the holder's Unix socket and sends one frame naming a node; the holder
opens (or reuses) the SSH connection, opens a stream to that node's agent, answers with one
frame, and from then on splices the two byte for byte. The command speaks the agent protocol
end to end through it, pays no SSH handshake after the first command, and never imports
asyncssh. The holder leaves by itself after `idle_s` seconds with no stream open.

Frames are the protocol's own: a 4-byte big-endian length, then msgpack.
    request  {"op": "open", "target": {...SshTarget fields}}  -> {"ok": true, "address", "via"}
    request  {"op": "ping"}                                    -> {"ok": true, "pid"}
    failure  {"ok": false, "error": [code, message, detail]}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from agent.protocol import errors
from agent.protocol.errors import LaunchError, NodeUnreachable
from agent.protocol.rpc import HEADER
from launcher import pidfile

IDLE_S = float(os.environ.get("LAUNCH_HOLDER_IDLE", "600"))
MAX_HEADER_FRAME = 64 * 1024
COPY_SIZE = 256 * 1024

log = logging.getLogger("launch-holder")


async def read_frame(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(HEADER.size)
    (length,) = HEADER.unpack(header)
    if length > MAX_HEADER_FRAME:
        raise ValueError(f"holder frame of {length} bytes is too large")
    return msgpack.unpackb(await reader.readexactly(length), raw=False)


def frame(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return HEADER.pack(len(body)) + body


async def splice(a_reader: Any, a_writer: Any, b_reader: Any, b_writer: Any) -> None:
    """Copy both ways until both directions reached end of stream (or one side broke)."""

    async def copy(reader: Any, writer: Any) -> None:
        try:
            while data := await reader.read(COPY_SIZE):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(copy(a_reader, b_writer))
            tg.create_task(copy(b_reader, a_writer))
    finally:
        for writer in (a_writer, b_writer):
            writer.close()


class Holder:
    def __init__(self, path: Path, idle_s: float = IDLE_S) -> None:
        from launcher.transport import SshPool

        self.path = path
        self.idle_s = idle_s
        self.pool = SshPool()
        self.streams: set[asyncio.Task[None]] = set()
        self.last_active = time.monotonic()
        self.wake = asyncio.Event()
        self.stopping = False

    async def run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(64)
        listener.setblocking(False)
        pidfile.publish(_pid_path(self.path))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            async with asyncio.TaskGroup() as tg:
                accepting = tg.create_task(self._accept(listener, tg))
                await self._wait_idle()
                accepting.cancel()
                for task in self.streams:
                    task.cancel()
        finally:
            listener.close()
            for path in (self.path, _pid_path(self.path)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            await self.pool.close()

    def _stop(self) -> None:
        self.stopping = True
        self.wake.set()

    async def _wait_idle(self) -> None:
        """Return on SIGTERM, or once no stream has been open for idle_s seconds."""
        while not self.stopping:
            idle_for = time.monotonic() - self.last_active
            if not self.streams and idle_for >= self.idle_s:
                return
            self.wake.clear()
            timeout = self.idle_s - idle_for if not self.streams else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _accept(self, listener: socket.socket, tg: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = tg.create_task(self._serve(conn))
            self.streams.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.streams.discard(task)
        self.last_active = time.monotonic()
        self.wake.set()

    async def _serve(self, conn: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        try:
            request = await read_frame(reader)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "ping":
                writer.write(frame({"ok": True, "pid": os.getpid()}))
                await writer.drain()
                return
            if op != "open":
                raise ValueError(f"unknown holder request {op!r}")
            from launcher.transport import SshTarget

            target = SshTarget.from_dict(request["target"])
            try:
                stream = await self.pool.open_agent(target)
            except LaunchError as exc:
                writer.write(frame({"ok": False, "error": errors.to_wire(exc)}))
                await writer.drain()
                return
            writer.write(frame({"ok": True, "address": stream.address, "via": stream.via}))
            await writer.drain()
            await splice(reader, writer, stream.reader, stream.writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
            log.info("holder request failed: %s", exc)
        finally:
            writer.close()


def _pid_path(sock: Path) -> Path:
    return sock.with_suffix(".pid")


# ------------------------------------------------------------------ used by the CLI side


async def open_via_holder(sock: Path, target: dict[str, Any], node: str) -> tuple[Any, Any, str]:
    """A stream to a node's agent through the holder, started if it is not running."""
    for attempt in range(2):
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if attempt:
                raise NodeUnreachable(node, "the connection holder did not start") from None
            await asyncio.to_thread(start_holder, sock)
    writer.write(frame({"op": "open", "target": target}))
    await writer.drain()
    try:
        reply = await read_frame(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        writer.close()
        raise NodeUnreachable(node, f"the connection holder hung up ({exc})") from None
    if not reply.get("ok"):
        writer.close()
        raise errors.from_wire(reply.get("error"))
    return reader, writer, str(reply.get("address", ""))


def start_holder(sock: Path, timeout: float = 10.0) -> None:
    """Start the holder in the background (its own session) and wait until it answers.

    Every node of a command (and every command running at once) finds the holder missing at
    the same moment; under a lock file only the first starts one and the others wait for it.
    Without the lock each started its own, the last took the socket and the pid file, and the
    others were left running where nothing could find or stop them.
    """
    import fcntl

    def answers() -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(sock))
            return True
        return False

    log_path = sock.with_suffix(".log")
    with open(sock.with_suffix(".lock"), "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if answers():
            return
        with open(log_path, "ab") as out:
            subprocess.Popen(
                [sys.executable, "-m", "launcher.holder", str(sock)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers():
                return
            time.sleep(0.02)
    raise NodeUnreachable("holder", f"did not start within {timeout:.0f} s; see {log_path}")


def stop_holder(sock: Path) -> bool:
    """Stop the holder by the pid it published (checked against its start time)."""
    return pidfile.stop(_pid_path(sock))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="launch-holder: %(message)s")
    asyncio.run(Holder(Path(sys.argv[1])).run())


if __name__ == "__main__":
    main()

"""AgentClient: one protocol connection to one agent, over any asyncio stream (a local Unix
socket, an SSH channel, the connection holder's spliced stream). It drives the same sans-I/O
rpc.Connection the agent uses; this module adds only reading, writing and waiting.

`open_client(...)` is an async context manager: its reader task lives in a TaskGroup that the
context awaits, so no task outlives the connection. Errors: a LaunchError raised by the agent
arrives as that same class; a broken stream becomes NodeUnreachable naming the node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent.protocol.errors import LaunchError, NodeUnreachable, ProtocolError
from agent.protocol.rpc import (
    CLOSED,
    NEED_DATA,
    Connection,
    Notification,
    Packed,
    Response,
    Role,
)
from launcher.scope import background_tasks

READ_SIZE = 256 * 1024
DEFAULT_TIMEOUT = 60.0
# Methods that may rightly take long (None: as long as the job runs).
TIMEOUTS: dict[str, float | None] = {
    "logs": None,
    "cancel": None,
    "prepare": 900.0,
    "put_blobs": 900.0,
    "put_manifest": 300.0,
}
Listener = Callable[[Any], None]


class AgentClient:
    def __init__(
        self, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.node = node
        self._reader = reader
        self._writer = writer
        self._rpc = Connection(Role.CLIENT)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._listeners: dict[tuple[str, str], Listener] = {}
        self._broken: LaunchError | None = None
        self.hello: dict[str, Any] = {}

    @property
    def version(self) -> int:
        """The protocol version agreed with the agent by hello."""
        return self._rpc.peer_version or 1

    async def call(
        self,
        method: str,
        params: dict[str, Any] | Packed | None = None,
        timeout: float | None = -1.0,
    ) -> Any:
        """Send one request and wait for its result; raises what the agent raised.

        A node that does not answer within `timeout` seconds (default: by method) is
        NodeUnreachable, so one hung node never hangs a command.
        """
        if timeout is not None and timeout < 0:
            timeout = TIMEOUTS.get(method, DEFAULT_TIMEOUT)
        if self._broken is not None:
            raise self._broken
        rid, parts = self._rpc.send_request_parts(method, params or {})
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            for part in parts:
                # As a view: what the socket does not take at once is then buffered by one
                # copy, not sliced into a new bytes object first (megabytes, per node).
                self._writer.write(memoryview(part))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._waiting.pop(rid, None)
            raise self._break(f"{method}: {exc}") from None
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._waiting.pop(rid, None)
            raise NodeUnreachable(
                self.node, f"no answer to {method} within {timeout:.0f} s"
            ) from None

    @contextlib.contextmanager
    def listen(self, method: str, key: str, listener: Listener) -> Any:
        """Route notifications `method` whose params carry job == key to listener."""
        self._listeners[(method, key)] = listener
        try:
            yield
        finally:
            self._listeners.pop((method, key), None)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                self._rpc.receive_data(data)
                while (event := self._rpc.next_event()) is not NEED_DATA:
                    if event is CLOSED:
                        raise ConnectionError("the agent closed the connection")
                    self._dispatch(event)
        except (ConnectionError, OSError, ProtocolError) as exc:
            self._break(str(exc) or type(exc).__name__)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Response):
            future = self._waiting.pop(event.id, None)
            if future is not None and not future.done():
                if event.error is not None:
                    event.error.node = self.node  # every refusal says which node made it
                    future.set_exception(event.error)
                else:
                    future.set_result(event.result)
        elif isinstance(event, Notification):
            key = event.params.get("job", "") if isinstance(event.params, dict) else ""
            listener = self._listeners.get((event.method, key))
            if listener is not None:
                listener(event.params)

    def _break(self, reason: str) -> LaunchError:
        if self._broken is None:
            self._broken = NodeUnreachable(self.node, reason)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self._broken)
        self._waiting.clear()
        return self._broken


@contextlib.asynccontextmanager
async def open_client(
    node: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client_name: str = "launch",
) -> AsyncIterator[AgentClient]:
    """Say hello over an open stream and yield the client; close everything on exit."""
    client = AgentClient(node, reader, writer)
    try:
        async with background_tasks() as scope:
            scope.spawn(client._read_loop())
            client.hello = await client.call("hello", client._rpc.hello_params(client_name))
            yield client
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def open_unix_client(
    node: str, path: Path, timeout: float = 10.0
) -> AsyncIterator[AgentClient]:
    """A client on an agent's Unix socket on this machine."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=READ_SIZE), timeout
        )
    except (OSError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or "timed out"
        raise NodeUnreachable(node, f"cannot connect to {path}: {reason}") from None
    async with open_client(node, reader, writer) as client:
        yield client

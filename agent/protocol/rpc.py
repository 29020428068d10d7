"""The msgpack-RPC connection, sans I/O (in the manner of h11): bytes in, events out; events
in, bytes out. Both the launcher's client and the agent's server drive this same class; no
socket or event loop appears here.

Wire: each message is a frame, a 4-byte big-endian length then one msgpack value:
`[0, id, method, params]` request, `[1, id, error, result]` response, `[2, method, params]`
notification. The length prefix lets the receiver refuse an oversized frame before buffering
it, so memory stays bounded whatever the peer announces. The first request on a connection
is `hello`; nothing else is accepted before its successful response.

After a LocalProtocolError or RemoteProtocolError the connection is dead: every further call
raises, and the owner should close the transport.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from agent.protocol import errors
from agent.protocol.errors import LaunchError, LocalProtocolError, RemoteProtocolError

# The protocol's version, agreed by hello (re-exported by messages.py, its home in DESIGN.md).
# 2: put_blobs may carry its blobs compressed (`zipped`).
PROTOCOL_VERSION = 2
# Oldest peer version this side still understands; hello fails below it.
MIN_PROTOCOL_VERSION = 1
REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
HEADER = struct.Struct(">I")
# Large enough for one 50 MiB file (the freeze limit) with room; a batch of blobs is split.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
MAX_ID = 2**32 - 1


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    GREETING = "greeting"  # before hello has succeeded
    OPEN = "open"
    CLOSED = "closed"  # the peer closed cleanly
    ERROR = "error"  # a protocol error happened; the connection is dead


class Packed(bytes):
    """Request params already msgpack-encoded (`pack_params`): the same large params sent to
    many peers (a batch of blobs for eight nodes) are encoded once, not once per peer."""


def pack_params(params: Any) -> Packed:
    return Packed(msgpack.packb(params, use_bin_type=True))


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: Any


@dataclass(frozen=True)
class Response:
    id: int
    error: LaunchError | None
    result: Any


@dataclass(frozen=True)
class Notification:
    method: str
    params: Any


class _Sentinel(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED
Event = Request | Response | Notification | _Sentinel


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack ext type {code} is not allowed")


class Connection:
    """One side of one RPC connection. Not thread-safe; one owner drives it."""

    def __init__(self, role: Role, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.role = role
        self.max_frame = max_frame
        self.state = State.GREETING
        self.peer_version: int | None = None
        self._buffer = bytearray()
        self._eof = False
        self._next_id = 1
        self._pending: dict[int, str] = {}  # ids we sent (client) or received (server)
        self._hello_id: int | None = None

    # ------------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the transport; b"" means the peer closed its side."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is dead after a protocol error")
        if not data:
            self._eof = True
            return
        if self._eof:
            self._local_error("data received after end of stream")
        self._buffer += data
        # Refuse an oversized frame as soon as its header arrives, before buffering it.
        if len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame:
                self._fail(f"frame of {length} bytes exceeds the limit of {self.max_frame}")

    def next_event(self) -> Event:
        """The next complete event, NEED_DATA, or CLOSED once the peer ended the stream."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is dead after a protocol error")
        if len(self._buffer) < HEADER.size:
            return self._end_or_wait()
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.max_frame:
            self._fail(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        if len(self._buffer) < HEADER.size + length:
            return self._end_or_wait()
        # Decoded in place, through a view released before the buffer shrinks: a 16 MiB
        # frame of blobs is not copied twice before msgpack copies out what it holds.
        with (
            memoryview(self._buffer) as whole,
            whole[HEADER.size : HEADER.size + length] as body,
        ):
            try:
                message = msgpack.unpackb(
                    body,
                    raw=False,
                    use_list=True,
                    strict_map_key=True,
                    ext_hook=_refuse_ext,
                    # Ext type -1 (timestamp) bypasses ext_hook; as a float it is a value the
                    # peer could have sent anyway, and events hold only plain msgpack types.
                    timestamp=1,
                )
            except RemoteProtocolError as exc:
                problem = str(exc)
            except Exception as exc:  # msgpack raises several unrelated types for bad input
                problem = f"undecodable frame: {type(exc).__name__}: {exc}"
            else:
                problem = ""
        del self._buffer[: HEADER.size + length]
        if problem:
            self._fail(problem)
        return self._event_from(message)

    def _end_or_wait(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._buffer:
            self._fail("stream ended inside a frame")
        self.state = State.CLOSED
        return CLOSED

    def _event_from(self, message: Any) -> Event:
        if not isinstance(message, list) or not message:
            self._fail("a message must be a non-empty array")
        kind = message[0]
        if not isinstance(kind, int) or isinstance(kind, bool):
            self._fail("message type is not an integer")
        if kind == REQUEST and len(message) == 4:
            _, rid, method, params = message
            if not _valid_id(rid) or not isinstance(method, str):
                self._fail("malformed request")
            return self._on_request(Request(rid, method, params))
        if kind == RESPONSE and len(message) == 4:
            _, rid, error, result = message
            if not _valid_id(rid):
                self._fail("malformed response id")
            return self._on_response(rid, error, result)
        if kind == NOTIFICATION and len(message) == 3:
            _, method, params = message
            if not isinstance(method, str):
                self._fail("malformed notification")
            if self.state is not State.OPEN:
                self._fail("notification before hello")
            return Notification(method, params)
        self._fail(f"unknown message type {kind} or arity {len(message)}")

    def _on_request(self, request: Request) -> Request:
        if self.role is not Role.SERVER:
            self._fail("a client does not accept requests")
        if request.id in self._pending:
            self._fail(f"request id {request.id} is already in use")
        if self.state is State.GREETING:
            if request.method != "hello" or self._hello_id is not None:
                self._fail(f"first request must be hello, got {request.method!r}")
            self._hello_id = request.id
            version = request.params.get("version") if isinstance(request.params, dict) else None
            valid = isinstance(version, int) and not isinstance(version, bool)
            self.peer_version = version if valid else None
        self._pending[request.id] = request.method
        return request

    def _on_response(self, rid: int, error: Any, result: Any) -> Response:
        if self.role is not Role.CLIENT:
            self._fail("a server does not accept responses")
        if self._pending.pop(rid, None) is None:
            self._fail(f"response to unknown request id {rid}")
        exc = None if error is None else errors.from_wire(error)
        if rid == self._hello_id:
            self._hello_id = None
            if exc is None:
                version = result.get("version") if isinstance(result, dict) else None
                if not isinstance(version, int) or isinstance(version, bool):
                    self._fail("hello response carries no version")
                self.peer_version = version
                self.state = State.OPEN
        return Response(rid, exc, result)

    # -------------------------------------------------------------------------- sending

    def send_request(self, method: str, params: Any) -> tuple[int, bytes]:
        """Bytes of a new request and the id its response will carry."""
        rid, parts = self.send_request_parts(method, params)
        return rid, b"".join(parts)

    def send_request_parts(self, method: str, params: Any) -> tuple[int, tuple[bytes, ...]]:
        """send_request, its bytes in pieces to be sent one after the other: Packed params
        stay the buffer they are, not copied into one frame per peer (a batch of blobs is
        megabytes, sent to eight nodes)."""
        self._check_sendable()
        if self.role is not Role.CLIENT:
            self._local_error("a server does not send requests")
        if self.state is State.GREETING and (method != "hello" or self._hello_id is not None):
            self._local_error(f"first request must be hello, not {method!r}")
        rid = self._next_id
        self._next_id = 1 if rid >= MAX_ID else rid + 1
        if method == "hello":
            self._hello_id = rid
        self._pending[rid] = method
        if isinstance(params, Packed):
            # A msgpack array is its header and its items, one after the other: the request
            # is [REQUEST, rid, method] with one more item, the encoded params, appended.
            head = b"\x94" + self._encode([REQUEST, rid, method])[1:]
            return rid, (self._header(len(head) + len(params)) + head, params)
        return rid, (self._frame([REQUEST, rid, method, params]),)

    def send_response(
        self, rid: int, result: Any = None, error: LaunchError | None = None
    ) -> bytes:
        self._check_sendable()
        if self.role is not Role.SERVER:
            self._local_error("a client does not send responses")
        if self._pending.pop(rid, None) is None:
            self._local_error(f"no pending request with id {rid}")
        if rid == self._hello_id:
            self._hello_id = None
            if error is None:
                self.state = State.OPEN
        wire_error = None if error is None else errors.to_wire(error)
        return self._frame([RESPONSE, rid, wire_error, None if error else result])

    def send_notification(self, method: str, params: Any) -> bytes:
        self._check_sendable()
        if self.state is not State.OPEN:
            self._local_error("no notification before hello")
        return self._frame([NOTIFICATION, method, params])

    def hello_params(self, client: str = "") -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "client": client}

    def _check_sendable(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is dead after a protocol error")

    def _frame(self, message: list[Any]) -> bytes:
        data = self._encode(message)
        return self._header(len(data)) + data

    def _encode(self, message: list[Any]) -> bytes:
        try:
            return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
        except Exception as exc:
            self._local_error(f"cannot encode message: {exc}")

    def _header(self, size: int) -> bytes:
        if size > self.max_frame:
            self._local_error(f"message of {size} bytes exceeds {self.max_frame}")
        return HEADER.pack(size)

    def _local_error(self, reason: str) -> NoReturn:
        # Our side broke the protocol: the connection is dead, as after a remote error.
        self.state = State.ERROR
        self._buffer.clear()
        raise LocalProtocolError(reason) from None

    def _fail(self, reason: str) -> NoReturn:
        self.state = State.ERROR
        self._buffer.clear()
        raise RemoteProtocolError(reason)

    @property
    def pending(self) -> int:
        return len(self._pending)


def negotiate(their_version: object) -> int:
    """The version to speak with a peer that announced `their_version`, or VersionMismatch."""
    if not isinstance(their_version, int) or isinstance(their_version, bool):
        raise errors.VersionMismatch(PROTOCOL_VERSION, their_version)
    if their_version < MIN_PROTOCOL_VERSION:
        raise errors.VersionMismatch(PROTOCOL_VERSION, their_version)
    return min(their_version, PROTOCOL_VERSION)


def _valid_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID

"""The sans-I/O RPC connection: two Connections joined by a fake link (as h11's
ConnectionPair), byte-at-a-time feeding, the protocol rules, the size cap, negotiate(), and a
fuzzed decoder that may only ever yield valid events or RemoteProtocolError."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol.errors import (
    InvalidParams,
    LaunchError,
    LocalProtocolError,
    RemoteProtocolError,
    StaleRevision,
    VersionMismatch,
)
from agent.protocol.messages import PROTOCOL_VERSION, parse
from agent.protocol.rpc import (
    CLOSED,
    HEADER,
    MAX_ID,
    NEED_DATA,
    Connection,
    Event,
    Notification,
    Request,
    Response,
    Role,
    State,
    negotiate,
    pack_params,
)

Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def pack(message: object) -> bytes:
    return frame(msgpack.packb(message, use_bin_type=True))


def drain(conn: Connection, data: bytes, chunker: Chunker = whole) -> list[Event]:
    """Feed data as the transport would, collecting every event up to NEED_DATA or CLOSED."""
    events: list[Event] = []
    for chunk in chunker(data):
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if event is CLOSED:
                return events
    return events


class ConnectionPair:
    """A client and a server joined by a fake link that carries bytes both ways."""

    def __init__(self, chunker: Chunker = whole, max_frame: int = 1 << 20) -> None:
        self.client = Connection(Role.CLIENT, max_frame=max_frame)
        self.server = Connection(Role.SERVER, max_frame=max_frame)
        self.chunker = chunker
        self.wire: list[tuple[str, bytes]] = []  # every byte sent, in order, for replays

    def other(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def deliver(self, sender: Connection, data: bytes) -> list[Event]:
        self.wire.append((sender.role.value, data))
        return drain(self.other(sender), data, self.chunker)

    def request(self, method: str, params: Any) -> tuple[int, list[Event]]:
        rid, data = self.client.send_request(method, params)
        return rid, self.deliver(self.client, data)

    def respond(
        self, rid: int, result: Any = None, error: LaunchError | None = None
    ) -> list[Event]:
        return self.deliver(self.server, self.server.send_response(rid, result, error))

    def hello(self) -> None:
        rid, events = self.request("hello", self.client.hello_params("tests"))
        assert events == [Request(rid, "hello", {"version": PROTOCOL_VERSION, "client": "tests"})]
        assert self.server.peer_version == PROTOCOL_VERSION
        assert self.server.state is State.GREETING
        version = negotiate(events[0].params["version"])  # type: ignore[union-attr]
        result = {"version": version, "agent": "0.1.0", "node": "n1", "uid": 1000}
        assert self.respond(rid, result) == [Response(rid, None, result)]
        assert (self.client.state, self.server.state) == (State.OPEN, State.OPEN)
        assert self.client.peer_version == version


def exchange(chunker: Chunker) -> list[object]:
    """A whole conversation; returns everything each side saw, in order."""
    pair = ConnectionPair(chunker)
    pair.hello()
    seen: list[object] = []

    rid, events = pair.request("status", {"job": "j-1"})
    assert events == [Request(rid, "status", {"job": "j-1"})]
    seen += events
    events = pair.respond(rid, {"job": "j-1", "state": "running", "revision": 3})
    assert events == [Response(rid, None, {"job": "j-1", "state": "running", "revision": 3})]
    seen += events

    rid, events = pair.request("patch", {"job": "j-1", "base": 3})
    seen += events
    events = pair.respond(rid, error=StaleRevision(3, 4))
    assert len(events) == 1
    response = events[0]
    assert isinstance(response, Response)
    assert response.id == rid and response.result is None
    assert type(response.error) is StaleRevision
    assert (response.error.expected, response.error.actual) == (3, 4)
    assert "based on r3 but the head is r4" in str(response.error)
    seen.append((response.id, type(response.error), response.error.detail))

    # Log streaming: server -> client, and the other way.
    log = {"job": "j-1", "offset": 0, "data": b"step 1\n\x00\xff"}
    assert pair.deliver(pair.server, pair.server.send_notification("log", log)) == [
        Notification("log", log)
    ]
    assert pair.deliver(pair.client, pair.client.send_notification("ping", [])) == [
        Notification("ping", [])
    ]
    seen += [Notification("log", log), Notification("ping", [])]

    # Several requests in flight, answered out of order.
    ids = []
    for n in range(3):
        rid, events = pair.request("cat", {"id": f"{n:064x}"})
        assert events == [Request(rid, "cat", {"id": f"{n:064x}"})]
        ids.append(rid)
    assert len(set(ids)) == 3
    assert pair.client.pending == pair.server.pending == 3
    for rid in (ids[2], ids[0], ids[1]):
        events = pair.respond(rid, {"data": bytes([rid]) * 3})
        assert events == [Response(rid, None, {"data": bytes([rid]) * 3})]
        seen += events
    assert pair.client.pending == pair.server.pending == 0

    # Clean close from the client.
    assert drain(pair.server, b"") == [CLOSED]
    assert pair.server.state is State.CLOSED
    assert pair.server.next_event() is CLOSED
    return seen


# -------------------------------------------------------------------------- exchanges


def test_full_exchange() -> None:
    seen = exchange(whole)
    assert len(seen) == 9


def test_byte_at_a_time_gives_the_same_events() -> None:
    assert exchange(byte_at_a_time) == exchange(whole)


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), min_size=1))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    def chunker(data: bytes) -> list[bytes]:
        out, i, n = [], 0, 0
        while i < len(data):
            out.append(data[i : i + cuts[n % len(cuts)]])
            i += cuts[n % len(cuts)]
            n += 1
        return out

    assert exchange(chunker) == exchange(whole)


def test_many_frames_in_one_chunk() -> None:
    pair = ConnectionPair()
    pair.hello()
    data = b"".join(pair.client.send_request("status", {"job": str(n)})[1] for n in range(5))
    events = drain(pair.server, data)
    assert [e.params for e in events] == [{"job": str(n)} for n in range(5)]  # type: ignore[union-attr]


def test_params_encoded_once_make_the_same_request() -> None:
    """Params packed once for many peers (a batch of blobs for eight nodes) give the same
    bytes on the wire as the plain form, under each connection's own id; the size cap holds."""
    params = {"blobs": [["a" * 64, b"\x00\xff" * 300], ["b" * 64, b""]]}
    packed = pack_params(params)
    for calls in (0, 200, 70000):  # ids that encode as fixint, uint8 and uint32
        packed_pair, plain_pair = ConnectionPair(), ConnectionPair()
        for pair in (packed_pair, plain_pair):
            pair.hello()
            pair.client._next_id += calls
        rid, data = packed_pair.client.send_request("put_blobs", packed)
        assert (rid, data) == plain_pair.client.send_request("put_blobs", params)
        assert drain(packed_pair.server, data) == [Request(rid, "put_blobs", params)]
    small = ConnectionPair(max_frame=len(packed))
    small.hello()
    with pytest.raises(LocalProtocolError, match="exceeds"):
        small.client.send_request("put_blobs", packed)


def test_hello_refused_then_retried() -> None:
    pair = ConnectionPair()
    rid, _ = pair.request("hello", {"version": 0})
    with pytest.raises(VersionMismatch) as info:
        negotiate(pair.server.peer_version)
    events = pair.respond(rid, error=info.value)
    assert len(events) == 1 and isinstance(events[0], Response)
    error = events[0].error
    assert type(error) is VersionMismatch
    assert (error.ours, error.theirs) == (PROTOCOL_VERSION, 0)
    assert pair.client.state is State.GREETING and pair.server.state is State.GREETING
    pair.hello()


def test_request_ids_are_reusable_once_answered() -> None:
    pair = ConnectionPair()
    pair.hello()
    assert drain(pair.server, pack([0, 7, "status", {}])) == [Request(7, "status", {})]
    pair.server.send_response(7, {})
    assert drain(pair.server, pack([0, 7, "status", {}])) == [Request(7, "status", {})]


# ------------------------------------------------------------------------------ rules


def test_first_request_must_be_hello_on_the_client() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="hello"):
        client.send_request("status", {"job": "j-1"})
    assert client.state is State.ERROR


def test_first_request_must_be_hello_on_the_server() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="hello"):
        drain(server, pack([0, 1, "status", {"job": "j-1"}]))
    assert server.state is State.ERROR


def test_no_second_request_while_hello_is_pending() -> None:
    server = Connection(Role.SERVER)
    data = pack([0, 1, "hello", {"version": 1}]) + pack([0, 2, "hello", {"version": 1}])
    with pytest.raises(RemoteProtocolError):
        drain(server, data)
    client = Connection(Role.CLIENT)
    client.send_request("hello", client.hello_params())
    with pytest.raises(LocalProtocolError):
        client.send_request("hello", client.hello_params())


def test_response_to_unknown_id() -> None:
    pair = ConnectionPair()
    pair.hello()
    pair.client.send_request("status", {"job": "j"})
    with pytest.raises(RemoteProtocolError, match="unknown request id 99"):
        drain(pair.client, pack([1, 99, None, {}]))


def test_response_before_any_request() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(RemoteProtocolError):
        drain(client, pack([1, 1, None, {"version": 1}]))


def test_duplicate_request_id() -> None:
    pair = ConnectionPair()
    pair.hello()
    assert drain(pair.server, pack([0, 5, "status", {"job": "a"}])) == [
        Request(5, "status", {"job": "a"})
    ]
    with pytest.raises(RemoteProtocolError, match="already in use"):
        drain(pair.server, pack([0, 5, "status", {"job": "b"}]))


def test_notification_before_hello() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="before hello"):
        drain(server, pack([2, "log", {}]))
    client = Connection(Role.CLIENT)
    client.send_request("hello", client.hello_params())
    with pytest.raises(RemoteProtocolError, match="before hello"):
        drain(client, pack([2, "log", {}]))
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send_notification("log", {})
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_notification("log", {})


def test_roles() -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(RemoteProtocolError, match="client does not accept requests"):
        drain(pair.client, pack([0, 9, "status", {}]))
    with pytest.raises(RemoteProtocolError, match="server does not accept responses"):
        drain(pair.server, pack([1, 1, None, None]))
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(LocalProtocolError):
        pair.server.send_request("status", {})
    pair = ConnectionPair()
    pair.hello()
    rid, _ = pair.client.send_request("status", {})
    with pytest.raises(LocalProtocolError):
        pair.client.send_response(rid, {})


def test_response_to_unsent_id_on_the_server() -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(LocalProtocolError, match="no pending request"):
        pair.server.send_response(42, {})


def test_hello_response_without_version() -> None:
    for result in ({}, None, {"version": "1"}, {"version": True}):
        client = Connection(Role.CLIENT)
        rid, _ = client.send_request("hello", client.hello_params())
        with pytest.raises(RemoteProtocolError, match="no version"):
            drain(client, pack([1, rid, None, result]))


def test_data_after_eof() -> None:
    server = Connection(Role.SERVER)
    assert drain(server, b"") == [CLOSED]
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        server.receive_data(b"x")


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 10])
def test_eof_inside_a_frame(cut: int) -> None:
    data = pack([0, 1, "hello", {"version": 1}])
    server = Connection(Role.SERVER)
    assert drain(server, data[:cut]) == []
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        server.next_event()


def test_eof_after_a_frame_still_yields_it() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(pack([0, 1, "hello", {"version": 1}]))
    server.receive_data(b"")
    assert server.next_event() == Request(1, "hello", {"version": 1})
    assert server.next_event() is CLOSED


def remote_error(conn: Connection) -> None:
    with pytest.raises(RemoteProtocolError):
        drain(conn, frame(b"\xc1"))


def local_error(conn: Connection) -> None:
    with pytest.raises(LocalProtocolError):
        conn.send_notification("x", object())


@pytest.mark.parametrize("cause", [remote_error, local_error])
@pytest.mark.parametrize("role", list(Role))
def test_every_call_raises_after_an_error(cause: Callable[[Connection], None], role: Role) -> None:
    pair = ConnectionPair()
    pair.hello()
    conn = pair.client if role is Role.CLIENT else pair.server
    if role is Role.SERVER:
        drain(conn, pack([0, 77, "status", {}]))  # so send_response has a pending id
    cause(conn)
    assert conn.state is State.ERROR
    calls: list[Callable[[], object]] = [
        lambda: conn.receive_data(pack([2, "log", {}])),
        lambda: conn.receive_data(b""),
        conn.next_event,
        lambda: conn.send_request("status", {}),
        lambda: conn.send_response(77, {}),
        lambda: conn.send_notification("log", {}),
    ]
    for call in calls:
        with pytest.raises(LocalProtocolError, match="dead"):
            call()


@pytest.mark.parametrize(
    "message",
    [
        [0, -1, "status", {}],
        [0, MAX_ID + 1, "status", {}],
        [0, True, "status", {}],
        [0, 1.0, "status", {}],
        [0, 1, b"status", {}],
        [0, 1, None, {}],
        [0, 1, "status"],
        [0, 1, "status", {}, None],
        [True, 1, "status", {}],  # True == 1 in Python, but it is not a message type
        [False, 1, "status", {}],
        [0.0, 1, "status", {}],
        [3, 1, "status", {}],
        [-1],
        [],
        {"type": 0},
        "request",
        None,
    ],
)
def test_malformed_messages(message: object) -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(RemoteProtocolError):
        drain(pair.server, pack(message))
    assert pair.server.state is State.ERROR


def test_max_id_is_valid() -> None:
    pair = ConnectionPair()
    pair.hello()
    assert drain(pair.server, pack([0, MAX_ID, "status", {}])) == [Request(MAX_ID, "status", {})]


def test_unencodable_message_is_a_local_error() -> None:
    pair = ConnectionPair()
    pair.hello()
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        pair.client.send_request("status", {"x": {1, 2}})
    assert pair.client.state is State.ERROR


def test_malformed_error_in_a_response() -> None:
    # An error that is not [code, message, detail] arrives as a RemoteProtocolError value.
    pair = ConnectionPair()
    pair.hello()
    rid, _ = pair.client.send_request("status", {})
    events = drain(pair.client, pack([1, rid, "boom", None]))
    assert len(events) == 1 and isinstance(events[0], Response)
    assert type(events[0].error) is RemoteProtocolError


def test_typed_error_with_bad_detail_degrades_to_launch_error() -> None:
    pair = ConnectionPair()
    pair.hello()
    rid, _ = pair.client.send_request("status", {})
    events = drain(pair.client, pack([1, rid, [StaleRevision.code, "stale", ["3", 4]], None]))
    assert isinstance(events[0], Response)
    assert type(events[0].error) is LaunchError
    assert events[0].error.detail == ["3", 4]


def test_ext_types_refused() -> None:
    pair = ConnectionPair()
    pair.hello()
    body = msgpack.packb([0, 1, "status", {"job": msgpack.ExtType(1, b"x")}])
    with pytest.raises(RemoteProtocolError, match="ext type 1"):
        drain(pair.server, frame(body))


def test_timestamp_ext_decodes_as_a_plain_float() -> None:
    pair = ConnectionPair()
    pair.hello()
    body = b"\x94\x00\x02\xa6status\xd6\xff\x00\x00\x00\x02"  # params: Timestamp(2 s)
    assert drain(pair.server, frame(body)) == [Request(2, "status", 2.0)]


# ---------------------------------------------------------------------------- size cap


def test_oversized_header_refused_before_the_body() -> None:
    server = Connection(Role.SERVER, max_frame=1024)
    header = HEADER.pack(1025)
    for byte in byte_at_a_time(header[:3]):
        server.receive_data(byte)
        assert server.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        server.receive_data(header[3:])
        server.next_event()
    assert server.state is State.ERROR


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    body = msgpack.packb([0, 1, "hello", {"version": 1, "client": ""}])
    pad = 1024 - (len(body) - 1 + 3)  # the 1-byte empty fixstr becomes a str16 of `pad` bytes
    body = msgpack.packb([0, 1, "hello", {"version": 1, "client": "x" * pad}])
    assert len(body) == 1024
    server = Connection(Role.SERVER, max_frame=1024)
    assert drain(server, frame(body)) == [Request(1, "hello", {"version": 1, "client": "x" * pad})]
    server = Connection(Role.SERVER, max_frame=1023)
    with pytest.raises(RemoteProtocolError):
        drain(server, frame(body))


def test_oversized_second_frame_in_a_chunk() -> None:
    server = Connection(Role.SERVER, max_frame=1024)
    server.receive_data(pack([0, 1, "hello", {"version": 1}]) + HEADER.pack(2**32 - 1))
    assert server.next_event() == Request(1, "hello", {"version": 1})
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        server.next_event()


def test_oversized_announcement_uses_no_memory() -> None:
    max_frame = 1 << 20
    tracemalloc.start()
    try:
        server = Connection(Role.SERVER, max_frame=max_frame)
        with pytest.raises(RemoteProtocolError):
            server.receive_data(b"\xff\xff\xff\xff")
            server.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_sending_an_oversized_message_is_a_local_error() -> None:
    pair = ConnectionPair(max_frame=1024)
    pair.hello()
    with pytest.raises(LocalProtocolError, match="exceeds"):
        pair.client.send_request("put_blobs", {"blobs": [["0" * 64, b"x" * 1024]]})
    assert pair.client.state is State.ERROR


def test_decoded_size_is_bounded_by_a_constant_factor() -> None:
    """msgpack turns 1 byte into up to ~72 bytes of Python objects (an empty array or map),
    so a frame of max_frame bytes costs at most about that many times max_frame in memory.
    Measured: ~74x for a frame full of empty maps; 80x is the bound kept here. (This is why
    the server reads with a small max_frame until hello has succeeded.)"""
    max_frame = 1 << 18
    n = max_frame - 16
    body = b"\x94\x00\x01\xa5hello\xdd" + struct.pack(">I", n) + b"\x80" * n
    server = Connection(Role.SERVER, max_frame=max_frame)
    data = frame(body)
    tracemalloc.start()
    try:
        server.receive_data(data)
        event = server.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(event, Request)
    assert event.params == [{}] * n
    assert peak < 80 * max_frame


# --------------------------------------------------------------------------- negotiate


def test_negotiate_accepts_our_version() -> None:
    assert negotiate(PROTOCOL_VERSION) == PROTOCOL_VERSION == 2
    assert negotiate(1) == 1  # an agent of protocol 1 is spoken to without compressed blobs
    assert negotiate(PROTOCOL_VERSION + 1) == PROTOCOL_VERSION  # a newer peer speaks ours


@pytest.mark.parametrize("theirs", [0, -1, "1", True, False, None, 1.0, [1]])
def test_negotiate_refuses(theirs: object) -> None:
    with pytest.raises(VersionMismatch) as info:
        negotiate(theirs)
    assert info.value.ours == PROTOCOL_VERSION
    assert info.value.theirs == theirs


# -------------------------------------------------------------------------------- fuzz

FUZZ_MAX_FRAME = 1 << 20
PLAIN = (type(None), bool, int, float, str, bytes)


def assert_plain(value: object) -> None:
    """Only plain msgpack types (no ExtType, no Timestamp) ever reach an event."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            assert all(isinstance(k, str | bytes) for k in item)
            stack.extend(item.values())
        else:
            assert type(item) in PLAIN, type(item)


def assert_valid(event: Event) -> None:
    if isinstance(event, Request):
        assert type(event.id) is int and 0 <= event.id <= MAX_ID
        assert type(event.method) is str
        assert_plain(event.params)
    elif isinstance(event, Response):
        assert type(event.id) is int and 0 <= event.id <= MAX_ID
        assert event.error is None or isinstance(event.error, LaunchError)
        assert_plain(event.result)
    elif isinstance(event, Notification):
        assert type(event.method) is str
        assert_plain(event.params)
    else:
        assert event is CLOSED


def fresh(state: str) -> Connection:
    """A connection in one of the states the fuzz starts from."""
    pair = ConnectionPair(max_frame=FUZZ_MAX_FRAME)
    if state == "server-greeting":
        return pair.server
    if state == "client-hello-sent":
        pair.client.send_request("hello", pair.client.hello_params())
        return pair.client
    pair.hello()
    if state == "server-open":
        drain(pair.server, pack([0, 9, "status", {}]))
        return pair.server
    for _ in range(4):
        pair.client.send_request("status", {})
    return pair.client


def fuzz(conn: Connection, data: bytes, chunker: Chunker = whole) -> list[object]:
    """Feed data then EOF; only events or one RemoteProtocolError may come out. A server
    answers each request at once (so hello opens the connection and ids can be reused)."""
    out: list[object] = []

    def take(event: Event) -> None:
        assert_valid(event)
        out.append(event)
        if isinstance(event, Request):
            conn.send_response(event.id, {"version": 1})

    try:
        for chunk in [*(c for c in chunker(data) if c), b""]:  # b"": the peer closes
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                take(event)
                if event is CLOSED:
                    break
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        out.append("error")
    else:
        assert out[-1] is CLOSED
    return out


STATES = st.sampled_from(["server-greeting", "client-hello-sent", "server-open", "client-open"])

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
EXT = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
        ),
        max_leaves=20,
    )


# Mostly plain values (which must come through), sometimes with ext types (which must not).
VALUES = st.one_of(nested(SCALARS), nested(SCALARS), nested(SCALARS | EXT))
IDS = st.integers(0, 6) | st.sampled_from([-1, MAX_ID, MAX_ID + 1, True, 1.0, None])
METHODS = st.sampled_from(["hello", "status", "log", "cat"]) | st.text(max_size=5) | VALUES
WIRE_ERRORS = st.tuples(
    st.sampled_from([1, 4, 5, 7, 10, 11, 12, 13, 20, 24, 30, 99, 1000, -1]),
    st.text(max_size=5),
    VALUES | st.lists(st.integers(0, 9) | st.text(max_size=3), min_size=2, max_size=2),
).map(list)
PLAIN_VALUES = nested(SCALARS)
HELLO = st.fixed_dictionaries({"version": VALUES})


def array(*items: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.tuples(*items).map(list)


# Messages the protocol allows in some state (so the fuzz gets past the first frame) ...
VALID = st.one_of(
    array(st.just(0), st.integers(1, 6), st.just("hello"), st.just({"version": 1})),
    array(st.just(0), st.integers(0, 6), st.text(max_size=5), PLAIN_VALUES),
    array(st.just(1), st.integers(1, 5), st.none() | WIRE_ERRORS, PLAIN_VALUES),
    array(st.just(1), st.just(1), st.none(), st.just({"version": 1})),
    array(st.just(2), st.text(max_size=5), PLAIN_VALUES),
)
# ... and anything else.
OTHER = st.one_of(
    array(st.just(0), IDS, METHODS, VALUES),
    array(st.just(0), IDS, st.just("hello"), HELLO),
    array(st.just(1), IDS, st.none() | WIRE_ERRORS | VALUES, VALUES),
    array(st.just(1), IDS, st.none(), HELLO),
    array(st.just(2), METHODS, VALUES),
    st.lists(VALUES, max_size=5),
    VALUES,
)
MESSAGES = st.one_of(VALID, VALID, VALID, OTHER)
PREFIXES = st.sampled_from(
    [b"", b"\x92\x03", b"\x94\x00\x01\xa5hello", b"\x94\x00\x08\xa6status", b"\x93\x02\xa3log",
     b"\x94\x01\x01\xc0", b"\x94\x01\x01", b"\x94\x01\x02\x93\x18\xa0"]
)  # fmt: skip
HUGE = st.sampled_from(
    [b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
     b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xda\xff\xff", b"\xdc\xff\xff",
     b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + b"\xff" * 8, b"\xc7\x0c\xff" + bytes(12)]
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn, small: bool) -> bytes:
    kinds = ["message"] * 3 + ["deep", "huge"] * 2 + ["bytes", "truncated"]
    kinds += [] if small else ["big"]
    kind = draw(st.sampled_from(kinds))
    if kind == "message":
        return bytes(msgpack.packb(draw(MESSAGES), use_bin_type=True))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        # Up to 1023 levels decode; Python's repr() recursion limit is near 1000.
        depths = [10, 1000, 1023, 1024] + ([] if small else [100_000])
        depth = draw(st.sampled_from(depths))
        opener = draw(st.sampled_from([b"\x91", b"\x81\xa0", b"\x92\xc0"]))
        prefix, suffix = draw(
            st.sampled_from(
                [
                    (b"", b""),
                    (b"\x92\x03", b""),  # [3, deep]
                    (b"\x94\x01\x01", b"\xc0"),  # a response whose error is deep
                    (b"\x94\x01\x01\xc0", b""),  # a response whose result is deep
                    (b"\x94\x00\x01\xa5hello", b""),
                    (b"\x93\x02\xa3log", b""),
                ]
            )
        )
        return prefix + opener * depth + b"\xc0" + suffix
    if kind == "huge":
        return draw(PREFIXES) + draw(HUGE) + draw(st.binary(max_size=16))
    if kind == "truncated":
        body = bytes(msgpack.packb(draw(MESSAGES), use_bin_type=True))
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    # big: near the cap, one large value or many small ones
    size = draw(st.integers(1, FUZZ_MAX_FRAME - 64))
    filler = draw(st.sampled_from([b"bin", b"nil", b"str"]))
    if filler == b"bin":
        return draw(PREFIXES) + b"\xc6" + struct.pack(">I", size) + bytes(size)
    if filler == b"str":
        return draw(PREFIXES) + b"\xdb" + struct.pack(">I", size) + b"a" * size
    n = size // 8  # many small objects, still well under the cap
    return draw(PREFIXES) + b"\xdd" + struct.pack(">I", n) + b"\xc0" * n


@st.composite
def streams(draw: st.DrawFn, small: bool = False) -> bytes:
    out = b""
    count = draw(st.sampled_from([1, 1, 2, 3, 4]))
    for body in draw(st.lists(bodies(small), min_size=count, max_size=count)):
        how = draw(st.sampled_from(["exact"] * 8 + ["short", "long"]))
        if how == "exact":
            out += frame(body)
        elif how == "short":  # the announced length cuts the body; the rest is the next frame
            out += HEADER.pack(draw(st.integers(0, len(body)))) + body
        else:  # announces more than is sent before EOF
            out += HEADER.pack(len(body) + draw(st.integers(1, 100))) + body
    return out


@settings(max_examples=250, deadline=None)
@given(state=STATES, data=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(state: str, data: bytes) -> None:
    fuzz(fresh(state), data)


def reads(data: bytes) -> list[bytes]:
    # As a transport delivers them: reads of at most 64 KiB.
    return [data[i : i + 65536] for i in range(0, len(data), 65536)]


def test_fuzz_harness_sees_eof() -> None:
    assert fuzz(fresh("server-greeting"), b"") == [CLOSED]
    hello = pack([0, 1, "hello", {"version": 1}])
    assert fuzz(fresh("server-greeting"), hello, byte_at_a_time) == [
        Request(1, "hello", {"version": 1}),
        CLOSED,
    ]
    assert fuzz(fresh("server-greeting"), hello[:-1]) == ["error"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=STATES, data=streams())
def test_fuzz_frames(state: str, data: bytes) -> None:
    conn = fresh(state)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fuzz(conn, data, reads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 10 * FUZZ_MAX_FRAME


def flatten(items: list[object]) -> list[object]:
    """A comparable form of fuzz output: exceptions by type and detail, floats by their bits
    (NaN != NaN), without recursion (values nest up to msgpack's 1024 levels)."""
    out: list[object] = []
    stack: list[object] = list(reversed(items))
    while stack:
        item = stack.pop()
        if isinstance(item, Request):
            out += ["request", item.id, item.method]
            stack.append(item.params)
        elif isinstance(item, Response):
            out += ["response", item.id, type(item.error), str(item.error)]
            stack += [item.result, getattr(item.error, "detail", None)]
        elif isinstance(item, Notification):
            out += ["notification", item.method]
            stack.append(item.params)
        elif isinstance(item, list):
            out.append(("list", len(item)))
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            out.append(("dict", len(item)))
            for key, value in reversed(item.items()):
                stack += [value, key]
        elif isinstance(item, float):
            out.append(("float", struct.pack(">d", item)))
        else:
            out.append((type(item), item))
    return out


@settings(max_examples=60, deadline=None)
@given(state=STATES, data=streams(small=True))
def test_fuzz_byte_at_a_time_agrees(state: str, data: bytes) -> None:
    one = fuzz(fresh(state), data, byte_at_a_time)
    assert flatten(one) == flatten(fuzz(fresh(state), data))


def test_fuzz_known_cases() -> None:
    # Cases that broke earlier versions: nesting deep enough for repr() to recurse, frames
    # that msgpack refuses for reasons of its own, and huge announced lengths. They run here,
    # outside @given, because hypothesis raises the recursion limit while a test runs: under
    # it a 1000-level repr() does not overflow, as it does in the agent.
    for state in ("server-greeting", "server-open", "client-hello-sent", "client-open"):
        for body in (
            b"\x92\x03" + b"\x91" * 1000 + b"\xc0",
            b"\x94\x01\x01" + b"\x91" * 1000 + b"\xc0\xc0",
            b"\x91" * 100_000,
            b"\xdb\xff\xff\xff\xff",
            b"\xdd\xff\xff\xff\xff",
            b"\x94\x00\x01\xa5hello\xdf\xff\xff\xff\xff",
        ):
            out = fuzz(fresh(state), frame(body))
            if state == "client-hello-sent" and body.startswith(b"\x94\x01\x01"):
                # A response to the pending hello whose error is not [code, message, detail].
                (response, _) = out
                assert isinstance(response, Response)
                assert type(response.error) is RemoteProtocolError
            else:
                assert out == ["error"]


def test_known_messages_still_work_at_max_nesting() -> None:
    pair = ConnectionPair()
    pair.hello()
    body = b"\x94\x00\x05\xa6status" + b"\x91" * 1000 + b"\xc0"
    (event,) = drain(pair.server, frame(body))
    assert isinstance(event, Request) and event.id == 5
    with pytest.raises(InvalidParams):
        parse(event.method, event.params)

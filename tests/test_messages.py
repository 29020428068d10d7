"""Messages: parse() of every method, its refusals, and the errors' wire form."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import errors
from agent.protocol.errors import (
    BY_CODE,
    AmbiguousRef,
    Busy,
    ChecksumMismatch,
    InternalError,
    InvalidManifest,
    InvalidParams,
    JobNotFound,
    JobStateError,
    LaunchError,
    LocalProtocolError,
    NodeUnreachable,
    ObjectMissing,
    PathNotFound,
    PermissionDenied,
    ProtocolError,
    RemoteProtocolError,
    StaleRevision,
    UnknownMethod,
    VersionMismatch,
)
from agent.protocol.messages import (
    METHODS,
    PROTOCOL_VERSION,
    Hello,
    Logs,
    Prepare,
    method_of,
    parse,
    to_params,
    unzip_blobs,
    zip_blobs,
)

ID = "ab" * 32

MINIMAL: dict[str, dict[str, Any]] = {
    "hello": {"version": 1},
    "node_info": {},
    "missing": {"blobs": []},
    "put_blobs": {"blobs": [[ID, b"data"]]},
    "put_manifest": {"manifest": b"\x92\x01\x90"},
    "prepare": {"job": "j-1", "bundle": ID, "argv": ["python", "train.py"]},
    "start": {"job": "j-1"},
    "abort": {"job": "j-1"},
    "cancel": {"job": "j-1"},
    "jobs": {},
    "status": {"job": "j-1"},
    "logs": {"job": "j-1"},
    "cat": {"id": "abc123"},
    "revisions": {"job": "j-1"},
    "patch_prepare": {"job": "j-1", "base": 0, "bundle": ID},
    "patch_commit": {"job": "j-1", "revision": 1},
    "patch_abort": {"job": "j-1", "revision": 1},
    "get_blobs": {"blobs": [ID]},
    "metrics": {"job": "j-1"},
    "reserve": {"job": "j-1"},
    "find_artifacts": {},
    "facts": {"job": "j-1"},
}


def wire(value: object) -> Any:
    """Through msgpack and back, as the value would arrive."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


# ---------------------------------------------------------------------------- parse


def test_every_method_has_a_minimal_case() -> None:
    assert set(MINIMAL) == set(METHODS)
    assert PROTOCOL_VERSION == 2


def test_zipped_blobs_round_trip_and_incompressible_data_is_not_zipped() -> None:
    source = [[ID, b"import os\n" * 400], ["b" * 64, b"def f():\n    return 1\n" * 100]]
    zipped = zip_blobs(source)
    assert zipped is not None and len(zipped) < 500
    assert unzip_blobs(zipped, 10_000) == [(i, d) for i, d in source]
    with pytest.raises(InvalidParams, match="inflates past"):
        unzip_blobs(zipped, 1_000)
    assert zip_blobs([[ID, os.urandom(4096)]]) is None  # sent as it is


@pytest.mark.parametrize("method", sorted(MINIMAL))
def test_parse_minimal(method: str) -> None:
    params = wire(MINIMAL[method])
    message = parse(method, params)
    assert type(message) is METHODS[method]
    assert dataclasses.is_dataclass(message)
    for key, value in MINIMAL[method].items():
        assert getattr(message, key) == value
    assert method_of(message) == method
    assert parse(method, wire(to_params(message))) == message
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(message, "x", 1)  # noqa: B010


def test_parse_applies_defaults() -> None:
    p = parse("prepare", MINIMAL["prepare"])
    assert (p.env, p.rank, p.nnodes, p.peers, p.name, p.author, p.message) == (
        {},
        0,
        1,
        [],
        "",
        "",
        "",
    )
    assert p.source == [None, None, None]
    assert parse("hello", {"version": 1}) == Hello(1, "")
    assert parse("logs", {"job": "j"}) == Logs("j", 0, False)
    assert parse("start", {"job": "j"}).master_port == 29500
    assert parse("cancel", {"job": "j"}).grace_s == 10


def test_parse_every_field() -> None:
    params: dict[str, Any] = {
        "job": "j-1",
        "bundle": ID,
        "argv": ["torchrun", "train.py"],
        "env": {"A": "1", "B": ""},
        "rank": 2,
        "nnodes": 4,
        "peers": ["n1", "n2"],
        "name": "exp",
        "author": "alice",
        "message": "first",
        "source": ["abc", "main", True],
    }
    assert parse("prepare", wire(params)) == Prepare(**params)
    assert parse("logs", {"job": "j", "offset": 2**40, "follow": True}) == Logs("j", 2**40, True)


def test_unknown_method() -> None:
    with pytest.raises(UnknownMethod, match="'launch_missiles'"):
        parse("launch_missiles", {})
    with pytest.raises(UnknownMethod):
        parse("Hello", {"version": 1})
    with pytest.raises(UnknownMethod):
        method_of(object())


@pytest.mark.parametrize("params", [None, [], [1], "version=1", b"", 1])
def test_params_must_be_a_map(params: object) -> None:
    with pytest.raises(InvalidParams, match="map"):
        parse("hello", params)


def test_unknown_key() -> None:
    with pytest.raises(InvalidParams, match="unknown parameter 'verbose'"):
        parse("status", {"job": "j", "verbose": True})
    with pytest.raises(InvalidParams, match="unknown parameter"):
        parse("node_info", {"x": 1})
    with pytest.raises(InvalidParams, match="unknown parameter"):
        parse("status", {"job": "j", b"job": "j"})


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("hello", {}, "version"),
        ("hello", {"client": "x"}, "version"),
        ("prepare", {"job": "j", "bundle": ID}, "argv"),
        ("prepare", {"job": "j", "argv": []}, "bundle"),
        ("patch_prepare", {"job": "j", "bundle": ID}, "base"),
        ("cat", {}, "id"),
    ],
)
def test_missing_key(method: str, params: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidParams, match=f"missing parameter '{name}'"):
        parse(method, params)


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        # bool where int, and int where bool
        ("hello", {"version": True}, "version"),
        ("start", {"job": "j", "master_port": False}, "master_port"),
        ("logs", {"job": "j", "offset": True}, "offset"),
        ("logs", {"job": "j", "follow": 1}, "follow"),
        ("jobs", {"all_users": 0}, "all_users"),
        ("jobs", {"all_users": None}, "all_users"),
        # other scalars
        ("hello", {"version": 1.0}, "version"),
        ("hello", {"version": "1"}, "version"),
        ("hello", {"version": None}, "version"),
        ("hello", {"version": 1, "client": None}, "client"),
        ("cancel", {"job": "j", "grace_s": 1.5}, "grace_s"),
        # str where bytes, bytes where str
        ("put_manifest", {"manifest": "\x92\x01\x90"}, "manifest"),
        ("put_manifest", {"manifest": bytearray(b"x")}, "manifest"),
        ("status", {"job": b"j-1"}, "job"),
        ("cat", {"id": 1}, "id"),
        # lists with a wrong item, or not lists
        ("missing", {"blobs": [ID, 1]}, "blobs"),
        ("missing", {"blobs": [ID, b"ab"]}, "blobs"),
        ("missing", {"blobs": ID}, "blobs"),
        ("missing", {"blobs": (ID,)}, "blobs"),
        ("put_blobs", {"blobs": [ID, b"x"]}, "blobs"),
        ("put_blobs", {"blobs": [[ID, b"x"], "y"]}, "blobs"),
        ("prepare", {"job": "j", "bundle": ID, "argv": ["a", b"b"]}, "argv"),
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "peers": [None]}, "peers"),
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "source": None}, "source"),
        # dicts with non-str values or keys
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "env": {"A": 1}}, "env"),
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "env": {"A": None}}, "env"),
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "env": {"A": b"1"}}, "env"),
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "env": {b"A": "1"}}, "env"),
        ("prepare", {"job": "j", "bundle": ID, "argv": [], "env": [["A", "1"]]}, "env"),
    ],
)
def test_wrong_type(method: str, params: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidParams, match=f"parameter '{name}' has the wrong type") as info:
        parse(method, params)
    assert info.value.detail == method


PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def fuzzed_params(draw: st.DrawFn) -> tuple[str, dict[Any, Any]]:
    method = draw(st.sampled_from(sorted(METHODS)))
    names = [f.name for f in dataclasses.fields(METHODS[method])]
    params: dict[Any, Any] = dict(MINIMAL[method])
    for key in draw(st.lists(st.sampled_from(names), max_size=3)) if names else []:
        params[key] = draw(PLAIN)
    if draw(st.booleans()):
        params[draw(st.text(max_size=6) | st.binary(max_size=3))] = draw(PLAIN)
    return method, params


@settings(max_examples=300, deadline=None)
@given(case=fuzzed_params())
def test_parse_either_builds_or_refuses(case: tuple[str, dict[Any, Any]]) -> None:
    method, params = case
    try:
        message = parse(method, params)
    except InvalidParams:
        return
    assert type(message) is METHODS[method]
    assert parse(method, wire(to_params(message))) == message


# ------------------------------------------------------------------------------ errors

# One instance of every error class, with data in the typed ones.
EXAMPLES: list[LaunchError] = [
    LaunchError("something failed", {"k": [1, "v"]}),
    ProtocolError("broken", None),
    LocalProtocolError("we sent garbage"),
    RemoteProtocolError("they sent garbage"),
    VersionMismatch(1, 7),
    UnknownMethod("unknown method 'x'", "x"),
    InvalidParams("status: missing parameter 'job'", "status"),
    InvalidManifest("path has an empty component", "a//b"),
    ChecksumMismatch("aa" * 32, "bb" * 32),
    ObjectMissing(["cc" * 32, "dd" * 32]),
    PathNotFound("src/main.py"),
    JobNotFound("j-xyz"),
    AmbiguousRef("j-1 matches j-10, j-11", ["j-10", "j-11"]),
    PermissionDenied("not your job", None),
    JobStateError("job already started", "running"),
    StaleRevision(3, 4),
    Busy("gpus held", None),
    NodeUnreachable("gpu-7", "connection refused"),
    InternalError("boom", "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n"),
]

FIELDS: dict[type[LaunchError], tuple[str, ...]] = {
    VersionMismatch: ("ours", "theirs"),
    InvalidManifest: ("path",),
    ChecksumMismatch: ("expected", "actual"),
    ObjectMissing: ("ids",),
    PathNotFound: ("path",),
    JobNotFound: ("ref",),
    StaleRevision: ("expected", "actual"),
    NodeUnreachable: ("node", "reason"),
}

# The stable codes. Changing one is a wire change: an older peer would map it to another class.
CODES = {
    LaunchError: 1,
    ProtocolError: 2,
    LocalProtocolError: 3,
    RemoteProtocolError: 4,
    VersionMismatch: 5,
    UnknownMethod: 6,
    InvalidParams: 7,
    InvalidManifest: 10,
    ChecksumMismatch: 11,
    ObjectMissing: 12,
    PathNotFound: 13,
    JobNotFound: 20,
    AmbiguousRef: 21,
    PermissionDenied: 22,
    JobStateError: 23,
    StaleRevision: 24,
    Busy: 25,
    NodeUnreachable: 30,
    InternalError: 99,
}


def test_examples_cover_every_error_class() -> None:
    assert {type(e) for e in EXAMPLES} == set(BY_CODE.values())
    assert len(EXAMPLES) == len(BY_CODE)


def test_error_codes_are_unique_and_stable() -> None:
    codes = [cls.code for cls in BY_CODE.values()]
    assert len(codes) == len(set(codes))
    assert {cls: cls.code for cls in BY_CODE.values()} == CODES
    assert all(BY_CODE[code] is cls for cls, code in CODES.items())


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_error_round_trip(error: LaunchError) -> None:
    value = errors.to_wire(error)
    assert value == [error.code, error.message, error.detail]
    back = errors.from_wire(wire(value))
    assert type(back) is type(error)
    assert back.code == error.code
    assert back.message == error.message
    assert str(back) == str(error)
    assert back.detail == error.detail
    for name in FIELDS.get(type(error), ()):
        assert getattr(back, name) == getattr(error, name)


def test_typed_errors_keep_their_data() -> None:
    stale = errors.from_wire(wire(errors.to_wire(StaleRevision(3, 4))))
    assert isinstance(stale, StaleRevision)
    assert (stale.expected, stale.actual) == (3, 4)
    missing = errors.from_wire(wire(errors.to_wire(ObjectMissing("ee" * 32))))
    assert isinstance(missing, ObjectMissing)
    assert missing.ids == ["ee" * 32]
    many = ObjectMissing([f"{i:064x}" for i in range(7)])
    assert str(many).endswith(" ...")
    assert errors.from_wire(wire(errors.to_wire(many))).ids == many.ids  # type: ignore[attr-defined]
    mismatch = errors.from_wire(wire(errors.to_wire(VersionMismatch(1, "2.0"))))
    assert isinstance(mismatch, VersionMismatch)
    assert (mismatch.ours, mismatch.theirs) == (1, "2.0")


@pytest.mark.parametrize(
    "value",
    [
        None,
        "boom",
        b"boom",
        7,
        [],
        [24, "stale"],
        [24, "stale", [3, 4], None],
        ["24", "stale", [3, 4]],
        [24.0, "stale", [3, 4]],
        [True, "stale", [3, 4]],  # True == 1, but a code is an integer
        [24, b"stale", [3, 4]],
        [24, None, [3, 4]],
        (24, "stale", [3, 4]),
        {"code": 24, "message": "stale", "detail": [3, 4]},
        [[[[[[]]]]]],
    ],
)
def test_from_wire_malformed(value: object) -> None:
    error = errors.from_wire(value)
    assert type(error) is RemoteProtocolError
    assert "malformed error" in error.message


def test_from_wire_malformed_deep_or_huge() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    assert type(errors.from_wire(deep)) is RemoteProtocolError
    huge = errors.from_wire(["x"] * 1_000_000)
    assert type(huge) is RemoteProtocolError
    assert len(huge.message) < 200


@pytest.mark.parametrize(
    "value",
    [
        [StaleRevision.code, "stale", ["3", 4]],
        [StaleRevision.code, "stale", [True, 4]],
        [StaleRevision.code, "stale", [3]],
        [StaleRevision.code, "stale", "3,4"],
        [ChecksumMismatch.code, "bad", [1, 2]],
        [ChecksumMismatch.code, "bad", None],
        [NodeUnreachable.code, "down", ["n1"]],
        [VersionMismatch.code, "old", 3],
    ],
)
def test_typed_error_with_malformed_detail_degrades(value: list[Any]) -> None:
    # Never a StaleRevision whose `expected` is not an int: a plain LaunchError instead.
    error = errors.from_wire(value)
    assert type(error) is LaunchError
    assert (error.message, error.detail) == (value[1], value[2])


def test_unknown_code_is_a_plain_launch_error() -> None:
    error = errors.from_wire([12345, "from the future", {"x": 1}])
    assert type(error) is LaunchError
    assert (error.message, error.detail) == ("from the future", {"x": 1})


def test_lenient_but_typed_details() -> None:
    # These classes turn any detail into their field types.
    path = errors.from_wire([PathNotFound.code, "m", 5])
    assert isinstance(path, PathNotFound) and path.path == "5"
    manifest = errors.from_wire([InvalidManifest.code, "m", None])
    assert isinstance(manifest, InvalidManifest) and manifest.path == ""
    missing = errors.from_wire([ObjectMissing.code, "m", [1, "a"]])
    assert isinstance(missing, ObjectMissing) and missing.ids == ["1", "a"]


@settings(max_examples=200, deadline=None)
@given(value=PLAIN)
def test_from_wire_never_raises(value: object) -> None:
    assert isinstance(errors.from_wire(value), LaunchError)
    if isinstance(value, list) and len(value) == 3:
        code = value[0]
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(value[1], str):
            assert type(errors.from_wire(value)) in (BY_CODE.get(code, LaunchError), LaunchError)

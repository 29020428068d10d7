"""Every method of the agent protocol: one frozen dataclass of parameters per method, the
method table, and PROTOCOL_VERSION (kept beside the handshake in rpc.py). The agent imports
this module; it performs no I/O.

Parameters travel as msgpack maps keyed by field name. `parse(method, obj)` validates a map
against the method's dataclass (known keys only, required keys present, exact types), so a
handler never sees a malformed value. Results are plain maps documented on each method.
"""

from __future__ import annotations

import types
import typing
import zlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Union

import msgpack

from agent.protocol.errors import InvalidParams, UnknownMethod

# Defined with the handshake in rpc.py, so the launcher, which never parses a request, need
# not import (and build) the dataclasses below: ~15 ms of every command's start-up.
from agent.protocol.rpc import MIN_PROTOCOL_VERSION as MIN_PROTOCOL_VERSION
from agent.protocol.rpc import PROTOCOL_VERSION as PROTOCOL_VERSION


@dataclass(frozen=True)
class Hello:
    """First call on every connection. Result: {version, agent, node, uid}."""

    version: int
    client: str = ""


@dataclass(frozen=True)
class NodeInfo:
    """Result: agent and protocol version, hostname, addresses, cpus, load, memory, disk, gpus,
    running jobs."""


@dataclass(frozen=True)
class Missing:
    """Which of these blob ids the store lacks. Result: {missing: [id...]}."""

    blobs: list[str]


@dataclass(frozen=True)
class PutBlobs:
    """Store blobs, each verified against its claimed id; one sync for the batch.
    Result: {stored: n}. Any mismatch rejects the batch (ChecksumMismatch).

    `blobs` is [[id, data], ...]; or (protocol 2) `zipped` holds that same list, msgpack
    encoded, then zlib compressed: source code shrinks three to four times, and each byte
    saved is one less to encrypt, send and decrypt for every node (`unzip_blobs`)."""

    blobs: list[list[Any]] = field(default_factory=list)
    zipped: bytes = b""


@dataclass(frozen=True)
class PutManifest:
    """Store a manifest (validated): either `manifest`, its canonical bytes, or, for a tree
    close to one the node holds, `base` (that bundle's id) with the entries `puts` and the
    paths `deletes` that turn it into `bundle` (objects.delta); the agent rebuilds the
    manifest and checks its id. ObjectMissing when the node lacks `base`. A delta may carry
    the blobs its puts add (`blobs`, as put_blobs takes them): a small change then needs no
    put_blobs round trip. Result: {bundle, missing: [blob ids still absent]}."""

    manifest: bytes = b""
    base: str = ""
    bundle: str = ""
    puts: list[list[Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    blobs: list[list[Any]] = field(default_factory=list)  # [[id, data], ...]


@dataclass(frozen=True)
class Prepare:
    """Phase one of submit: record the job and revision 0, build its code directory from the
    store. Fails with ObjectMissing when blobs are absent. Result: {bundle, port, code_dir}."""

    job: str
    bundle: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    rank: int = 0
    nnodes: int = 1
    peers: list[str] = field(default_factory=list)
    name: str = ""
    author: str = ""
    message: str = ""
    source: list[Any] = field(default_factory=lambda: [None, None, None])
    # False: run the command without the owner's shell profile (a clean, faster start).
    login: bool = True
    reason: str = "submit"  # or "rerun": the same code, command and environment as another job
    gpus: int = -1  # GPUs to reserve on this node; -1: all of them (Busy if any is held)
    # A bundle this one was probably changed from (the last sent from the same tree): if the
    # node keeps a spare tree of it, the code directory is made from that (agent/spares.py).
    near: str = ""
    env_from: str = ""  # a rerun: take secret env values from this job (same owner, this node)
    data: list[str] = field(default_factory=list)  # input directories to fingerprint
    data_hash: bool = False  # ... with the SHA-256 of every file
    # The artifact this job starts from: {job, path, sha256, revision, node}.
    init_from: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Start:
    """Phase two of submit: start a prepared job. Result: the job's status map."""

    job: str
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass(frozen=True)
class Abort:
    """Forget a prepared job that was never started (the other phase failed). Result: {}."""

    job: str


@dataclass(frozen=True)
class Cancel:
    """SIGTERM the job's whole process tree, SIGKILL after grace_s. Result: status map."""

    job: str
    grace_s: int = 10


@dataclass(frozen=True)
class Jobs:
    """The caller's jobs (root sees all). Result: {jobs: [status map...]}."""

    all_users: bool = False


@dataclass(frozen=True)
class Status:
    """One job. Result: status map {job, state, revision, bundle, pid, exit_code, ...}."""

    job: str


@dataclass(frozen=True)
class Logs:
    """Stream the job's log from a byte offset as `log` notifications {job, offset, data};
    with follow, until the job ends. Result: {offset, state}."""

    job: str
    offset: int = 0
    follow: bool = False


@dataclass(frozen=True)
class Cat:
    """Raw bytes of one stored object by id or unique prefix. Result: {id, kind, data}."""

    id: str


@dataclass(frozen=True)
class Revisions:
    """A job's revision records. Result: {revisions: [encoded revision bytes...]}."""

    job: str


@dataclass(frozen=True)
class PatchPrepare:
    """Phase one of a patch: check `base` is still the head (else StaleRevision), that no
    other patch is staged, that every object is here; stage the changed files.
    Result: {revision, paths}. `reason` is "patch", "resume" or "drift"."""

    job: str
    base: int
    bundle: str
    author: str = ""
    message: str = ""
    reason: str = "patch"
    # The new tree as changes to the base revision's (objects.delta), with the blobs they
    # add: a patch then costs one round trip, not three (put_manifest, put_blobs, prepare).
    puts: list[list[Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    blobs: list[list[Any]] = field(default_factory=list)  # [[id, data], ...]


@dataclass(frozen=True)
class PatchCommit:
    """Phase two: swap the staged files into the live code directory and record the
    revision; then send `signal` to the job, or restart it. Result: {revision, at_ns, paths}."""

    job: str
    revision: int
    signal: str = ""
    restart: bool = False
    grace_s: int = 10


@dataclass(frozen=True)
class PatchAbort:
    """Drop a staged patch (another node failed to prepare it). Result: {}."""

    job: str
    revision: int
    bundle: str = ""  # when given, drop the staged patch only if it is this one


@dataclass(frozen=True)
class GetBlobs:
    """Bytes of stored blobs, for checkout and diff. Result: {blobs: [[id, bytes]...]}."""

    blobs: list[str]


@dataclass(frozen=True)
class Metrics:
    """The job's reported metrics: every point, or with buckets > 0 that many step ranges
    with min, max, last of each metric. Result: {points: [...]} or {buckets: [...]}."""

    job: str
    buckets: int = 0


@dataclass(frozen=True)
class Reserve:
    """Hold GPUs for a job about to be prepared (a quick first step on node 0, so racing
    launchers are settled there). Expires like a prepared job's. Result: {gpus: [...]}."""

    job: str
    gpus: int = -1


@dataclass(frozen=True)
class FindArtifacts:
    """The caller's artifacts with this SHA-256 (or, with job and path, that file's records).
    Result: {artifacts: [{job, node, rank, path, size, sha256, step, revision, since,
    closed_ns}]}."""

    sha256: str = ""
    job: str = ""
    path: str = ""


@dataclass(frozen=True)
class Facts:
    """What was recorded about a job besides its revisions: environment at each start, data
    fingerprints, the artifact it was initialised from. Result: {facts: [{kind, at_ns, data}]}."""

    job: str


METHODS: dict[str, type] = {
    "hello": Hello,
    "node_info": NodeInfo,
    "missing": Missing,
    "put_blobs": PutBlobs,
    "put_manifest": PutManifest,
    "prepare": Prepare,
    "start": Start,
    "abort": Abort,
    "cancel": Cancel,
    "jobs": Jobs,
    "status": Status,
    "logs": Logs,
    "cat": Cat,
    "revisions": Revisions,
    "patch_prepare": PatchPrepare,
    "patch_commit": PatchCommit,
    "patch_abort": PatchAbort,
    "get_blobs": GetBlobs,
    "metrics": Metrics,
    "reserve": Reserve,
    "find_artifacts": FindArtifacts,
    "facts": Facts,
}
NOTIFICATIONS = ("log",)


ZIP_WORTH = 0.8  # compressed blobs are sent when they are at most this share of the bytes


def blob_items(items: list[list[Any]]) -> list[tuple[str, bytes]]:
    """[[id, data], ...] as pairs, each id well formed (the store verifies the bytes)."""
    from agent.protocol.objects import check_object_id

    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], bytes)):
            raise InvalidParams("blobs: each item is [id, bytes]")
        out.append((check_object_id(item[0], "blob id"), item[1]))
    return out


def zip_blobs(items: list[list[Any]], level: int = 1) -> bytes | None:
    """put_blobs' `zipped` for `items`, or None when compressing saves too little (data
    that is compressed already) to be worth the node's time to inflate it."""
    raw: bytes = msgpack.packb(items, use_bin_type=True)
    zipped = zlib.compress(raw, level)
    return zipped if len(zipped) <= len(raw) * ZIP_WORTH else None


def unzip_blobs(zipped: bytes, limit: int) -> list[tuple[str, bytes]]:
    """The blobs of put_blobs' `zipped`, as blob_items gives them; InvalidParams if it is not
    one zlib stream of a msgpack list, or inflates to more than `limit` bytes: a small
    message costs no more to decode than a frame of `limit` bytes would."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(zipped, limit)
    except zlib.error as exc:
        raise InvalidParams(f"put_blobs: zipped is not zlib data ({exc})") from None
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise InvalidParams(
            f"put_blobs: zipped inflates past {limit} bytes, is cut short or has bytes after"
        )
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise InvalidParams(f"put_blobs: zipped holds no msgpack ({exc})") from None
    if not isinstance(items, list):
        raise InvalidParams("put_blobs: zipped holds no list of [id, bytes]")
    return blob_items(items)


def to_params(message: Any) -> dict[str, Any]:
    return asdict(message)


def method_of(message: Any) -> str:
    for name, cls in METHODS.items():
        if type(message) is cls:
            return name
    raise UnknownMethod(f"{type(message).__name__} is not a protocol message")


def parse(method: str, params: object) -> Any:
    """Validate `params` against `method`'s dataclass and build it. Raises UnknownMethod or
    InvalidParams naming the field."""
    cls = METHODS.get(method)
    if cls is None:
        raise UnknownMethod(f"unknown method {method!r}", method)
    if not isinstance(params, dict):
        raise InvalidParams(f"{method}: params must be a map", method)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in params:
        if key not in known:
            raise InvalidParams(f"{method}: unknown parameter {key!r}", method)
    values = {}
    for name, f in known.items():
        if name not in params:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InvalidParams(f"{method}: missing parameter {name!r}", method)
            continue
        if not _conforms(params[name], hints[name]):
            raise InvalidParams(f"{method}: parameter {name!r} has the wrong type", method)
        values[name] = params[name]
    return cls(**values)


def _conforms(value: object, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bytes, bool):
        return isinstance(value, hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False
        # list[Any] items need no look each: put_blobs carries thousands of [id, bytes].
        return item is Any or all(_conforms(v, item) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _conforms(k, key_t) and _conforms(v, val_t) for k, v in value.items()
        )
    return False

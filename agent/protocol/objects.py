"""Trees as both sides must agree on them, byte for byte: blob ids, manifests, revision
records, their canonical encoding, the path grammar, patches (apply_changes), diffs, and
deltas (a manifest sent as the changes to one the receiver holds).

This module performs no I/O. Every decoder validates fully before returning, so a value of
these types is always well formed: a `Manifest` can be materialised without re-checking paths.

Canonical encoding is msgpack with arrays only (no maps, no floats), entries sorted by path
(code-point order, which is UTF-8 byte order). Golden vectors in tests pin it.

Departure from DESIGN.md, on purpose: a symlink entry carries its target as a fifth element,
`(path, "symlink", size, blob, target)`, with blob = SHA-256 of the target. The path grammar
asks that targets stay inside the tree and that this is enforced on decode; without the target
in the manifest, decode could not check it.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

import msgpack

from agent.protocol.errors import InvalidManifest, PathNotFound

Kind = Literal["file", "exec", "symlink"]
KINDS: tuple[Kind, ...] = ("file", "exec", "symlink")
REASONS = ("submit", "patch", "resume", "drift", "rerun")

MANIFEST_FORMAT = 1
REVISION_FORMAT = 1
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_ENTRIES = 1_000_000
ID_HEX_LEN = 64
SHORT_LEN = 12


def blob_id(data: bytes) -> str:
    """The id of a blob: the SHA-256 of its bytes, 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def short(object_id: str) -> str:
    """The 12-hex form used when showing ids to people."""
    return object_id[:SHORT_LEN]


_OBJECT_ID = re.compile(r"[0-9a-f]{64}")


def is_object_id(value: object) -> bool:
    # A regex, not a loop over characters: a manifest's ids are checked several times per
    # submit on every node (about 10 times faster).
    return isinstance(value, str) and _OBJECT_ID.fullmatch(value) is not None


def check_object_id(value: object, what: str = "object id") -> str:
    if not is_object_id(value):
        raise InvalidManifest(f"{what} is not 64 lowercase hex digits", repr(value)[:80])
    assert isinstance(value, str)
    return value


# ---------------------------------------------------------------------------------- paths


# Most paths are short ASCII names: those the grammar allows match this (components of
# 1..255 safe characters, none "." or ".."), and are admitted without the general checks.
_PLAIN_PATH = re.compile(r"(?:(?!\.\.?(?:/|$))[\w.+@=,~-]{1,255}(?:/|$))+", re.ASCII)


def check_path(path: object) -> str:
    """Enforce the path grammar on one path; return it. Raises InvalidManifest.

    Relative, `/`-separated, no empty, `.` or `..` components, no NUL or backslash, at most
    MAX_COMPONENT_BYTES a component and MAX_PATH_BYTES in all (UTF-8).
    """
    if (
        isinstance(path, str)
        and len(path) <= MAX_PATH_BYTES
        and not path.endswith("/")
        and _PLAIN_PATH.fullmatch(path)
    ):
        return path
    if not isinstance(path, str):
        raise InvalidManifest("path is not a string", repr(path)[:80])
    if not path:
        raise InvalidManifest("empty path", path)
    if "\x00" in path or "\\" in path:
        raise InvalidManifest("path contains NUL or backslash", path)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidManifest("path is not valid UTF-8", repr(path)) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidManifest(f"path longer than {MAX_PATH_BYTES} bytes", path[:80])
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidManifest("path has an empty, '.' or '..' component", path)
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise InvalidManifest(f"path component longer than {MAX_COMPONENT_BYTES} bytes", path)
    return path


def check_symlink_target(path: str, target: object) -> str:
    """A symlink target must stay inside the tree whatever the links it passes through.

    Relative; `..` only as leading components (so no later `..` can climb out through another
    link), and those leading `..` may not climb above the tree's root. `.` components are
    harmless and allowed.
    """
    if not isinstance(target, str) or not target:
        raise InvalidManifest("symlink target is empty or not a string", path)
    try:
        size = len(target.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (e.g. os.readlink of a non-UTF-8 name)
        raise InvalidManifest("symlink target is not valid UTF-8", path) from None
    if "\x00" in target or size > MAX_PATH_BYTES:
        raise InvalidManifest("symlink target contains NUL or is too long", path)
    if target.startswith("/"):
        raise InvalidManifest(f"symlink {path} -> {target} is absolute: it leaves the tree", path)
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        raise InvalidManifest(
            f"symlink {path} -> {target}: '..' allowed only at the start of a target", path
        )
    if ups > path.count("/"):
        raise InvalidManifest(f"symlink {path} -> {target} leaves the tree", path)
    return target


# ------------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    """One manifest entry. For symlinks, size and blob describe the target's UTF-8 bytes."""

    path: str
    kind: Kind
    size: int
    blob: str
    target: str | None = field(default=None, compare=False)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        data = target.encode("utf-8")
        return cls(path, "symlink", len(data), blob_id(data), target)

    def check(self) -> Entry:
        return self._check(with_id=True)

    def _check(self, with_id: bool) -> Entry:
        check_path(self.path)
        if self.kind not in KINDS:
            raise InvalidManifest(f"unknown kind {self.kind!r}", self.path)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise InvalidManifest("size is not a non-negative integer", self.path)
        if with_id:
            check_object_id(self.blob, f"blob of {self.path}")
        if self.kind == "symlink":
            target = check_symlink_target(self.path, self.target)
            data = target.encode("utf-8")
            if self.size != len(data) or self.blob != blob_id(data):
                raise InvalidManifest("symlink size or blob does not match its target", self.path)
        elif self.target is not None:
            raise InvalidManifest("only symlinks carry a target", self.path)
        return self

    def to_wire(self) -> list[Any]:
        row: list[Any] = [self.path, self.kind, self.size, bytes.fromhex(self.blob)]
        if self.kind == "symlink":
            row.append(self.target)
        return row

    @classmethod
    def from_wire(cls, row: object) -> Entry:
        if not isinstance(row, (list, tuple)) or len(row) not in (4, 5):
            raise InvalidManifest("entry is not an array of 4 or 5 elements", repr(row)[:80])
        path, kind, size, blob = row[0], row[1], row[2], row[3]
        target = row[4] if len(row) == 5 else None
        if kind == "symlink" and len(row) != 5:
            raise InvalidManifest("symlink entry without target", repr(path)[:80])
        if not isinstance(blob, bytes) or len(blob) != 32:
            raise InvalidManifest("blob is not 32 bytes", repr(path)[:80])
        if not isinstance(kind, str):
            raise InvalidManifest("kind is not a string", repr(path)[:80])
        # An id made from 32 bytes is well formed: only the rest needs checking.
        return make_entry(path, kind, size, blob.hex(), target)._check(with_id=False)


def _entry_maker() -> Callable[..., Entry]:
    """A faster `Entry(path, kind, size, blob, target)`, unchecked, for code that makes
    thousands (a warm freeze's entries, a decoded manifest's).

    Entry is a frozen slots dataclass: its generated __init__ sets each field through
    object.__setattr__, which costs three times what setting the slots directly does, and
    7,000 entries are a tenth of a warm freeze. The entries are the same objects either way;
    if Entry ever stops being exactly these five plain slots, this is its own constructor.
    """
    names = ("path", "kind", "size", "blob", "target")
    slots = getattr(Entry, "__slots__", ())
    plain = not hasattr(Entry, "__post_init__") and tuple(f.name for f in fields(Entry)) == names
    if not plain or tuple(slots) != names:
        return Entry
    set_path, set_kind, set_size, set_blob, set_target = (
        Entry.__dict__[name].__set__ for name in names
    )
    new = object.__new__

    def make(path: str, kind: str, size: int, blob: str, target: str | None) -> Entry:
        entry = new(Entry)
        set_path(entry, path)
        set_kind(entry, kind)
        set_size(entry, size)
        set_blob(entry, blob)
        set_target(entry, target)
        return entry

    return make


make_entry = _entry_maker()


# ------------------------------------------------------------------------------ manifests


def _parents(path: str) -> Iterable[str]:
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


@dataclass(frozen=True, repr=False)
class Manifest:
    """A sorted, validated tree. Build with `Manifest.of(entries)` or `Manifest.decode(data)`."""

    entries: tuple[Entry, ...]

    def __repr__(self) -> str:
        # Short: a repr of every entry of a real tree takes a third of a second, and asyncio
        # writes one of whatever a task returned when it sets up Ctrl-C handling.
        return f"<Manifest {short(self.bundle_id)} of {len(self.entries)} entries>"

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Manifest:
        """Sort and validate (duplicates, case clashes, file-versus-directory clashes)."""
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        _validate(ordered)
        return cls(ordered)._vouched(True)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Decode and validate a canonical manifest; anything else is InvalidManifest.

        The input must be in canonical form (sorted, and encode(decode(x)) == x), so that a
        bundle id names exactly one manifest.
        """
        try:
            raw = msgpack.unpackb(
                data, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext
            )
        except InvalidManifest:
            raise
        except Exception as exc:
            raise InvalidManifest(f"manifest is not valid msgpack: {exc}", "") from None
        if not (isinstance(raw, list) and len(raw) == 2 and raw[0] == MANIFEST_FORMAT):
            raise InvalidManifest("not a manifest (expected [1, entries])", "")
        rows = raw[1]
        if not isinstance(rows, list) or len(rows) > MAX_ENTRIES:
            raise InvalidManifest("manifest entries are not an array of bounded size", "")
        entries = tuple(Entry.from_wire(row) for row in rows)
        for a, b in itertools.pairwise(entries):
            if a.path >= b.path:
                raise InvalidManifest("entries not sorted or duplicated", b.path)
        _validate(entries, checked=True)  # from_wire checked each entry
        manifest = cls(entries)
        if manifest.encode() != data:
            raise InvalidManifest("manifest is not in canonical form", "")
        return manifest._vouched(True)

    def _vouched(self, valid: bool) -> Manifest:
        if valid:
            object.__setattr__(self, "_valid", True)
        return self

    @property
    def validated(self) -> bool:
        """Whether every entry was checked: true of a manifest from `of` or `decode`, or
        changed from one by apply_changes; not of one made by calling Manifest(entries)."""
        return bool(self.__dict__.get("_valid"))

    def encode(self) -> bytes:
        # Kept: a manifest is a value, and its encoding is asked for again (its id, storing
        # it, sending it).
        cached: bytes | None = self.__dict__.get("_encoded")
        if cached is None:
            body = [MANIFEST_FORMAT, [e.to_wire() for e in self.entries]]
            cached = msgpack.packb(body, use_bin_type=True)
            object.__setattr__(self, "_encoded", cached)
        return cached

    @property
    def bundle_id(self) -> str:
        cached: str | None = self.__dict__.get("_bundle_id")
        if cached is None:
            cached = blob_id(self.encode())
            object.__setattr__(self, "_bundle_id", cached)
        return cached

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    @property
    def paths(self) -> list[str]:
        """The entries' paths, in order (built once per manifest; do not change it)."""
        cached: list[str] | None = self.__dict__.get("_paths")
        if cached is None:
            cached = [e.path for e in self.entries]
            object.__setattr__(self, "_paths", cached)
        return cached

    def get(self, path: str) -> Entry | None:
        """The entry at `path`, found by bisection."""
        i = bisect.bisect_left(self.paths, path)
        if i < len(self.entries) and self.entries[i].path == path:
            return self.entries[i]
        return None

    @property
    def index(self) -> TreeIndex:
        """Names of files and directories, built once per manifest (for apply_changes)."""
        cached: TreeIndex | None = self.__dict__.get("_index")
        if cached is None:
            cached = TreeIndex.of(self.entries)
            object.__setattr__(self, "_index", cached)
        return cached

    def blobs(self) -> set[str]:
        """Blob ids that must be in a store to materialise this tree (symlinks carry theirs)."""
        return {e.blob for e in self.entries if e.kind != "symlink"}

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries if e.kind != "symlink")

    def __len__(self) -> int:
        return len(self.entries)


def _no_ext(code: int, data: bytes) -> object:
    raise InvalidManifest(f"msgpack ext type {code} is not allowed", "")


def _validate(entries: Sequence[Entry], checked: bool = False) -> None:
    seen: set[str] = set()
    folded: dict[str, str] = {}
    for entry in entries:
        if not checked:
            entry.check()
        if entry.path in seen:
            raise InvalidManifest(f"duplicate path {entry.path}", entry.path)
        seen.add(entry.path)
        key = entry.path.casefold()
        if key in folded:
            raise InvalidManifest(
                f"paths {folded[key]} and {entry.path} differ only in case", entry.path
            )
        folded[key] = entry.path
    if len(entries) > MAX_ENTRIES:
        raise InvalidManifest("too many entries", "")
    # Each directory is looked at once, at its first entry: its ancestors were then too.
    visited: set[str] = set()
    for entry in entries:
        for parent in _parents(entry.path):
            if parent in visited:
                break
            visited.add(parent)
            if parent in seen:
                raise InvalidManifest(
                    f"{parent} is both a file and the directory of {entry.path}", entry.path
                )
    # A directory may not clash in case with another directory or file either.
    dirs: dict[str, str] = {}
    visited.clear()
    for entry in entries:
        for parent in _parents(entry.path):
            if parent in visited:
                break
            visited.add(parent)
            key = parent.casefold()
            other = dirs.setdefault(key, parent)
            if other != parent:
                raise InvalidManifest(
                    f"directories {other} and {parent} differ only in case", parent
                )
            if key in folded:
                raise InvalidManifest(
                    f"{folded[key]} and directory {parent} differ only in case", parent
                )


# ---------------------------------------------------------------------- patches and diffs


@dataclass(frozen=True, slots=True)
class Change:
    """One path's change between two trees: `old` None is an add, `new` None a delete."""

    path: str
    old: Entry | None
    new: Entry | None

    @property
    def action(self) -> str:
        if self.old is None:
            return "add"
        if self.new is None:
            return "delete"
        return "replace"


def apply_changes(
    manifest: Manifest, puts: Iterable[Entry] = (), deletes: Iterable[str] = ()
) -> Manifest:
    """The tree after removing `deletes`, then adding or replacing `puts`.

    Deleting a path that is not in the tree is PathNotFound: a patch names what it removes.
    The result is validated like any manifest (a put may not turn a directory into a file),
    but only the changed paths are checked: `manifest` was valid, so a patch of one file
    costs little on a tree of thousands (every patch, on every node).
    """
    puts, deletes = list(puts), list(deletes)
    if not deletes and all(manifest.get(e.path) is not None for e in puts):
        return _replace(manifest, puts)  # the usual patch: files edited in place
    current = manifest.by_path()
    for path in deletes:
        check_path(path)
        if current.pop(path, None) is None:
            raise PathNotFound(path)
    added: list[Entry] = []
    for entry in puts:
        if entry.check().path not in current and entry.path not in manifest.index.files:
            added.append(entry)
        current[entry.path] = entry
    if len(current) > MAX_ENTRIES:
        raise InvalidManifest("too many entries", "")
    deleted = len(current) - len(added) < len(manifest.entries)
    if added and deleted:
        return Manifest.of(current.values())  # a removed directory may make room: see all
    index = manifest.index
    if added:
        index = index.copy()
        for entry in sorted(added, key=_path_of):
            index.add(entry.path)
    result = Manifest(tuple(sorted(current.values(), key=_path_of)))._vouched(manifest.validated)
    if not deleted:
        object.__setattr__(result, "_index", index)
    return result


def delta(base: bytes, new: Manifest) -> tuple[list[list[Any]], list[str], list[str]]:
    """What turns the manifest encoded in `base` into `new`: the wire rows to put and the
    paths to delete, as put_manifest takes them, and the blobs the puts name that `base` has
    nowhere (new content: a node holding base's tree lacks at most these). `base` is read,
    not validated (it is the sender's own): the receiver checks the tree it rebuilds against
    new's bundle id."""
    try:
        rows = msgpack.unpackb(base, raw=False, use_list=True)[1]
        old = {row[0]: row for row in rows}
        had = {row[3] for row in rows}
    except Exception as exc:
        raise InvalidManifest(f"base manifest is not valid msgpack: {exc}", "") from None
    puts = []
    added = set()
    for entry in new.entries:
        row = entry.to_wire()
        if old.pop(entry.path, None) != row:
            puts.append(row)
            if entry.kind != "symlink" and entry.blob not in had:
                added.add(entry.blob)
    return puts, sorted(old), sorted(added)


class Rebuilt(NamedTuple):
    """What from_delta gives: the manifest, its encoding, and the entries the delta put."""

    manifest: Manifest
    encoded: bytes
    puts: list[Entry]


def from_delta(
    base: Manifest, puts: Sequence[object], deletes: Sequence[object], bundle: str
) -> Rebuilt:
    """The manifest `delta` described, its encoding, checked to be bundle `bundle`, and the
    entries put (only their blobs can be new to a node that holds base's)."""
    entries = [Entry.from_wire(row) for row in puts]
    names = [path for path in deletes if isinstance(path, str)]
    if len(names) != len(deletes):
        raise InvalidManifest("deleted paths are not strings", "")
    try:
        new = apply_changes(base, entries, names)
    except PathNotFound as exc:
        raise InvalidManifest(f"delta deletes {exc.path}, absent from its base", exc.path) from None
    encoded = new.encode()
    actual = blob_id(encoded)
    if actual != bundle:
        raise InvalidManifest(
            f"the changes to {short(base.bundle_id)} do not make {short(bundle)}", bundle
        )
    object.__setattr__(new, "_bundle_id", actual)  # hashed once
    return Rebuilt(new, encoded, entries)


def _replace(manifest: Manifest, puts: list[Entry]) -> Manifest:
    """apply_changes when every put replaces an entry: the tree's shape is unchanged, so
    nothing but the entries themselves needs checking, and the names carry over. So does
    the encoding, but for the replaced entries (see _splice)."""
    entries = list(manifest.entries)
    replaced = {}
    for entry in puts:
        i = bisect.bisect_left(manifest.paths, entry.check().path)
        entries[i] = replaced[i] = entry
    result = Manifest(tuple(entries))._vouched(manifest.validated)
    object.__setattr__(result, "_paths", manifest.paths)
    if "_index" in manifest.__dict__:
        object.__setattr__(result, "_index", manifest.index)
    if "_encoded" in manifest.__dict__ and len(replaced) <= SPLICE_MAX:
        _splice(manifest, result, replaced)
    return result


SPLICE_MAX = 64  # replaced entries up to which an encoding is patched rather than rebuilt


def _offsets(manifest: Manifest) -> list[int]:
    """Where each entry's encoding starts in manifest.encode(), and where the last ends: the
    encoding is a header, then each entry packed on its own (msgpack has no separators)."""
    cached: list[int] | None = manifest.__dict__.get("_offsets")
    if cached is None:
        sizes = [len(msgpack.packb(e.to_wire(), use_bin_type=True)) for e in manifest.entries]
        start = len(manifest.encode()) - sum(sizes)
        cached = list(itertools.accumulate(sizes, initial=start))
        object.__setattr__(manifest, "_offsets", cached)
    return cached


def _splice(base: Manifest, result: Manifest, replaced: dict[int, Entry]) -> None:
    """Give `result` (base with the entries at these indices replaced) its encoding, made by
    replacing those entries' bytes in base's: a resubmit that changed one file then costs
    the node one entry's packing instead of the whole tree's. Its offsets come along."""
    offsets = _offsets(base)
    old = base.encode()
    parts: list[bytes] = []
    new_offsets = list(offsets)
    at = 0
    for i in sorted(replaced):
        packed = msgpack.packb(replaced[i].to_wire(), use_bin_type=True)
        parts += (old[at : offsets[i]], packed)
        at = offsets[i + 1]
        grown = len(packed) - (offsets[i + 1] - offsets[i])
        if grown:
            new_offsets[i + 1 :] = [o + grown for o in new_offsets[i + 1 :]]
    parts.append(old[at:])
    object.__setattr__(result, "_encoded", b"".join(parts))
    object.__setattr__(result, "_offsets", new_offsets)


def changes(manifest: Manifest, puts: Iterable[Entry], deletes: Iterable[str]) -> list[Change]:
    """diff(manifest, apply_changes(manifest, puts, deletes)), in the time of the changes
    rather than of the tree."""
    puts = list(puts)
    replaced = {e.path for e in puts}
    out = [Change(path, manifest.get(path), None) for path in deletes if path not in replaced]
    for entry in puts:
        old = manifest.get(entry.path)
        if old is None or (old.kind, old.blob, old.target) != (
            entry.kind,
            entry.blob,
            entry.target,
        ):
            out.append(Change(entry.path, old, entry))
    return sorted(out, key=lambda c: c.path)


def _path_of(entry: Entry) -> str:
    return entry.path


@dataclass
class TreeIndex:
    """A valid tree's file and directory names, for checking a few new paths against it."""

    files: set[str]
    dirs: set[str]
    folded: dict[str, str]  # casefold() of every file and directory -> its name

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> TreeIndex:
        files = {e.path for e in entries}
        dirs = {parent for path in files for parent in _parents(path)}
        folded = {name.casefold(): name for name in files | dirs}
        return cls(files, dirs, folded)

    def copy(self) -> TreeIndex:
        return TreeIndex(set(self.files), set(self.dirs), dict(self.folded))

    def add(self, path: str) -> None:
        """Admit a new file at `path`, or raise InvalidManifest as Manifest.of would."""
        if path in self.dirs:
            raise InvalidManifest(f"{path} is both a file and a directory", path)
        other = self.folded.get(path.casefold())
        if other is not None:
            raise InvalidManifest(f"paths {other} and {path} differ only in case", path)
        parents = list(_parents(path))
        for parent in parents:
            if parent in self.files:
                raise InvalidManifest(f"{parent} is both a file and the directory of {path}", path)
            other = self.folded.get(parent.casefold())
            if other is not None and other != parent:
                raise InvalidManifest(f"{other} and directory {parent} differ only in case", parent)
        self.files.add(path)
        self.folded[path.casefold()] = path
        for parent in parents:
            self.dirs.add(parent)
            self.folded[parent.casefold()] = parent


def diff(a: Manifest, b: Manifest) -> list[Change]:
    """Every path whose entry differs between a and b, sorted by path.

    One merge of the two sorted entry lists; an entry shared by both (a manifest made by
    apply_changes keeps its base's entries) is passed over without a look inside."""
    changes = []
    xs, ys = a.entries, b.entries
    i = j = 0
    while i < len(xs) and j < len(ys):
        x, y = xs[i], ys[j]
        if x is y:
            i, j = i + 1, j + 1
        elif x.path == y.path:
            if (x.kind, x.blob, x.target) != (y.kind, y.blob, y.target):
                changes.append(Change(x.path, x, y))
            i, j = i + 1, j + 1
        elif x.path < y.path:
            changes.append(Change(x.path, x, None))
            i += 1
        else:
            changes.append(Change(y.path, None, y))
            j += 1
    changes.extend(Change(x.path, x, None) for x in xs[i:])
    changes.extend(Change(y.path, None, y) for y in ys[j:])
    return changes


# ------------------------------------------------------------------------------ revisions


@dataclass(frozen=True, slots=True)
class Source:
    """Where the frozen tree came from; beside the bundle, never part of its id."""

    commit: str | None = None
    branch: str | None = None
    dirty: bool | None = None

    def to_wire(self) -> list[Any]:
        return [self.commit, self.branch, self.dirty]

    @classmethod
    def from_wire(cls, row: object) -> Source:
        if not (isinstance(row, list) and len(row) == 3):
            raise InvalidManifest("source is not [commit, branch, dirty]", "")
        commit, branch, dirty = row
        if not (commit is None or isinstance(commit, str)) or not (
            branch is None or isinstance(branch, str)
        ):
            raise InvalidManifest("source commit or branch is not a string", "")
        if not (dirty is None or isinstance(dirty, bool)):
            raise InvalidManifest("source dirty is not a boolean", "")
        return cls(commit, branch, dirty)


@dataclass(frozen=True, slots=True)
class Revision:
    """State N of a job's code. `at_ns` is wall time in integer nanoseconds (no floats)."""

    job: str
    number: int
    parent: int | None
    bundle: str
    reason: str
    author: str
    at_ns: int
    paths: tuple[str, ...] = ()
    message: str = ""
    step: int | None = None
    source: Source = Source()

    @property
    def ref(self) -> str:
        return f"{self.job}@r{self.number}"

    def check(self) -> Revision:
        if not isinstance(self.job, str) or not self.job:
            raise InvalidManifest("revision job is empty", "")
        if not _is_int(self.number) or self.number < 0:
            raise InvalidManifest("revision number is not a non-negative integer", "")
        expected_parent = None if self.number == 0 else self.number - 1
        # The type too: False == 0.0 == 0, but they encode differently.
        if self.parent != expected_parent or type(self.parent) is not type(expected_parent):
            raise InvalidManifest(f"revision {self.number} must name parent {expected_parent}", "")
        check_object_id(self.bundle, "revision bundle")
        if self.reason not in REASONS:
            raise InvalidManifest(f"unknown revision reason {self.reason!r}", "")
        if not isinstance(self.author, str) or not isinstance(self.message, str):
            raise InvalidManifest("revision author or message is not a string", "")
        if not _is_int(self.at_ns) or not (self.step is None or _is_int(self.step)):
            raise InvalidManifest("revision time or step is not an integer", "")
        for path in self.paths:
            check_path(path)
        return self

    def encode(self) -> bytes:
        body = [
            REVISION_FORMAT,
            self.job,
            self.number,
            self.parent,
            bytes.fromhex(self.bundle),
            self.reason,
            self.author,
            self.at_ns,
            list(self.paths),
            self.message,
            self.step,
            self.source.to_wire(),
        ]
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]

    @property
    def id(self) -> str:
        return blob_id(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Revision:
        try:
            raw = msgpack.unpackb(data, raw=False, use_list=True, ext_hook=_no_ext)
        except InvalidManifest:
            raise
        except Exception as exc:
            raise InvalidManifest(f"revision is not valid msgpack: {exc}", "") from None
        if not (isinstance(raw, list) and len(raw) == 12 and raw[0] == REVISION_FORMAT):
            raise InvalidManifest("not a revision record", "")
        _, job, number, parent, bundle, reason, author, at_ns, paths, message, step, source = raw
        if not isinstance(bundle, bytes) or len(bundle) != 32:
            raise InvalidManifest("revision bundle is not 32 bytes", "")
        if not isinstance(paths, list):
            raise InvalidManifest("revision paths is not an array", "")
        revision = cls(
            job,
            number,
            parent,
            bundle.hex(),
            reason,
            author,
            at_ns,
            tuple(paths),
            message,
            step,
            Source.from_wire(source),
        ).check()
        if revision.encode() != data:
            raise InvalidManifest("revision is not in canonical form", "")
        return revision


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def object_kind(data: bytes) -> str:
    """Tell a stored manifest from a revision record from a plain blob, for `launch cat`."""
    for kind, decoder in (("manifest", Manifest.decode), ("revision", Revision.decode)):
        try:
            decoder(data)
        except InvalidManifest:
            continue
        return kind
    return "blob"

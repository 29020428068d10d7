"""The freeze stat cache: this module owns its file, its format and the rule for trusting it.

Like git's index, the cache keeps one row for every path the last freeze looked at, in path
order: the path's stat as it was just before the file was read (mode, size, mtime_ns, inode,
ctime_ns), its kind, its blob (SHA-256), its git blob id (SHA-1 of git's `blob <size>\\0`
header and the bytes: it lets git vouch for a file, see launcher/gitview.py), for a symlink its
target, and whether git vouched for it last time. A path whose stat is unchanged is not read
again. Paths that were left out (a deleted tracked file, a fifo) have a row without kind, so
that the next freeze can go through the same list without asking where anything is.

Trust rule (git's "racy git" rule): a row's stat is only used when the file's mtime is older
than the moment the cache was written by more than RACY_NS. A file changed in the same clock
tick as the stat that was cached can keep size, mtime and ctime; such a file is read again
until its mtime is safely in the past. Rows that fail the rule are loaded with an mtime of
-1, which no stat matches. Whether a blob is still in the store is the caller's to check.

Beside the rows the cache keeps one opaque value for freeze (`extra`: what git said last time,
parsed), so that an unchanged tree is not parsed again.

The file is msgpack, one array, in columns rather than rows: a warm freeze of 7,000 files has
a few tens of milliseconds in all, and loading an array per row would take a fifth of them.
It is written whole to a temp file and renamed into place, so a reader sees the old cache or
the new one. A cache that is missing, unreadable, of another format or of another root is
simply empty: losing it costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

CACHE_FORMAT = 3
RACY_NS = 2_000_000_000  # git uses the index's own mtime; 2 s also absorbs small clock skew
NO_BLOB = "0" * 64
NO_GIT_BLOB = "0" * 40
_KIND_CODES = {"file": "f", "exec": "x", "symlink": "l", "": "-"}
_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
_VOUCHED = bytes.maketrans(b"01", b"\0\1")

Key = tuple[int, int, int, int, int]  # mode, size, mtime_ns, ino, ctime_ns
NO_KEY: Key = (0, 0, 0, 0, 0)  # the key of a path left out: mode 0 matches nothing on disk
_NEVER_RACY = 2**63  # the racy limit of a table built to be saved: every key as it was taken


def stat_key(st: os.stat_result) -> Key:
    """The five stat fields that must all be unchanged for a cached row to be used."""
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass
class Table:
    """Rows in path order, as parallel sequences. `kinds[i]` is "" for a path left out (its
    key is NO_KEY). `vouched[i]` is true if git vouched for the row's bytes last time.

    A loaded table keeps the stats flat and the git blob ids as one string, and makes keys
    only when asked (`key(i)`, `keys`): a warm freeze of a git tree needs only the sizes."""

    paths: list[str] = field(default_factory=list)
    _keys: Sequence[Key] | None = field(default_factory=list)
    kinds: Sequence[str] = field(default_factory=list)
    blobs: Sequence[str] = field(default_factory=list)
    git_blobs: str = ""
    targets: dict[str, str] = field(default_factory=dict)
    vouched: Sequence[int] = field(default_factory=list)
    _stats: Sequence[int] = ()  # size, mtime_ns... flat, when loaded
    _racy_after: int = 0  # mtimes at or after this are racy (see the module's docstring)
    _position: dict[str, int] | None = None
    _present: list[str] | None = None

    @classmethod
    def of_stats(
        cls,
        paths: list[str],
        stats: list[int],
        kinds: list[str],
        blobs: list[str],
        git_blobs: str,
        targets: dict[str, str],
        vouched: Sequence[int],
    ) -> Table:
        """A table to save with these stats, flat, as they were taken (none racy-adjusted)."""
        return cls(paths, None, kinds, blobs, git_blobs, targets, vouched, stats, _NEVER_RACY)

    def raw_stats(self) -> Sequence[int]:
        """The stats, flat, as they were taken (a racy row's mtime included)."""
        if self._keys is None:
            return self._stats
        return [field for key in self._keys for field in key]

    def flat_keys(self) -> Sequence[int]:
        """The keys, flat, as key() gives them (a racy row's mtime -1): what a save writes."""
        if self._keys is None and self._racy_after == _NEVER_RACY:
            return self._stats  # nothing to adjust
        return [field for key in self.keys for field in key]

    def present(self) -> list[str]:
        """The paths that were in the tree (not left out), in order (built once: a freeze
        compares them with its manifest's twice)."""
        if self._present is None:
            kinds = zip(self.paths, self.kinds, strict=True)
            self._present = [path for path, kind in kinds if kind]
        return self._present

    def key(self, i: int) -> Key:
        if self._keys is not None:
            return self._keys[i]
        mode, size, mtime, ino, ctime = self._stats[5 * i : 5 * i + 5]
        return (mode, size, mtime if mtime < self._racy_after else -1, ino, ctime)

    @property
    def keys(self) -> Sequence[Key]:
        if self._keys is None:
            self._keys = [self.key(i) for i in range(len(self.paths))]
        return self._keys

    @property
    def sizes(self) -> Sequence[int]:
        return self._stats[1::5] if self._keys is None else [k[1] for k in self._keys]

    def git_blob(self, i: int) -> str:
        return self.git_blobs[40 * i : 40 * i + 40]

    def position(self) -> dict[str, int]:
        """Row number by path (built on first use)."""
        if self._position is None:
            self._position = dict(zip(self.paths, range(len(self.paths)), strict=True))
        return self._position


@dataclass
class StatCache:
    """The last freeze of `root`: its rows, when they were written, the bundle they made.

    That bundle's manifest went to the store after all of its blobs (the store's write
    order), so finding it there proves every blob of the rows present at once, without one
    `has` call per file.
    """

    root: str
    table: Table = field(default_factory=Table)
    written_ns: int = 0
    bundle_id: str | None = None
    extra: Any = None


def load(path: Path | None, root: str) -> StatCache:
    """The cache at `path` for the tree at `root`; empty if there is none worth trusting."""
    empty = StatCache(root)
    if path is None:
        return empty
    try:
        data = path.read_bytes()
    except OSError:
        return empty
    try:
        return _decode(data, root) or empty
    except Exception:  # a torn, foreign or corrupt cache is only a cold cache
        return empty


def _decode(data: bytes, root: str) -> StatCache | None:
    raw = msgpack.unpackb(data, raw=False, use_list=False)
    fmt, cached_root, written_ns, bundle_id, paths, stats, kinds, blobs, git_blobs = raw[:9]
    targets, vouched, extra = raw[9:]
    if fmt != CACHE_FORMAT or cached_root != root or not isinstance(written_ns, int):
        return None
    n = len(paths)
    if not (len(stats) == 5 * n == 5 * len(kinds) == 5 * len(vouched) == 5 * len(blobs)):
        return None
    if len(git_blobs) != 40 * n or len(targets) != kinds.count("l"):
        return None
    links = [name for name, code in zip(paths, kinds, strict=True) if code == "l"]
    table = Table(
        list(paths),
        None,
        list(map(_KINDS.__getitem__, kinds)),
        blobs,
        git_blobs,
        dict(zip(links, targets, strict=True)),
        vouched.translate(_VOUCHED),
        stats,
        written_ns - RACY_NS,
    )
    return StatCache(root, table, written_ns, bundle_id, extra)


def save(path: Path, root: str, table: Table, bundle_id: str | None, extra: Any = None) -> None:
    """Write the cache atomically (temp file, rename). The write time is taken after every
    stat it holds was taken, which is what the racy rule needs. `extra` must be msgpack
    made of arrays, strings, bytes, integers, booleans and None."""
    stats = table.flat_keys()
    kinds = "".join(_KIND_CODES[kind] for kind in table.kinds)
    links = (p for p, k in zip(table.paths, table.kinds, strict=True) if k == "symlink")
    body: list[Any] = [
        CACHE_FORMAT,
        root,
        time.time_ns(),
        bundle_id,
        list(table.paths),  # arrays of strings: msgpack makes them in C, fast
        stats,
        kinds,
        list(table.blobs),
        table.git_blobs,
        [table.targets[p] for p in links],
        bytes(49 if flag else 48 for flag in table.vouched),  # b"1" or b"0" each
        extra,
    ]
    data = msgpack.packb(body, use_bin_type=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # one per writer
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise

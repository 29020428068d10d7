"""The freeze stat cache: this module owns its file, its format and the rule for trusting it.

Like git's index, the cache keeps one row for every path the last freeze looked at, in path
order: the path's stat as it was just before the file was read (mode, size, mtime_ns, inode,
ctime_ns), its kind, its blob (SHA-256), its git blob id (SHA-1 of git's `blob <size>\\0`
header and the bytes: it lets git vouch for a file, see launcher/freeze.py), for a symlink its
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

Key = tuple[int, int, int, int, int]  # mode, size, mtime_ns, ino, ctime_ns
NO_KEY: Key = (0, 0, 0, 0, 0)  # the key of a path left out: mode 0 matches nothing on disk


def stat_key(st: os.stat_result) -> Key:
    """The five stat fields that must all be unchanged for a cached row to be used."""
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass
class Table:
    """Rows in path order, as parallel lists. `kinds[i]` is "" for a path left out (its key
    is NO_KEY). Git blob ids stay one string until asked for: a warm freeze rarely needs
    them. `vouched[i]`: git vouched for the row's bytes last time."""

    paths: list[str] = field(default_factory=list)
    keys: Sequence[Key] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    git_blobs: str = ""
    targets: dict[str, str] = field(default_factory=dict)
    vouched: Sequence[bool] = field(default_factory=list)
    _position: dict[str, int] | None = None

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
    names = paths.split("\0") if paths else []
    n = len(names)
    if not (len(stats) == 5 * n == 5 * len(kinds) == 5 * len(vouched)):
        return None
    if len(blobs) != 64 * n or len(git_blobs) != 40 * n or len(targets) != kinds.count("l"):
        return None
    racy_after = written_ns - RACY_NS
    keys = [
        key if key[2] < racy_after else (key[0], key[1], -1, key[3], key[4])
        for key in zip(*[iter(stats)] * 5, strict=True)
    ]
    links = [name for name, code in zip(names, kinds, strict=True) if code == "l"]
    table = Table(
        names,
        keys,
        [_KINDS[code] for code in kinds],
        [blobs[i : i + 64] for i in range(0, len(blobs), 64)],
        git_blobs,
        dict(zip(links, targets, strict=True)),
        [flag == "1" for flag in vouched],
    )
    return StatCache(root, table, written_ns, bundle_id, extra)


def save(path: Path, root: str, table: Table, bundle_id: str | None, extra: Any = None) -> None:
    """Write the cache atomically (temp file, rename). The write time is taken after every
    stat it holds was taken, which is what the racy rule needs. `extra` must be msgpack
    made of arrays, strings, bytes, integers, booleans and None."""
    stats: list[int] = []
    for key in table.keys:
        stats.extend(key)
    kinds = "".join(_KIND_CODES[kind] for kind in table.kinds)
    links = (p for p, k in zip(table.paths, table.kinds, strict=True) if k == "symlink")
    body: list[Any] = [
        CACHE_FORMAT,
        root,
        time.time_ns(),
        bundle_id,
        "\0".join(table.paths),
        stats,
        kinds,
        "".join(table.blobs),
        table.git_blobs,
        [table.targets[p] for p in links],
        "".join("1" if flag else "0" for flag in table.vouched),
        extra,
    ]
    data = msgpack.packb(body, use_bin_type=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise

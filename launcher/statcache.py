"""The freeze stat cache: this module owns its file, its format and the rule for trusting it.

Like git's index, the cache remembers for every file of the last freeze its stat
(size, mtime_ns, inode, ctime_ns), its kind, its blob (SHA-256) and its git blob id (SHA-1 of
git's `blob <size>\\0` header and the bytes, which lets freeze tell a clean work tree without
running `git status`). A file whose stat is unchanged is not read again.

Trust rule (git's "racy git" rule): a row is only used when the file's mtime is older than the
moment the cache was written by more than RACY_NS. A file changed in the same clock tick as
the stat that was cached can keep size, mtime and ctime; such a file is read again until its
mtime is safely in the past. Whether the blob is still in the store is checked by the caller.

Beside the rows the cache keeps one opaque value for freeze (`listing`: the last git listing,
parsed, under the digest of git's output), so that an unchanged tree is not parsed again.

The file is msgpack, one array, in columns rather than rows: loading 7,000 rows this way costs
about a millisecond, a quarter of what an array per row costs, and a warm freeze has only a few
tens of milliseconds to spend. It is written whole to a temp file and renamed into place, so a
reader sees the old cache or the new one. A cache that is missing, unreadable, of another
format or of another root is simply empty: losing it costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

CACHE_FORMAT = 1
RACY_NS = 2_000_000_000  # git uses the index's own mtime; 2 s also absorbs small clock skew

Stat = tuple[int, int, int, int]  # size, mtime_ns, ino, ctime_ns

# What one file hashed to: (stat just before it was read, kind, blob, git blob id). A plain
# tuple, not a dataclass: building 7,000 of them must cost well under a millisecond.
Row = tuple[Stat, str, str, str]


def stat_key(st: os.stat_result) -> Stat:
    """The four stat fields that must all be unchanged for a cached row to be used."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass
class StatCache:
    """Rows by path, as loaded; `written_ns` is when they were saved (0: never).

    `bundle_id` is the bundle the rows were saved with. Its manifest went to the store after
    all of its blobs (the store's write order), so finding it there proves every blob it lists
    present at once, without one `has` call per file.
    """

    root: str
    rows: dict[str, Row] = field(default_factory=dict)
    written_ns: int = 0
    bundle_id: str | None = None
    listing: tuple[bytes, Any] | None = None  # (digest, value): freeze's, opaque here

    def lookup(self, path: str, key: Stat, kind: str) -> Row | None:
        """The row for `path` if it may be trusted for a file with this stat and kind."""
        row = self.rows.get(path)
        if row is None or row[0] != key or row[1] != kind:
            return None
        if key[1] >= self.written_ns - RACY_NS:  # racy: changed in the tick that was cached?
            return None
        return row

    @property
    def racy_before_ns(self) -> int:
        """Rows of files with an mtime at or after this are not trusted (see `lookup`)."""
        return self.written_ns - RACY_NS


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
    fmt, cached_root, written_ns, bundle_id, paths, stats, kinds, blobs, git_blobs, listing = raw
    if fmt != CACHE_FORMAT or cached_root != root or not isinstance(written_ns, int):
        return None
    names = paths.split("\0") if paths else []
    n = len(names)
    if not (len(stats) == 4 * n and len(kinds) == n and len(blobs) == 64 * n):
        return None
    if len(git_blobs) != 40 * n:
        return None
    keys = zip(*[iter(stats)] * 4, strict=True)
    kind_list = ["exec" if k == "x" else "file" for k in kinds]
    blob_list = [blobs[i : i + 64] for i in range(0, len(blobs), 64)]
    git_list = [git_blobs[i : i + 40] for i in range(0, len(git_blobs), 40)]
    rows = dict(zip(names, zip(keys, kind_list, blob_list, git_list, strict=True), strict=True))
    if listing is not None:
        digest, value = listing
        listing = (digest, value)
    return StatCache(root, rows, written_ns, bundle_id, listing)


def save(
    path: Path,
    root: str,
    rows: Iterable[tuple[str, Row]],
    bundle_id: str | None,
    listing: tuple[bytes, Any] | None = None,
) -> None:
    """Write the cache atomically (temp file, rename). The write time is taken after every
    stat it holds was taken, which is what the racy rule needs. `listing` must be msgpack
    made of arrays, strings, bytes, integers, booleans and None."""
    names: list[str] = []
    stats: list[int] = []
    kinds: list[str] = []
    blobs: list[str] = []
    git_blobs: list[str] = []
    for name, (key, kind, blob, git_blob) in rows:
        names.append(name)
        stats.extend(key)
        kinds.append("x" if kind == "exec" else "f")
        blobs.append(blob)
        git_blobs.append(git_blob)
    body: list[Any] = [
        CACHE_FORMAT,
        root,
        time.time_ns(),
        bundle_id,
        "\0".join(names),
        stats,
        "".join(kinds),
        "".join(blobs),
        "".join(git_blobs),
        None if listing is None else list(listing),
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

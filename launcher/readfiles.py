"""Reading the files the scan missed: this module owns reading each of them once, hashing
those same bytes (SHA-256: the blob id; SHA-1 of git's blob header and the bytes: git's id
for them) and handing them to `Store.put_many` in batches.

Large trees are read and hashed on two threads: os.read and hashlib release the GIL.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.protocol.objects import Entry, Kind
from launcher import statcache
from launcher.gitview import Excluded

if TYPE_CHECKING:
    from agent.store import Store
    from launcher.pending import PendingStore

BATCH_BYTES = 64 * 2**20  # blobs handed to one put_many: the store syncs once per batch
BATCH_FILES = 8192
READ_THREADS = 2  # the machines this runs on have two cores or more
CHUNK_BYTES = 4 * 2**20  # one unit of work for a reading thread
CHUNK_FILES = 256
PARALLEL_MIN_BYTES = 8 * 2**20  # smaller jobs (in bytes and in files) are read on the
PARALLEL_MIN_FILES = 512  # calling thread: there, threads cost more than they save
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
Row = tuple[statcache.Key, str, str, str]  # a stat cache row: stat, kind, blob, git blob


@dataclass
class Read:
    """What reading the misses gave: entries, cache rows, and what went wrong."""

    entries: list[Entry] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)
    excluded: list[Excluded] = field(default_factory=list)
    oversize: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    files: int = 0


# One file's outcome, from a reading thread: (path, kind, stat, bytes, blob, git blob) when it
# was read, else (path, problem, detail, None, "", "") with problem one of "oversize",
# "unreadable", "vanished" (detail: the size, or the reason).
_Outcome = tuple[str, str, statcache.Key | str | int, bytes | None, str, str]


def read_all(
    top: str,
    misses: list[tuple[str, Kind, int]],
    store: Store | PendingStore,
    max_file_size: int,
    git_ids: bool = True,
) -> Read:
    """Read every miss once, hash those bytes, and hand the same bytes to the store.

    Big jobs use READ_THREADS threads, each reading and hashing a chunk of files, with a
    bounded number of chunks in flight so memory stays near one batch; the calling thread
    stores each batch meanwhile (the store's writes release the GIL too).
    """
    read = Read()
    if not misses:
        return read
    chunks = list(_chunks(misses))
    parallel = len(chunks) > 1 and (
        len(misses) >= PARALLEL_MIN_FILES or sum(m[2] for m in misses) >= PARALLEL_MIN_BYTES
    )
    batch: list[tuple[str, bytes]] = []
    batch_bytes = 0
    batched: set[str] = set()
    limit = getattr(store, "batch_bytes", BATCH_BYTES)  # a PendingStore's are smaller
    for outcomes in _map_chunks(top, chunks, max_file_size, git_ids, parallel):
        for path, kind, key, data, blob, git_blob in outcomes:
            if data is None:
                if kind == "oversize":
                    assert isinstance(key, int)
                    read.oversize.append((path, key))
                elif kind == "vanished":
                    read.excluded.append(Excluded(path, "vanished while freezing"))
                else:
                    read.unreadable.append((path, str(key)))
                continue
            assert isinstance(key, tuple)
            read.entries.append(Entry(path, kind, len(data), blob))  # type: ignore[arg-type]
            read.rows[path] = (key, kind, blob, git_blob)
            read.bytes += len(data)
            read.files += 1
            if blob not in batched:
                batched.add(blob)
                batch.append((blob, data))
                batch_bytes += len(data)
                if batch_bytes >= limit or len(batch) >= BATCH_FILES:
                    store.put_many(batch)
                    batch, batch_bytes = [], 0
    if batch:
        store.put_many(batch)
    return read


def _chunks(misses: list[tuple[str, Kind, int]]) -> Iterator[list[str]]:
    """Group files into chunks of about CHUNK_BYTES or CHUNK_FILES (sizes from the scan's
    stat are estimates: the read decides)."""
    chunk: list[str] = []
    size = 0
    for path, _, estimate in misses:
        chunk.append(path)
        size += estimate
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_FILES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _map_chunks(
    top: str, chunks: list[list[str]], max_file_size: int, git_ids: bool, parallel: bool
) -> Iterator[list[_Outcome]]:
    """Outcomes chunk by chunk, in order: on this thread for a small job, else on threads."""
    if not parallel:
        for chunk in chunks:
            yield _read_chunk(top, chunk, max_file_size, git_ids)
        return
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="freeze-read") as pool:
        pending: deque[Future[list[_Outcome]]] = deque()
        todo = iter(chunks)
        for chunk in todo:
            pending.append(pool.submit(_read_chunk, top, chunk, max_file_size, git_ids))
            if len(pending) >= 2 * READ_THREADS:
                break
        while pending:
            outcomes = pending.popleft().result()
            more = next(todo, None)
            if more is not None:
                pending.append(pool.submit(_read_chunk, top, more, max_file_size, git_ids))
            yield outcomes


def _read_chunk(top: str, chunk: list[str], max_file_size: int, git_ids: bool) -> list[_Outcome]:
    return [_read_one(top, path, max_file_size, git_ids) for path in chunk]


def _read_one(top: str, path: str, max_file_size: int, git_ids: bool) -> _Outcome:
    """Open without following symlinks, stat the open file, read it, hash what was read.

    The stat kept for the cache is the one taken before reading: if the file changes while it
    is read, its stat will differ next time and it is read again.
    """
    try:
        fd = os.open(top + "/" + path, _OPEN_FLAGS)
    except FileNotFoundError:
        return (path, "vanished", "", None, "", "")
    except OSError as exc:  # ELOOP: it became a symlink since the scan
        return (path, "unreadable", why(exc), None, "", "")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return (path, "unreadable", "changed while freezing: try again", None, "", "")
        if st.st_size > max_file_size:
            return (path, "oversize", st.st_size, None, "", "")
        data = _read_fd(fd, st.st_size, max_file_size)
    except OSError as exc:
        return (path, "unreadable", why(exc), None, "", "")
    finally:
        os.close(fd)
    if data is None:
        return (path, "oversize", max_file_size + 1, None, "", "")
    kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
    git = statcache.NO_GIT_BLOB
    if git_ids:  # git's id serves only where git lists the tree (launcher/gitview.py)
        sha1 = hashlib.sha1(b"blob %d\0" % len(data))
        sha1.update(data)
        git = sha1.hexdigest()
    return (path, kind, statcache.stat_key(st), data, hashlib.sha256(data).hexdigest(), git)


def _read_fd(fd: int, size: int, limit: int) -> bytes | None:
    """The file's bytes, or None if it grew past `limit` while read.

    One read() for a file of the size its stat gave. A file that grows after that read is
    not followed: its stat, taken before, will differ next time, so it will be read again.
    Anything else (it shrank, or a read was short, as for files over 2 GiB) reads to EOF.
    """
    first = os.read(fd, size + 1)
    if len(first) == size:
        return first
    parts = [first]
    total = len(first)
    while True:
        if total > limit:
            return None
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)
        total += len(part)


def why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__

"""The content-addressed object store on disk: this module owns `root/objects`, `root/packs`
and `root/tmp`.

An object is a file named by the SHA-256 of its bytes (`objects/ab/cdef...`: the first two
hex digits name a shard directory, the other 62 the file), or, when it is small and came in a
batch of many, one of the objects of a pack (`packs/`, agent/packs.py): a tree of thousands
of small files then costs one file to store, not thousands, which is most of what storing it
costs. (A departure from DESIGN.md's one file per object, for that reason; large objects stay
files of their own, which a copy-on-write file system can clone into a code directory.)
Nothing is stored that was not hashed first, and an object or a pack appears only by rename
after its bytes are on disk, so a crash leaves the whole object or none (invariant 1). Both
are read-only once visible.

`materialize` turns a manifest back into a tree. It treats the manifest as hostile and the
destination as contested: every directory is walked by file descriptor with O_NOFOLLOW, so
nothing is ever written outside the destination, even if a directory in it is swapped for a
symlink while it runs.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import packs
from agent.protocol.errors import (
    AmbiguousRef,
    ChecksumMismatch,
    InvalidManifest,
    JobStateError,
    ObjectMissing,
)
from agent.protocol.objects import (
    Entry,
    Manifest,
    blob_id,
    check_object_id,
    short,
)

log = logging.getLogger("launch-agent")

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
MANIFEST_MEMO = 8  # decoded manifests kept in memory, most recent last
# Materialising: files of THREAD_COPY_BYTES or more are copied on COPY_THREADS threads (at
# most COPY_AHEAD waiting), several at a time; smaller ones on the calling thread. Creating
# and filling a small file is a few short system calls, each of which hands the GIL to
# another thread: measured on tmpfs with a 6,809-file tree, four threads took 0.33 s of wall
# and 0.43 s of CPU where one took 0.21 s and 0.23 s.
COPY_THREADS = 4
COPY_AHEAD = 16
THREAD_COPY_BYTES = 256 * 1024
# Objects smaller than this, PACK_MIN or more of them in one batch, are stored in a pack; so
# every packed object is materialised on the calling thread.
PACK_MAX_SIZE = THREAD_COPY_BYTES
PACK_MIN = 16
PACKS_TICK_NS = 2 * 10**9  # packs/ changed less than this ago is listed again on a miss
MIN_PREFIX = 4
_TEMP_NUMBERS = itertools.count()  # next() is atomic under the GIL
_HEX = frozenset("0123456789abcdef")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors the kernel gives when the tree clashes with itself or changes underneath us.
_TREE_ERRNOS = {errno.EEXIST, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
# Errors that mean "this way of copying does not work here", so the next way is tried.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


def _load_syncfs() -> Any:
    """libc's syncfs(2), or None where it does not exist (then each temp file is fsync-ed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


class Store:
    """Objects under `root`, written once and verified on the way in and out."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.packs = self.root / "packs"
        self.tmp = self.root / "tmp"
        self._objects = str(self.objects)  # for string paths on hot loops (no pathlib)
        self._manifests: dict[str, Manifest] = {}  # recently stored or read, by bundle id
        # Ids seen present. Objects are never removed by the store, so once present an object
        # stays: a submit asks about thousands of blobs, and a set answers without a stat each.
        # (An object deleted by hand is still caught: materialising it is ObjectMissing.)
        self._present: set[str] = set()
        self._complete: set[str] = set()  # bundles whose blobs were all found present
        # Packed objects: id -> (pack file, offset, size); each pack's index read once. Other
        # processes may add packs (two launchers share a store): a lookup that fails looks
        # for new ones, at the cost of one stat when there are none.
        self._packed: dict[str, tuple[str, int, int]] = {}
        self._pack_names: set[str] = set()
        self._packs_seen = -1  # st_mtime_ns of packs/ when last listed
        self._packs_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        for directory, mode in ((self.objects, 0o755), (self.packs, 0o755), (self.tmp, 0o700)):
            if not directory.is_dir():
                directory.mkdir(mode=mode)
                directory.chmod(mode)  # mkdir's mode is filtered by the umask

    def path(self, object_id: str) -> Path:
        """Where an object lives when it is a file of its own (not packed). An id that is not
        64 lowercase hex is InvalidManifest."""
        check_object_id(object_id)
        return self.objects / object_id[:2] / object_id[2:]

    def has(self, object_id: str) -> bool:
        if object_id in self._present:
            return True
        check_object_id(object_id)
        self._load_packs()
        return self._has(object_id)

    def _has(self, object_id: str) -> bool:
        """has() for an id already checked, packs already looked for."""
        if object_id in self._present or os.path.isfile(self._file(object_id)):
            self._present.add(object_id)
            return True
        return False

    def _load_packs(self) -> None:
        """Read the index of every pack not seen yet (one stat when there is none)."""
        try:
            seen = os.stat(self.packs).st_mtime_ns
        except FileNotFoundError:
            return
        # A directory's time moves in ticks of a few ms: one changed again within its last
        # tick looks unchanged, so a recent time is no proof and the directory is listed.
        settled = time.time_ns() - seen > PACKS_TICK_NS
        if seen == self._packs_seen and settled:
            return
        with self._packs_lock:
            if seen == self._packs_seen and settled:
                return
            for name in sorted(os.listdir(self.packs)):
                if name.endswith(packs.SUFFIX) and name not in self._pack_names:
                    path = f"{self.packs}/{name}"
                    try:
                        entries = self._read_pack_index(path)[0]
                    except (OSError, packs.CorruptPack) as exc:
                        # Its objects count as absent (they are sent again); fsck names it.
                        log.warning("store: pack %s is unreadable: %s", name, exc)
                        continue
                    self._add_pack(name, entries)
            self._packs_seen = seen

    def _add_pack(self, name: str, entries: Iterable[tuple[str, int, int]]) -> None:
        path = f"{self.packs}/{name}"
        for object_id, offset, size in entries:
            self._packed.setdefault(object_id, (path, offset, size))
            self._present.add(object_id)
        self._pack_names.add(name)

    @staticmethod
    def _read_pack_index(path: str) -> tuple[list[tuple[str, int, int]], str]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return packs.read_index(fd)
        finally:
            os.close(fd)

    def _file(self, object_id: str) -> str:
        """path() as a string, without pathlib's cost (thousands of calls per manifest), for
        an id already checked (by has(), Entry.check() or its bytes' hash)."""
        return f"{self._objects}/{object_id[:2]}/{object_id[2:]}"

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids not in the store, sorted and de-duplicated; an invalid id is InvalidManifest.

        A shard directory that does not exist answers for every id in it with one stat: the
        first upload to a node asks about thousands of blobs of an empty store."""
        return self._missing([check_object_id(i) for i in set(ids) - self._present])

    def _missing(self, unknown: Iterable[str]) -> list[str]:
        """missing() for ids already checked (put_many's were, with their bytes)."""
        unknown = [i for i in set(unknown) if i not in self._present]
        if unknown:
            self._load_packs()
            unknown = [i for i in unknown if i not in self._present]
        shards = {i[:2] for i in unknown}
        absent = {s for s in shards if not os.path.isdir(f"{self._objects}/{s}")}
        return sorted(i for i in unknown if i[:2] in absent or not self._has(i))

    def lacks(self, manifest: Manifest, base: str = "", puts: Iterable[Entry] = ()) -> list[str]:
        """The blobs of `manifest` not in the store. For a manifest made from bundle `base` by
        `puts` (and deletions), only the puts' blobs are looked at when all of base's were
        found here before: objects, once present, stay. A resubmit of one changed file then
        costs a set of one, not of every blob of the tree, on every node."""
        # A validated manifest's ids were checked when it was built.
        find = self._missing if manifest.validated else self.missing
        if base in self._complete:
            missing = find(e.blob for e in puts if e.kind != "symlink")
        else:
            missing = find(manifest.blobs())
        if not missing:
            self._complete.add(manifest.bundle_id)
        return missing

    def put(self, object_id: str, data: bytes) -> bool:
        """Store one object; True if newly written, False if it was already there.

        The bytes are hashed before anything is written: a mismatch is ChecksumMismatch and
        leaves neither an object nor a temp file.
        """
        _verify(object_id, data)
        if self.has(object_id):
            return False
        return self._write({object_id: data}, False, {}) == 1

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> int:
        """Store a batch; returns how many objects were new.

        Every item is verified before the first byte is written (one mismatch and nothing is
        stored). The batch costs one syncfs(2) instead of one fsync per object, which is what
        makes uploading thousands of small files fast.
        """
        pending: dict[str, bytes] = {}
        for object_id, data in items:
            _verify(object_id, data)
            pending[object_id] = data
        pending = {i: pending[i] for i in self._missing(pending)}
        small = {i: d for i, d in pending.items() if len(d) < PACK_MAX_SIZE}
        if len(small) < PACK_MIN:
            small = {}
        loose = {i: d for i, d in pending.items() if i not in small}
        batch_sync = len(loose) + bool(small) > 1 and _SYNCFS is not None
        return self._write(loose, batch_sync, small)

    def _write(self, loose: dict[str, bytes], batch_sync: bool, packed: dict[str, bytes]) -> int:
        """Temp files (one per loose object, one for the pack), sync, rename into place, fsync
        each touched directory once."""
        temps: list[tuple[str, str]] = []  # (final path, temp path)
        chmod = not modes_exact()
        pack: tuple[str, list[tuple[str, int, int]]] | None = None
        try:
            for object_id, data in loose.items():
                temp = self._write_temp(object_id[:16], (data,), not batch_sync, chmod)
                temps.append((self._file(object_id), temp))
            if packed:
                pieces, index, name = packs.build(packed.items())
                temp = self._write_temp("pack", pieces, not batch_sync, chmod)
                temps.append((f"{self.packs}/{name}", temp))
                pack = (name, index)
            if batch_sync and temps:
                _syncfs(str(self.tmp))
            # String paths, and each shard looked at once per batch: thousands of objects.
            touched: set[str] = set()
            for n, (final, temp) in enumerate(temps):
                directory = final.rpartition("/")[0]
                if directory not in touched and not os.path.isdir(directory):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(directory, 0o755)
                    touched.add(self._objects)  # the new shard's own name must be durable too
                os.rename(temp, final)
                temps[n] = (final, "")  # nothing left to clean up
                touched.add(directory)
            for directory in sorted(touched, reverse=True):
                _fsync_dir(directory)
        finally:
            for _, temp in temps:
                if temp:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
        self._present.update(loose)
        if pack is not None:
            self._add_pack(*pack)
        return len(loose) + len(packed)

    def _write_temp(self, label: str, pieces: Sequence[bytes], fsync: bool, chmod: bool) -> str:
        # Read-only from creation: the object is never visible with a writable mode. Named by
        # process and a counter, unique among this process's threads (no random bytes: a
        # system call per object); a name left by an earlier process of the same pid is
        # skipped.
        while True:
            temp = f"{self.tmp}/{label}.{os.getpid()}.{next(_TEMP_NUMBERS)}"
            try:
                fd = os.open(temp, _NEW_FILE, 0o444)
                break
            except FileExistsError:
                continue
        try:
            for data in pieces:
                _write_all(fd, data)
            if chmod:
                os.fchmod(fd, 0o444)
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def get(self, object_id: str) -> bytes:
        """An object's bytes: ObjectMissing if absent, ChecksumMismatch if the file is corrupt."""
        data = self.read(object_id)
        _verify(object_id, data)
        return data

    def read(self, object_id: str) -> bytes:
        """An object's bytes, not hashed again: for sending them to a node, which verifies
        what it stores. ObjectMissing if absent."""
        check_object_id(object_id)
        for attempt in range(2):
            where = self._packed.get(object_id)
            if where is not None:
                try:
                    return _read_packed(*where)
                except FileNotFoundError:  # removed by hand: as a removed object would be
                    raise ObjectMissing(object_id) from None
            try:
                with open(self._file(object_id), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                if attempt == 0:
                    self._load_packs()  # packed meanwhile by another process?
        raise ObjectMissing(object_id)

    def put_manifest(self, manifest: Manifest, encoded: bytes | None = None) -> str:
        """Store a manifest as an object; returns its bundle id.

        The encoding is decoded again first, so a manifest built without validation (or not in
        canonical form) is refused with InvalidManifest rather than stored. `encoded`: the
        bytes `manifest` was just decoded from, or its encoding when it was built validated
        (by Manifest.of or apply_changes): canonical and checked already.
        """
        if encoded is None:
            encoded = manifest.encode()
            manifest = Manifest.decode(encoded)
        elif encoded is not manifest.encode() and encoded != manifest.encode():
            raise InvalidManifest("the bytes given are not this manifest's encoding", "")
        # Its id is the hash of exactly these bytes (taken once per manifest: a delta's was
        # taken when it was checked against the id the launcher named).
        bundle = manifest.bundle_id
        if not self.has(bundle):
            self._write({bundle: encoded}, False, {})
        self._remember(bundle, manifest)
        return bundle

    def get_manifest(self, bundle_id: str) -> Manifest:
        # Objects never change, so a manifest decoded (validated) once stays valid: a submit
        # stores it (put_manifest) and prepares from it right after, on every node.
        known = self._manifests.get(bundle_id)
        if known is not None and self.has(bundle_id):
            return known
        manifest = Manifest.decode(self.get(bundle_id))
        self._remember(bundle_id, manifest)
        return manifest

    def _remember(self, bundle_id: str, manifest: Manifest) -> None:
        self._manifests.pop(bundle_id, None)
        self._manifests[bundle_id] = manifest
        while len(self._manifests) > MANIFEST_MEMO:
            self._manifests.pop(next(iter(self._manifests)))

    def resolve(self, prefix: str) -> str:
        """The one object id starting with `prefix` (at least 4 hex digits).

        InvalidManifest if the prefix is malformed, ObjectMissing if no object matches,
        AmbiguousRef (detail: the matching ids) if several do.
        """
        prefix = prefix.lower()
        if len(prefix) < MIN_PREFIX or len(prefix) > 64 or not set(prefix) <= _HEX:
            raise InvalidManifest(f"{prefix!r} is not an object id prefix of 4 to 64 hex", "")
        shard = self.objects / prefix[:2]
        names = sorted(os.listdir(shard)) if shard.is_dir() else []
        loose = {prefix[:2] + n for n in names if n.startswith(prefix[2:]) and _is_hex(n, 62)}
        self._load_packs()
        found = sorted(loose.union(i for i in self._packed if i.startswith(prefix)))
        if not found:
            raise ObjectMissing(prefix)
        if len(found) > 1:
            shown = ", ".join(short(i) for i in found[:5])
            raise AmbiguousRef(f"{prefix} matches {len(found)} objects: {shown}", found)
        return found[0]

    def clean_tmp(self) -> int:
        """Remove temp files left by a crash; returns how many. Call only when no write runs
        (at agent start-up): a temp file in use would vanish under its writer."""
        removed = 0
        for entry in os.scandir(self.tmp):
            os.unlink(entry.path)
            removed += 1
        return removed

    def count(self) -> int:
        """How many distinct objects are stored, packed or not."""
        self._load_packs()
        loose = {s.name + n for s in os.scandir(self.objects) if s.is_dir() for n in os.listdir(s)}
        return len(loose.union(self._packed))

    def fsck(self) -> Iterator[tuple[str, str]]:
        """Re-hash every object; yield (object id or path, problem) for each one that is wrong.

        Problems: content that does not hash to the file's name or to its name in a pack's
        index, files that are not objects or packs (stray or wrong-named), a pack whose index
        is unreadable or not the one its name says, anything that is not a regular file. A
        healthy store yields nothing.
        """
        yield from self._fsck_packs()
        for shard in sorted(os.scandir(self.objects), key=lambda e: e.name):
            if not (shard.is_dir(follow_symlinks=False) and _is_hex(shard.name, 2)):
                yield shard.path, "stray entry: not an object shard directory"
                continue
            for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
                if not _is_hex(entry.name, 62):
                    yield entry.path, "stray file: its name is not an object id"
                elif not entry.is_file(follow_symlinks=False):
                    yield shard.name + entry.name, "not a regular file"
                else:
                    object_id = shard.name + entry.name
                    try:
                        with open(entry.path, "rb") as f:
                            actual = hashlib.file_digest(f, "sha256").hexdigest()
                    except OSError as exc:
                        yield object_id, f"unreadable: {exc}"
                        continue
                    if actual != object_id:
                        yield object_id, f"corrupt: content hashes to {short(actual)}"

    def _fsck_packs(self) -> Iterator[tuple[str, str]]:
        for entry in sorted(os.scandir(self.packs), key=lambda e: e.name):
            name = entry.name
            if not (name.endswith(packs.SUFFIX) and _is_hex(name[: -len(packs.SUFFIX)], 64)):
                yield entry.path, "stray entry: not a pack"
                continue
            if not entry.is_file(follow_symlinks=False):
                yield entry.path, "not a regular file"
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                yield entry.path, f"unreadable: {exc}"
                continue
            try:
                try:
                    index, proper = packs.read_index(fd)
                except (OSError, packs.CorruptPack) as exc:
                    yield entry.path, f"corrupt pack: {exc}"
                    continue
                if proper != name:
                    yield entry.path, f"corrupt pack: its index hashes to {proper}"
                for object_id, offset, size in index:
                    try:
                        actual = blob_id(packs.read_object(fd, offset, size))
                    except (OSError, packs.CorruptPack) as exc:
                        yield object_id, f"unreadable in pack {short(name)}: {exc}"
                        continue
                    if actual != object_id:
                        yield object_id, f"corrupt in pack {short(name)}: hashes to {short(actual)}"
            finally:
                os.close(fd)

    def materialize(self, manifest: Manifest, dest: Path) -> None:
        """Write the tree of `manifest` at `dest`, which must not exist or be an empty directory.

        Files are 0o444, executables 0o555, directories 0o755. Entries are checked (unless
        the manifest was validated: Manifest.validated), and every blob must be present before
        anything is created: InvalidManifest, ObjectMissing (listing all missing ids) or
        JobStateError (dest in the way) leave dest untouched. A clash found while writing (a
        file and a directory of one name, a directory swapped for a symlink) is
        InvalidManifest and may leave a partial tree in dest, but nothing is ever written
        outside dest: callers materialise into a staging directory and rename it into place.
        dest's parent must exist (else FileNotFoundError). Blobs are cloned or copied, not
        re-hashed: they were verified on the way in, and `fsck` re-verifies them.
        """
        if not manifest.validated:
            for entry in manifest.entries:
                entry.check()
        missing = self.lacks(manifest)  # at once for a tree that a prepare just checked
        if missing:
            raise ObjectMissing(missing)
        groups: dict[tuple[str, ...], list[Entry]] = defaultdict(list)
        for entry in manifest.entries:
            groups[tuple(entry.path.split("/")[:-1])].append(entry)
        dirs = sorted({p[:n] for p in groups for n in range(1, len(p) + 1)})
        root_fd = _open_dest(Path(dest))
        clone = _Cloner(self._packed)
        chmod = not modes_exact()
        try:
            with ThreadPoolExecutor(COPY_THREADS) as pool:
                pending: collections.deque[Future[None]] = collections.deque()

                def fill(parts: tuple[str, ...], dir_fd: int) -> None:
                    for entry in groups.get(parts, ()):
                        if entry.size < THREAD_COPY_BYTES or entry.blob in self._packed:
                            self._create(dir_fd, entry, clone, chmod)
                            continue
                        pending.append(
                            pool.submit(self._create_closing, os.dup(dir_fd), entry, clone, chmod)
                        )
                        while len(pending) > COPY_AHEAD:
                            pending.popleft().result()

                fill((), root_fd)
                # Sorted tuples are a depth-first pre-order: each directory is made through a
                # descriptor of its parent, opened once (no walk from the root per directory).
                stack: list[tuple[tuple[str, ...], int]] = []
                try:
                    for parts in dirs:
                        while stack and stack[-1][0] != parts[:-1]:
                            os.close(stack.pop()[1])
                        fd = _make_child(stack[-1][1] if stack else root_fd, parts, chmod)
                        stack.append((parts, fd))
                        fill(parts, fd)
                finally:
                    for _, fd in stack:
                        os.close(fd)
                while pending:
                    pending.popleft().result()
        finally:
            os.close(root_fd)
            clone.close()

    def _create_closing(self, dir_fd: int, entry: Entry, clone: _Cloner, chmod: bool) -> None:
        """_create on a copy thread, with a descriptor of the directory of its own."""
        try:
            self._create(dir_fd, entry, clone, chmod)
        finally:
            os.close(dir_fd)

    def _create(self, dir_fd: int, entry: Entry, clone: _Cloner, chmod: bool) -> None:
        name = safe_component(entry.path.rsplit("/", 1)[-1])
        try:
            if entry.kind == "symlink":
                assert entry.target is not None  # entry.check() guarantees it
                os.symlink(entry.target, name, dir_fd=dir_fd)
                return
            mode = 0o555 if entry.kind == "exec" else 0o444
            data = clone.packed(entry.blob)
            if data is not None:
                _new_file(dir_fd, name, mode, chmod, lambda dst: _write_all(dst, data))
                return
            try:
                src = os.open(self._file(entry.blob), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ObjectMissing(entry.blob) from None  # removed since the presence check
            try:
                _new_file(dir_fd, name, mode, chmod, lambda dst: clone(src, dst))
            finally:
                os.close(src)
        except OSError as exc:
            raise _tree_error(exc, entry.path) from None


def _new_file(
    dir_fd: int, name: str, mode: int, chmod: bool, fill: Callable[[int], object]
) -> None:
    """Create file `name` in dir_fd with `mode` (never over an existing one), `fill` it."""
    dst = os.open(name, _NEW_FILE, mode, dir_fd=dir_fd)
    try:
        fill(dst)
        if chmod:
            os.fchmod(dst, mode)
    finally:
        os.close(dst)


def _make_child(parent_fd: int, parts: Sequence[str], chmod: bool) -> int:
    """Create directory parts[-1] in parent_fd and return a descriptor of it, opened without
    following symlinks (a swap in between fails rather than escapes)."""
    name = safe_component(parts[-1])
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise _tree_error(exc, "/".join(parts)) from None
    try:
        if chmod:
            os.fchmod(fd, 0o755)
    except OSError as exc:
        os.close(fd)
        raise _tree_error(exc, "/".join(parts)) from None
    return fd


class _Cloner:
    """Copies for one materialisation: a copy-on-write clone (FICLONE) where the file system
    can (btrfs, XFS); once one is refused as unsupported, the rest of the tree, on the same
    file systems, goes straight to the in-kernel copy. A full disk or an I/O error is raised.
    Packed objects are read from their packs, each opened once (on the calling thread only:
    every packed object is small)."""

    def __init__(self, packed: dict[str, tuple[str, int, int]]) -> None:
        self.reflink = True
        self._packed = packed
        self._packs: dict[str, int] = {}

    def packed(self, object_id: str) -> bytes | None:
        """A packed object's bytes, or None when it is a file of its own."""
        where = self._packed.get(object_id)
        if where is None:
            return None
        path, offset, size = where
        fd = self._packs.get(path)
        if fd is None:
            try:
                fd = self._packs[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # removed since the presence check
                raise ObjectMissing(object_id) from None
        return _read_packed(path, offset, size, fd)

    def close(self) -> None:
        for fd in self._packs.values():
            os.close(fd)
        self._packs.clear()

    def __call__(self, src: int, dst: int) -> None:
        if self.reflink:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.reflink = False
        _copy(src, dst)


def modes_exact() -> bool:
    """Whether what is created now gets exactly the modes the store asks (0o755, 0o555,
    0o444): the umask clears none of their bits (022, 002, 0). Then no fchmod need follow
    each create, three fewer system calls per file on a tree of thousands. Read from /proc:
    os.umask() would have to set the mask to read it, under the other threads' creates."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8) & 0o755 == 0
    except (OSError, ValueError, IndexError):
        pass
    return False


def _read_packed(path: str, offset: int, size: int, fd: int | None = None) -> bytes:
    """An object's bytes from its pack (open at `fd`, else opened here); a pack cut short
    is an I/O error."""
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return packs.read_object(fd, offset, size)
    except packs.CorruptPack as exc:
        raise OSError(errno.EIO, f"pack {path}: {exc}") from None
    finally:
        if own:
            os.close(fd)


def _verify(object_id: str, data: bytes) -> None:
    check_object_id(object_id)
    actual = blob_id(data)
    if actual != object_id:
        raise ChecksumMismatch(object_id, actual)


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


def _syncfs(path: str) -> None:
    fd = os.open(path, DIR_FLAGS)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_component(name: str) -> str:
    """One path component, safe to pass with dir_fd: never empty, '.', '..', '/' or NUL."""
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise InvalidManifest(f"unsafe path component {name!r}", name)
    return name


def _open_dest(dest: Path) -> int:
    """Create dest (or accept an empty directory) and open it without following symlinks."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(dest, 0o755)
    try:
        fd = os.open(dest, DIR_FLAGS)
    except OSError as exc:
        raise JobStateError(
            f"cannot materialise into {dest}: not a directory ({exc.strerror})", str(dest)
        ) from None
    if os.listdir(fd):
        os.close(fd)
        raise JobStateError(f"cannot materialise into {dest}: it is not empty", str(dest))
    os.fchmod(fd, 0o755)
    return fd


def open_dir(root_fd: int, parts: Sequence[str]) -> int:
    """A new descriptor for root/parts, refusing any symlink on the way."""
    fd = os.dup(root_fd)
    for part in parts:
        try:
            child = os.open(safe_component(part), DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def make_dir(root_fd: int, parts: Sequence[str]) -> None:
    """Create root/parts (its parent exists); re-opened with O_NOFOLLOW to set its mode, so a
    swap in between fails rather than escapes."""
    try:
        parent = open_dir(root_fd, parts[:-1])
        try:
            os.mkdir(safe_component(parts[-1]), 0o755, dir_fd=parent)
        finally:
            os.close(parent)
        fd = open_dir(root_fd, parts)
        try:
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _tree_error(exc, "/".join(parts)) from None


def _tree_error(exc: OSError, where: str) -> Exception:
    """A clash inside the tree, or the tree changed underneath us, is InvalidManifest; any
    other OSError (a full disk, an I/O error) is returned as it is."""
    if exc.errno not in _TREE_ERRNOS:
        return exc
    return InvalidManifest(f"cannot create {where or '.'}: {exc.strerror}", where)


def _copy(src: int, dst: int) -> None:
    """Copy src (at offset 0) into the empty dst without a clone: copy_file_range, else
    sendfile, else read and write."""
    size = max(os.fstat(src).st_size, 1)
    steps: list[Callable[[], int]] = [
        lambda: os.copy_file_range(src, dst, size),
        lambda: os.sendfile(dst, src, None, size),
        lambda: _write_all(dst, os.read(src, 1 << 20)),
    ]
    for n, step in enumerate(steps):
        if n:  # start again from nothing after a way that is not supported here
            for fd in (src, dst):
                os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(dst, 0)
        try:
            while step():
                pass
            return
        except OSError as exc:
            if n == len(steps) - 1 or exc.errno not in _UNSUPPORTED:
                raise


def _write_all(fd: int, data: bytes) -> int:
    """Write all of data (os.write may write less); returns its length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)

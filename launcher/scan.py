"""The stat-cache scan: this module owns sorting every path of a listing into a hit (its stat
cache row holds, so it is not read), a miss (a file to read: launcher/readfiles.py), an
exclusion or a problem to report, and what comes of it: the manifest, and the rows the stat
cache (launcher/statcache.py) saves for next time.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import TYPE_CHECKING

from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import (
    Entry,
    Kind,
    Manifest,
    check_path,
    check_symlink_target,
    make_entry,
)
from launcher import statcache
from launcher.gitview import LAUNCHIGNORE, Excluded, FreezeError, Listing
from launcher.readfiles import Read, Row, why

if TYPE_CHECKING:
    from agent.store import Store
    from launcher.pending import PendingStore

path_of = attrgetter("path")


class Scan:
    """Sort every candidate: a hit (its cached row holds, so it is not read), a file to read
    (a miss), an exclusion, or a problem to report. Reads only symlink targets.

    A hit is either vouched for by git (see launcher/gitview.py; not even stat-ed) or a
    file whose stat matches its row. The loop over candidates is the warm path's inner loop,
    so it does as little as it can; anything but a hit goes to `rest`, sorted out afterwards
    by plainer code. When the listing is the cache's own (git said the same as last time),
    its rows line up with the candidates, and so do last time's vouchers.
    """

    def __init__(
        self,
        top: str,
        cache: statcache.StatCache,
        listing: Listing,
        max_file_size: int,
        vouch: bool,
    ) -> None:
        self.top = top
        self.cache = cache
        self.listing = listing
        self.max_file_size = max_file_size
        self.vouch_asked = vouch
        self._manifest: Manifest | None = None
        self.vouch = vouch and listing.git and not listing.attributes
        self.hits: list[Entry] = []
        self._rows: Sequence[int] = ()  # the cache row of each candidate (-1: none)
        self._hit_rows: list[int] | None = None
        self.others: list[Entry] = []  # entries that are not hits (symlinks looked at now)
        self.rows: dict[str, Row] = {}  # rows of symlinks looked at now (reads have theirs)
        self.targets: dict[str, str] = {}  # their targets
        self.seen: dict[str, os.stat_result] = {}  # stats taken, for a scan after this one
        self.rest: list[tuple[str, int, os.stat_result | None, OSError | None]] = []
        self.misses: list[tuple[str, Kind, int]] = []  # path, kind, size when stat-ed
        self.excluded: list[Excluded] = []
        self.oversize: list[tuple[str, int]] = []
        self.escaping: list[tuple[str, str]] = []
        self.bad_names: list[tuple[str, str]] = []
        self.unreadable: list[tuple[str, str]] = []
        self.deleted_tracked = False

    def run(self, known: dict[str, os.stat_result] | None = None) -> Scan:
        """Scan the listing; `known` are stats taken already (by a scan of a guess)."""
        table = self.cache.table
        candidates = self.listing.candidates
        rows: Sequence[int]
        vouched: Sequence[int] | repeat[int]
        if candidates is table.paths:
            rows, sizes, kinds, blobs = (
                range(len(candidates)),
                table.sizes,
                table.kinds,
                table.blobs,
            )
            vouched = table.vouched if self.vouch else repeat(0)
        else:
            where = table.position()
            rows = [where.get(path, -1) for path in candidates]
            every = table.sizes
            sizes = [every[i] if i >= 0 else 0 for i in rows]
            kinds = [table.kinds[i] if i >= 0 else "" for i in rows]
            blobs = [table.blobs[i] if i >= 0 else "" for i in rows]
            vouched = repeat(0)
            if self.vouch:
                vouches = self.listing.vouches
                vouched = [
                    i >= 0 and vouches(path, table.kinds[i], table.git_blob(i), table.key(i))
                    for path, i in zip(candidates, rows, strict=True)
                ]
        key_of = table.key
        targets = table.targets
        lstat = os.lstat
        prefix = self.top + "/"
        max_size = self.max_file_size
        make = make_entry
        self._rows = rows
        hits, rest, seen = self.hits, self.rest, self.seen
        columns = zip(candidates, rows, sizes, kinds, blobs, vouched, strict=False)  # repeat()
        for path, row, size, kind, blob, sure in columns:
            if sure and size <= max_size:
                hits.append(make(path, kind, size, blob, targets.get(path) if targets else None))
                continue
            st = known.get(path) if known else None
            if st is None:
                try:
                    st = lstat(prefix + path)
                except OSError as exc:
                    rest.append((path, row, None, exc))
                    continue
            seen[path] = st
            if (
                row >= 0
                and size <= max_size
                and key_of(row)
                == (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            ):
                hits.append(make(path, kind, size, blob, targets.get(path) if targets else None))
            else:
                rest.append((path, row, st, None))
        self._sort_rest()
        self._drop_beyond_symlinks()
        return self

    def known(self) -> dict[str, os.stat_result]:
        """The stats this scan took, by path."""
        return self.seen

    @property
    def hit_rows(self) -> list[int]:
        """The cache row of each hit. Every candidate is a hit or in `rest`, and a candidate
        without a row is never a hit, so these are worked out when asked, not in the loop."""
        if self._hit_rows is None:
            again = {row for _, row, _, _ in self.rest}
            self._hit_rows = [row for row in self._rows if row >= 0 and row not in again]
        return self._hit_rows

    @hit_rows.setter
    def hit_rows(self, rows: list[int]) -> None:
        self._hit_rows = rows

    def manifest(self, reads: list[Entry] | None = None) -> Manifest:
        """The manifest of the hits, the other entries and `reads`, with its id worked out;
        made once while nothing was read (a warm freeze makes it while git still works)."""
        if reads:
            return _manifest(self.hits + self.others + reads)
        if self._manifest is None:
            self._manifest = _manifest(self.hits + self.others)
        return self._manifest

    def _sort_rest(self) -> None:
        for path, row, st, exc in self.rest:
            if row < 0:  # a path with a row passed this check when it was first frozen
                try:
                    check_path(path)
                except InvalidManifest as bad:
                    self.bad_names.append((path, bad.message))
                    continue
            if st is None:
                if isinstance(exc, FileNotFoundError):
                    self._vanished(path)
                else:
                    self.unreadable.append((path, why(exc) if exc else "unknown error"))
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                if st.st_size > self.max_file_size:
                    self.oversize.append((path, st.st_size))
                else:
                    kind: Kind = "exec" if mode & stat.S_IXUSR else "file"
                    self.misses.append((path, kind, st.st_size))
            elif stat.S_ISLNK(mode):
                self._symlink(path, st)
            else:
                self.excluded.append(Excluded(path, f"not a regular file ({_type_name(mode)})"))

    def _vanished(self, path: str) -> None:
        if not self.listing.git:
            self.excluded.append(Excluded(path, "vanished while freezing"))
        elif path in self.listing.skip_worktree:
            self.excluded.append(Excluded(path, "git: not checked out (skip-worktree)"))
        elif path in self.listing.tracked:
            self.excluded.append(Excluded(path, "git: deleted"))
            self.deleted_tracked = True
        else:
            self.excluded.append(Excluded(path, "vanished while freezing"))

    def _symlink(self, path: str, st: os.stat_result) -> None:
        try:
            target = os.readlink(self.top + "/" + path)
        except OSError as exc:
            self.unreadable.append((path, why(exc)))
            return
        try:
            check_symlink_target(path, target)
        except InvalidManifest:
            self.escaping.append((path, target))
            return
        entry = Entry.symlink(path, target)
        self.others.append(entry)
        data = target.encode()
        git_blob = hashlib.sha1(b"blob %d\0%s" % (len(data), data)).hexdigest()
        self.rows[path] = (statcache.stat_key(st), "symlink", entry.blob, git_blob)
        self.targets[path] = target

    def _drop_beyond_symlinks(self) -> None:
        """git still lists a tracked `d/x` after `d` became a symlink, and lstat would follow
        `d`. Such paths are not in the tree any more (git status calls them deleted)."""
        if not (self.cache.table.targets or self.others):  # no symlink: nothing beyond one
            return
        links = {e.path for e in self.hits + self.others if e.kind == "symlink"}
        if not links:
            return

        def beyond(path: str) -> bool:
            parts = path.split("/")
            return any("/".join(parts[:n]) in links for n in range(1, len(parts)))

        gone = [e.path for e in self.hits + self.others if beyond(e.path)]
        gone += [m[0] for m in self.misses if beyond(m[0])]
        for path in gone:
            self.excluded.append(Excluded(path, "beyond a symlink"))
            self.deleted_tracked |= self.listing.git and path in self.listing.tracked
            self.rows.pop(path, None)
        kept = [(e, r) for e, r in zip(self.hits, self.hit_rows, strict=True) if not beyond(e.path)]
        self.hits = [e for e, _ in kept]
        self.hit_rows = [r for _, r in kept]
        self.others = [e for e in self.others if not beyond(e.path)]
        self.misses = [m for m in self.misses if not beyond(m[0])]

    def raise_problems(self) -> None:
        """Refuse the tree before reading anything if a name, a symlink or a size is wrong."""
        if self.bad_names:
            shown = ", ".join(f"{p!r} ({why})" for p, why in self.bad_names)
            raise FreezeError(
                f"names a bundle cannot hold: {shown}: rename them or exclude them in "
                f"{LAUNCHIGNORE}",
                self.bad_names[0][0],
            )
        if self.escaping:
            one = len(self.escaping) == 1
            shown = ", ".join(f"{p} -> {t}" for p, t in self.escaping)
            raise FreezeError(
                f"{'symlink leaves' if one else 'symlinks leave'} the tree: {shown}: point "
                f"{'it' if one else 'them'} inside the tree, replace {'it' if one else 'them'} "
                f"with a copy of the target, or exclude {'it' if one else 'them'} in "
                f"{LAUNCHIGNORE}",
                self.escaping[0][0],
            )
        if self.oversize:
            raise _oversize_error(self.oversize, self.max_file_size)
        if self.unreadable:
            raise _unreadable_error(self.unreadable)

    def check_present(self, store: Store | PendingStore) -> None:
        """A cached blob counts only if the store has it. The bundle the cache was saved with
        proves all of its blobs present at once (the store writes blobs before manifests);
        without it, ask the store about each, and read again any file whose blob is gone."""
        if not self.hits or (self.cache.bundle_id and store.has(self.cache.bundle_id)):
            return
        missing = set(store.missing({e.blob for e in self.hits if e.kind != "symlink"}))
        if not missing:
            return
        self._manifest = None
        kept: list[tuple[Entry, int]] = []
        for entry, row in zip(self.hits, self.hit_rows, strict=True):
            if entry.kind != "symlink" and entry.blob in missing:
                self.misses.append((entry.path, entry.kind, entry.size))
            else:
                kept.append((entry, row))
        self.hits = [e for e, _ in kept]
        self.hit_rows = [r for _, r in kept]

    def add_read(self, read: Read) -> None:
        """Take in what reading the misses found; raise if a file could not be frozen."""
        self.excluded += read.excluded
        if read.oversize:
            raise _oversize_error(read.oversize, self.max_file_size)
        if read.unreadable:
            raise _unreadable_error(read.unreadable)

    def changes_since_cache(self, manifest: Manifest, read: Read) -> tuple[Entry, ...] | None:
        """The entries of `manifest` that differ from the last freeze's (the cache's bundle),
        when the tree has that freeze's paths: then only what was read or looked at again
        can differ, and the tree need not be compared entry by entry. None otherwise."""
        table = self.cache.table
        if self.cache.bundle_id is None or manifest.paths != table.present():
            return None
        where, kinds, blobs, sizes = table.position(), table.kinds, table.blobs, table.sizes
        out = []
        for entry in [*self.others, *read.entries]:
            i = where[entry.path]
            old = (kinds[i], blobs[i], sizes[i], table.targets.get(entry.path))
            if old != (entry.kind, entry.blob, entry.size, entry.target):
                out.append(entry)
        return tuple(sorted(out, key=path_of))

    def changed(self, read: Read) -> bool:
        """Whether the cache needs writing: anything was read or is new, or the list moved."""
        table = self.cache.table
        candidates = self.listing.candidates
        same = candidates is table.paths or candidates == table.paths
        return bool(read.files or self.rows or not same)

    def table(self, read: Read) -> statcache.Table:
        """The rows to save: one per candidate, in order, with git's vouchers for them."""
        old = self.cache.table
        if self.listing.candidates is old.paths and self.listing.from_cache:
            return self._patched_table(read)
        hit_row = dict(zip((e.path for e in self.hits), self.hit_rows, strict=True))
        fresh = {**self.rows, **read.rows}
        keys: list[statcache.Key] = []
        kinds: list[str] = []
        blobs: list[str] = []
        git_blobs: list[str] = []
        targets: dict[str, str] = {}
        vouched: list[bool] = []
        # git's stats are at hand only in a listing parsed now; with last time's listing, a
        # hit keeps its voucher and a new row waits for the next listing to get one.
        recount = not self.listing.from_cache
        for path in self.listing.candidates:
            row = fresh.get(path)
            if row is not None:
                key, kind, blob, git_blob = row
                vouch = recount
            elif path in hit_row:
                i = hit_row[path]
                key, kind, blob, git_blob = old.key(i), old.kinds[i], old.blobs[i], old.git_blob(i)
                vouch = recount or bool(old.vouched[i])
            else:
                key, kind = statcache.NO_KEY, ""
                blob, git_blob = statcache.NO_BLOB, statcache.NO_GIT_BLOB
                vouch = False
            if vouch and recount:
                vouch = self.listing.vouches(path, kind, git_blob, key)
            keys.append(key)
            kinds.append(kind)
            blobs.append(blob)
            git_blobs.append(git_blob)
            vouched.append(vouch)
            if kind == "symlink":
                targets[path] = old.targets[path] if row is None else self.targets[path]
        paths = self.listing.candidates
        return statcache.Table(
            paths, keys, kinds, blobs, "".join(git_blobs), targets, [int(v) for v in vouched]
        )

    def _patched_table(self, read: Read) -> statcache.Table:
        """table() when the candidates are the cache's own rows and nothing asks for new
        vouchers: the old columns, copied, with only the rows that were not hits rewritten
        (a one-file change rewrites one row instead of building thousands). A hit's row is
        copied as stored; it was not racy, or it would not have been a hit. Every other row
        is what was read now, or left out."""
        old = self.cache.table
        fresh = {**self.rows, **read.rows}
        stats = list(old.raw_stats())
        kinds, blobs, vouched = list(old.kinds), list(old.blobs), list(old.vouched)
        git_blobs = bytearray(old.git_blobs, "ascii")
        targets = dict(old.targets)
        hit = set(self.hit_rows)  # after _drop_beyond_symlinks: the rows kept as they are
        for row, path in enumerate(old.paths):
            if row in hit:
                continue
            got = fresh.get(path)
            key, kind, blob, git_blob = got or (
                statcache.NO_KEY,
                "",
                statcache.NO_BLOB,
                statcache.NO_GIT_BLOB,
            )
            stats[5 * row : 5 * row + 5] = key
            kinds[row], blobs[row], vouched[row] = kind, blob, 0
            git_blobs[40 * row : 40 * row + 40] = git_blob.encode("ascii")
            targets.pop(path, None)
            if kind == "symlink":
                targets[path] = self.targets[path]
        return statcache.Table.of_stats(
            old.paths, stats, kinds, blobs, git_blobs.decode("ascii"), targets, vouched
        )


def _type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "unknown type"


def _oversize_error(oversize: list[tuple[str, int]], limit: int) -> FreezeError:
    oversize = sorted(oversize)
    if len(oversize) == 1:
        path, size = oversize[0]
        what = f"{path} is {_human(size)}, over the {_human(limit)} limit: exclude it"
    else:
        shown = ", ".join(f"{p} ({_human(s)})" for p, s in oversize)
        what = f"{len(oversize)} files are over the {_human(limit)} limit: {shown}: exclude them"
    return FreezeError(f"{what} in {LAUNCHIGNORE} or raise --max-file-size", oversize[0][0])


def _unreadable_error(unreadable: list[tuple[str, str]]) -> FreezeError:
    unreadable = sorted(unreadable)
    shown = ", ".join(f"{p} ({why})" for p, why in unreadable)
    return FreezeError(
        f"cannot read {shown}: fix the permissions or exclude "
        f"{'it' if len(unreadable) == 1 else 'them'} in {LAUNCHIGNORE}",
        unreadable[0][0],
    )


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            exact = value >= 100 or size % scale == 0
            return f"{value:.0f} {unit}" if exact else f"{value:.1f} {unit}"
    return f"{size} B"


def _manifest(entries: list[Entry]) -> Manifest:
    """Entries in path order, as a manifest whose id is known. Each entry is well formed by
    construction; the tree's shape is validated by the store (see _store_manifest in
    launcher/freeze.py)."""
    entries.sort(key=path_of)  # sorted runs (hits, others, reads): merged in linear time
    manifest = Manifest(tuple(entries))
    manifest.bundle_id  # noqa: B018 (worked out now, and kept by the manifest)
    return manifest

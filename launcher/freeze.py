"""Freezing a directory into a bundle: this module owns which files a bundle holds, reading
each of them once, and handing their blobs to the store.

Which files: git's view when the directory is in a git work tree (`git ls-files --cached
--others --exclude-standard`: tracked files and untracked ones that are not ignored; deleted
files dropped), else a walk that honours every `.gitignore` below the root as git would. Then
`.launchignore` (gitignore syntax, at the root) removes more, in both cases. `.git` is never
shipped.

How: every file is stat-ed; one whose stat matches the stat cache (launcher/statcache.py) is
not read. The others are read once each and those same bytes are hashed (SHA-256: the blob
id; SHA-1 of git's blob header and the bytes: git's id, used to tell a clean work tree) and
given to `Store.put_many` in batches. Large trees are read and hashed on two threads: os.read
and hashlib release the GIL.

Where the tree came from (commit, branch, dirty) is recorded beside the bundle as a Source,
never inside the manifest: the bundle id depends on the files alone.

Speed matters on the warm path (nothing changed since the last freeze), whose target is the
time `git status` takes: the git processes run while this process stats the files the cache
knows, and no file, blob or manifest is read or validated twice.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pathspec

from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import Entry, Kind, Manifest, Source, check_path, check_symlink_target
from launcher import statcache

if TYPE_CHECKING:
    from agent.store import Store

DEFAULT_MAX_FILE_SIZE = 50 * 2**20
LAUNCHIGNORE = ".launchignore"
BATCH_BYTES = 64 * 2**20  # blobs handed to one put_many: one sync of the store per batch
BATCH_FILES = 4096
READ_THREADS = 2  # the machines this runs on have two cores or more
CHUNK_BYTES = 4 * 2**20  # one unit of work for a reading thread
CHUNK_FILES = 256
PARALLEL_MIN_BYTES = 8 * 2**20  # below this (or PARALLEL_MIN_FILES) threads cost more than
PARALLEL_MIN_FILES = 512  # they save
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_GIT_MODES = {"file": "100644", "exec": "100755", "symlink": "120000"}


class FreezeError(InvalidManifest):
    """The tree cannot be frozen as it is. One line: what is wrong and what to do about it.

    A subclass of InvalidManifest (code 10, `detail` the first offending path) so that it maps
    to the same exit code and wire error as any other bad tree.
    """


@dataclass(frozen=True)
class Excluded:
    """A path the tree has but the bundle does not, and why (".launchignore", "git: deleted",
    ".git directory", "not a regular file (fifo)", ...)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Frozen:
    """The result of a freeze: the manifest (its blobs are in the store), where it came from,
    what was left out, and how much had to be read this time (0 on a warm re-freeze)."""

    root: Path
    manifest: Manifest
    source: Source
    excluded: tuple[Excluded, ...]
    bytes_read: int
    files_read: int = 0

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id


def freeze(
    root: Path,
    store: Store,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    cache_path: Path | None = None,
) -> Frozen:
    """Freeze the tree at `root` into `store`: every blob, then the manifest.

    `cache_path` is the stat cache to use and update (None: no cache, every file is read).
    Raises FreezeError (an InvalidManifest) when root is not a directory, or names every file
    that is over `max_file_size`, every symlink that leaves the tree, every file that cannot
    be read and every name a bundle cannot hold, with what to do about it.
    """
    root = _check_root(root)
    top = str(root)
    cache = statcache.load(cache_path, top)
    with ThreadPoolExecutor(3, thread_name_prefix="freeze-git") as pool:
        git = _Git(root, pool)
        # While git lists the tree, stat what the last freeze saw: most of it is still there.
        prestat = _lstat_many(top, cache.rows)
        ignore = _LaunchIgnore.load(root)
        listing = git.listing(ignore) or _walk(top, ignore)
        scan = _Scan(top, cache, prestat, listing, max_file_size)
        scan.run(listing.candidates)
        scan.raise_problems()
        scan.check_present(store)
        read = _read_all(top, scan.misses, store, max_file_size)
        scan.raise_read_problems(read)
        manifest = _store_manifest(store, scan.entries + read.entries)
        source = git.source(listing, scan) if listing.git else Source()
    rows = {**scan.rows, **read.rows}
    changed = read.files > 0 or rows.keys() != cache.rows.keys()
    if cache_path is not None and (changed or manifest.bundle_id != cache.bundle_id):
        statcache.save(cache_path, top, sorted(rows.items()), manifest.bundle_id)
    excluded = tuple(sorted(listing.excluded + scan.excluded + read.excluded, key=_by_path))
    return Frozen(root, manifest, source, excluded, read.bytes, read.files)


def _by_path(item: Excluded) -> str:
    return item.path


def _check_root(root: Path) -> Path:
    path = Path(root).absolute()
    if not path.exists():
        raise FreezeError(f"{root} does not exist: give the directory to freeze", str(root))
    if not path.is_dir():
        raise FreezeError(f"{root} is not a directory: give the directory to freeze", str(root))
    return path


def _lstat_many(top: str, paths: Iterable[str]) -> dict[str, os.stat_result]:
    """lstat each path that still exists; the others are left out (they will be looked at
    again, with their error, if the listing still names them)."""
    out: dict[str, os.stat_result] = {}
    lstat = os.lstat
    prefix = top + "/"
    for path in paths:
        try:  # noqa: SIM105 (contextlib.suppress costs more than the lstat in this loop)
            out[path] = lstat(prefix + path)
        except OSError:
            pass
    return out


# ---------------------------------------------------------------------------- listing


@dataclass
class _Listing:
    """The candidate paths of a tree, plus what git says about them (git mode only)."""

    candidates: list[str]
    excluded: list[Excluded] = field(default_factory=list)
    git: bool = False
    index: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (mode, sha1)
    untracked: bool = False  # git status would list an untracked file or directory
    unmerged: bool = False
    unknown: bool = False  # a tracked path not examined here (launchignored, a submodule...)
    skip_worktree: set[str] = field(default_factory=set)


class _LaunchIgnore:
    """The root's `.launchignore`, with git's rule that nothing below an excluded directory
    can be re-included (each directory's verdict is remembered: trees have far fewer
    directories than files)."""

    def __init__(self, spec: pathspec.GitIgnoreSpec | None) -> None:
        self._spec = spec
        self._dirs: dict[str, bool] = {}

    @classmethod
    def load(cls, root: Path) -> _LaunchIgnore:
        try:
            text = (root / LAUNCHIGNORE).read_text(encoding="utf-8", errors="surrogateescape")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return cls(None)
        except OSError as exc:
            raise FreezeError(
                f"cannot read {LAUNCHIGNORE} ({exc.strerror}): fix its permissions",
                LAUNCHIGNORE,
            ) from None
        return cls(pathspec.GitIgnoreSpec.from_lines(text.splitlines()))

    def __bool__(self) -> bool:
        return self._spec is not None

    def excludes(self, path: str, is_dir: bool = False) -> bool:
        if self._spec is None:
            return False
        slash = path.rfind("/")
        if slash > 0 and self._dir_excluded(path[:slash]):
            return True
        return self._spec.match_file(path + "/" if is_dir else path)

    def _dir_excluded(self, path: str) -> bool:
        verdict = self._dirs.get(path)
        if verdict is None:
            verdict = self.excludes(path, is_dir=True)
            self._dirs[path] = verdict
        return verdict


def _walk(top: str, ignore: _LaunchIgnore) -> _Listing:
    """Every file below top that no `.gitignore` on its way and no `.launchignore` excludes.

    A `.gitignore` applies to its own directory and below; a deeper one overrides a shallower
    one, and within one file the last matching pattern wins (git's precedence). An ignored
    directory is not entered, so nothing in it can be re-included, as in git.
    """
    candidates: list[str] = []
    excluded: list[Excluded] = []
    stack: list[tuple[str, list[tuple[str, pathspec.GitIgnoreSpec]]]] = [("", [])]
    while stack:
        prefix, specs = stack.pop()
        try:
            entries = list(os.scandir(top + "/" + prefix if prefix else top))
        except OSError as exc:
            raise FreezeError(
                f"cannot list {prefix or '.'} ({exc.strerror}): fix its permissions or "
                f"exclude it in {LAUNCHIGNORE}",
                prefix,
            ) from None
        gitignore = next((e for e in entries if e.name == ".gitignore"), None)
        if gitignore is not None and gitignore.is_file():
            specs = [*specs, (prefix, _read_gitignore(gitignore.path))]
        for entry in entries:
            path = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if entry.name == ".git":
                excluded.append(Excluded(path, ".git directory"))
            elif _gitignored(specs, path, is_dir):
                excluded.append(Excluded(path, ".gitignore"))
            elif ignore.excludes(path, is_dir):
                excluded.append(Excluded(path, LAUNCHIGNORE))
            elif is_dir:
                stack.append((path + "/", specs))
            else:
                candidates.append(path)
    return _Listing(candidates, excluded)


def _read_gitignore(path: str) -> pathspec.GitIgnoreSpec:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return pathspec.GitIgnoreSpec.from_lines(f.read().splitlines())
    except OSError as exc:
        raise FreezeError(
            f"cannot read {path} ({exc.strerror}): fix its permissions", path
        ) from None


def _gitignored(specs: list[tuple[str, pathspec.GitIgnoreSpec]], path: str, is_dir: bool) -> bool:
    verdict: bool | None = None
    for base, spec in specs:
        relative = path[len(base) :] + ("/" if is_dir else "")
        include = spec.check_file(relative).include
        if include is not None:
            verdict = include
    return bool(verdict)


class _Git:
    """The git processes of one freeze, all started at once so that they run beside the stat
    pass on the other core: the listing (with each tracked file's mode and SHA-1, which tell a
    clean work tree without `git status`), HEAD and its branch, and whether the index differs
    from HEAD."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor) -> None:
        self._root = root
        # C locale: git's messages are matched below. No optional locks: never write the
        # user's index behind their back (git status would, to refresh it).
        self._env = {**os.environ, "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
        self._pool = pool
        self._ls = self._start(
            "ls-files", "-z", "-t", "-s", "--cached", "--others", "--exclude-standard"
        )
        self._head = self._start("rev-parse", "--show-toplevel", "HEAD", "--abbrev-ref", "HEAD")
        self._staged = self._start("diff-index", "--cached", "--quiet", "HEAD", "--", ".")

    def _start(self, *args: str) -> Future[subprocess.CompletedProcess[bytes]]:
        return self._pool.submit(self._run, *args)

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["git", *args],
            cwd=self._root,
            env=self._env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )

    def listing(self, ignore: _LaunchIgnore) -> _Listing | None:
        """git's view of the tree, or None when root is not in a git work tree (or there is
        no git). Any other git failure (a repository git refuses, say) is a FreezeError."""
        try:
            done = self._ls.result()
        except FileNotFoundError:
            return None
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            if "not a git repository" in message or "must be run in a work tree" in message:
                return None
            first = message.splitlines()[0] if message else f"exit status {done.returncode}"
            raise FreezeError(
                f"git cannot list {self._root}: {first.removeprefix('fatal: ')}", str(self._root)
            )
        listing = _parse_ls_files(os.fsdecode(done.stdout), ignore)
        if not listing.candidates and not listing.index and _has_files(self._root):
            raise FreezeError(
                f"git shows no files in {self._root}: the repository around it ignores it; "
                "freeze a directory git tracks, or un-ignore this one",
                str(self._root),
            )
        return listing

    def source(self, listing: _Listing, scan: _Scan) -> Source:
        """Commit, branch and whether the tree differs from the commit (as `git status` in
        root would say: untracked files count)."""
        head = self._head.result()
        lines = head.stdout.decode(errors="replace").splitlines()
        if head.returncode == 0 and len(lines) == 3:
            commit: str | None = lines[1]
            branch: str | None = None if lines[2] == "HEAD" else lines[2]
        else:  # no commit yet: there is a branch to be born, and no commit to differ from
            commit = None
            ref = self._run("symbolic-ref", "-q", "--short", "HEAD")
            branch = ref.stdout.decode(errors="replace").strip() or None
            return Source(None, branch, listing.untracked or bool(listing.index) or listing.unknown)
        return Source(commit, branch, self._dirty(listing, scan))

    def _dirty(self, listing: _Listing, scan: _Scan) -> bool:
        if listing.untracked or listing.unmerged or scan.deleted_tracked:
            return True
        if self._staged.result().returncode != 0:
            return True
        if not (listing.unknown or scan.suspects):
            return False
        # Our bytes differ from the index (or were not looked at): a change, or only a clean
        # filter, an eol rule or core.fileMode at work. git decides.
        done = self._run("diff", "--quiet", "HEAD", "--", ".")
        return done.returncode != 0


def _has_files(root: Path) -> bool:
    with os.scandir(root) as entries:
        return any(e.name != ".git" for e in entries)


def _parse_ls_files(text: str, ignore: _LaunchIgnore) -> _Listing:
    """Parse `git ls-files -z -t -s --cached --others`: `? path` for an untracked file,
    `H mode sha stage\\tpath` for a tracked one (S: skip-worktree, M: unmerged)."""
    listing = _Listing([], git=True)
    candidates = listing.candidates
    seen: set[str] = set()
    for record in text.split("\0"):
        if not record:
            continue
        tag = record[0]
        if tag == "?":
            path = record[2:]
            listing.untracked = True
            if path.endswith("/"):  # git does not enter another repository
                listing.excluded.append(Excluded(path[:-1], "git: nested repository"))
                continue
        else:
            meta, _, path = record[2:].partition("\t")
            mode, sha, stage = meta.split(" ")
            if stage != "0":
                listing.unmerged = True
            if path in seen:  # an unmerged path has one record per stage
                continue
            if mode == "160000":
                listing.excluded.append(Excluded(path, "git: submodule"))
                listing.unknown = True
                seen.add(path)
                continue
            listing.index[path] = (mode, sha)
            if tag == "S":
                listing.skip_worktree.add(path)
        seen.add(path)
        if ".git" in path.split("/"):
            listing.excluded.append(Excluded(path, ".git directory"))
        elif ignore and ignore.excludes(path):
            listing.excluded.append(Excluded(path, LAUNCHIGNORE))
            if tag != "?":
                listing.unknown = True
        else:
            candidates.append(path)
    return listing


# ------------------------------------------------------------------------------- scan


class _Scan:
    """Stat every candidate: sort it into an entry known from the cache, a file to read, an
    exclusion, or a problem to report. Nothing is read here but symlink targets."""

    def __init__(
        self,
        top: str,
        cache: statcache.StatCache,
        prestat: dict[str, os.stat_result],
        listing: _Listing,
        max_file_size: int,
    ) -> None:
        self.top = top
        self.cache = cache
        self.prestat = prestat
        self.listing = listing
        self.max_file_size = max_file_size
        self.entries: list[Entry] = []
        self.rows: dict[str, statcache.Row] = {}
        self.misses: list[tuple[str, Kind, int]] = []  # path, kind, size when stat-ed
        self.excluded: list[Excluded] = []
        self.oversize: list[tuple[str, int]] = []
        self.escaping: list[tuple[str, str]] = []
        self.bad_names: list[tuple[str, str]] = []
        self.unreadable: list[tuple[str, str]] = []
        self.suspects: list[str] = []  # tracked paths whose bytes or mode differ from the index
        self.deleted_tracked = False

    def run(self, candidates: list[str]) -> None:
        lookup = self.cache.lookup
        index = self.listing.index
        prestat = self.prestat
        prefix = self.top + "/"
        max_size = self.max_file_size
        for path in candidates:
            try:
                check_path(path)
            except InvalidManifest as exc:
                self.bad_names.append((path, exc.message))
                continue
            st = prestat.get(path)
            if st is None:
                try:
                    st = os.lstat(prefix + path)
                except FileNotFoundError:
                    self._vanished(path)
                    continue
                except OSError as exc:
                    self.unreadable.append((path, exc.strerror or str(exc)))
                    continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                kind: Kind = "exec" if mode & stat.S_IXUSR else "file"
                if st.st_size > max_size:
                    self.oversize.append((path, st.st_size))
                    continue
                row = lookup(path, statcache.stat_key(st), kind)
                if row is None:
                    self.misses.append((path, kind, st.st_size))
                    continue
                self.entries.append(Entry(path, kind, st.st_size, row[2]))
                self.rows[path] = row
                git = index.get(path)
                if git is not None and (git[1] != row[3] or git[0] != _GIT_MODES[kind]):
                    self.suspects.append(path)
            elif stat.S_ISLNK(mode):
                self._symlink(path, st)
            else:
                self.excluded.append(Excluded(path, f"not a regular file ({_type_name(mode)})"))
                if path in index:
                    self.suspects.append(path)
        self._drop_beyond_symlinks()

    def _drop_beyond_symlinks(self) -> None:
        """git lists a tracked `d/x` even after `d` became a symlink; lstat would follow `d`.
        Such paths are not in the tree any more (git status calls them deleted)."""
        links = {e.path for e in self.entries if e.kind == "symlink"}
        if not links:
            return

        def beyond(path: str) -> bool:
            parts = path.split("/")
            return any("/".join(parts[:n]) in links for n in range(1, len(parts)))

        for path in [e.path for e in self.entries if beyond(e.path)] + [
            m[0] for m in self.misses if beyond(m[0])
        ]:
            self.excluded.append(Excluded(path, "beyond a symlink"))
            self.deleted_tracked |= path in self.listing.index
            self.rows.pop(path, None)
        self.entries = [e for e in self.entries if not beyond(e.path)]
        self.misses = [m for m in self.misses if not beyond(m[0])]

    def _vanished(self, path: str) -> None:
        if path in self.listing.skip_worktree:
            self.excluded.append(Excluded(path, "git: not checked out (skip-worktree)"))
        elif path in self.listing.index:
            self.excluded.append(Excluded(path, "git: deleted"))
            self.deleted_tracked = True
        else:
            self.excluded.append(Excluded(path, "vanished while freezing"))

    def _symlink(self, path: str, st: os.stat_result) -> None:
        try:
            target = os.readlink(self.top + "/" + path)
        except OSError as exc:
            self.unreadable.append((path, exc.strerror or str(exc)))
            return
        try:
            check_symlink_target(path, target)
        except InvalidManifest:
            self.escaping.append((path, target))
            return
        entry = Entry.symlink(path, target)
        self.entries.append(entry)
        data = target.encode()
        git_blob = hashlib.sha1(b"blob %d\0%s" % (len(data), data)).hexdigest()
        git = self.listing.index.get(path)
        if git is not None and git != ("120000", git_blob):
            self.suspects.append(path)

    def raise_problems(self) -> None:
        """Refuse the tree, before reading anything, if a name, a symlink or a size is wrong."""
        if self.bad_names:
            shown = ", ".join(f"{p!r} ({why})" for p, why in self.bad_names)
            raise FreezeError(
                f"names a bundle cannot hold: {shown}: rename them or exclude them in "
                f"{LAUNCHIGNORE}",
                self.bad_names[0][0],
            )
        if self.escaping:
            shown = ", ".join(f"{p} -> {t}" for p, t in self.escaping)
            what = "symlink leaves" if len(self.escaping) == 1 else "symlinks leave"
            raise FreezeError(
                f"{what} the tree: {shown}: point {'it' if len(self.escaping) == 1 else 'them'}"
                f" inside the tree, replace with a copy, or exclude in {LAUNCHIGNORE}",
                self.escaping[0][0],
            )
        if self.oversize:
            raise _oversize_error(self.oversize, self.max_file_size)
        if self.unreadable:
            raise _unreadable_error(self.unreadable)

    def check_present(self, store: Store) -> None:
        """A cached blob counts only if the store has it. The bundle the cache was saved with
        proves all of its blobs present at once (the store writes blobs before manifests);
        without it, ask the store about each, and read again any file whose blob is gone."""
        if not self.rows or (self.cache.bundle_id and store.has(self.cache.bundle_id)):
            return
        missing = set(store.missing({row[2] for row in self.rows.values()}))
        if not missing:
            return
        kept: list[Entry] = []
        for entry in self.entries:
            if entry.kind != "symlink" and entry.blob in missing:
                del self.rows[entry.path]
                self.misses.append((entry.path, entry.kind, entry.size))
            else:
                kept.append(entry)
        self.entries = kept

    def raise_read_problems(self, read: _Read) -> None:
        self.suspects.extend(read.suspects(self.listing.index))
        if read.oversize:
            raise _oversize_error(read.oversize, self.max_file_size)
        if read.unreadable:
            raise _unreadable_error(read.unreadable)


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
            return (
                f"{value:.0f} {unit}"
                if value >= 100 or size % scale == 0
                else f"{value:.1f} {unit}"
            )
    return f"{size} B"


# ------------------------------------------------------------------------------- read


@dataclass
class _Read:
    """What reading the cache misses gave: entries, cache rows, and what went wrong."""

    entries: list[Entry] = field(default_factory=list)
    rows: dict[str, statcache.Row] = field(default_factory=dict)
    excluded: list[Excluded] = field(default_factory=list)
    oversize: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    files: int = 0

    def suspects(self, index: dict[str, tuple[str, str]]) -> Iterator[str]:
        """Tracked paths whose bytes or mode, as read, differ from git's index."""
        for path, (_, kind, _, git_blob) in self.rows.items():
            git = index.get(path)
            if git is not None and git != (_GIT_MODES[kind], git_blob):
                yield path


# One file's outcome, from a reading thread: (path, kind, stat, bytes, blob, git blob) when it
# was read, else (path, problem, detail, None, "", "") with problem one of "oversize",
# "unreadable", "vanished" (detail: the size or the reason).
_Outcome = tuple[str, str, statcache.Stat | str | int, bytes | None, str, str]


def _read_all(
    top: str, misses: list[tuple[str, Kind, int]], store: Store, max_file_size: int
) -> _Read:
    """Read every miss once, hash those bytes, and hand them to the store in batches.

    Big jobs use READ_THREADS threads, each reading and hashing a chunk of files, with a
    bounded number of chunks in flight so memory stays near one batch; the calling thread
    stores the batches meanwhile.
    """
    read = _Read()
    if not misses:
        return read
    chunks = list(_chunks(misses))
    parallel = len(chunks) > 1 and (
        len(misses) >= PARALLEL_MIN_FILES or sum(m[2] for m in misses) >= PARALLEL_MIN_BYTES
    )
    batch: list[tuple[str, bytes]] = []
    batch_bytes = 0
    batched: set[str] = set()
    for outcomes in _map_chunks(top, chunks, max_file_size, parallel):
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
                if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_FILES:
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
    top: str, chunks: list[list[str]], max_file_size: int, parallel: bool
) -> Iterator[list[_Outcome]]:
    """Outcomes chunk by chunk, in order: on this thread for a small job, else on threads."""
    if not parallel:
        for chunk in chunks:
            yield _read_chunk(top, chunk, max_file_size)
        return
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="freeze-read") as pool:
        pending: deque[Future[list[_Outcome]]] = deque()
        todo = iter(chunks)
        for chunk in todo:
            pending.append(pool.submit(_read_chunk, top, chunk, max_file_size))
            if len(pending) >= 2 * READ_THREADS:
                break
        while pending:
            outcomes = pending.popleft().result()
            more = next(todo, None)
            if more is not None:
                pending.append(pool.submit(_read_chunk, top, more, max_file_size))
            yield outcomes


def _read_chunk(top: str, chunk: list[str], max_file_size: int) -> list[_Outcome]:
    return [_read_one(top, path, max_file_size) for path in chunk]


def _read_one(top: str, path: str, max_file_size: int) -> _Outcome:
    """Open without following symlinks, stat the open file, read it to the end, hash.

    The stat kept for the cache is the one taken before reading: if the file changes while it
    is read, its stat will differ next time and it is read again.
    """
    try:
        fd = os.open(top + "/" + path, _OPEN_FLAGS)
    except FileNotFoundError:
        return (path, "vanished", "", None, "", "")
    except OSError as exc:
        return (path, "unreadable", _why(exc), None, "", "")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return (path, "unreadable", "changed while freezing: try again", None, "", "")
        if st.st_size > max_file_size:
            return (path, "oversize", st.st_size, None, "", "")
        data = _read_fd(fd, st.st_size, max_file_size)
    except OSError as exc:
        return (path, "unreadable", _why(exc), None, "", "")
    finally:
        os.close(fd)
    if data is None:
        return (path, "oversize", max_file_size + 1, None, "", "")
    kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
    git = hashlib.sha1(b"blob %d\0" % len(data))
    git.update(data)
    blob = hashlib.sha256(data).hexdigest()
    return (path, kind, statcache.stat_key(st), data, blob, git.hexdigest())


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


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --------------------------------------------------------------------------- manifest


def _store_manifest(store: Store, entries: list[Entry]) -> Manifest:
    """Sort the entries into a manifest and store it unless the store has it already.

    Not validated here: `put_manifest` decodes what it stores, which validates every entry
    and the tree's shape (duplicates, case clashes), and a manifest already in the store was
    validated when it was put. Validating here as well would double the cost of a warm freeze.
    """
    entries.sort(key=_entry_path)
    manifest = Manifest(tuple(entries))
    if not store.has(manifest.bundle_id):
        try:
            store.put_manifest(manifest)
        except InvalidManifest as exc:
            raise FreezeError(
                f"{exc.message}: rename one or exclude it in {LAUNCHIGNORE}", exc.path
            ) from None
    return manifest


def _entry_path(entry: Entry) -> str:
    return entry.path

"""Freezing a directory into a bundle: this module owns which files a bundle holds, reading
each of them once, and handing their blobs to the store.

Which files: git's view when the directory is in a git work tree (`git ls-files --cached
--others --exclude-standard`: tracked files and untracked ones that are not ignored; deleted
files dropped), else a walk that honours every `.gitignore` below the root as git would. Then
`.launchignore` (gitignore syntax, at the root) removes more, in both cases. `.git` is never
shipped.

How: a file whose stat matches the stat cache (launcher/statcache.py) is not read. The others
are read once each and those same bytes are hashed (SHA-256: the blob id; SHA-1 of git's
blob header and the bytes: git's id for them) and given to `Store.put_many` in batches.
Large trees are read and hashed on two threads: os.read and hashlib release the GIL.

Where the tree came from (commit, branch, dirty) is recorded beside the bundle as a Source,
never inside the manifest: the bundle id depends on the files alone.

Speed matters most when nothing changed since the last freeze: the target is the time
`git status` takes. Three git processes start first and run on the other core: the tracked
files with `-m` (git checks each against its index, in C, as git status does), the untracked
files, and HEAD. git vouches for a tracked file it found unmodified when its index holds the
blob the cache has for that file and the very stat the cache read it with: the file still
holds the cached bytes, and it is not even stat-ed. Meanwhile this process stats the rest
(untracked and modified files) and builds the manifest of last time's listing; when git's
output is byte for byte what it was last time, that is the answer. No file, blob or manifest
is read or validated twice.

Why the stat as well as the blob: git compares bytes after its filters (core.autocrlf,
.gitattributes), and under them CRLF can pass for the LF git holds. For a file whose stat
changed, git's -m here compares raw bytes (core.autocrlf off, no global or system attributes
file), and git vouches for nothing in a repository with a `.gitattributes` file or
`info/attributes`. Known gap: a `.gitattributes` file that git itself ignores is not seen.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import pathspec

from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import Entry, Kind, Manifest, Source, check_path, check_symlink_target
from launcher import statcache

if TYPE_CHECKING:
    from agent.store import Store

DEFAULT_MAX_FILE_SIZE = 50 * 2**20
LAUNCHIGNORE = ".launchignore"
BATCH_BYTES = 64 * 2**20  # blobs handed to one put_many: the store syncs once per batch
BATCH_FILES = 8192
READ_THREADS = 2  # the machines this runs on have two cores or more
CHUNK_BYTES = 4 * 2**20  # one unit of work for a reading thread
CHUNK_FILES = 256
PARALLEL_MIN_BYTES = 8 * 2**20  # smaller jobs (in bytes and in files) are read on the
PARALLEL_MIN_FILES = 512  # calling thread: there, threads cost more than they save
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_GIT_MODES = {"file": "100644", "exec": "100755", "symlink": "120000"}
# Tracked files, each checked against the index (-m), with tags (-v: lower case for
# assume-unchanged), index entries (-s) and the stat the index keeps (--debug). The settings
# make git check every stat field and compare raw bytes (no autocrlf, no global or system
# attributes; GIT_ATTR_NOSYSTEM is set too, and a repository's own are looked for apart).
_LS_TRACKED = (
    *("-c", "core.fileMode=true", "-c", "core.autocrlf=false", "-c", "core.fsmonitor=false"),
    *("-c", "core.attributesFile=/dev/null", "-c", "core.checkStat=default"),
    *("-c", "core.trustctime=true", "ls-files", "-z", "-v", "-s", "-m", "--debug", "--cached"),
)
_LS_UNTRACKED = ("ls-files", "-z", "--others", "--exclude-standard")
_REV_PARSE = (
    *("rev-parse", "--show-toplevel", "--git-path", "index", "--git-path", "info/attributes"),
    *("HEAD", "--abbrev-ref", "HEAD"),
)
_path_of = attrgetter("path")
_Row = tuple[statcache.Key, str, str, str]  # a stat cache row: stat, kind, blob, git blob


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

    `cache_path` is the stat cache to use and update (None: no cache, every file is read); it
    should lie outside the tree. Raises FreezeError (an InvalidManifest) when root is not a
    directory, and otherwise names every file over `max_file_size`, every symlink that leaves
    the tree, every file that cannot be read or every name a bundle cannot hold, with what to
    do about it. Blobs already stored when that happens stay: the store only ever holds
    verified objects, and the next freeze will not store them again.
    """
    root = _check_root(root)
    top = str(root)
    with _Git(root) as git:  # first, so that git works while the rest happens
        cache = statcache.load(cache_path, top)
        last = _Listing.load(cache)
        ignore = _LaunchIgnore.load(root)
        scan = None
        if last is not None:
            # While git lists the tree, scan what it listed last time: usually it is the same.
            guess = not _has_content(last.attributes)
            scan = _Scan(top, cache, last.listing, max_file_size, guess).run()
            if not scan.misses:  # the manifest and its id too: if nothing changed, it is all
                scan.manifest()
        head = git.head()
        vouch = head is not None and not _has_content(head.attributes)
        if head is not None:
            git.recall(last.memo if last is not None else None, head)
        outputs = git.listings()
        digest: bytes | None = None
        if outputs is None:
            listing = _walk(top, ignore)
        else:
            digest = hashlib.sha256(b"\0\0".join((*outputs, ignore.raw))).digest()
            if last is not None and last.digest == digest:
                listing = last.listing
            else:
                listing = _parse_git(*outputs, ignore)
        if scan is None or scan.listing is not listing or scan.vouch_asked != vouch:
            known = scan.known() if scan is not None else None
            scan = _Scan(top, cache, listing, max_file_size, vouch).run(known)
        scan.raise_problems()
        scan.check_present(store)
        read = _read_all(top, scan.misses, store, max_file_size)
        scan.add_read(read)
        manifest = _store_manifest(store, scan.manifest(read.entries), cache, read.entries)
        source = git.source(head, listing, scan) if head is not None and listing.git else Source()
    # The memo holds for as long as the index and HEAD do: kept unless git was asked again.
    memo = git.memo or (last.memo if last is not None else None)
    attributes = head.attributes if head is not None else ""
    if cache_path is not None and (
        scan.changed(read)
        or manifest.bundle_id != cache.bundle_id
        or digest != (last.digest if last is not None else None)
        or memo != (last.memo if last is not None else None)
        or attributes != (last.attributes if last is not None else "")
    ):
        extra = listing.to_extra(digest, memo, attributes) if digest is not None else None
        statcache.save(cache_path, top, scan.table(read), manifest.bundle_id, extra)
    excluded = tuple(sorted(listing.excluded + scan.excluded, key=_path_of))
    return Frozen(root, manifest, source, excluded, read.bytes, read.files)


def _check_root(root: Path) -> Path:
    path = Path(root).absolute()
    if not path.exists():
        raise FreezeError(f"{root} does not exist: give the directory to freeze", str(root))
    if not path.is_dir():
        raise FreezeError(f"{root} is not a directory: give the directory to freeze", str(root))
    return path


def _has_content(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


# ---------------------------------------------------------------------------- listing


class _Listing:
    """The candidate paths of a tree, sorted, plus what git says about them.

    `tracked` are the paths in git's index. `vouchers` (only in a listing parsed just now)
    hold, for each, what git's index says of it: mode, blob and the stat git saw when it last
    hashed the file (mtime_ns, ctime_ns, and inode and size as the index keeps them, in 32
    bits). A listing taken from the stat cache keeps `tracked` as the string it was saved in
    until someone asks (a warm freeze usually does not).
    """

    def __init__(
        self, candidates: list[str], excluded: list[Excluded] | None = None, *, git: bool = False
    ) -> None:
        self.candidates = candidates
        self.excluded: list[Excluded] = excluded if excluded is not None else []
        self.git = git
        self._tracked: set[str] | None = set()
        self._tracked_column = ""
        self.vouchers: dict[str, tuple[str, str, int, int, int, int]] = {}
        self.untracked = False  # git status would show an untracked file or directory
        self.unmerged = False
        self.unknown = False  # a tracked path git's -m cannot speak for (a submodule)
        self.modified: set[str] = set()  # git: differs from the index (deleted included)
        self.unvouched: set[str] = set()  # git: assume-unchanged or skip-worktree: unchecked
        self.skip_worktree: set[str] = set()
        self.attributes = False  # a .gitattributes file among the paths: git cannot vouch
        self.from_cache = False

    @property
    def tracked(self) -> set[str]:
        if self._tracked is None:
            self._tracked = set(self._tracked_column.split("\0")) - {""}
        return self._tracked

    def vouches(self, path: str, kind: str, git_blob: str, key: statcache.Key) -> bool:
        """Whether git vouches that `path` holds the bytes of a row with this kind, git blob
        and stat: git checked the file and found it unmodified, and its index holds that
        blob and mode, and the very stat the row was read with. (The same blob alone would
        not do: git compares after its filters, and CRLF can pass for LF.)"""
        git = self.vouchers.get(path)
        return (
            git is not None
            and git[0] == _GIT_MODES.get(kind)
            and git[1] == git_blob
            and git[2:] == (key[2], key[4], key[3] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF)
            and path not in self.modified
            and path not in self.unvouched
        )

    def to_extra(self, digest: bytes, memo: _StagedMemo | None, attributes: str) -> list[Any]:
        """What the stat cache keeps of a git listing (the candidates are its rows' paths),
        with the memo and where the repository's own attributes file is."""
        return [
            digest,
            [[e.path, e.reason] for e in self.excluded],
            "\0".join(sorted(self.tracked)),
            [self.untracked, self.unmerged, self.unknown, self.attributes],
            sorted(self.modified),
            sorted(self.unvouched),
            sorted(self.skip_worktree),
            memo.to_wire() if memo is not None else None,
            attributes,
        ]

    @classmethod
    def load(cls, cache: statcache.StatCache) -> _Recalled | None:
        """The git listing saved with the cache; None if there is none (or it is malformed).
        Its candidates are the cache's own rows."""
        if cache.extra is None:
            return None
        try:
            digest, excluded, tracked, flags, modified, unvouched, skip, memo, attributes = (
                cache.extra
            )
            listing = cls(cache.table.paths, [Excluded(p, r) for p, r in excluded], git=True)
            listing._tracked, listing._tracked_column = None, tracked
            listing.untracked, listing.unmerged, listing.unknown, listing.attributes = (
                bool(f) for f in flags
            )
            listing.modified, listing.unvouched = set(modified), set(unvouched)
            listing.skip_worktree = set(skip)
            listing.from_cache = True
            staged = _StagedMemo.from_wire(memo, cache.written_ns - statcache.RACY_NS)
        except (TypeError, ValueError, IndexError):
            return None
        if not (isinstance(digest, bytes) and isinstance(tracked, str)):
            return None
        if not isinstance(attributes, str):
            return None
        return _Recalled(digest, listing, staged, attributes)


@dataclass(frozen=True)
class _Recalled:
    """What the last freeze of a git tree learnt from git: the digest of git's listings (and
    of `.launchignore`), those listings parsed, and the memo about the index and HEAD."""

    digest: bytes
    listing: _Listing
    memo: _StagedMemo | None
    attributes: str  # the path of the repository's own attributes file


# One record of `git ls-files -z -v -s --debug`: tag, mode, blob, stage, path, then the stat
# the index keeps for it.
_TRACKED_RECORD = re.compile(
    r"([A-Za-z]) (\d+) ([0-9a-f]+) (\d+)\t([^\0]*)\0"
    r"  ctime: (\d+):(\d+)\n  mtime: (\d+):(\d+)\n  dev: \d+\tino: (\d+)\n"
    r"  uid: \d+\tgid: \d+\n  size: (\d+)\tflags: [0-9a-f]+\n"
)


def _parse_git(tracked: bytes, untracked: bytes, ignore: _LaunchIgnore) -> _Listing:
    """Parse `git ls-files -z -v -s -m --debug --cached` (per index entry: `H mode blob
    stage\\tpath` and its stat; then the same as a `C` record if git found it modified or
    deleted; tag in lower case: assume-unchanged; S: skip-worktree; M: unmerged) and
    `git ls-files -z --others` (one path each)."""
    listing = _Listing([], git=True)
    assert listing._tracked is not None
    index = listing._tracked
    vouchers = listing.vouchers
    text = os.fsdecode(tracked)
    count = 0
    for match in _TRACKED_RECORD.finditer(text):
        count += 1
        tag, mode, sha, stage, path, c_s, c_ns, m_s, m_ns, ino, size = match.groups()
        if tag in "CcRrKk":  # a note about the entry just listed
            listing.modified.add(path)
            continue
        if stage != "0":
            listing.unmerged = True
            listing.unvouched.add(path)
        if path in index:  # an unmerged path has one record per stage
            continue
        index.add(path)
        if tag.islower() or tag == "S":
            listing.unvouched.add(path)
        if tag in "Ss":
            listing.skip_worktree.add(path)
        if mode == "160000":
            listing.excluded.append(Excluded(path, "git: submodule"))
            listing.unknown = True
            continue
        mtime = int(m_s) * 1_000_000_000 + int(m_ns)
        ctime = int(c_s) * 1_000_000_000 + int(c_ns)
        vouchers[path] = (mode, sha, mtime, ctime, int(ino), int(size))
        _consider(listing, path, ignore)
    if count != text.count("\0"):  # git printed what this parser does not know: vouch for none
        raise FreezeError(f"cannot read the output of this git ({count} records understood)", "")
    for path in os.fsdecode(untracked).split("\0"):
        if not path:
            continue
        listing.untracked = True
        if path.endswith("/"):  # git does not enter another repository
            listing.excluded.append(Excluded(path[:-1], "git: nested repository"))
        else:
            _consider(listing, path, ignore)
    listing.candidates.sort()
    return listing


def _consider(listing: _Listing, path: str, ignore: _LaunchIgnore) -> None:
    if path == ".gitattributes" or path.endswith("/.gitattributes"):
        listing.attributes = True
    if ".git" in path.split("/"):
        listing.excluded.append(Excluded(path, ".git directory"))
    elif ignore and ignore.excludes(path):
        listing.excluded.append(Excluded(path, LAUNCHIGNORE))
    else:
        listing.candidates.append(path)


@dataclass(frozen=True)
class _Head:
    """What `git rev-parse` says: HEAD's commit (None before the first), its branch (None when
    detached; "" when not known yet, before the first commit), and where the index file and
    the repository's own attributes file are."""

    commit: str | None
    branch: str | None
    index: str
    attributes: str


@dataclass(frozen=True)
class _StagedMemo:
    """Whether git's index differed from HEAD at the last freeze, and what that depended on:
    the commit and the index file (by path and stat). While both are the same, so is the
    answer, and no `git diff-index` runs."""

    head: str
    index_path: str
    index_key: statcache.Key | None  # None: not to be trusted (written in a racy moment)
    staged: bool

    def to_wire(self) -> list[Any]:
        return [self.head, self.index_path, list(self.index_key or ()), self.staged]

    @classmethod
    def from_wire(cls, value: Any, racy_after_ns: int) -> _StagedMemo | None:
        if not value:
            return None
        head, index_path, key, staged = value
        index_key = tuple(key) if key and key[2] < racy_after_ns else None
        return cls(head, index_path, index_key, bool(staged))


class _Git:
    """The git processes of one freeze, started at once so that they run on the other core
    while this process stats files: the tracked files (checked against the index), the
    untracked ones, HEAD and, unless the last freeze's memo still holds, whether the index
    differs from HEAD. Listings go to temporary files, not pipes, so git never waits for us."""

    def __init__(self, root: Path) -> None:
        self._root = root
        # C locale: git's messages are matched below. No optional locks: never write the
        # user's index behind their back (git status would, to refresh it).
        self._env = {**os.environ, "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
        self._files: list[IO[bytes]] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._staged: subprocess.Popen[bytes] | None = None
        self._memo: _StagedMemo | None = None
        self._index_key: statcache.Key | None = None
        self.memo: _StagedMemo | None = None  # what to remember for the next freeze
        self._tracked: subprocess.Popen[bytes] | None = None
        self._untracked_out, self._tracked_out = self._file(), self._file()
        try:  # the untracked listing first: it takes longest
            self._untracked = self._start(_LS_UNTRACKED, self._untracked_out, subprocess.DEVNULL)
        except FileNotFoundError:  # no git here: every tree is a plain directory
            return
        env = {**self._env, "GIT_ATTR_NOSYSTEM": "1"}  # no system attributes: see _LS_TRACKED
        self._tracked = self._start(_LS_TRACKED, self._tracked_out, subprocess.PIPE, env)
        self._head = self._start(_REV_PARSE, subprocess.PIPE, subprocess.DEVNULL)

    def _started(self) -> bool:
        """False if there is no git."""
        return self._tracked is not None

    def _file(self) -> IO[bytes]:
        self._files.append(tempfile.TemporaryFile())  # noqa: SIM115 (closed by __exit__)
        return self._files[-1]

    def _start(
        self, args: tuple[str, ...], stdout: Any, stderr: Any, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["git", *args],
            cwd=self._root,
            env=env or self._env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        self._procs.append(proc)
        return proc

    def __enter__(self) -> _Git:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On an error nobody needs their answers: git only reads here, so stop it now.
        for proc in self._procs:
            if kind is not None and proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for file in self._files:
            file.close()

    def head(self) -> _Head | None:
        """HEAD and the paths git uses; None if root is not in a git work tree."""
        if not self._started():
            return None
        out, _ = self._head.communicate()
        lines = out.decode(errors="replace").splitlines()
        if len(lines) < 3:  # not in a work tree (the listing will say what is wrong)
            return None
        index, attributes = (os.path.join(self._root, line) for line in lines[1:3])
        if self._head.returncode != 0 or len(lines) != 5:  # no commit yet
            return _Head(None, "", index, attributes)
        return _Head(lines[3], None if lines[4] == "HEAD" else lines[4], index, attributes)

    def recall(self, memo: _StagedMemo | None, head: _Head) -> None:
        """Take the last freeze's memo; unless the index file and HEAD are as they were
        then, ask git at once whether the index differs from HEAD (it runs beside the rest)."""
        self._memo = memo
        self._index_key = _key_of(head.index)
        if head.commit is None:
            return
        if (
            memo is None
            or (memo.head, memo.index_path) != (head.commit, head.index)
            or self._index_key is None
            or self._index_key != memo.index_key
        ):
            self._start_staged()

    def _start_staged(self) -> subprocess.Popen[bytes]:
        if self._staged is None:
            args = ("diff-index", "--cached", "--quiet", "HEAD", "--", ".")
            self._staged = self._start(args, subprocess.DEVNULL, subprocess.DEVNULL)
        return self._staged

    def listings(self) -> tuple[bytes, bytes] | None:
        """git's listings (tracked, untracked), or None when root is not in a git work tree
        (or there is no git). Any other git failure (a repository git refuses to use, say) is
        a FreezeError."""
        if not self._started() or self._tracked is None:
            return None
        _, err = self._tracked.communicate()
        if self._tracked.returncode != 0:
            message = err.decode(errors="replace").strip()
            if "not a git repository" in message or "must be run in a work tree" in message:
                return None
            code = self._tracked.returncode
            first = message.splitlines()[0] if message else f"exit status {code}"
            raise FreezeError(
                f"git cannot list {self._root}: {first.removeprefix('fatal: ')}", str(self._root)
            )
        if self._untracked.wait() != 0:
            raise FreezeError(f"git cannot list the untracked files of {self._root}", "")
        tracked, untracked = self._read(self._tracked_out), self._read(self._untracked_out)
        if not (tracked or untracked) and _has_files(self._root):
            raise FreezeError(
                f"git shows no files in {self._root}: the repository around it ignores it; "
                "freeze a directory git tracks, or un-ignore this one",
                str(self._root),
            )
        return tracked, untracked

    @staticmethod
    def _read(file: IO[bytes]) -> bytes:
        file.seek(0)
        return file.read()

    def source(self, head: _Head, listing: _Listing, scan: _Scan) -> Source:
        """Commit, branch, and whether the tree differs from the commit as `git status` in
        root would say (untracked files count: they are in the bundle, not in the commit)."""
        if head.commit is None:  # anything at all differs from no commit
            ref = self._run("symbolic-ref", "-q", "--short", "HEAD")
            branch = ref.stdout.decode(errors="replace").strip() or None
            return Source(
                None, branch, listing.untracked or bool(listing.tracked) or listing.unknown
            )
        return Source(head.commit, head.branch, self._dirty(head, listing, scan))

    def _dirty(self, head: _Head, listing: _Listing, scan: _Scan) -> bool:
        if listing.untracked or listing.unmerged or scan.deleted_tracked:
            return True
        if self._differs_from_head(head):
            return True
        if not (listing.modified or listing.unknown):
            return False
        # git's -m compared raw bytes (see _LS_TRACKED): a change, or only an eol rule or a
        # clean filter that git status would apply. Submodules: their own state. git status
        # decides, with the user's settings; without optional locks it does not write the
        # index (git diff would).
        args = ("status", "--porcelain", "--untracked-files=no", "--", ".")
        return bool(self._run(*args).stdout.strip())

    def _differs_from_head(self, head: _Head) -> bool:
        """Whether the index differs from HEAD: the memo's answer while it holds, else git's."""
        assert head.commit is not None
        if self._staged is None and self._memo is not None:
            self.memo = self._memo  # recall() found the index and HEAD unchanged
            return self._memo.staged
        staged = self._start_staged().wait() != 0
        self.memo = _StagedMemo(head.commit, head.index, self._index_key, staged)
        return staged

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["git", *args], cwd=self._root, env=self._env, capture_output=True, check=False
        )


def _key_of(path: str) -> statcache.Key | None:
    try:
        return statcache.stat_key(os.lstat(path))
    except OSError:
        return None


def _has_files(root: Path) -> bool:
    with os.scandir(root) as entries:
        return any(e.name != ".git" for e in entries)


# --------------------------------------------------------------------------- ignores


class _LaunchIgnore:
    """The root's `.launchignore`, with git's rule that nothing below an excluded directory
    can be re-included (each directory's verdict is remembered: trees have far fewer
    directories than files)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        text = raw.decode("utf-8", "surrogateescape")
        self._spec = pathspec.GitIgnoreSpec.from_lines(text.splitlines()) if raw else None
        self._dirs: dict[str, bool] = {}

    @classmethod
    def load(cls, root: Path) -> _LaunchIgnore:
        try:
            return cls((root / LAUNCHIGNORE).read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return cls(b"")
        except OSError as exc:
            raise FreezeError(
                f"cannot read {LAUNCHIGNORE} ({exc.strerror}): fix its permissions",
                LAUNCHIGNORE,
            ) from None

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
    directory is not entered, so nothing in it can be re-included, as in git. Symlinks are
    not followed: they are entries.
    """
    candidates: list[str] = []
    excluded: list[Excluded] = []
    stack: list[tuple[str, list[tuple[str, pathspec.GitIgnoreSpec]]]] = [("", [])]
    while stack:
        prefix, specs = stack.pop()
        try:
            with os.scandir(top + "/" + prefix if prefix else top) as it:
                entries = list(it)
        except OSError as exc:
            raise FreezeError(
                f"cannot list {prefix or '.'} ({exc.strerror}): fix its permissions or "
                f"exclude it in {LAUNCHIGNORE}",
                prefix,
            ) from None
        gitignore = next((e for e in entries if e.name == ".gitignore"), None)
        if gitignore is not None and gitignore.is_file(follow_symlinks=False):
            specs = [*specs, (prefix, _read_gitignore(gitignore.path, prefix + ".gitignore"))]
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
    candidates.sort()
    return _Listing(candidates, excluded)


def _read_gitignore(path: str, shown: str) -> pathspec.GitIgnoreSpec:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return pathspec.GitIgnoreSpec.from_lines(f.read().splitlines())
    except OSError as exc:
        raise FreezeError(
            f"cannot read {shown} ({exc.strerror}): fix its permissions", shown
        ) from None


def _gitignored(specs: list[tuple[str, pathspec.GitIgnoreSpec]], path: str, is_dir: bool) -> bool:
    verdict: bool | None = None
    for base, spec in specs:
        include = spec.check_file(path[len(base) :] + ("/" if is_dir else "")).include
        if include is not None:
            verdict = include
    return bool(verdict)


# ------------------------------------------------------------------------------- scan


def _entry_maker() -> Callable[..., Entry]:
    """A faster `Entry(path, kind, size, blob, target)` for the warm path's entries.

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


_make_entry = _entry_maker()


class _Scan:
    """Sort every candidate: a hit (its cached row holds, so it is not read), a file to read
    (a miss), an exclusion, or a problem to report. Reads only symlink targets.

    A hit is either vouched for by git (see the module's docstring; not even stat-ed) or a
    file whose stat matches its row. The loop over candidates is the warm path's inner loop,
    so it does as little as it can; anything but a hit goes to `rest`, sorted out afterwards
    by plainer code. When the listing is the cache's own (git said the same as last time),
    its rows line up with the candidates, and so do last time's vouchers.
    """

    def __init__(
        self,
        top: str,
        cache: statcache.StatCache,
        listing: _Listing,
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
        self.rows: dict[str, _Row] = {}  # rows of symlinks looked at now (reads have theirs)
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

    def run(self, known: dict[str, os.stat_result] | None = None) -> _Scan:
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
        make = _make_entry
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
                    self.unreadable.append((path, _why(exc) if exc else "unknown error"))
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
            self.unreadable.append((path, _why(exc)))
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

    def check_present(self, store: Store) -> None:
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

    def add_read(self, read: _Read) -> None:
        """Take in what reading the misses found; raise if a file could not be frozen."""
        self.excluded += read.excluded
        if read.oversize:
            raise _oversize_error(read.oversize, self.max_file_size)
        if read.unreadable:
            raise _unreadable_error(read.unreadable)

    def changed(self, read: _Read) -> bool:
        """Whether the cache needs writing: anything was read or is new, or the list moved."""
        table = self.cache.table
        candidates = self.listing.candidates
        same = candidates is table.paths or candidates == table.paths
        return bool(read.files or self.rows or not same)

    def table(self, read: _Read) -> statcache.Table:
        """The rows to save: one per candidate, in order, with git's vouchers for them."""
        old = self.cache.table
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


# ------------------------------------------------------------------------------- read


@dataclass
class _Read:
    """What reading the misses gave: entries, cache rows, and what went wrong."""

    entries: list[Entry] = field(default_factory=list)
    rows: dict[str, _Row] = field(default_factory=dict)
    excluded: list[Excluded] = field(default_factory=list)
    oversize: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    files: int = 0


# One file's outcome, from a reading thread: (path, kind, stat, bytes, blob, git blob) when it
# was read, else (path, problem, detail, None, "", "") with problem one of "oversize",
# "unreadable", "vanished" (detail: the size, or the reason).
_Outcome = tuple[str, str, statcache.Key | str | int, bytes | None, str, str]


def _read_all(
    top: str, misses: list[tuple[str, Kind, int]], store: Store, max_file_size: int
) -> _Read:
    """Read every miss once, hash those bytes, and hand the same bytes to the store.

    Big jobs use READ_THREADS threads, each reading and hashing a chunk of files, with a
    bounded number of chunks in flight so memory stays near one batch; the calling thread
    stores each batch meanwhile (the store's writes release the GIL too).
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
    """Open without following symlinks, stat the open file, read it, hash what was read.

    The stat kept for the cache is the one taken before reading: if the file changes while it
    is read, its stat will differ next time and it is read again.
    """
    try:
        fd = os.open(top + "/" + path, _OPEN_FLAGS)
    except FileNotFoundError:
        return (path, "vanished", "", None, "", "")
    except OSError as exc:  # ELOOP: it became a symlink since the scan
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


def _manifest(entries: list[Entry]) -> Manifest:
    """Entries in path order, as a manifest whose id is known. Each entry is well formed by
    construction; the tree's shape is validated by the store (see _store_manifest)."""
    entries.sort(key=_path_of)  # sorted runs (hits, others, reads): merged in linear time
    manifest = Manifest(tuple(entries))
    manifest.bundle_id  # noqa: B018 (worked out now, and kept by the manifest)
    return manifest


def _store_manifest(
    store: Store, manifest: Manifest, cache: statcache.StatCache, read: list[Entry]
) -> Manifest:
    """Store the manifest unless the store has it already.

    Not validated here (see _Scan.manifest): `put_manifest` decodes what it stores, which
    validates every entry and the tree's shape (duplicates, case clashes), and a manifest
    already in the store was validated when it was put. Validating here as well would double
    the cost of a warm freeze. When the tree has the same paths as the last freeze's (whose
    manifest the store holds, so it was valid), its shape is known good: only the entries
    read again (`read`) are checked, which makes a one-file change cheap to freeze.
    """
    if store.has(manifest.bundle_id):
        return manifest
    try:
        if (
            cache.bundle_id is not None
            and store.has(cache.bundle_id)
            and manifest.paths == cache.table.present()
        ):
            for entry in read:
                entry.check()
            store.put_manifest(manifest, encoded=manifest.encode())
        else:
            store.put_manifest(manifest)
    except InvalidManifest as exc:
        raise FreezeError(
            f"{exc.message}: rename one or exclude it in {LAUNCHIGNORE}", exc.path
        ) from None
    return manifest

"""What is in the tree: this module owns the paths a freeze considers (git's listing, or a walk
with the ignore rules), what git says about each of them, and where the tree came from
(commit, branch, dirty).

Which files: git's view when the directory is in a git work tree (`git ls-files --cached
--others --exclude-standard`: tracked files and untracked ones that are not ignored; deleted
files dropped), else a walk that honours every `.gitignore` below the root as git would. Then
`.launchignore` (gitignore syntax, at the root) removes more, in both cases. `.git` is never
shipped.

git vouches for a tracked file it found unmodified when its index holds the blob the stat
cache has for that file and the very stat the cache read it with (`Listing.vouches`): the
file still holds the cached bytes, and it is not even stat-ed.

Why the stat as well as the blob: git compares bytes after its filters (core.autocrlf,
.gitattributes), and under them CRLF can pass for the LF git holds. For a file whose stat
changed, git's -m here compares raw bytes (core.autocrlf off, no global or system attributes
file), and git vouches for nothing in a repository with a `.gitattributes` file or
`info/attributes`. Known gap: a `.gitattributes` file that git itself ignores is not seen.

FreezeError and Excluded are defined here, the lowest module that needs them;
launcher/freeze.py re-exports them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import Source
from launcher import statcache

if TYPE_CHECKING:
    import pathspec  # imported where a pattern is read: ~15 ms of start-up otherwise

    from launcher.scan import Scan

LAUNCHIGNORE = ".launchignore"
WALK_MEMO = "walk-1"  # the tag of a walk's memo in the stat cache (recall_walk)
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


# ---------------------------------------------------------------------------- listing


class Listing:
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
        self.memo: list[Any] | None = None  # a walk's: what it depends on (recall_walk)

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
    listing: Listing
    memo: _StagedMemo | None
    attributes: str  # the path of the repository's own attributes file


# One record of `git ls-files -z -v -s --debug`: tag, mode, blob, stage, path, then the stat
# the index keeps for it.
_TRACKED_RECORD = re.compile(
    r"([A-Za-z]) (\d+) ([0-9a-f]+) (\d+)\t([^\0]*)\0"
    r"  ctime: (\d+):(\d+)\n  mtime: (\d+):(\d+)\n  dev: \d+\tino: (\d+)\n"
    r"  uid: \d+\tgid: \d+\n  size: (\d+)\tflags: [0-9a-f]+\n"
)


def parse_git(tracked: bytes, untracked: bytes, ignore: LaunchIgnore) -> Listing:
    """Parse `git ls-files -z -v -s -m --debug --cached` (per index entry: `H mode blob
    stage\\tpath` and its stat; then the same as a `C` record if git found it modified or
    deleted; tag in lower case: assume-unchanged; S: skip-worktree; M: unmerged) and
    `git ls-files -z --others` (one path each)."""
    listing = Listing([], git=True)
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


def _consider(listing: Listing, path: str, ignore: LaunchIgnore) -> None:
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


class Git:
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
        if not _may_be_in_git(root):  # three git processes that would only say so
            return
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

    def __enter__(self) -> Git:
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

    def source(self, head: _Head, listing: Listing, scan: Scan) -> Source:
        """Commit, branch, and whether the tree differs from the commit as `git status` in
        root would say (untracked files count: they are in the bundle, not in the commit)."""
        if head.commit is None:  # anything at all differs from no commit
            ref = self._run("symbolic-ref", "-q", "--short", "HEAD")
            branch = ref.stdout.decode(errors="replace").strip() or None
            return Source(
                None, branch, listing.untracked or bool(listing.tracked) or listing.unknown
            )
        return Source(head.commit, head.branch, self._dirty(head, listing, scan))

    def _dirty(self, head: _Head, listing: Listing, scan: Scan) -> bool:
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


def _may_be_in_git(root: Path) -> bool:
    """False when git surely finds no work tree for root: nothing names a repository in the
    environment and there is no .git in root or above it."""
    if any(name in os.environ for name in ("GIT_DIR", "GIT_WORK_TREE")):
        return True
    real = Path(os.path.realpath(root))  # where git, started there, finds itself
    return any(os.path.lexists(os.path.join(d, ".git")) for d in (real, *real.parents))


def _has_files(root: Path) -> bool:
    with os.scandir(root) as entries:
        return any(e.name != ".git" for e in entries)


# --------------------------------------------------------------------------- ignores


class LaunchIgnore:
    """The root's `.launchignore`, with git's rule that nothing below an excluded directory
    can be re-included (each directory's verdict is remembered: trees have far fewer
    directories than files)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        text = raw.decode("utf-8", "surrogateescape")
        self._spec = _spec(text) if raw else None
        self._dirs: dict[str, bool] = {}

    @classmethod
    def load(cls, root: Path) -> LaunchIgnore:
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


def walk(top: str, ignore: LaunchIgnore) -> Listing:
    """Every file below top that no `.gitignore` on its way and no `.launchignore` excludes.

    A `.gitignore` applies to its own directory and below; a deeper one overrides a shallower
    one, and within one file the last matching pattern wins (git's precedence). An ignored
    directory is not entered, so nothing in it can be re-included, as in git. Symlinks are
    not followed: they are entries.

    The listing keeps what it depends on (`memo`, see recall_walk): the stat of every
    directory walked, taken before it was listed, and of every `.gitignore` read.
    """
    walked_ns = time.time_ns()
    candidates: list[str] = []
    excluded: list[Excluded] = []
    dirs: list[str] = []
    dir_stats: list[int] = []
    ignores: list[str] = []
    ignore_stats: list[int] = []
    stack: list[tuple[str, list[tuple[str, pathspec.GitIgnoreSpec]], os.stat_result]] = [
        ("", [], os.lstat(top))
    ]
    while stack:
        prefix, specs, st = stack.pop()
        dirs.append(prefix)
        dir_stats.extend(statcache.stat_key(st))
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
            ignores.append(prefix + ".gitignore")
            ignore_stats.extend(statcache.stat_key(gitignore.stat(follow_symlinks=False)))
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
                try:
                    stack.append((path + "/", specs, entry.stat(follow_symlinks=False)))
                except OSError:  # gone meanwhile: as if never seen
                    continue
            else:
                candidates.append(path)
    candidates.sort()
    listing = Listing(candidates, excluded)
    listing.memo = [
        WALK_MEMO,
        walked_ns,
        dirs,
        dir_stats,
        ignores,
        ignore_stats,
        ignore.raw,
        [[e.path, e.reason] for e in excluded],
    ]
    return listing


def recall_walk(cache: statcache.StatCache, top: str, ignore: LaunchIgnore) -> Listing | None:
    """The last walk's listing when nothing it depends on changed, found by a stat of each
    directory instead of a listing and an ignore check of each entry: a file added, removed
    or renamed changes its directory's stat, and an edited `.gitignore` its own. None when
    anything differs, or is too recent to trust (statcache's racy rule, from the moment the
    walk began), or when the cache holds no walk."""
    memo = cache.extra
    try:
        tag, walked_ns, dirs, dir_stats, ignores, ignore_stats, raw, excluded = memo
    except (TypeError, ValueError):
        return None
    if tag != WALK_MEMO or raw != ignore.raw or len(dir_stats) != 5 * len(dirs):
        return None
    trusted_before = walked_ns - statcache.RACY_NS
    lstat, stat_key = os.lstat, statcache.stat_key
    for names, stats in ((dirs, dir_stats), (ignores, ignore_stats)):
        for i, name in enumerate(names):
            try:
                key = stat_key(lstat(f"{top}/{name}" if name else top))
            except OSError:
                return None
            if key != tuple(stats[5 * i : 5 * i + 5]) or key[2] >= trusted_before:
                return None
    listing = Listing(cache.table.paths, [Excluded(p, r) for p, r in excluded])
    listing.memo = memo
    listing.from_cache = True
    return listing


def _read_gitignore(path: str, shown: str) -> pathspec.GitIgnoreSpec:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return _spec(f.read())
    except OSError as exc:
        raise FreezeError(
            f"cannot read {shown} ({exc.strerror}): fix its permissions", shown
        ) from None


def _spec(text: str) -> pathspec.GitIgnoreSpec:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(text.splitlines())


def _gitignored(specs: list[tuple[str, pathspec.GitIgnoreSpec]], path: str, is_dir: bool) -> bool:
    verdict: bool | None = None
    for base, spec in specs:
        include = spec.check_file(path[len(base) :] + ("/" if is_dir else "")).include
        if include is not None:
            verdict = include
    return bool(verdict)

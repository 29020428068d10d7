"""Freezing real trees into a real store: which files (git's view, or the .gitignore walk, then
.launchignore), what a bundle id depends on (the files alone), the stat cache, the refusals,
and the Source recorded beside the bundle. Real temp dirs and real `git`; no mocks."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import blob_id, diff
from agent.store import Store
from launcher import statcache
from launcher.freeze import FreezeError, Frozen, freeze
from launcher.gitview import LaunchIgnore, recall_walk
from launcher.pending import PendingStore

HOUR_AGO = time.time() - 3600


@pytest.fixture(autouse=True)
def quiet_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """git as on a fresh machine: no user or system config (no global excludes file, no
    fsmonitor) and a fixed identity, so these tests mean the same everywhere."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def write(root: Path, files: dict[str, bytes | str], mode: int | None = None) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            path.chmod(mode)


def age(root: Path) -> None:
    """Set every mtime an hour back, as for files not edited just now: a fresh mtime keeps a
    file out of the stat cache (the racy-git rule), which is tested on its own."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            os.utime(Path(dirpath, name), (HOUR_AGO, HOUR_AGO), follow_symlinks=False)


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def git_repo(root: Path, files: dict[str, bytes | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    write(root, files)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


def paths(frozen: Frozen) -> set[str]:
    return {e.path for e in frozen.manifest.entries}


def reasons(frozen: Frozen) -> dict[str, str]:
    return {e.path: e.reason for e in frozen.excluded}


# ------------------------------------------------------------------------- bundle ids

FILES: dict[str, bytes | str] = {
    "train.py": "print('train')\n",
    "pkg/__init__.py": "",
    "pkg/model.py": "class Model: ...\n",
    "data/config.yaml": "lr: 0.1\n",
}


def test_same_tree_same_bundle_whatever_mtime_umask_or_order(tmp_path: Path, store: Store) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    old = os.umask(0o077)
    try:
        write(a, FILES)
    finally:
        os.umask(old)
    os.umask(0o002)
    try:
        write(b, dict(reversed(FILES.items())))
    finally:
        os.umask(old)
    age(a)
    os.utime(b / "train.py", (1_000_000, 1_000_000))
    first, second = freeze(a, store), freeze(b, store)
    assert first.bundle_id == second.bundle_id
    assert paths(first) == set(FILES)
    assert first.source.commit is None and first.source.dirty is None  # not a git tree


def test_every_blob_stored_with_the_bytes_that_were_hashed(tmp_path: Path, store: Store) -> None:
    write(tmp_path / "t", FILES)
    frozen = freeze(tmp_path / "t", store)
    for entry in frozen.manifest.entries:
        data = (tmp_path / "t" / entry.path).read_bytes()
        assert entry.blob == blob_id(data) and entry.size == len(data)
        assert store.get(entry.blob) == data
    assert store.get_manifest(frozen.bundle_id) == frozen.manifest
    assert frozen.bytes_read == sum(len(str(v)) for v in FILES.values())


def test_one_byte_changes_one_blob_and_the_bundle(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, FILES)
    before = freeze(root, store)
    write(root, {"pkg/model.py": "class Modem: ...\n"})
    after = freeze(root, store)
    changes = diff(before.manifest, after.manifest)
    assert [c.path for c in changes] == ["pkg/model.py"]
    assert changes[0].old and changes[0].new and changes[0].old.blob != changes[0].new.blob
    assert before.bundle_id != after.bundle_id


def test_a_refreeze_of_the_same_paths_stores_a_valid_manifest(tmp_path: Path, store: Store) -> None:
    """With the stat cache, a tree whose paths are those of the last freeze has only the
    files read again checked; what is stored must still be a manifest that decodes."""
    root = tmp_path / "t"
    write(root, FILES)
    cache = tmp_path / "cache"
    freeze(root, store, cache_path=cache)
    write(root, {"pkg/model.py": "class Modem: ...\n"})
    after = freeze(root, store, cache_path=cache)
    assert Store(store.root).get_manifest(after.bundle_id) == after.manifest  # decoded afresh


def test_exec_bit_is_the_users_x_bit(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"run.sh": "#!/bin/sh\n"}, mode=0o755)
    write(root, {"own.sh": "x\n"}, mode=0o700)
    write(root, {"group-only.sh": "y\n"}, mode=0o654)
    write(root, {"plain.txt": "z\n"}, mode=0o644)
    kinds = {e.path: e.kind for e in freeze(root, store).manifest.entries}
    assert kinds == {
        "run.sh": "exec",
        "own.sh": "exec",
        "group-only.sh": "file",
        "plain.txt": "file",
    }


def test_a_mode_change_alone_changes_the_bundle(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"run.sh": "#!/bin/sh\n"}, mode=0o644)
    before = freeze(root, store, cache_path=tmp_path / "cache")
    (root / "run.sh").chmod(0o755)
    after = freeze(root, store, cache_path=tmp_path / "cache")
    assert before.bundle_id != after.bundle_id
    assert [e.kind for e in after.manifest.entries] == ["exec"]


# --------------------------------------------------------------------------- symlinks


def test_symlinks_inside_the_tree_are_kept_as_symlinks(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, FILES)
    (root / "latest.yaml").symlink_to("data/config.yaml")
    (root / "pkg" / "up").symlink_to("../data")
    entries = freeze(root, store).manifest.by_path()
    assert entries["latest.yaml"].kind == "symlink"
    assert entries["latest.yaml"].target == "data/config.yaml"
    assert entries["pkg/up"].target == "../data"
    assert not any(p.startswith("pkg/up/") for p in entries)  # not followed


def test_symlinks_leaving_the_tree_are_refused_by_name(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, FILES)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "pkg" / "out").symlink_to("../../elsewhere")
    with pytest.raises(InvalidManifest) as info:
        freeze(root, store)
    message = str(info.value)
    assert "passwd -> /etc/passwd" in message and "pkg/out -> ../../elsewhere" in message
    assert "\n" not in message and ".launchignore" in message
    assert isinstance(info.value, FreezeError) and info.value.path == "passwd"


# ------------------------------------------------------------------------ which files


def test_git_view_is_what_git_lists_minus_deleted_and_launchignored(
    tmp_path: Path, store: Store
) -> None:
    root = git_repo(
        tmp_path / "repo",
        {
            ".gitignore": "*.log\nbuild/\n",
            "train.py": "a\n",
            "gone.py": "b\n",
            "pkg/model.py": "c\n",
            "data/big.bin": "d\n",
        },
    )
    write(root, {"new.py": "e\n", "run.log": "f\n", "build/out.o": "g\n", "notes/todo.md": "h\n"})
    write(root, {".launchignore": "data/\ntodo.md\n"})
    (root / "gone.py").unlink()
    frozen = freeze(root, store)

    listing = git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    listed = set(listing.split("\0")) - {""}
    expected = {".gitignore", ".launchignore", "train.py", "pkg/model.py", "new.py"}
    assert paths(frozen) == expected
    assert paths(frozen) == listed - {"gone.py"} - {"data/big.bin", "notes/todo.md"}
    assert not any(p == ".git" or p.startswith(".git/") for p in paths(frozen))
    assert reasons(frozen) == {
        "gone.py": "git: deleted",
        "data/big.bin": ".launchignore",
        "notes/todo.md": ".launchignore",
    }


def test_git_view_of_a_subdirectory(tmp_path: Path, store: Store) -> None:
    root = git_repo(tmp_path / "repo", {"top.py": "1", "exp/train.py": "2", "exp/lib/x.py": "3"})
    frozen = freeze(root / "exp", store)
    assert paths(frozen) == {"train.py", "lib/x.py"}
    assert frozen.source.commit == git(root, "rev-parse", "HEAD").strip()


def test_nested_repository_is_not_shipped(tmp_path: Path, store: Store) -> None:
    root = git_repo(tmp_path / "repo", {"a.py": "1"})
    git_repo(root / "vendor", {"lib.py": "2"})
    frozen = freeze(root, store)
    assert paths(frozen) == {"a.py"}
    assert reasons(frozen) == {"vendor": "git: nested repository"}


def test_walk_agrees_with_git_on_nested_gitignores(tmp_path: Path, store: Store) -> None:
    files: dict[str, bytes | str] = {
        ".gitignore": "*.log\n/top-only.txt\ncache/\n",
        "a.log": "",
        "top-only.txt": "",
        "keep.py": "",
        "cache/x": "",
        "sub/.gitignore": "!keep.log\n*.tmp\ntop-only.txt\n",
        "sub/keep.log": "",
        "sub/other.log": "",
        "sub/b.tmp": "",
        "sub/top-only.txt": "",
        "sub/deep/c.tmp": "",
        "sub/deep/d.py": "",
        "sub/cache/y": "",
        "a.tmp": "",
        "secret.txt": "",
        ".launchignore": "secret.txt\n",
    }
    plain = tmp_path / "plain"
    write(plain, files)
    (plain / ".git").mkdir()  # not a repository, but never shipped either
    (plain / ".git" / "config").write_text("x")
    os.mkfifo(plain / "pipe")
    frozen = freeze(plain, store)

    repo = tmp_path / "repo"
    write(repo, files)
    git(repo, "init", "-q")
    by_git = set(git(repo, "ls-files", "-z", "--others", "--exclude-standard").split("\0")) - {""}
    assert paths(frozen) == by_git - {"secret.txt"}
    assert "sub/keep.log" in paths(frozen) and "a.tmp" in paths(frozen)
    found = reasons(frozen)
    assert found[".git"] == ".git directory"
    assert found["secret.txt"] == ".launchignore"
    assert found["cache"] == ".gitignore" and found["sub/b.tmp"] == ".gitignore"
    assert found["pipe"] == "not a regular file (fifo)"


def test_launchignore_directory_patterns_prune_in_the_walk(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"a.py": "", "data/x.bin": "", "data/sub/y.bin": "", "!data/keep": ""})
    write(root, {".launchignore": "data/\n!data/sub/y.bin\n"})
    assert paths(freeze(root, store)) == {"a.py", "!data/keep", ".launchignore"}


def test_sockets_and_fifos_are_excluded_with_a_reason(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"a.py": ""})
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        frozen = freeze(root, store)
    finally:
        sock.close()
    assert paths(frozen) == {"a.py"}
    assert reasons(frozen) == {
        "fifo": "not a regular file (fifo)",
        "sock": "not a regular file (socket)",
    }


# --------------------------------------------------------------------------- refusals


def test_oversize_files_are_refused_all_named_in_one_line(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"small.txt": "0123456789", "big.bin": "x" * 11, "data/huge.bin": "y" * 2048})
    with pytest.raises(InvalidManifest) as info:
        freeze(root, store, max_file_size=10)
    message = str(info.value)
    assert message == (
        "2 files are over the 10 B limit: big.bin (11 B), data/huge.bin (2 KiB): "
        "exclude them in .launchignore or raise --max-file-size"
    )
    assert info.value.path == "big.bin"
    assert not list((store.root / "objects").iterdir())  # refused before anything was stored
    write(root, {".launchignore": "*.bin\n"})
    assert paths(freeze(root, store, max_file_size=10)) == {"small.txt", ".launchignore"}


def test_one_oversize_file_message(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"data/big.bin": b"\0" * (3 * 2**20 + 2**19)})
    with pytest.raises(InvalidManifest) as info:
        freeze(root, store, max_file_size=2**20)
    assert str(info.value) == (
        "data/big.bin is 3.5 MiB, over the 1 MiB limit: exclude it in .launchignore "
        "or raise --max-file-size"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_file_is_refused_by_name(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"a.py": "", "secret.key": "k"})
    (root / "secret.key").chmod(0)
    with pytest.raises(InvalidManifest) as info:
        freeze(root, store)
    assert "secret.key (Permission denied)" in str(info.value)
    assert ".launchignore" in str(info.value)


def test_not_a_directory_is_refused(tmp_path: Path, store: Store) -> None:
    write(tmp_path, {"file.txt": "x"})
    with pytest.raises(InvalidManifest, match="is not a directory"):
        freeze(tmp_path / "file.txt", store)
    with pytest.raises(InvalidManifest, match="does not exist"):
        freeze(tmp_path / "nowhere", store)


def test_names_a_bundle_cannot_hold_are_refused(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"ok.py": "", "back\\slash.py": ""})
    with pytest.raises(InvalidManifest, match=r"back\\\\slash.py"):
        freeze(root, store)


def test_case_clash_is_refused_with_what_to_do(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"README": "a", "readme": "b"})
    with pytest.raises(InvalidManifest, match=r"differ only in case.*exclude it in \.launchignore"):
        freeze(root, store)


# ------------------------------------------------------------------------- stat cache


@pytest.fixture(params=["walk", "git"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    files = {f"pkg/m{i}.py": f"# module {i}\n" for i in range(40)} | FILES
    root = tmp_path / "t"
    if request.param == "git":
        git_repo(root, files)
        age(root)
        git(root, "status")  # as a user would: git refreshes its index, and can vouch
    else:
        write(root, files)
        age(root)
    yield root


def test_warm_refreeze_reads_nothing(tree: Path, tmp_path: Path, store: Store) -> None:
    cache = tmp_path / "cache" / "stat"
    cold = freeze(tree, store, cache_path=cache)
    assert cold.files_read == len(cold.manifest) and cold.bytes_read > 0
    warm = freeze(tree, store, cache_path=cache)
    assert (warm.bytes_read, warm.files_read) == (0, 0)
    assert warm.bundle_id == cold.bundle_id and warm.manifest == cold.manifest
    assert warm.source == cold.source and warm.excluded == cold.excluded


def test_a_changed_file_is_the_only_one_read_again(
    tree: Path, tmp_path: Path, store: Store
) -> None:
    cache = tmp_path / "stat"
    first = freeze(tree, store, cache_path=cache)
    write(tree, {"pkg/m7.py": "# changed\n"})
    os.utime(tree / "pkg/m7.py", (HOUR_AGO, HOUR_AGO))
    second = freeze(tree, store, cache_path=cache)
    assert (second.files_read, second.bytes_read) == (1, len("# changed\n"))
    assert [c.path for c in diff(first.manifest, second.manifest)] == ["pkg/m7.py"]
    # What changed since the last freeze is known without comparing the trees.
    assert second.base == first.bundle_id and second.changes is not None
    assert [(e.path, e.blob) for e in second.changes] == [
        (c.path, c.new.blob) for c in diff(first.manifest, second.manifest) if c.new
    ]
    os.utime(tree / "train.py", (HOUR_AGO, HOUR_AGO + 1))  # touched, same bytes
    third = freeze(tree, store, cache_path=cache)
    # Read again, unless git vouches for the bytes (it compared them with its index).
    assert third.files_read == (0 if (tree / ".git").exists() else 1)
    assert third.bundle_id == second.bundle_id
    assert (third.base, third.changes) == (second.bundle_id, ())  # read again, not changed


def test_added_and_removed_files_with_a_warm_cache(
    tree: Path, tmp_path: Path, store: Store
) -> None:
    cache = tmp_path / "stat"
    freeze(tree, store, cache_path=cache)
    write(tree, {"extra/new.py": "new\n"})
    os.utime(tree / "extra/new.py", (HOUR_AGO, HOUR_AGO))
    (tree / "pkg/m3.py").unlink()
    frozen = freeze(tree, store, cache_path=cache)
    assert frozen.files_read == 1
    assert "extra/new.py" in paths(frozen) and "pkg/m3.py" not in paths(frozen)
    assert frozen.changes is None  # other paths: the trees are compared where it matters
    assert frozen.bundle_id == freeze(tree, store).bundle_id  # same as without a cache


def test_switching_branches_ships_the_other_branch(tmp_path: Path, store: Store) -> None:
    """git rewrites files and its index on checkout; the cache must not hold on to either."""
    root = git_repo(tmp_path / "repo", FILES)
    git(root, "checkout", "-q", "-b", "other")
    write(root, {"train.py": "print('other')\n"})  # the same size as on main
    git(root, "commit", "-q", "-am", "other")
    git(root, "checkout", "-q", "main")
    age(root)
    git(root, "status")
    cache = tmp_path / "stat"
    on_main = freeze(root, store, cache_path=cache)
    git(root, "checkout", "-q", "other")
    os.utime(root / "train.py", (HOUR_AGO, HOUR_AGO))
    git(root, "status")
    on_other = freeze(root, store, cache_path=cache)
    assert store.get(on_other.manifest.by_path()["train.py"].blob) == b"print('other')\n"
    assert on_other.source.branch == "other" and on_other.bundle_id != on_main.bundle_id
    assert freeze(root, store).bundle_id == on_other.bundle_id  # as without a cache


def test_git_vouches_only_for_what_it_checked(tmp_path: Path, store: Store) -> None:
    """A tracked file git does not check (assume-unchanged) is stat-ed and read like any."""
    root = git_repo(tmp_path / "repo", FILES)
    age(root)
    cache = tmp_path / "stat"
    freeze(root, store, cache_path=cache)
    git(root, "update-index", "--assume-unchanged", "train.py")
    write(root, {"train.py": "print('TRAIN')\n"})  # same size; git will not look
    os.utime(root / "train.py", (HOUR_AGO, HOUR_AGO))
    frozen = freeze(root, store, cache_path=cache)
    assert frozen.files_read == 1
    assert store.get(frozen.manifest.by_path()["train.py"].blob) == b"print('TRAIN')\n"


def test_a_plain_directory_that_becomes_a_repository_freezes_the_same(
    tmp_path: Path, store: Store
) -> None:
    """Outside git, files are not hashed the git way (nothing would use it), so the cache
    holds no git ids for them: once the directory becomes a repository, nothing is vouched
    for on the strength of ids never taken, and an edit git does not look at is still seen."""
    root = tmp_path / "tree"
    write(root, FILES)
    age(root)
    cache = tmp_path / "stat"
    plain = freeze(root, store, cache_path=cache)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    same = freeze(root, store, cache_path=cache)
    assert same.bundle_id == plain.bundle_id and same.source.commit
    git(root, "update-index", "--assume-unchanged", "train.py")
    write(root, {"train.py": "print('TRAIN')\n"})  # same size; git will not look
    os.utime(root / "train.py", (HOUR_AGO, HOUR_AGO))
    edited = freeze(root, store, cache_path=cache)
    assert store.get(edited.manifest.by_path()["train.py"].blob) == b"print('TRAIN')\n"


def test_attributes_stop_git_vouching(tmp_path: Path, store: Store) -> None:
    """With a .gitattributes, git compares filtered bytes, so every file is stat-ed."""
    root = git_repo(tmp_path / "repo", {**FILES, ".gitattributes": "*.yaml text\n"})
    age(root)
    cache = tmp_path / "stat"
    freeze(root, store, cache_path=cache)
    os.utime(root / "train.py", (HOUR_AGO, HOUR_AGO + 1))  # touched, same bytes
    assert freeze(root, store, cache_path=cache).files_read == 1


@pytest.mark.parametrize("staged", [False, True])
def test_line_endings_changed_under_autocrlf(tmp_path: Path, store: Store, staged: bool) -> None:
    """Under core.autocrlf git takes CRLF for the LF it holds (after `git add`, even its index
    stat is the new file's); the bundle holds the CRLF bytes all the same."""
    root = git_repo(tmp_path / "repo", {"a.txt": "one\ntwo\n"})
    git(root, "config", "core.autocrlf", "true")
    age(root)
    git(root, "status")
    cache = tmp_path / "stat"
    freeze(root, store, cache_path=cache)
    write(root, {"a.txt": "one\r\ntwo\r\n"})
    os.utime(root / "a.txt", (HOUR_AGO, HOUR_AGO + 5))  # not racy: git will trust its stat
    if staged:
        git(root, "add", "a.txt")  # the index blob stays the LF one
    frozen = freeze(root, store, cache_path=cache)
    assert store.get(frozen.manifest.by_path()["a.txt"].blob) == b"one\r\ntwo\r\n"
    assert frozen.source.dirty is bool(git(root, "status", "--porcelain"))  # as git says


def test_a_file_changed_just_now_is_not_trusted(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, {"a.py": "1", "b.py": "2"})
    age(root)
    write(root, {"b.py": "3"})  # mtime: now, racy against the cache written next
    cache = tmp_path / "stat"
    freeze(root, store, cache_path=cache)
    again = freeze(root, store, cache_path=cache)
    assert again.files_read == 1  # b.py: its mtime is too close to the cache's write
    table = statcache.load(cache, str(root)).table
    trusted = dict(zip(table.paths, (key[2] != -1 for key in table.keys), strict=True))
    assert trusted == {"a.py": True, "b.py": False}


def test_cached_blob_missing_from_the_store_is_read_again(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stat"
    first = freeze(tree, Store(tmp_path / "one"), cache_path=cache)
    other = Store(tmp_path / "two")
    second = freeze(tree, other, cache_path=cache)
    assert second.files_read == len(second.manifest) and second.bundle_id == first.bundle_id
    assert not other.missing(second.manifest.blobs()) and other.has(second.bundle_id)


def test_a_corrupt_or_foreign_cache_is_only_a_cold_cache(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, FILES)
    age(root)
    cache = tmp_path / "stat"
    cache.write_bytes(b"\x93garbage")
    assert freeze(root, store, cache_path=cache).files_read == len(FILES)
    other = tmp_path / "other"
    write(other, FILES)
    age(other)
    assert freeze(other, store, cache_path=cache).files_read == len(FILES)  # another root
    assert freeze(other, store, cache_path=cache).files_read == 0


# ---------------------------------------------------------------------------- source


def test_git_source_is_recorded_beside_the_bundle(tmp_path: Path, store: Store) -> None:
    root = git_repo(tmp_path / "repo", FILES)
    head = git(root, "rev-parse", "HEAD").strip()
    clean = freeze(root, store, cache_path=tmp_path / "stat")
    assert (clean.source.commit, clean.source.branch, clean.source.dirty) == (head, "main", False)

    git(root, "commit", "-q", "--allow-empty", "-m", "same files")
    git(root, "checkout", "-q", "-b", "other")
    moved = freeze(root, store, cache_path=tmp_path / "stat")
    assert moved.source.commit != head and moved.source.branch == "other"
    assert moved.bundle_id == clean.bundle_id  # the bundle id depends on the files alone

    git(root, "checkout", "-q", "--detach")
    assert freeze(root, store).source.branch is None


@pytest.mark.parametrize(
    "change",
    ["modify", "untracked", "staged", "delete", "chmod", "launchignored-modified"],
)
def test_dirty_whatever_the_change(tmp_path: Path, store: Store, change: str) -> None:
    ignored = {".launchignore": "data/\n"} if change == "launchignored-modified" else {}
    root = git_repo(tmp_path / "repo", {**FILES, **ignored})
    age(root)
    cache = tmp_path / "stat"
    assert freeze(root, store, cache_path=cache).source.dirty is False
    if change == "modify":
        write(root, {"train.py": "print('changed')\n"})
    elif change == "untracked":
        write(root, {"scratch.py": ""})
    elif change == "staged":  # the work tree matches the index: only HEAD differs
        write(root, {"train.py": "staged\n"})
        git(root, "add", "train.py")
    elif change == "delete":
        (root / "pkg/model.py").unlink()
    elif change == "chmod":
        (root / "train.py").chmod(0o755)
    else:
        write(root, {"data/config.yaml": "lr: 1\n"})
    assert freeze(root, store, cache_path=cache).source.dirty is True
    assert freeze(root, store).source.dirty is True


def test_a_change_still_counts_when_the_file_is_not_read_again(
    tmp_path: Path, store: Store
) -> None:
    root = git_repo(tmp_path / "repo", FILES)
    age(root)
    cache = tmp_path / "stat"
    assert freeze(root, store, cache_path=cache).source.dirty is False
    write(root, {"train.py": "print('changed')\n"})
    os.utime(root / "train.py", (HOUR_AGO, HOUR_AGO))
    first = freeze(root, store, cache_path=cache)
    again = freeze(root, store, cache_path=cache)
    assert (first.files_read, again.files_read) == (1, 0)
    assert first.source.dirty is True and again.source.dirty is True


def test_touched_but_unchanged_is_clean(tmp_path: Path, store: Store) -> None:
    root = git_repo(tmp_path / "repo", FILES)
    age(root)  # every stat differs from git's index now, and no byte does
    assert freeze(root, store).source.dirty is False


def test_repository_without_commits(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "trunk")
    empty = freeze(root, store)
    assert (empty.source.commit, empty.source.branch, empty.source.dirty) == (None, "trunk", False)
    assert len(empty.manifest) == 0
    write(root, {"a.py": "x"})
    assert freeze(root, store).source.dirty is True


def test_directory_that_git_ignores_is_refused(tmp_path: Path, store: Store) -> None:
    root = git_repo(tmp_path / "repo", {".gitignore": "scratch/\n", "a.py": ""})
    write(root, {"scratch/exp.py": ""})
    with pytest.raises(InvalidManifest, match="git shows no files"):
        freeze(root / "scratch", store)


def test_stat_cache_file_is_replaced_atomically(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "t"
    write(root, FILES)
    cache = tmp_path / "c" / "stat"
    freeze(root, store, cache_path=cache)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["stat"]  # no temp left behind
    assert stat.S_ISREG(cache.stat().st_mode)


def age_dirs(root: Path) -> None:
    """Set every directory's mtime an hour back too (after any change in them)."""
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (HOUR_AGO, HOUR_AGO))


def test_an_unchanged_walk_is_recalled_and_every_change_is_seen(
    tmp_path: Path, store: Store
) -> None:
    """A plain tree's listing is taken from the last walk while no directory and no ignore
    file changed (a stat of each directory); each kind of change below makes a new walk, and
    every freeze equals one without any cache."""
    root = tmp_path / "t"
    write(root, {f"pkg/m{i}.py": f"# {i}\n" for i in range(20)} | FILES)
    write(root, {".gitignore": "*.log\n", "pkg/.gitignore": "secret*\n", "pkg/a.log": "x"})
    write(root, {".launchignore": "nothing-yet\n"})
    age(root)
    age_dirs(root)
    cache_path = tmp_path / "stat"

    def check() -> set[str]:
        warm = freeze(root, store, cache_path=cache_path)
        cold = freeze(root, store)
        assert warm.manifest == cold.manifest and warm.excluded == cold.excluded
        return paths(warm)

    def recalled() -> bool:
        cache = statcache.load(cache_path, str(root))
        listing = recall_walk(cache, str(root), LaunchIgnore.load(root))
        return listing is not None and listing.candidates == cache.table.paths

    assert "pkg/a.log" not in check()
    assert recalled()
    # A file's content changed in place: the listing is recalled, the file read again.
    write(root, {"pkg/m1.py": "# one, changed\n"})
    os.utime(root / "pkg/m1.py", (HOUR_AGO, HOUR_AGO))
    frozen = freeze(root, store, cache_path=cache_path)
    assert (frozen.files_read, frozen.bundle_id) == (1, freeze(root, store).bundle_id)
    assert recalled()
    again = freeze(root, store, cache_path=cache_path)  # the rewritten cache holds
    assert (again.files_read, again.bundle_id) == (0, frozen.bundle_id)

    # Ignore files edited in place: no directory changes, their own stat or bytes do.
    write(root, {"pkg/.gitignore": "secret*\nm5.py\n"})
    age(root)  # not edited just now (else it is not trusted yet: see the end)
    assert "pkg/m5.py" not in check()
    assert recalled()
    write(root, {".launchignore": "pkg/m6.py\n"})
    age(root)
    assert "pkg/m6.py" not in check()
    assert recalled()

    # Entries added, removed, renamed, a new directory: their directory's stat changes.
    write(root, {"pkg/new.py": "new\n"})
    (root / "pkg/m3.py").unlink()
    (root / "pkg/m4.py").rename(root / "pkg/m44.py")
    write(root, {"pkg/sub/deep.py": "deep\n"})
    final = check()
    assert {"pkg/new.py", "pkg/m44.py", "pkg/sub/deep.py"} <= final
    assert not {"pkg/m3.py", "pkg/m4.py"} & final
    # Directories changed just now are not trusted yet (the racy rule), whatever their stat.
    assert not recalled()
    assert check() == final


# ------------------------------------------------------------------ writes held back


def _objects(store: Store) -> set[str]:
    return {p.parent.name + p.name for p in store.objects.glob("*/*")}


def test_a_submit_freeze_writes_to_disk_only_when_settled(tmp_path: Path, store: Store) -> None:
    """A submit freezes into a PendingStore: the bytes are there to send, but no blob,
    manifest or stat cache is written until settle(); then all of them, and the next freeze
    of the tree reads nothing."""
    root, cache = tmp_path / "tree", tmp_path / "cache"
    write(root, {"a.py": "a = 1\n", "pkg/b.py": "b = 2\n", "big.bin": os.urandom(100_000)})
    age(root)
    pending = PendingStore(store)
    frozen = freeze(root, pending, cache_path=cache)
    assert _objects(store) == set() and not cache.exists()
    for entry in frozen.manifest.entries:
        assert pending.read(entry.blob) == (root / entry.path).read_bytes()
        assert pending.has(entry.blob) and not store.has(entry.blob)
    assert pending.has(frozen.bundle_id) and pending.missing(frozen.manifest.blobs()) == []
    pending.settle()
    assert _objects(store) == set(frozen.manifest.blobs()) | {frozen.bundle_id}
    assert store.get_manifest(frozen.bundle_id) == frozen.manifest
    again = freeze(root, store, cache_path=cache)
    assert again.bundle_id == frozen.bundle_id and again.bytes_read == 0
    pending.settle()  # a second settle writes nothing more and breaks nothing
    assert _objects(store) == set(frozen.manifest.blobs()) | {frozen.bundle_id}
    # Settled, it writes through: a freeze that was still running when its submit was
    # interrupted stores in order and never races settle().
    write(root, {"a.py": "a = 2\n"})
    os.utime(root / "a.py", (HOUR_AGO, HOUR_AGO))
    late = freeze(root, pending, cache_path=cache)
    assert store.has(late.bundle_id) and store.missing(late.manifest.blobs()) == []
    assert freeze(root, store, cache_path=cache).files_read == 0


def test_a_launcher_that_dies_before_settling_loses_only_time(tmp_path: Path, store: Store) -> None:
    """Nothing of an unsettled freeze reaches the disk, so nothing half-written is trusted:
    the next freeze reads the tree again and gives the same bundle, with every blob."""
    root, cache = tmp_path / "tree", tmp_path / "cache"
    write(root, {"a.py": "a = 1\n", "b.py": "b = 2\n"})
    age(root)
    freeze(root, store, cache_path=cache)  # a settled freeze of an older tree
    write(root, {"b.py": "b = 3\n", "c.py": "c = 4\n"})
    for name in ("b.py", "c.py"):  # not age(): a.py's stat stays what the cache holds
        os.utime(root / name, (HOUR_AGO, HOUR_AGO))
    lost = freeze(root, PendingStore(store), cache_path=cache)  # never settled
    after = freeze(root, store, cache_path=cache)
    assert after.bundle_id == lost.bundle_id
    assert after.files_read == 2  # the changed and the new file, read again
    assert store.missing(after.manifest.blobs()) == []


def test_past_its_budget_a_pending_store_writes_blobs_at_once(tmp_path: Path, store: Store) -> None:
    """Memory stays bounded: blobs past the budget go to disk as they come; the manifest
    and the stat cache still wait for settle()."""
    root, cache = tmp_path / "tree", tmp_path / "cache"
    write(root, {f"f{i}.bin": os.urandom(40_000) for i in range(20)})
    age(root)
    pending = PendingStore(store, budget=100_000)
    frozen = freeze(root, pending, cache_path=cache)
    assert pending.size <= 100_000
    assert store.missing(frozen.manifest.blobs()) == []
    assert not store.has(frozen.bundle_id) and not cache.exists()
    pending.settle()
    assert store.has(frozen.bundle_id) and cache.exists()

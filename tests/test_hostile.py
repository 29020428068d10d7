"""Hostile manifests and a hostile neighbour: materialise never writes outside its dest.

Manifests here are built with `Manifest(entries=...)` and `Entry(...)` directly, skipping the
validation that decoding does, to show that the store does not depend on it. Each case is
also checked the other way: its canonical bytes must be refused by `Manifest.decode`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from agent.protocol.errors import InvalidManifest, LaunchError
from agent.protocol.objects import Entry, Manifest, blob_id
from agent.store import Store

DATA = b"evil"
BLOB = blob_id(DATA)


def f(path: str, kind: str = "file") -> Entry:
    return Entry(path, kind, len(DATA), BLOB)  # type: ignore[arg-type]


def link(path: str, target: str) -> Entry:
    return Entry.symlink(path, target)


# Each case gets `outside`, an absolute directory next to dest, so escapes land where the
# snapshot looks.
CASES: dict[str, Callable[[str], list[Entry]]] = {
    "dotdot": lambda out: [f("../x")],
    "dotdot deep": lambda out: [f("../../../x")],
    "inner dotdot": lambda out: [f("a/../../x")],
    "dotdot only": lambda out: [f("..")],
    "dot": lambda out: [f("./x")],
    "absolute": lambda out: [f(out + "/x")],
    "empty path": lambda out: [f("")],
    "empty component": lambda out: [f("a//x")],
    "trailing slash": lambda out: [f("a/")],
    "nul": lambda out: [f("a\x00/../../x")],
    "backslash": lambda out: [f("..\\..\\x")],
    "unknown kind": lambda out: [f("x", "dir")],
    "symlink up": lambda out: [link("l", "../../etc")],
    "symlink absolute": lambda out: [link("l", "/etc")],
    "symlink to outside": lambda out: [link("l", out)],
    "nested symlink up": lambda out: [link("a/l", "../../x")],
    "symlink up then file": lambda out: [link("d", ".."), f("d/x")],
    "symlink root then file": lambda out: [link("a/d", ".."), f("a/d/x"), f("a/y")],
    "symlink dir then file": lambda out: [link("s", "sub"), f("sub/y"), f("s/x")],
    "file through symlink first": lambda out: [f("s/x"), link("s", "sub"), f("sub/y")],
    "symlink outside then file": lambda out: [link("l", out), f("l/x")],
    "file and dir": lambda out: [f("d"), f("d/x")],
    "dir and file": lambda out: [f("d/x"), f("d")],
    "file and dir via symlink": lambda out: [link("d", "e"), f("d/x/y")],
    "duplicate": lambda out: [f("x"), f("x")],
    "case duplicates": lambda out: [f("README"), f("readme")],
    "case duplicate dirs": lambda out: [f("Dir/x"), f("dir/y")],
}


def snapshot(top: Path, dest: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Everything under top except dest's own subtree: type and content, by real path."""
    seen: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == dest.parent and dest.name in dirnames:
            dirnames.remove(dest.name)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if path == str(dest):
                continue
            st = os.lstat(path)
            content: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            seen[os.path.join(os.path.realpath(dirpath), name)] = (st.st_mode, content)
    return seen


def assert_inside(dest: Path) -> None:
    """Every path in dest, links resolved, stays in dest."""
    real_dest = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            real = os.path.realpath(os.path.join(dirpath, name))
            assert real == real_dest or real.startswith(real_dest + os.sep), (name, real)


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Store, Path, Path, Path]:
    """A store, a deep dest, and bait: files around dest that an escape would change."""
    store = Store(tmp_path / "store")
    store.put(BLOB, DATA)
    top = tmp_path / "top"
    dest = top / "a" / "b" / "c" / "dest"
    dest.parent.mkdir(parents=True)
    outside = top / "outside"
    (outside / "sub").mkdir(parents=True)
    for d in (top, top / "a", top / "a" / "b", dest.parent, outside):
        (d / "x").write_bytes(b"bait")
    return store, top, dest, outside


def swap_loop(
    dest: Path, outside: Path, stop: threading.Event, swaps: list[int], start_at: Path
) -> None:
    """Once start_at exists and until stopped: move dest/sub away, put a symlink to outside
    in its place, undo."""
    sub, away = dest / "sub", dest / "away"
    while not (stop.is_set() or start_at.exists()):
        pass
    while not stop.is_set():
        try:
            os.rename(sub, away)
            os.symlink(outside, sub)
            swaps.append(1)
            os.unlink(sub)
            os.rename(away, sub)
        except OSError:
            continue


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_manifest_is_contained(case: str, arena: tuple[Store, Path, Path, Path]) -> None:
    store, top, dest, outside = arena
    manifest = Manifest(entries=tuple(CASES[case](str(outside))))
    before = snapshot(top, dest)
    with contextlib.suppress(LaunchError):
        store.materialize(manifest, dest)
    assert snapshot(top, dest) == before
    if dest.exists():
        assert_inside(dest)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_manifest_is_refused_by_decode(case: str) -> None:
    rows = []
    for e in sorted(CASES[case]("/outside"), key=lambda e: e.path):
        row: list[object] = [e.path, e.kind, e.size, bytes.fromhex(e.blob)]
        if e.kind == "symlink":
            row.append(e.target)
        rows.append(row)
    data = msgpack.packb([1, rows], use_bin_type=True)
    with pytest.raises(InvalidManifest):
        Manifest.decode(data)


def test_swapping_a_directory_for_a_symlink_never_escapes(
    arena: tuple[Store, Path, Path, Path],
) -> None:
    """A neighbour keeps replacing dest/sub by a symlink to `outside` while files are written.

    Materialise may fail (it sees the symlink); it must not write a byte through it.
    """
    store, top, dest, outside = arena
    entries = [f(f"sub/f{i:04}") for i in range(400)]
    entries += [f(f"sub/d{i:02}/f{j}") for i in range(40) for j in range(10)]
    for i in range(40):
        (outside / f"d{i:02}").mkdir()  # so a path-based writer would succeed out there
    manifest = Manifest(entries=tuple(sorted(entries)))
    before = snapshot(top, dest)
    swaps: list[int] = []
    # Half the rounds race the directories being made, half the files being written.
    for start_at in [dest, dest / "sub" / "d39"] * 5:
        stop = threading.Event()
        args = (dest, outside, stop, swaps, start_at)
        swapper = threading.Thread(target=swap_loop, args=args)
        swapper.start()
        try:
            store.materialize(manifest, dest)
        except (LaunchError, OSError):
            pass
        finally:
            stop.set()
            swapper.join()
        assert snapshot(top, dest) == before
        assert_inside(dest)
        for path in sorted(dest.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    assert swaps, "the race never happened; the test proved nothing"

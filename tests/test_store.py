"""The object store on real files: write once, verify both ways, materialise, fsck."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.errors import (
    AmbiguousRef,
    ChecksumMismatch,
    InvalidManifest,
    JobStateError,
    ObjectMissing,
)
from agent.protocol.objects import Entry, Manifest, apply_changes, blob_id
from agent.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree(store: Store, files: dict[str, bytes | tuple[str, bytes | str]]) -> Manifest:
    """A manifest of plain files (bytes), ("exec", bytes) and ("symlink", target); blobs stored."""
    entries = []
    for path, spec in files.items():
        kind, value = spec if isinstance(spec, tuple) else ("file", spec)
        if kind == "symlink":
            assert isinstance(value, str)
            entries.append(Entry.symlink(path, value))
        else:
            assert isinstance(value, bytes)
            store.put(blob_id(value), value)
            entries.append(Entry(path, kind, len(value), blob_id(value)))  # type: ignore[arg-type]
    return Manifest.of(entries)


def test_new_store_directories_and_modes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert mode(store.root / "objects") == 0o755
    assert mode(store.root / "tmp") == 0o700
    Store(tmp_path / "s")  # reopening an existing store is fine


def test_put_get_has_missing(store: Store) -> None:
    a, b = b"alpha", b"beta"
    assert store.put(blob_id(a), a) is True
    assert store.has(blob_id(a)) and not store.has(blob_id(b))
    assert store.get(blob_id(a)) == a
    assert store.path(blob_id(a)) == store.root / "objects" / blob_id(a)[:2] / blob_id(a)[2:]
    assert store.missing([blob_id(b), blob_id(a), blob_id(b)]) == [blob_id(b)]
    with pytest.raises(ObjectMissing) as info:
        store.get(blob_id(b))
    assert info.value.ids == [blob_id(b)]


def test_lacks_trusts_a_base_only_once_all_its_blobs_were_here(store: Store) -> None:
    """A manifest made from a base by a few puts needs only the puts' blobs looked at, but
    only when every blob of the base was found present: a base whose upload was cut short
    still has its own gaps reported through every manifest built on it."""

    def entry(path: str, data: bytes) -> Entry:
        return Entry(path, "file", len(data), blob_id(data))

    a, b, c, d = b"a\n", b"b\n", b"c\n", b"d\n"
    base = Manifest.of([entry("a.py", a), entry("b.py", b)])
    store.put(blob_id(a), a)
    assert store.lacks(base) == [blob_id(b)]
    put_c = [entry("a.py", c)]
    changed = apply_changes(base, put_c)
    store.put(blob_id(c), c)
    assert store.lacks(changed, base.bundle_id, put_c) == [blob_id(b)]  # base incomplete
    store.put(blob_id(b), b)
    assert store.lacks(base) == []
    put_d = [entry("d.py", d)]
    added = apply_changes(base, put_d)
    assert store.lacks(added, base.bundle_id, put_d) == [blob_id(d)]
    store.put(blob_id(d), d)
    assert store.lacks(added, base.bundle_id, put_d) == []
    assert store.lacks(changed, added.bundle_id, put_c) == []  # added is complete too


def test_a_temp_name_left_by_an_earlier_process_is_skipped(store: Store) -> None:
    """Temp files are named by pid and a counter: a file of the same name, left by a dead
    process that had this pid, is neither clobbered nor a failure."""
    import agent.store

    data = b"object\n"
    oid = blob_id(data)
    upcoming = next(agent.store._TEMP_NUMBERS) + 1
    stale = [store.tmp / f"{oid[:16]}.{os.getpid()}.{upcoming + k}" for k in range(3)]
    for path in stale:
        path.write_bytes(b"left by a crash")
    assert store.put(oid, data)
    assert store.get(oid) == data
    assert all(p.read_bytes() == b"left by a crash" for p in stale)


def test_invalid_ids_are_refused(store: Store) -> None:
    for bad in ("", "abc", "A" * 64, "g" * 64, "../" + "a" * 61):
        with pytest.raises(InvalidManifest):
            store.missing([bad])
        with pytest.raises(InvalidManifest):
            store.put(bad, b"x")


def test_checksum_mismatch_leaves_nothing(store: Store) -> None:
    wrong = blob_id(b"expected")
    with pytest.raises(ChecksumMismatch) as info:
        store.put(wrong, b"something else")
    assert (info.value.expected, info.value.actual) == (wrong, blob_id(b"something else"))
    assert not store.has(wrong)
    assert list((store.root / "objects").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_put_many_mismatch_writes_nothing(store: Store) -> None:
    good = [(blob_id(bytes([i])), bytes([i])) for i in range(10)]
    with pytest.raises(ChecksumMismatch):
        store.put_many([*good, (blob_id(b"x"), b"y")])
    assert store.missing(i for i, _ in good) == sorted(i for i, _ in good)
    assert list((store.root / "tmp").iterdir()) == []


def test_put_many_counts_new_objects_only(store: Store) -> None:
    items = [(blob_id(bytes([i]) * 100), bytes([i]) * 100) for i in range(50)]
    store.put(*items[0])
    assert store.put_many([*items, items[1]]) == 49
    assert store.put_many(items) == 0
    assert all(store.get(i) == d for i, d in items)
    assert list((store.root / "tmp").iterdir()) == []


def test_objects_are_read_only_and_put_is_idempotent(store: Store) -> None:
    data = b"frozen"
    assert store.put(blob_id(data), data) is True
    assert store.put(blob_id(data), data) is False
    assert mode(store.path(blob_id(data))) == 0o444
    assert store.get(blob_id(data)) == data


def test_get_detects_corruption(store: Store) -> None:
    data = b"will rot"
    store.put(blob_id(data), data)
    path = store.path(blob_id(data))
    path.chmod(0o644)
    path.write_bytes(b"has rot!")
    with pytest.raises(ChecksumMismatch):
        store.get(blob_id(data))


def test_resolve_prefix_ambiguous_missing(store: Store) -> None:
    seen: dict[str, bytes] = {}
    while True:
        data = os.urandom(8)
        prefix = blob_id(data)[:4]
        if prefix in seen:
            break
        seen[prefix] = data
    first, second = seen[prefix], data
    store.put_many([(blob_id(first), first), (blob_id(second), second)])
    assert store.resolve(blob_id(first)[:12]) == blob_id(first)
    assert store.resolve(blob_id(second).upper()) == blob_id(second)
    with pytest.raises(AmbiguousRef) as info:
        store.resolve(prefix)
    assert sorted(info.value.detail) == sorted([blob_id(first), blob_id(second)])
    with pytest.raises(ObjectMissing):
        store.resolve(blob_id(b"not stored")[:8])
    for bad in ("abc", "xyz123", "a" * 65):
        with pytest.raises(InvalidManifest):
            store.resolve(bad)


def test_manifest_round_trip(store: Store) -> None:
    manifest = tree(store, {"a.py": b"print(1)\n", "bin/run": ("exec", b"#!/bin/sh\n")})
    bundle = store.put_manifest(manifest)
    assert bundle == manifest.bundle_id
    assert store.get_manifest(bundle) == manifest
    with pytest.raises(InvalidManifest):
        store.put_manifest(Manifest((Entry("../x", "file", 0, blob_id(b"")),)))


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The test runs under this umask: the store's modes never depend on it (under 022 and
    002 it skips the fchmod after each create; under 077 it must not)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_materialize_round_trip(store: Store, tmp_path: Path, umask: int) -> None:
    big = os.urandom(3 << 20)
    manifest = tree(
        store,
        {
            "README": b"hello\n",
            "empty": b"",
            "big.bin": big,
            "bin/train.sh": ("exec", b"#!/bin/sh\necho hi\n"),
            "pkg/sub/deep/mod.py": b"x = 1\n",
            "pkg/sub/link": ("symlink", "deep/mod.py"),
            "pkg/up": ("symlink", "../README"),
            "dangling": ("symlink", "nowhere/at/all"),
        },
    )
    dest = tmp_path / "code"
    store.materialize(manifest, dest)
    assert (dest / "README").read_bytes() == b"hello\n"
    assert (dest / "empty").read_bytes() == b""
    assert (dest / "big.bin").read_bytes() == big
    assert (dest / "bin/train.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "pkg/sub/deep/mod.py").read_bytes() == b"x = 1\n"
    assert os.readlink(dest / "pkg/sub/link") == "deep/mod.py"
    assert os.readlink(dest / "pkg/up") == "../README"
    assert os.readlink(dest / "dangling") == "nowhere/at/all"
    assert (dest / "pkg/sub/link").read_bytes() == b"x = 1\n"
    assert mode(dest) == 0o755
    assert mode(dest / "README") == mode(dest / "big.bin") == 0o444
    assert mode(dest / "bin/train.sh") == 0o555
    assert mode(dest / "pkg") == mode(dest / "pkg/sub/deep") == 0o755
    assert mode(store.path(blob_id(b"hello\n"))) == mode(store.path(blob_id(big))) == 0o444
    # Copies, never links to the store: the job cannot reach an object through its tree.
    assert os.stat(dest / "README").st_ino != os.stat(store.path(blob_id(b"hello\n"))).st_ino
    assert os.stat(dest / "README").st_nlink == 1
    found = {str(Path(d, n).relative_to(dest)) for d, ds, fs in os.walk(dest) for n in ds + fs}
    assert found == {e.path for e in manifest.entries} | {"bin", "pkg", "pkg/sub", "pkg/sub/deep"}


def test_materialize_many_files(store: Store, tmp_path: Path) -> None:
    files: dict[str, bytes | tuple[str, bytes | str]] = {
        f"d{i % 40}/f{i}.py": f"n = {i}\n".encode() for i in range(3000)
    }
    manifest = tree(store, files)
    store.materialize(manifest, tmp_path / "out")
    for path, data in files.items():
        assert (tmp_path / "out" / path).read_bytes() == data


def test_materialize_into_existing_empty_dir(store: Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    store.materialize(tree(store, {"x": b"1"}), tmp_path / "empty")
    assert (tmp_path / "empty/x").read_bytes() == b"1"


def test_materialize_refuses_occupied_dest(store: Store, tmp_path: Path) -> None:
    manifest = tree(store, {"x": b"1"})
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    (tmp_path / "afile").write_text("f")
    (tmp_path / "target").mkdir()
    (tmp_path / "alink").symlink_to(tmp_path / "target")
    for dest in (full, tmp_path / "afile", tmp_path / "alink"):
        with pytest.raises(JobStateError):
            store.materialize(manifest, dest)
    assert os.listdir(full) == ["keep"]
    assert os.listdir(tmp_path / "target") == []


def test_materialize_missing_blobs_lists_them_and_writes_nothing(
    store: Store, tmp_path: Path
) -> None:
    gone = sorted([blob_id(b"gone 1"), blob_id(b"gone 2")])
    present = tree(store, {"present": b"here"}).entries
    manifest = Manifest.of(
        [
            Entry("a", "file", 6, gone[0]),
            Entry("b/c", "exec", 6, gone[1]),
            Entry("d", "file", 6, gone[1]),
            *present,
        ]
    )
    with pytest.raises(ObjectMissing) as info:
        store.materialize(manifest, tmp_path / "dest")
    assert info.value.ids == gone
    assert not (tmp_path / "dest").exists()


def test_fsck_healthy_store_reports_nothing(store: Store) -> None:
    store.put_many((blob_id(bytes([i])), bytes([i])) for i in range(20))
    store.put_manifest(tree(store, {"a": b"a"}))
    assert list(store.fsck()) == []


def test_fsck_names_corruption_and_strays(store: Store) -> None:
    good, bad = b"good", b"bad!"
    store.put_many([(blob_id(good), good), (blob_id(bad), bad)])
    path = store.path(blob_id(bad))
    path.chmod(0o644)
    flipped = bytearray(path.read_bytes())
    flipped[0] ^= 1
    path.write_bytes(bytes(flipped))
    stray = path.parent / "notes.txt"
    stray.write_text("hello")
    junk_dir = store.root / "objects" / "zz"
    junk_dir.mkdir()
    problems = dict(store.fsck())
    assert set(problems) == {blob_id(bad), str(stray), str(junk_dir)}
    assert "corrupt" in problems[blob_id(bad)]


def test_clean_tmp_removes_leftovers(store: Store) -> None:
    for n in range(3):
        (store.root / "tmp" / f"leftover{n}").write_bytes(b"half an object")
    assert store.clean_tmp() == 3
    assert list((store.root / "tmp").iterdir()) == []
    store.put(blob_id(b"after"), b"after")
    assert store.clean_tmp() == 0

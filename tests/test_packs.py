"""Packs on real files: a batch of many small objects is stored as one file, read back,
materialised, seen by another process's store, and checked by fsck like any object."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent import packs
from agent.protocol.errors import AmbiguousRef, ChecksumMismatch, ObjectMissing
from agent.protocol.objects import Entry, Manifest, blob_id
from agent.store import PACK_MAX_SIZE, PACK_MIN, Store


def small(n: int, tag: str = "") -> dict[str, bytes]:
    blobs = [f"print({i})  # {tag}\n".encode() for i in range(n)]
    return {blob_id(b): b for b in blobs}


def loose_files(store: Store) -> set[str]:
    return {p.parent.name + p.name for p in store.objects.glob("*/*")}


def pack_files(store: Store) -> list[Path]:
    return sorted(store.packs.iterdir())


def test_a_batch_of_small_objects_is_one_pack_and_large_ones_stay_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN * 3)
    big = b"x" * PACK_MAX_SIZE
    objects[blob_id(big)] = big
    assert store.put_many(objects.items()) == len(objects)

    (pack,) = pack_files(store)
    assert stat.S_IMODE(pack.stat().st_mode) == 0o444
    assert loose_files(store) == {blob_id(big)}
    assert os.listdir(store.tmp) == []
    for object_id, data in objects.items():
        assert store.has(object_id) and store.get(object_id) == data
    assert store.missing(objects) == []
    assert store.count() == len(objects)
    # Stored again: nothing new, no second pack.
    assert store.put_many(objects.items()) == 0
    assert len(pack_files(store)) == 1

    # Another process's store (a restarted agent, a second launcher) reads the index.
    again = Store(tmp_path / "store")
    assert again.missing(objects) == []
    assert all(again.get(i) == d for i, d in objects.items())


def test_a_few_objects_are_files_of_their_own(tmp_path: Path) -> None:
    """A patch of one or two files does not make a pack."""
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN - 1)
    store.put_many(objects.items())
    assert pack_files(store) == []
    assert loose_files(store) == set(objects)


def test_a_mismatch_in_the_batch_writes_no_pack(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    objects = list(small(PACK_MIN * 2).items())
    objects[5] = (objects[5][0], b"not what the id says")
    with pytest.raises(ChecksumMismatch):
        store.put_many(objects)
    assert pack_files(store) == [] and loose_files(store) == set()
    assert os.listdir(store.tmp) == []


def test_materialize_from_packs_and_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN * 2)
    big = os.urandom(PACK_MAX_SIZE + 1)
    store.put_many([*objects.items(), (blob_id(big), big)])
    entries = [
        Entry(f"pkg/m{n}.py", "exec" if n % 5 == 0 else "file", len(data), object_id)
        for n, (object_id, data) in enumerate(objects.items())
    ]
    entries.append(Entry("data/big.bin", "file", len(big), blob_id(big)))
    entries.append(Entry.symlink("link", "pkg/m1.py"))
    manifest = Manifest.of(entries)

    # Materialised by a fresh store, as the spare builder (its own process) does.
    Store(tmp_path / "store").materialize(manifest, tmp_path / "out")
    out = tmp_path / "out"
    for n, data in enumerate(objects.values()):
        path = out / f"pkg/m{n}.py"
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == (0o555 if n % 5 == 0 else 0o444)
    assert (out / "data/big.bin").read_bytes() == big
    assert os.readlink(out / "link") == "pkg/m1.py"


def test_a_pack_written_by_another_store_is_found(tmp_path: Path) -> None:
    """Two launchers share one store: what one packs after the other opened it is there."""
    first = Store(tmp_path / "store")
    objects = small(PACK_MIN, "other")
    assert first.missing(objects) == sorted(objects)
    Store(tmp_path / "store").put_many(objects.items())
    some = next(iter(objects))
    assert first.get(some) == objects[some]
    assert first.missing(objects) == []
    assert first.has(sorted(objects)[-1])


def test_resolve_finds_packed_objects(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN)
    store.put_many(objects.items())
    some = sorted(objects)[3]
    assert store.resolve(some[:12]) == some
    with pytest.raises(ObjectMissing):
        store.resolve("0000000000")
    # A prefix matching a packed object and a file is ambiguous, not one of them.
    twin = next(
        data for n in range(100_000) if blob_id(data := f"twin {n}".encode()).startswith(some[:4])
    )
    store.put(blob_id(twin), twin)
    with pytest.raises(AmbiguousRef):
        store.resolve(some[:4])


def test_fsck_checks_every_packed_object(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN * 2)
    store.put_many(objects.items())
    assert list(store.fsck()) == []

    (pack,) = pack_files(store)
    entries, _ = packs.read_index(os.open(pack, os.O_RDONLY))
    victim, offset, _size = entries[7]
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(offset)
        f.write(b"#")
    problems = dict(store.fsck())
    assert list(problems) == [victim]
    assert "corrupt in pack" in problems[victim]
    with pytest.raises(ChecksumMismatch):
        Store(tmp_path / "store").get(victim)

    (store.packs / "notes.txt").write_text("hello")
    renamed = store.packs / ("0" * 64 + packs.SUFFIX)
    pack.rename(renamed)
    problems = dict(store.fsck())
    assert problems[str(store.packs / "notes.txt")] == "stray entry: not a pack"
    assert "its index hashes to" in problems[str(renamed)]


def test_a_cut_pack_is_named_by_fsck_and_its_objects_are_missing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN)
    store.put_many(objects.items())
    (pack,) = pack_files(store)
    pack.chmod(0o644)
    os.truncate(pack, pack.stat().st_size - 3)

    reopened = Store(tmp_path / "store")  # logs the pack, does not fail
    assert reopened.missing(objects) == sorted(objects)
    assert [p for _, p in reopened.fsck()] == ["corrupt pack: no pack footer"]
    # Sent again, they are stored again (in a new pack) and found.
    reopened.put_many(objects.items())
    assert reopened.missing(objects) == []
    assert Store(tmp_path / "store").missing(objects) == []


def test_a_hostile_index_is_refused(tmp_path: Path) -> None:
    objects = small(PACK_MIN)
    pieces, index, name = packs.build(objects.items())
    body = sum(len(p) for p in pieces[: len(objects)])
    path = tmp_path / name
    path.write_bytes(b"".join(pieces))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert packs.read_index(fd) == (index, name)
    finally:
        os.close(fd)

    import msgpack

    for bad in (
        [[b"x" * 32, body, 1]],  # past the end of the objects
        [[b"short", 0, 1]],
        [[b"x" * 32, -1, 1]],
        [["a" * 64, 0, 1]],
        [["a" * 32, 0, 1]],  # a string of the right length is not an id
        [[b"x" * 32, 0.5, 1]],
        [[b"x" * 32, True, 1]],
        [[b"x" * 32, 0]],
        {"a": 1},
    ):
        encoded = msgpack.packb(bad)
        path.write_bytes(b"y" * body + encoded + packs.FOOTER.pack(len(encoded), packs.MAGIC))
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(packs.CorruptPack):
                packs.read_index(fd)
        finally:
            os.close(fd)


def test_a_pack_removed_by_hand_is_object_missing_not_a_crash(tmp_path: Path) -> None:
    """As for a removed object file: the store remembers it present, and reading or
    materialising it says which object is missing."""
    store = Store(tmp_path / "store")
    objects = small(PACK_MIN)
    store.put_many(objects.items())
    some = sorted(objects)[2]
    manifest = Manifest.of([Entry("a.py", "file", len(objects[some]), some)])
    (pack,) = pack_files(store)
    pack.unlink()
    with pytest.raises(ObjectMissing) as info:
        store.get(some)
    assert info.value.ids == [some]
    with pytest.raises(ObjectMissing):
        store.materialize(manifest, tmp_path / "out")
    assert Store(tmp_path / "store").missing(objects) == sorted(objects)

"""Objects: the canonical encoding (pinned by golden vectors), the path grammar, symlink
targets, apply_changes, diff, revision records and object_kind."""

from __future__ import annotations

import hashlib
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.errors import InvalidManifest, PathNotFound
from agent.protocol.objects import (
    KINDS,
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    Entry,
    Manifest,
    Revision,
    Source,
    TreeIndex,
    apply_changes,
    blob_id,
    changes,
    check_path,
    check_symlink_target,
    diff,
    object_kind,
)


def file(path: str, data: bytes, kind: str = "file") -> Entry:
    return Entry(path, kind, len(data), blob_id(data))  # type: ignore[arg-type]


def golden_manifest() -> Manifest:
    # Given out of order on purpose: Manifest.of sorts.
    return Manifest.of(
        [
            Entry.symlink("bin/latest", "run.sh"),
            file("src/pkg/mod/__init__.py", b""),
            file("données/café.txt", "é\n".encode()),
            file("bin/run.sh", b"#!/bin/sh\necho hi\n", "exec"),
            file("README.md", b"hello\n"),
        ]
    )


def golden_revision() -> Revision:
    return Revision(
        job="j-0001",
        number=1,
        parent=0,
        bundle=GOLDEN_BUNDLE_ID,
        reason="patch",
        author="alice",
        at_ns=1_700_000_000_123_456_789,
        paths=("README.md", "bin/run.sh"),
        message="fix typo",
        step=42,
        source=Source("0123456789abcdef0123456789abcdef01234567", "main", True),
    )


# Golden vectors. Changing any of these constants is a FORMAT CHANGE: every bundle id and
# revision id already stored on a node would stop matching. Bump MANIFEST_FORMAT or
# REVISION_FORMAT instead, and add new vectors beside these.
#
# [1, [[path, kind, size, bin32 blob (, target)], ...]]: 92 01 95 | 94 a9 "README.md" a4 "file"
# 06 c4 20 <sha256("hello\n")> | 95 aa "bin/latest" a7 "symlink" 06 c4 20 <sha256("run.sh")>
# a6 "run.sh" | ...
GOLDEN_MANIFEST_HEX = (
    "92019594a9524541444d452e6d64a466696c6506c4205891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af"
    "34d08286a2e846f6be0395aa62696e2f6c6174657374a773796d6c696e6b06c420d31ce0453051853c17ba2a"
    "5225b3d1bfab548e095bab0967d6acfd1b3ce1b35da672756e2e736894aa62696e2f72756e2e7368a4657865"
    "6312c420299001868fb8c02fd431c336c6d058f5558c5dff5b5af5e6fe04b870a6a9cbba94b2646f6e6ec3a9"
    "65732f636166c3a92e747874a466696c6503c420edd3a863872a04239eb29ad4bc12fc892b3d4ae57cc7e786"
    "a3697816f8e141c294b77372632f706b672f6d6f642f5f5f696e69745f5f2e7079a466696c6500c420e3b0c4"
    "4298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
)
GOLDEN_BUNDLE_ID = "ed0cedd96a5e4fd06cdf6eb2f3d7ea1553a149ef9935fef6b5cc26c1edd9e90c"
GOLDEN_REVISION_HEX = (
    "9c01a66a2d303030310100c420ed0cedd96a5e4fd06cdf6eb2f3d7ea1553a149ef9935fef6b5cc26c1edd9e9"
    "0ca57061746368a5616c696365cf17979cfe3d85cd1592a9524541444d452e6d64aa62696e2f72756e2e7368"
    "a8666978207479706f2a93d92830313233343536373839616263646566303132333435363738396162636465"
    "663031323334353637a46d61696ec3"
)
GOLDEN_REVISION_ID = "a729c7c9051a46dfc152b2446b051e026340a8f0f6c350cd1b39e0af37135143"
GOLDEN_EMPTY_MANIFEST_HEX = "920190"
GOLDEN_EMPTY_BUNDLE_ID = "145ac1e952c63f90b74d5bf7c0e76d1ade71e9f2c9d55a3b4de346e81ba63278"


# ------------------------------------------------------------------------------ golden


def test_golden_manifest_bytes_and_bundle_id() -> None:
    m = golden_manifest()
    assert m.encode().hex() == GOLDEN_MANIFEST_HEX
    assert m.bundle_id == GOLDEN_BUNDLE_ID
    assert hashlib.sha256(bytes.fromhex(GOLDEN_MANIFEST_HEX)).hexdigest() == GOLDEN_BUNDLE_ID
    assert [e.path for e in m.entries] == [
        "README.md",
        "bin/latest",
        "bin/run.sh",
        "données/café.txt",
        "src/pkg/mod/__init__.py",
    ]


def test_golden_manifest_decodes() -> None:
    m = Manifest.decode(bytes.fromhex(GOLDEN_MANIFEST_HEX))
    assert m == golden_manifest()
    assert m.by_path()["bin/latest"].target == "run.sh"
    assert m.by_path()["bin/run.sh"].kind == "exec"
    assert m.blobs() == {
        blob_id(b"hello\n"),
        blob_id(b"#!/bin/sh\necho hi\n"),
        blob_id(b""),
        blob_id("é\n".encode()),
    }
    assert m.total_size == 6 + 18 + 0 + 3


def test_golden_empty_manifest() -> None:
    m = Manifest.of([])
    assert m.encode().hex() == GOLDEN_EMPTY_MANIFEST_HEX
    assert m.bundle_id == GOLDEN_EMPTY_BUNDLE_ID
    assert Manifest.decode(bytes.fromhex(GOLDEN_EMPTY_MANIFEST_HEX)) == m


def test_golden_revision_bytes_and_id() -> None:
    r = golden_revision().check()
    assert r.encode().hex() == GOLDEN_REVISION_HEX
    assert r.id == GOLDEN_REVISION_ID
    assert r.ref == "j-0001@r1"
    decoded = Revision.decode(bytes.fromhex(GOLDEN_REVISION_HEX))
    assert decoded == r
    assert decoded.source == Source("0123456789abcdef0123456789abcdef01234567", "main", True)


# ------------------------------------------------------------------------- determinism

SAFE_CHARS = st.characters(codec="utf-8", exclude_characters="/\\\x00")  # utf-8: no surrogates
COMPONENT = st.text(SAFE_CHARS, min_size=1, max_size=12).filter(lambda c: c not in (".", ".."))
RAW_PATH = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)


def compatible(paths: list[str]) -> list[str]:
    """Keep the paths that form a valid tree together (mirrors the manifest rules)."""
    files: set[str] = set()
    dirs: dict[str, str] = {}
    kept = []
    for path in paths:
        parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
        key = path.casefold()
        if key in files or key in dirs:
            continue
        if any(p.casefold() in files or dirs.get(p.casefold(), p) != p for p in parents):
            continue
        files.add(key)
        for p in parents:
            dirs[p.casefold()] = p
        kept.append(path)
    return kept


@st.composite
def entry_lists(draw: st.DrawFn) -> list[Entry]:
    paths = compatible(draw(st.lists(RAW_PATH, max_size=25)))
    entries = []
    for path in paths:
        kind = draw(st.sampled_from(KINDS))
        if kind == "symlink":
            ups = draw(st.integers(0, path.count("/")))
            target = "../" * ups + draw(COMPONENT)
            entries.append(Entry.symlink(path, target))
        else:
            # The blob is derived from the size: one blob id, one size (as real content).
            size = draw(st.integers(0, 2**40))
            blob = blob_id(f"{size}:{draw(st.integers(0, 3))}".encode())
            entries.append(Entry(path, kind, size, blob))
    return entries


@settings(max_examples=150, deadline=None)
@given(entries=entry_lists(), data=st.data())
def test_encoding_is_independent_of_entry_order(entries: list[Entry], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(entries))
    a, b = Manifest.of(entries), Manifest.of(shuffled)
    assert a.encode() == b.encode()
    assert a.bundle_id == b.bundle_id == blob_id(a.encode())
    decoded = Manifest.decode(a.encode())
    assert decoded == a
    assert [e.target for e in decoded.entries] == [e.target for e in a.entries]
    assert decoded.encode() == a.encode()
    assert [e.path for e in a.entries] == sorted(e.path for e in entries)


# ----------------------------------------------------------------- non-canonical input

BLOB_A = blob_id(b"a")


def rows() -> list[list[object]]:
    return [e.to_wire() for e in golden_manifest().entries]


def test_canonical_baseline_decodes() -> None:
    # The hand-built bytes below differ from this only in the part under test.
    data = msgpack.packb([1, rows()], use_bin_type=True)
    assert Manifest.decode(data).bundle_id == GOLDEN_BUNDLE_ID


def test_unsorted_entries_refused() -> None:
    r = rows()
    r[0], r[1] = r[1], r[0]
    with pytest.raises(InvalidManifest, match="sorted"):
        Manifest.decode(msgpack.packb([1, r], use_bin_type=True))


def test_duplicate_entries_refused_on_decode() -> None:
    r = rows()
    with pytest.raises(InvalidManifest):
        Manifest.decode(msgpack.packb([1, [r[0], r[0]]], use_bin_type=True))


@pytest.mark.parametrize(
    "body",
    [
        {"format": 1, "entries": []},
        [1, {"README.md": ["file", 1, bytes(32)]}],
        [1, [{"path": "a", "kind": "file", "size": 1, "blob": bytes(32)}]],
    ],
    ids=["top-level map", "entries map", "entry map"],
)
def test_maps_refused(body: object) -> None:
    with pytest.raises(InvalidManifest):
        Manifest.decode(msgpack.packb(body, use_bin_type=True))


def test_float_size_refused() -> None:
    with pytest.raises(InvalidManifest):
        Manifest.decode(msgpack.packb([1, [["a", "file", 1.0, bytes(32)]]], use_bin_type=True))
    with pytest.raises(InvalidManifest):
        Manifest.decode(msgpack.packb([1.0, []], use_bin_type=True))


def hand_built(size: bytes, path: bytes = b"\xa1a", fmt: bytes = b"\x01") -> bytes:
    # [fmt, [[path, "file", size, blob]]] with each part's bytes given by hand.
    return b"\x92" + fmt + b"\x91\x94" + path + b"\xa4file" + size + b"\xc4\x20" + bytes(32)


def test_hand_built_canonical_form_decodes() -> None:
    m = Manifest.decode(hand_built(b"\x06"))
    assert m.entries == (Entry("a", "file", 6, "00" * 32),)


@pytest.mark.parametrize(
    "data",
    [
        hand_built(b"\xcc\x06"),  # uint8
        hand_built(b"\xcd\x00\x06"),  # uint16
        hand_built(b"\xce\x00\x00\x00\x06"),  # uint32
        hand_built(b"\xcf" + struct.pack(">Q", 6)),  # uint64
        hand_built(b"\xd0\x06"),  # int8
        hand_built(b"\xd2\x00\x00\x00\x06"),  # int32
        hand_built(b"\x06", fmt=b"\xce\x00\x00\x00\x01"),  # format number as uint32
        hand_built(b"\x06", path=b"\xd9\x01a"),  # str8 for a 1-byte path
        hand_built(b"\x06", path=b"\xc4\x01a"),  # path as bin, not str
        b"\x92\x01\xdc\x00\x01\x94\xa1a\xa4file\x06\xc4\x20" + bytes(32),  # array16 of 1
        b"\x92\x01\x91\x94\xa1a\xa4file\x06\xc5\x00\x20" + bytes(32),  # bin16 blob
        hand_built(b"\x06") + b"\xc0",  # trailing bytes
        hand_built(b"\x06")[:-1],  # truncated
    ],
)
def test_non_minimal_msgpack_refused(data: bytes) -> None:
    with pytest.raises(InvalidManifest):
        Manifest.decode(data)


@pytest.mark.parametrize(
    "body",
    [
        [1, [], None],
        [1, [["a", "file", 1, bytes(32), None]]],
        [1, [["a", "file", 1, bytes(32), "x"]]],
        [1, [["a", "file", 1, bytes(32), "x", "y"]]],
        [1, [["a", "file", 1]]],
        [1, [["a", "symlink", 1, bytes(32)]]],
        [2, []],
        [1, [["a", "file", 1, bytes(31)]]],
        [1, [["a", "file", -1, bytes(32)]]],
        [1, [["a", "file", True, bytes(32)]]],
        [1, [["a", "dir", 1, bytes(32)]]],
        [1, [["a", "file", 1, blob_id(b"x")]]],
        [1, [["l", "symlink", 1, bytes.fromhex(blob_id(b"x")), "y"]]],  # blob is not of target
        [1, [["l", "symlink", 2, bytes.fromhex(blob_id(b"x")), "x"]]],  # size is not of target
    ],
)
def test_malformed_elements_refused(body: object) -> None:
    with pytest.raises(InvalidManifest):
        Manifest.decode(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize(
    "body",
    [
        msgpack.ExtType(1, b"x"),
        [1, [["a", "file", msgpack.ExtType(0, b"\x01"), bytes(32)]]],
        [1, [["a", "file", 1, msgpack.ExtType(5, bytes(32))]]],
    ],
)
def test_ext_types_refused(body: object) -> None:
    data = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(InvalidManifest, match="ext type"):
        Manifest.decode(data)
    assert object_kind(data) == "blob"


@pytest.mark.parametrize("fmt", [b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + bytes(8)])
def test_timestamp_ext_refused(fmt: bytes) -> None:
    # Ext type -1 (timestamp) is decoded by msgpack itself, not by ext_hook: the field type
    # checks must refuse it.
    with pytest.raises(InvalidManifest):
        Manifest.decode(hand_built(fmt))
    with pytest.raises(InvalidManifest):
        Manifest.decode(hand_built(b"\x06", fmt=fmt))
    raw = msgpack.unpackb(golden_revision().encode())
    for i in (2, 7, 10):  # number, at_ns, step
        body = msgpack.packb(raw[:i], use_bin_type=True)[1:] + fmt
        body += msgpack.packb(raw[i + 1 :], use_bin_type=True)[1:]
        with pytest.raises(InvalidManifest):
            Revision.decode(b"\x9c" + body)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x91" * 100_000, b"\xdd\xff\xff\xff\xff"])
def test_garbage_refused(data: bytes) -> None:
    with pytest.raises(InvalidManifest):
        Manifest.decode(data)
    with pytest.raises(InvalidManifest):
        Revision.decode(data)


# --------------------------------------------------------------------------- path grammar


PATH_4096 = "/".join(["a" * 255] * 15 + ["a" * 254, "b"])


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a/b/c.py",
        "données/café.txt",
        "..a/b..",  # dots inside a name are fine
        ".hidden/.x",
        "a" * MAX_COMPONENT_BYTES,
        "é" * (MAX_COMPONENT_BYTES // 2),  # 254 bytes
        "/".join(["a" * 255] * 16),  # 16 * 255 + 15 = 4095 bytes
        PATH_4096,
    ],
)
def test_paths_accepted(path: str) -> None:
    assert check_path(path) == path
    assert Manifest.of([file(path, b"")]).entries[0].path == path


@pytest.mark.parametrize(
    "path",
    [
        "/a",  # absolute
        "",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        ".",
        "..",
        "a/..",
        "../a",
        "a/../b",
        "a\x00b",
        "a\\b",
        "a" * (MAX_COMPONENT_BYTES + 1),
        "é" * 128,  # 256 bytes in UTF-8 although 128 characters
        "x/" + "a" * 256,
        PATH_4096 + "b",  # 4097 bytes
        "/".join(["é" * 100] * 21),  # 4220 bytes, each component under 255
        "a\udc80",  # a lone surrogate is not UTF-8
    ],
)
def test_paths_refused(path: str) -> None:
    with pytest.raises(InvalidManifest):
        check_path(path)
    with pytest.raises(InvalidManifest):
        Manifest.of([Entry(path, "file", 0, blob_id(b""))])


def test_path_limits_are_the_documented_ones() -> None:
    assert (MAX_COMPONENT_BYTES, MAX_PATH_BYTES) == (255, 4096)
    assert len(PATH_4096.encode()) == MAX_PATH_BYTES


def test_non_string_path_refused() -> None:
    with pytest.raises(InvalidManifest):
        check_path(b"a")
    with pytest.raises(InvalidManifest):
        check_path(None)


@pytest.mark.parametrize(
    "paths",
    [
        ["a", "a"],
        ["README", "readme"],
        ["Straße", "STRASSE"],  # casefold, not lower()
        ["A/x", "a"],  # a directory and a file differing only in case
        ["A/x", "a/y"],  # two directories differing only in case
        ["a/B/x", "a/b/y"],
        ["a", "a/b"],  # a file that is also a directory
        ["a/b", "a/b/c/d"],
    ],
)
def test_clashing_paths_refused(paths: list[str]) -> None:
    entries = [file(p, b"") for p in paths]
    with pytest.raises(InvalidManifest):
        Manifest.of(entries)
    with pytest.raises(InvalidManifest):
        Manifest.of(reversed(entries))


def test_clash_refused_on_decode() -> None:
    # Sorted and canonical, but "A/x" and "a" differ only in case.
    body = [1, [file("A/x", b"").to_wire(), file("a", b"").to_wire()]]
    with pytest.raises(InvalidManifest, match="case"):
        Manifest.decode(msgpack.packb(body, use_bin_type=True))


def test_siblings_sharing_a_prefix_are_fine() -> None:
    m = Manifest.of([file("a", b""), file("a.txt", b""), file("ab/c", b""), file("a-b/c", b"")])
    assert len(m) == 4


# ------------------------------------------------------------------------ symlink targets


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("l", "x"),
        ("l", "./x"),
        ("l", "."),
        ("l", "a/b/c"),
        ("d/l", "../x"),
        ("d/l", ".."),
        ("a/b/l", "../../x"),
        ("a/b/l", "../x/./y"),
    ],
)
def test_symlink_targets_accepted(path: str, target: str) -> None:
    assert check_symlink_target(path, target) == target
    m = Manifest.of([Entry.symlink(path, target)])
    assert Manifest.decode(m.encode()).entries[0].target == target


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("l", "/etc/passwd"),
        ("d/l", "/d/x"),
        ("l", "../x"),  # .. from the top level
        ("l", ".."),
        ("d/l", "../../x"),
        ("a/b/l", "../../../x"),
        ("l", "a/../.."),
        ("l", "x/../y"),  # a non-leading .. could climb out through another link
        ("d/l", "../x/../y"),
        ("l", ""),
        ("l", "a\x00b"),
        ("l", "a\udc80"),
        ("l", "a/" * 2048 + "b"),  # 4097 bytes
    ],
)
def test_symlink_targets_refused(path: str, target: str) -> None:
    with pytest.raises(InvalidManifest):
        check_symlink_target(path, target)
    data = target.encode("utf-8", "surrogatepass")
    entry = Entry(path, "symlink", len(data), blob_id(data), target)
    with pytest.raises(InvalidManifest):
        Manifest.of([entry])


def test_symlink_target_not_a_string_refused() -> None:
    with pytest.raises(InvalidManifest):
        check_symlink_target("l", b"x")
    with pytest.raises(InvalidManifest):
        Manifest.of([Entry("l", "symlink", 0, blob_id(b""), None)])


def test_symlink_chain_trick_refused() -> None:
    # `l -> .` alone is harmless, but `x -> l/..` would then resolve to the tree's parent.
    assert len(Manifest.of([Entry.symlink("l", ".")])) == 1
    with pytest.raises(InvalidManifest, match=r"'\.\.' allowed only at the start"):
        Manifest.of([Entry.symlink("l", "."), Entry.symlink("x", "l/..")])


def test_only_symlinks_carry_a_target() -> None:
    with pytest.raises(InvalidManifest, match="only symlinks"):
        Manifest.of([Entry("a", "file", 1, blob_id(b"x"), "x")])


def test_symlink_entry_describes_its_target() -> None:
    e = Entry.symlink("d/l", "../x")
    assert (e.kind, e.size, e.blob, e.target) == ("symlink", 4, blob_id(b"../x"), "../x")
    assert Manifest.of([e]).blobs() == set()
    assert Manifest.of([e]).total_size == 0


# -------------------------------------------------------------------------- apply, diff


def base() -> Manifest:
    return Manifest.of(
        [file("a.py", b"a"), file("d/b.py", b"b"), file("d/e/c.py", b"c"), file("run", b"r")]
    )


def test_apply_add_replace_delete() -> None:
    m = base()
    new_b = file("d/b.py", b"B2")
    out = apply_changes(m, puts=[file("z/new.py", b"n"), new_b], deletes=["a.py"])
    assert [e.path for e in out.entries] == ["d/b.py", "d/e/c.py", "run", "z/new.py"]
    assert out.by_path()["d/b.py"] == new_b
    assert out.by_path()["d/b.py"].size == 2
    # The input is a value: untouched.
    assert m == base()
    assert out.bundle_id != m.bundle_id


def test_apply_nothing_is_identity() -> None:
    assert apply_changes(base()).encode() == base().encode()


def test_apply_delete_and_put_same_path_replaces() -> None:
    out = apply_changes(base(), puts=[file("a.py", b"new")], deletes=["a.py"])
    assert out.by_path()["a.py"].blob == blob_id(b"new")


def test_apply_delete_of_absent_path() -> None:
    with pytest.raises(PathNotFound) as info:
        apply_changes(base(), deletes=["nope.py"])
    assert info.value.path == "nope.py"
    # A directory is not an entry either.
    with pytest.raises(PathNotFound):
        apply_changes(base(), deletes=["d"])


def test_apply_delete_with_bad_path_refused() -> None:
    with pytest.raises(InvalidManifest):
        apply_changes(base(), deletes=["../a.py"])


def test_apply_put_turning_dir_into_file_refused() -> None:
    with pytest.raises(InvalidManifest):
        apply_changes(base(), puts=[file("d", b"x")])
    with pytest.raises(InvalidManifest):
        apply_changes(base(), puts=[file("a.py/x", b"x")])
    with pytest.raises(InvalidManifest):
        apply_changes(base(), puts=[file("D/x", b"x")])  # case clash with d/


def test_apply_dir_into_file_after_deleting_its_contents() -> None:
    out = apply_changes(base(), puts=[file("d", b"x")], deletes=["d/b.py", "d/e/c.py"])
    assert [e.path for e in out.entries] == ["a.py", "d", "run"]


@settings(max_examples=300)
@given(entries=entry_lists(), data=st.data())
def test_apply_checks_only_the_changes_yet_agrees_with_a_full_check(
    entries: list[Entry], data: st.DataObject
) -> None:
    """The incremental check of apply_changes refuses exactly what Manifest.of refuses, and
    builds the same manifest; chained, as `launch watch` applies patch after patch."""
    m = Manifest.of(entries)
    for _ in range(3):
        paths = [e.path for e in m.entries]
        deletes = data.draw(st.lists(st.sampled_from(paths), unique=True)) if paths else []
        near = st.sampled_from(paths).map(lambda p: p.rsplit("/", 1)[0]) if paths else RAW_PATH
        new_paths = data.draw(
            st.lists(st.one_of(RAW_PATH, near, near.map(str.upper), near.map(lambda p: p + "/x")))
        )
        puts = [file(p, p.encode()) for p in new_paths]
        current = m.by_path()
        for path in deletes:
            del current[path]
        current.update((e.path, e) for e in puts)
        try:
            expected: Manifest | None = Manifest.of(current.values())
        except InvalidManifest:
            expected = None
        if expected is None:
            with pytest.raises(InvalidManifest):
                apply_changes(m, puts, deletes)
            return
        got = apply_changes(m, puts, deletes)
        assert got == expected and got.encode() == expected.encode()
        last = {e.path: e for e in puts}  # a path put twice: the last one counts
        named = [p for p in deletes if p not in last]
        assert changes(m, last.values(), named) == diff(m, got)
        assert got.index == TreeIndex.of(got.entries)  # what the next apply starts from
        m = got


def test_apply_put_invalid_entry_refused() -> None:
    with pytest.raises(InvalidManifest):
        apply_changes(base(), puts=[Entry("x", "file", 1, "not-hex")])


def test_diff() -> None:
    a = base()
    b = apply_changes(
        a,
        puts=[
            file("new.py", b"n"),
            file("d/b.py", b"b2"),
            file("run", b"r", "exec"),  # exec bit only
            file("a.py", b"a"),  # put but unchanged
        ],
        deletes=["d/e/c.py"],
    )
    changes = diff(a, b)
    assert [(c.path, c.action) for c in changes] == [
        ("d/b.py", "replace"),
        ("d/e/c.py", "delete"),
        ("new.py", "add"),
        ("run", "replace"),
    ]
    by = {c.path: c for c in changes}
    assert by["run"].old is not None and by["run"].old.kind == "file"
    assert by["run"].new is not None and by["run"].new.kind == "exec"
    assert by["run"].old.blob == by["run"].new.blob
    assert by["d/e/c.py"].new is None
    assert by["new.py"].old is None
    assert diff(a, a) == []
    assert [(c.path, c.action) for c in diff(b, a)] == [
        ("d/b.py", "replace"),
        ("d/e/c.py", "add"),
        ("new.py", "delete"),
        ("run", "replace"),
    ]


def test_diff_symlink_retarget() -> None:
    a = Manifest.of([Entry.symlink("l", "x")])
    b = Manifest.of([Entry.symlink("l", "y")])
    assert [(c.path, c.action) for c in diff(a, b)] == [("l", "replace")]


@settings(max_examples=100, deadline=None)
@given(a=entry_lists(), extra=entry_lists(), data=st.data())
def test_diff_then_apply_round_trip(
    a: list[Entry], extra: list[Entry], data: st.DataObject
) -> None:
    # b keeps some of a's entries and adds others (a path kept from a wins a clash).
    kept = data.draw(st.lists(st.sampled_from(a), unique=True)) if a else []
    candidates = {e.path: e for e in [*extra, *kept]}
    b = [candidates[p] for p in compatible([e.path for e in kept] + [e.path for e in extra])]
    ma, mb = Manifest.of(a), Manifest.of(b)
    changes = diff(ma, mb)
    assert [c.path for c in changes] == sorted({c.path for c in changes})
    for c in changes:
        assert (c.old, c.new) == (ma.by_path().get(c.path), mb.by_path().get(c.path))
    unchanged = set(ma.by_path()) & set(mb.by_path()) - {c.path for c in changes}
    assert all(ma.by_path()[p] == mb.by_path()[p] for p in unchanged)
    puts = [c.new for c in changes if c.new is not None]
    deletes = [c.path for c in changes if c.new is None]
    assert apply_changes(ma, puts=puts, deletes=deletes).encode() == mb.encode()


# ------------------------------------------------------------------------------ revisions


def rev(number: int, parent: object, **kw: object) -> Revision:
    fields: dict[str, object] = {
        "job": "j-1",
        "number": number,
        "parent": parent,
        "bundle": GOLDEN_BUNDLE_ID,
        "reason": "submit" if number == 0 else "patch",
        "author": "alice",
        "at_ns": 1,
    }
    fields.update(kw)
    return Revision(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("number", "parent"), [(0, None), (1, 0), (7, 6)])
def test_revision_parent_rule_accepts(number: int, parent: int | None) -> None:
    r = rev(number, parent).check()
    assert Revision.decode(r.encode()) == r


@pytest.mark.parametrize(
    ("number", "parent"),
    [(0, 0), (0, -1), (1, None), (1, 1), (7, 5), (7, 7), (1, False), (2, True), (1, 0.0)],
)
def test_revision_parent_rule_refuses(number: int, parent: object) -> None:
    r = rev(number, parent)
    with pytest.raises(InvalidManifest, match="parent"):
        r.check()
    with pytest.raises(InvalidManifest):
        Revision.decode(r.encode())


@pytest.mark.parametrize("reason", ["Patch", "", "hotfix", None, 1])
def test_revision_bad_reason_refused(reason: object) -> None:
    r = rev(1, 0, reason=reason)
    with pytest.raises(InvalidManifest, match="reason"):
        r.check()
    with pytest.raises(InvalidManifest):
        Revision.decode(r.encode())


@pytest.mark.parametrize(
    "kw",
    [
        {"job": ""},
        {"bundle": "00"},
        {"bundle": GOLDEN_BUNDLE_ID.upper()},
        {"at_ns": 1.5},
        {"at_ns": True},
        {"step": "3"},
        {"paths": ("../x",)},
        {"author": None},
        {"paths": ("a", 1)},
        {"message": b"x"},
    ],
)
def test_revision_bad_fields_refused(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidManifest):
        rev(1, 0, **kw).check()


@pytest.mark.parametrize("number", [-1, 1.0, True, "1"])
def test_revision_bad_number_refused(number: object) -> None:
    with pytest.raises(InvalidManifest):
        rev(number, 0).check()  # type: ignore[arg-type]


def test_revision_reasons() -> None:
    for reason in ("submit", "patch", "resume", "drift", "rerun"):
        assert rev(1, 0, reason=reason).check().reason == reason


def test_revision_decode_refuses_non_canonical() -> None:
    good = golden_revision().encode()
    # number 1 as uint32 instead of a positive fixint.
    wide = good.replace(b"\xa6j-0001\x01\x00", b"\xa6j-0001\xce\x00\x00\x00\x01\x00", 1)
    assert wide != good
    with pytest.raises(InvalidManifest, match="canonical"):
        Revision.decode(wide)
    raw = msgpack.unpackb(good)
    with pytest.raises(InvalidManifest):
        Revision.decode(msgpack.packb([*raw, None], use_bin_type=True))
    with pytest.raises(InvalidManifest):
        Revision.decode(msgpack.packb(raw[:-1], use_bin_type=True))
    raw[11] = {"commit": None}
    with pytest.raises(InvalidManifest):
        Revision.decode(msgpack.packb(raw, use_bin_type=True))


@settings(max_examples=100, deadline=None)
@given(
    number=st.integers(0, 2**40),
    author=st.text(),
    message=st.text(),
    at_ns=st.integers(-(2**63), 2**64 - 1),
    step=st.none() | st.integers(0, 2**63),
    paths=st.lists(RAW_PATH, max_size=5),
    reason=st.sampled_from(["submit", "patch", "resume", "drift", "rerun"]),
    source=st.builds(
        Source, st.none() | st.text(), st.none() | st.text(), st.none() | st.booleans()
    ),
)
def test_revision_round_trip(
    number: int,
    author: str,
    message: str,
    at_ns: int,
    step: int | None,
    paths: list[str],
    reason: str,
    source: Source,
) -> None:
    r = Revision(
        "j-x",
        number,
        None if number == 0 else number - 1,
        GOLDEN_BUNDLE_ID,
        reason,
        author,
        at_ns,
        tuple(paths),
        message,
        step,
        source,
    ).check()
    data = r.encode()
    assert Revision.decode(data) == r
    assert r.id == hashlib.sha256(data).hexdigest()
    assert object_kind(data) == "revision"


# ---------------------------------------------------------------------------- object_kind


def test_object_kind() -> None:
    assert object_kind(golden_manifest().encode()) == "manifest"
    assert object_kind(Manifest.of([]).encode()) == "manifest"
    assert object_kind(golden_revision().encode()) == "revision"
    assert object_kind(b"hello\n") == "blob"
    assert object_kind(b"") == "blob"
    # Valid msgpack that is neither: a blob too.
    assert object_kind(msgpack.packb([1, [["a"]]])) == "blob"
    assert object_kind(msgpack.packb([1, []]) + b"\x00") == "blob"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_object_kind_of_arbitrary_bytes_never_raises(data: bytes) -> None:
    assert object_kind(data) in ("manifest", "revision", "blob")


@settings(max_examples=200)
@given(entries=entry_lists(), data=st.data())
def test_a_replaced_entry_is_spliced_into_the_encoding_exactly(
    entries: list[Entry], data: st.DataObject
) -> None:
    """Puts that only replace entries patch the base's encoding in place (objects._splice);
    chained, as one resubmit follows another, it is always the manifest's own encoding,
    whatever the new entries' sizes do to their packed length."""
    m = Manifest.of(entries)
    m.encode()
    sizes = st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**40])
    for _ in range(4):
        files = [e for e in m.entries if e.kind != "symlink"]
        if not files:
            return
        chosen = data.draw(st.lists(st.sampled_from(files), min_size=1, unique=True))
        puts = [
            Entry(e.path, data.draw(st.sampled_from(["file", "exec"])), data.draw(sizes), e.blob)
            for e in chosen
        ]
        got = apply_changes(m, puts, [])
        fresh = Manifest(got.entries)
        assert got.encode() == fresh.encode()
        assert got.bundle_id == fresh.bundle_id
        assert Manifest.decode(got.encode()) == got
        m = got

"""Spare trees (agent/spares.py) and the manifest delta (objects.delta, put_manifest with a
base): the fast paths of a resubmit must give exactly the tree a full build gives."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from agents import AgentProc, children, wait_for
from conftest import submit
from hypothesis import given, settings
from hypothesis import strategies as st
from test_store import tree as store_tree

from agent.protocol.errors import ChecksumMismatch, InvalidManifest, ObjectMissing
from agent.protocol.objects import Entry, Manifest, blob_id, delta, diff, from_delta
from agent.spares import MIN_ENTRIES, Spares
from agent.store import Store

Spec = bytes | tuple[str, bytes | str]
UID = os.getuid()


def tree(store: Store, files: dict[str, Spec]) -> Manifest:
    """test_store's tree, its manifest stored too (spares are made from stored bundles)."""
    manifest = store_tree(store, files)
    store.put_manifest(manifest)
    return manifest


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a job could tell apart in a tree: names, kinds, modes, bytes, targets."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st_ = full.lstat()
            rel = str(full.relative_to(root))
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), full.read_bytes())
    return out


BASE: dict[str, Spec] = {
    "train.py": b"print('v1')\n",
    "pkg/__init__.py": b"",
    "pkg/model.py": b"W = 1\n",
    "pkg/old/gone.py": b"bye\n",
    "run.sh": ("exec", b"#!/bin/sh\n"),
    "link": ("symlink", "pkg/model.py"),
    "data": b"was a file\n",
}
SAME: dict[str, Spec] = {f"lib/m{i}.py": b"%d" % i for i in range(20)}  # most of a tree
BASE.update(SAME)
CHANGED: dict[str, Spec] = {
    **SAME,
    "train.py": b"print('v2')\n",  # replaced
    "pkg/__init__.py": b"",
    "pkg/model.py": ("exec", b"W = 1\n"),  # the exec bit only
    "pkg/new.py": b"new\n",  # added (pkg/old/ goes: its only file is deleted)
    "run.sh": ("symlink", "train.py"),  # an executable becomes a symlink
    "link": b"now a file\n",
    "data/x.txt": b"a file became a directory\n",
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def fresh(store: Store, manifest: Manifest, where: Path) -> dict[str, Any]:
    store.materialize(manifest, where)
    return snapshot(where)


def test_a_changed_spare_is_the_tree_a_full_build_writes(store: Store, tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spares", store, keep=2)
    old, new = tree(store, BASE), tree(store, CHANGED)
    spares.make(UID, old.bundle_id)
    assert (tmp_path / "spares" / f"{UID}-{old.bundle_id}").is_dir()
    (tmp_path / "job").mkdir()
    assert spares.fill(tmp_path / "job" / "code", new, UID, near=old.bundle_id) is True
    assert snapshot(tmp_path / "job" / "code") == fresh(store, new, tmp_path / "ref")
    assert not (tmp_path / "job" / "code.change").exists()  # scratch removed
    # Taken by one job: it left spares/.
    assert not (tmp_path / "spares" / f"{UID}-{old.bundle_id}").exists()
    assert spares.fill(tmp_path / "job2", new, UID, near=old.bundle_id) is False
    assert not (tmp_path / "job2").exists()


def test_the_reverse_change_and_the_same_bundle(store: Store, tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spares", store, keep=2)
    old, new = tree(store, CHANGED), tree(store, BASE)
    spares.make(UID, old.bundle_id)
    assert spares.fill(tmp_path / "a", new, UID, near=old.bundle_id)
    assert snapshot(tmp_path / "a") == fresh(store, new, tmp_path / "ref")
    spares.make(UID, new.bundle_id)
    assert spares.fill(tmp_path / "b", new, UID)  # its own spare: a rename, nothing to change
    assert snapshot(tmp_path / "b") == snapshot(tmp_path / "ref")


def test_a_spare_too_different_is_left_for_another_job(store: Store, tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spares", store, keep=2)
    old = tree(store, {f"f{i}.py": b"%d" % i for i in range(10)})
    new = tree(store, {f"f{i}.py": b"new %d" % i for i in range(10)})
    spares.make(UID, old.bundle_id)
    assert spares.fill(tmp_path / "job", new, UID, near=old.bundle_id) is False
    assert (tmp_path / "spares" / f"{UID}-{old.bundle_id}").is_dir()


def test_spares_are_kept_newest_first_and_bounded(store: Store, tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spares", store, keep=2)
    bundles = []
    for i in range(3):
        manifest = tree(store, {"a.py": b"%d" % i, "b.py": b"same"})
        bundles.append(manifest.bundle_id)
        spares.make(UID, manifest.bundle_id)
        time.sleep(0.01)  # distinct ages
    kept = sorted(p.name for p in (tmp_path / "spares").iterdir())
    assert kept == sorted(f"{UID}-{b}" for b in bundles[1:])  # the oldest went
    wanted = tree(store, {"a.py": b"x", "b.py": b"same"})
    # Another user's job never takes them.
    assert spares.fill(tmp_path / "other", wanted, UID + 1, near=bundles[2]) is False
    # With no exact or named spare, the newest is changed into the tree asked for.
    assert spares.fill(tmp_path / "job", wanted, UID)
    assert sorted(p.name for p in (tmp_path / "spares").iterdir()) == [f"{UID}-{bundles[1]}"]
    assert snapshot(tmp_path / "job") == fresh(store, wanted, tmp_path / "ref")


def test_keep_zero_and_leftovers(store: Store, tmp_path: Path) -> None:
    off = Spares(tmp_path / "off", store, keep=0)
    manifest = tree(store, {"a.py": b"a"})
    off.make(UID, manifest.bundle_id)
    assert list((tmp_path / "off").iterdir()) == []
    assert off.fill(tmp_path / "job", manifest, UID) is False
    # An interrupted build leaves a temporary tree: removed at start-up, never taken.
    spares = Spares(tmp_path / "spares", store, keep=2)
    store.materialize(manifest, tmp_path / "spares" / ".tmp-interrupted")
    assert spares.fill(tmp_path / "job", manifest, UID) is False
    spares.clean()
    assert list((tmp_path / "spares").iterdir()) == []


# ------------------------------------------------------------------------------ delta


def test_delta_round_trip_and_refusals(store: Store) -> None:
    old, new = tree(store, BASE), tree(store, CHANGED)
    puts, deletes, _ = delta(old.encode(), new)
    assert sorted(deletes) == ["data", "pkg/old/gone.py"]
    assert {row[0] for row in puts} == {c.path for c in diff(old, new) if c.new is not None}
    rebuilt, encoded, put = from_delta(old, puts, deletes, new.bundle_id)
    assert rebuilt == new and encoded == new.encode()
    assert put == [new.get(row[0]) for row in puts]
    with pytest.raises(InvalidManifest, match="do not make"):
        from_delta(old, puts[1:], deletes, new.bundle_id)  # a row left out
    with pytest.raises(InvalidManifest, match="absent from its base"):
        from_delta(old, puts, [*deletes, "nope.py"], new.bundle_id)
    with pytest.raises(InvalidManifest):
        from_delta(old, [["../escape", "file", 1, bytes(32)]], [], new.bundle_id)


@settings(max_examples=200)
@given(
    a=st.dictionaries(st.sampled_from("abcdefgh"), st.binary(max_size=2), max_size=8),
    b=st.dictionaries(st.sampled_from("abcdefgh"), st.binary(max_size=2), max_size=8),
)
def test_diff_is_every_path_whose_entry_differs(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    def manifest(files: dict[str, bytes]) -> Manifest:
        return Manifest.of(Entry(f"d/{p}", "file", len(d), blob_id(d)) for p, d in files.items())

    x, y = manifest(a), manifest(b)
    expected = sorted(f"d/{p}" for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    assert [c.path for c in diff(x, y)] == expected
    assert [c.path for c in diff(x, Manifest(x.entries))] == []


def test_agent_takes_a_manifest_as_a_delta(agent: AgentProc) -> None:
    files = {"a.py": b"a", "b.py": b"b"}
    base = Manifest.of(Entry(p, "file", len(d), blob_id(d)) for p, d in files.items())
    new = Manifest.of([*base.entries[:1], Entry("c.py", "file", 1, blob_id(b"c"))])
    puts, deletes, added = delta(base.encode(), new)
    assert added == [blob_id(b"c")]  # a.py is in both: only c.py's content is new
    change = {"base": base.bundle_id, "bundle": new.bundle_id, "puts": puts, "deletes": deletes}
    # A node that lacks the base says so (the launcher then sends the whole manifest).
    with pytest.raises(ObjectMissing):
        agent.call("put_manifest", change)
    agent.call("put_manifest", {"manifest": base.encode()})
    # A delta that does not give the bundle it names is refused, and nothing is stored.
    wrong = {**change, "puts": []}
    with pytest.raises(InvalidManifest):
        agent.call("put_manifest", wrong)
    assert agent.call("missing", {"blobs": [new.bundle_id]})["missing"] == [new.bundle_id]
    result = agent.call("put_manifest", change)
    assert result == {"bundle": new.bundle_id, "missing": sorted([blob_id(b"a"), blob_id(b"c")])}
    assert agent.call("cat", {"id": new.bundle_id})["data"] == new.encode()

    # The new content may travel with the delta: stored (verified), so nothing is missing.
    newer = Manifest.of([*new.entries, Entry("d.py", "file", 1, blob_id(b"d"))])
    puts, deletes, added = delta(new.encode(), newer)
    with_blobs = {
        "base": new.bundle_id,
        "bundle": newer.bundle_id,
        "puts": puts,
        "deletes": deletes,
        "blobs": [[blob_id(b"d"), b"d"]],
    }
    forged = {**with_blobs, "blobs": [[blob_id(b"d"), b"not d"]]}
    with pytest.raises(ChecksumMismatch):
        agent.call("put_manifest", forged)
    assert agent.call("missing", {"blobs": [blob_id(b"d")]})["missing"] == [blob_id(b"d")]
    result = agent.call("put_manifest", with_blobs)
    assert result == {"bundle": newer.bundle_id, "missing": sorted([blob_id(b"a"), blob_id(b"c")])}
    assert agent.call("cat", {"id": blob_id(b"d")})["data"] == b"d"


# ------------------------------------------------------------------------ on an agent


def test_a_resubmit_is_built_from_the_spare_of_the_last_tree(agent: AgentProc) -> None:
    files = {f"pkg/m{i}.py": b"x = %d\n" % i for i in range(MIN_ENTRIES)}
    first = submit(agent, "j-spare-1", files, ["/bin/true"])
    bundle1 = agent.call("status", {"job": first["job"]})["bundle"]
    spare = agent.state / "spares" / f"{UID}-{bundle1}"
    wait_for(spare.is_dir)  # built in the background after the start
    spare_inode = spare.stat().st_ino
    changed = {**files, "pkg/m3.py": b"x = 'changed'\n"}
    submit(agent, "j-spare-2", changed, ["/bin/true"], near=bundle1)
    code = agent.state / "jobs" / "j-spare-2" / "code"
    # The spare became the job's code directory (one rename), with the one file changed.
    assert code.stat().st_ino == spare_inode
    assert not spare.exists()
    got = {str(p.relative_to(code)): p.read_bytes() for p in code.rglob("*") if p.is_file()}
    assert got == changed
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in code.rglob("*.py"))
    # And a spare of the new tree follows, for the job after it.
    bundle2 = agent.call("status", {"job": "j-spare-2"})["bundle"]
    wait_for((agent.state / "spares" / f"{UID}-{bundle2}").is_dir)


def _spare_builder(agent: AgentProc) -> psutil.Process:
    """The agent's spare-building helper process, once it runs."""

    def found() -> psutil.Process | None:
        return next(iter(children(agent.pid, "agent.spares")), None)

    return wait_for(found, timeout=20, interval=0.005)  # type: ignore[no-any-return]


@pytest.mark.parametrize("how", ["stop", "kill9"])
def test_a_spare_build_ends_with_its_agent(agents: Any, how: str) -> None:
    """The builder runs at idle priority. An agent that stops (SIGTERM) stops it by pid; one
    killed outright takes it along (PR_SET_PDEATHSIG). No helper outlives the agent, and the
    half-built tree is removed when an agent starts on that state again."""
    agent = agents(f"node-{how}")
    files = {f"d{i // 100}/f{i}.py": b"%d\n" % i for i in range(2000)}
    # Every core busy, so that the builder, at idle priority, runs slowly enough to be held
    # still below in the middle of its build. The burners run at nice 19: beside them an idle
    # task still gets about a sixth of a core (CFS weight 3 against 15), where beside burners
    # at nice 0 (weight 1024) it starves outright on a machine without autogroups (CI's).
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        result = submit(agent, "j-spare-stop", files, ["/bin/true"])
        builder = _spare_builder(agent)
        # Held still once it writes its tree (its set-up, the death signal, is done).
        spares = agent.state / "spares"
        wait_for(lambda: any(p.name.startswith(".tmp-") for p in spares.iterdir()), interval=0.001)
        builder.suspend()
        assert os.sched_getscheduler(builder.pid) == os.SCHED_IDLE
        bundle = agent.call("status", {"job": result["job"]})["bundle"]
        spare = agent.state / "spares" / f"{UID}-{bundle}"
        assert not spare.exists()
        if how == "stop":
            agent.stop()
        else:
            agent.kill9()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    # SIGKILL ends a stopped process too.
    wait_for(lambda: not builder.is_running() or builder.status() == "zombie", timeout=10)
    assert not spare.exists()  # stopped, not finished
    leftovers = [p for p in (agent.state / "spares").iterdir() if p.name.startswith(".tmp-")]
    agent.start()
    assert all(not p.exists() for p in leftovers)


def test_no_spare_for_a_small_tree(agent: AgentProc) -> None:
    """A tree of a few files is written in full as fast as a spare is changed: no spare is
    built for it."""
    submit(agent, "j-small", {"main.py": b"print(1)\n"}, ["/bin/true"])
    bundle = agent.call("status", {"job": "j-small"})["bundle"]
    time.sleep(1.0)  # well past the moment a spare's build would have begun
    assert not (agent.state / "spares" / f"{UID}-{bundle}").exists()
    assert children(agent.pid, "agent.spares") == []

"""Revisions end to end: every change a job lives through (patch, resume, repair) is a numbered
revision that every node agrees on, and any revision can be checked out again byte for byte.

These are the acceptance items of the revisions issue, checked as a user would: the real `launch`
CLI as subprocesses under a private LAUNCH_HOME, real local agents, real jobs (2 nodes each).
Where a launcher is to die between the two phases of a patch, the test plays that launcher
itself, speaking the agent protocol on each node's socket. Jobs run this venv's interpreter
with --no-login-shell, and never import from their code directory (no __pycache__ there: the
agent would rightly record it as drift).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from launcher_env import (
    PYTHON,
    LaunchHome,
    Result,
    revisions,
    status,
    wait_state,
    wait_until,
    write_tree,
)

from agent.protocol.errors import StaleRevision
from agent.protocol.objects import Entry, Manifest, Revision, apply_changes, blob_id
from launcher.client import AgentClient, open_unix_client

NODES = ["local0", "local1"]
ROW_KEYS = {
    "revision",
    "parent",
    "bundle",
    "reason",
    "author",
    "at",
    "at_ns",
    "step",
    "paths",
    "message",
    "nodes",
}

SLEEPER = "import time\ntime.sleep(300)\n"
# Prints its restart count and revision, then sleeps.
START = """\
import os, time
env = os.environ
print(f"rank {env['LAUNCH_NODE_RANK']} count {env['LAUNCH_RESTART_COUNT']} "
      f"rev {env['LAUNCH_REVISION']}", flush=True)
time.sleep(300)
"""
# The same, but fails on its first run (restart count 0).
FAILS_FIRST = START.replace(
    "time.sleep(300)",
    "if env['LAUNCH_RESTART_COUNT'] == '0':\n    raise SystemExit(1)\ntime.sleep(300)",
)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def jobs(lh: LaunchHome) -> Iterator[list[str]]:
    """Jobs a test submitted in the module's home: cancelled when the test ends."""
    started: list[str] = []
    yield started
    for job in started:
        lh.run("cancel", job, "--grace", "1")


# ------------------------------------------------------------------------------ helpers


def submit(lh: LaunchHome, src: Path, *command: str) -> str:
    r = lh.run(
        "submit", "--nodes", "2", "--no-login-shell", "--dir", str(src), "--json", "--", *command
    )
    return str(r.json()["job"])


def job_dir(lh: LaunchHome, rank: int, job: str) -> Path:
    return lh.path / "state" / "local" / f"node{rank}" / "jobs" / job


def code_dir(lh: LaunchHome, rank: int, job: str) -> Path:
    return job_dir(lh, rank, job) / "code"


def node_socket(lh: LaunchHome, rank: int) -> Path:
    return lh.path / "run" / "local" / f"node{rank}.sock"


def log_lines(lh: LaunchHome, job: str, rank: int) -> list[str]:
    """The job's log as written on node `rank` (read from disk: cheap to poll)."""
    try:
        return (job_dir(lh, rank, job) / "log").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def wait_log(lh: LaunchHome, job: str, line: str, timeout: float = 30) -> None:
    """Wait until each rank's log has `line` ({rank} filled in)."""

    def seen() -> bool:
        return all(line.format(rank=r) in log_lines(lh, job, r) for r in (0, 1))

    assert wait_until(seen, timeout, 0.05), f"{line!r} not in both logs:\n" + "\n".join(
        f"node{r}: {log_lines(lh, job, r)}" for r in (0, 1)
    )


def tree(root: Path) -> dict[str, tuple[str, bytes]]:
    """path -> (kind, bytes) of every file and symlink below root (kind: file, exec,
    symlink; a symlink's bytes are its target). Directories themselves are not compared."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full).encode())
            else:
                kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
                out[rel] = (kind, full.read_bytes())
    return out


def assert_agree(lh: LaunchHome, job: str, head: int) -> dict[str, Any]:
    """Both nodes at `head`, nothing staged, not diverged; the same history on both; the same
    live code on both."""
    st = status(lh, job)
    assert st["diverged"] is False, st
    assert [(n["revision"], n["staged"]) for n in st["nodes"]] == [(head, None)] * 2, st
    rows = revisions(lh, job)
    assert [r["revision"] for r in rows] == list(range(head + 1)), rows
    for row in rows:
        assert row["nodes"] == NODES, row
        assert row["parent"] == (None if row["revision"] == 0 else row["revision"] - 1), row
    assert tree(code_dir(lh, 0, job)) == tree(code_dir(lh, 1, job))
    return st


@contextlib.asynccontextmanager
async def open_agents(lh: LaunchHome) -> Any:
    """A protocol client on each local agent's socket, as the launcher would hold them."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(open_unix_client(name, node_socket(lh, rank)))
            for rank, name in enumerate(NODES)
        ]
        yield clients


async def next_bundle(client: AgentClient, job: str, files: dict[str, bytes]) -> Manifest:
    """The job's head tree on this node with `files` put in."""
    st = await client.call("status", {"job": job})
    head = Manifest.decode((await client.call("cat", {"id": st["bundle"]}))["data"])
    return apply_changes(head, [Entry(p, "file", len(d), blob_id(d)) for p, d in files.items()])


async def upload(client: AgentClient, manifest: Manifest, files: dict[str, bytes]) -> None:
    await client.call("put_manifest", {"manifest": manifest.encode()})
    await client.call("put_blobs", {"blobs": [[blob_id(d), d] for d in files.values()]})


def node_histories(lh: LaunchHome, job: str) -> list[list[tuple[Any, ...]]]:
    """Each node's own revision records of the job, without the node-local time and step."""

    async def read() -> list[list[tuple[Any, ...]]]:
        async with open_agents(lh) as clients:
            out = []
            for client in clients:
                result = await client.call("revisions", {"job": job})
                revs = [Revision.decode(r) for r in result["revisions"]]
                out.append(
                    [
                        (r.number, r.parent, r.bundle, r.paths, r.reason, r.author, r.message)
                        for r in revs
                    ]
                )
            return out

    return asyncio.run(read())


def prepare_params(job: str, base: int, bundle: str) -> dict[str, Any]:
    return {
        "job": job,
        "base": base,
        "bundle": bundle,
        "author": "test@cut",
        "message": "cut short",
        "reason": "patch",
    }


# ------------------------------------------------------------------ 1: a live patch


POLLER = """\
import os, time
rank = os.environ['LAUNCH_NODE_RANK']
rev_file = os.environ['LAUNCH_REVISION_FILE']
seen = {}
def show(key, value):
    if seen.get(key, object()) != value:
        seen[key] = value
        print(f'rank {rank} {key} {value}', flush=True)
while True:
    with open('data.txt') as f:
        show('content', f.read().strip())
    show('gone', os.path.exists('gone.txt'))
    try:
        with open(rev_file) as f:
            show('revfile', f.read())
    except FileNotFoundError:
        pass
    time.sleep(0.05)
"""


def test_patch_reaches_a_running_job_on_both_nodes_and_is_recorded(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"poll.py": POLLER, "data.txt": "v0\n", "gone.txt": "bye\n"})
    job = submit(lh, src, PYTHON, "poll.py")
    jobs.append(job)
    wait_log(lh, job, "rank {rank} content v0")
    wait_log(lh, job, "rank {rank} gone True")

    (src / "data.txt").write_text("v1\n")
    (src / "gone.txt").unlink()
    before = time.time_ns()
    # No --job: the last job submitted from this directory.
    r = lh.run("patch", "data.txt", "gone.txt", "-m", "fix the data", cwd=src)
    after = time.time_ns()
    assert r.code == 0, r.describe()
    assert r.out == f"{job}@r1: data.txt, gone.txt\n", r.describe()

    # The job, still running, reads the new content on both ranks; the deleted file is gone.
    wait_log(lh, job, "rank {rank} content v1")
    wait_log(lh, job, "rank {rank} gone False")

    def published(rank: int) -> list[dict[str, Any]]:
        return [
            json.loads(line.split(" revfile ", 1)[1])
            for line in log_lines(lh, job, rank)
            if " revfile " in line
        ]

    # The agent swaps the files in first and then replaces the revision file, so the job
    # may see the new code one poll before it sees revision 1 (never the other way round).
    assert wait_until(lambda: all(published(r)[-1]["revision"] == 1 for r in (0, 1)), 10, 0.05), [
        published(r) for r in (0, 1)
    ]
    for rank in (0, 1):
        assert [p["revision"] for p in published(rank)] == [0, 1], published(rank)
        last = published(rank)[-1]
        assert last["paths"] == ["data.txt", "gone.txt"], last
        assert last["job"] == job and last["reason"] == "patch"
        assert not (code_dir(lh, rank, job) / "gone.txt").exists()
        assert (code_dir(lh, rank, job) / "data.txt").read_text() == "v1\n"

    rows = revisions(lh, job)
    assert [r["revision"] for r in rows] == [0, 1]
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["nodes"] == NODES
    r0, r1 = rows
    assert (r0["reason"], r0["parent"], r0["paths"]) == ("submit", None, [])
    assert r1["parent"] == 0 and r1["reason"] == "patch"
    assert r1["paths"] == ["data.txt", "gone.txt"]
    assert r1["message"] == "fix the data"
    assert "@" in r1["author"]
    assert r1["bundle"] != r0["bundle"]
    assert before <= r1["at_ns"] <= after, (before, r1["at_ns"], after)
    assert r1["at"].startswith(time.strftime("%Y-", time.gmtime(r1["at_ns"] / 1e9)))

    logs = lh.run("logs", job)
    assert logs.code == 0, logs.describe()
    marker = re.compile(r"^\[(\d)\] ── r1 patch data\.txt, gone\.txt by \S+ ──$")
    ranks = sorted(int(m[1]) for line in logs.lines() if (m := marker.match(line)))
    assert ranks == [0, 1], logs.describe()

    out = tmp_path / "r1"
    co = lh.run("checkout", f"{job}@r1", str(out))
    assert co.code == 0, co.describe()
    assert sorted(tree(out)) == ["data.txt", "poll.py"]
    assert (out / "data.txt").read_text() == "v1\n"


# ------------------------------------------------- 2: checkout reproduces every revision


def test_checkout_reproduces_every_revision_byte_for_byte(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(
        tmp_path / "src",
        {"a.py": "print('a')\nX = 1\n", "lib/b.txt": "b\n", "run.sh": "#!/bin/sh\necho hi\n"},
    )
    (src / "data.bin").write_bytes(bytes(range(256)) * 4)
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("a.py")
    job = submit(lh, src, PYTHON, "-c", SLEEPER)
    jobs.append(job)
    snapshots = [tree(src)]
    assert snapshots[0]["run.sh"][0] == "exec" and snapshots[0]["link"][0] == "symlink"

    def patch(*args: str) -> Result:
        r = lh.run("patch", "--job", job, *args, cwd=src)
        assert r.code == 0, r.describe()
        snapshots.append(tree(src))
        return r

    (src / "a.py").write_text("print('a')\nX = 2\n")
    patch("a.py", "-m", "change")  # r1
    (src / "lib" / "new.txt").write_text("new\n")
    patch("lib/new.txt", "-m", "add")  # r2
    (src / "lib" / "b.txt").unlink()
    patch("lib/b.txt", "-m", "delete")  # r3
    (src / "a.py").chmod(0o755)
    (src / "run.sh").chmod(0o644)
    patch("--all", "-m", "exec bits")  # r4
    (src / "lib" / "new.txt").unlink()  # lib/ is left empty
    (src / "link").unlink()
    (src / "link").symlink_to("run.sh")
    (src / "data.bin").write_bytes(b"\x00\xff" * 300)
    patch("--all", "-m", "several")  # r5

    rows = revisions(lh, job)
    assert [(r["revision"], r["paths"]) for r in rows] == [
        (0, []),
        (1, ["a.py"]),
        (2, ["lib/new.txt"]),
        (3, ["lib/b.txt"]),
        (4, ["a.py", "run.sh"]),
        (5, ["data.bin", "lib/new.txt", "link"]),
    ]
    assert [r["message"] for r in rows[1:]] == ["change", "add", "delete", "exec bits", "several"]

    for number, expected in enumerate(snapshots):
        out = tmp_path / f"co{number}"
        co = lh.run("checkout", f"{job}@r{number}", str(out))
        assert co.code == 0, co.describe()
        assert co.out.startswith(f"{job}@r{number}: {len(expected)} files in "), co.describe()
        assert tree(out) == expected, f"r{number}"
    assert not (tmp_path / "co5" / "lib").exists()
    # The head with no @rN, into a directory that exists but is empty.
    (tmp_path / "head").mkdir()
    assert lh.run("checkout", job, str(tmp_path / "head")).code == 0
    assert tree(tmp_path / "head") == snapshots[5]
    # The live code on both nodes is the head too, and the emptied lib/ is gone there.
    for rank in (0, 1):
        assert tree(code_dir(lh, rank, job)) == snapshots[5]
        assert not (code_dir(lh, rank, job) / "lib").exists()

    before = tree(tmp_path / "co1")
    refused = lh.run("checkout", f"{job}@r0", str(tmp_path / "co1"))
    line = refused.assert_clean_failure(2)
    assert "not an empty directory" in line, line
    assert tree(tmp_path / "co1") == before

    d = lh.run("diff", f"{job}@r0", f"{job}@r1")
    assert d.code == 0, d.describe()
    assert d.lines() == [
        f"--- {job}@r0/a.py",
        f"+++ {job}@r1/a.py",
        "@@ -1,2 +1,2 @@",
        " print('a')",
        "-X = 1",
        "+X = 2",
    ], d.describe()
    modes = lh.run("diff", f"{job}@r3", f"{job}@r4")
    assert modes.code == 0, modes.describe()
    assert "mode: file -> exec" in modes.lines() and "mode: exec -> file" in modes.lines()


# ----------------------------------------------------------- 3: eight concurrent patches


def test_concurrent_patches_lose_nothing_and_all_nodes_agree(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    clients = 8
    src = write_tree(tmp_path / "src", {f"f{i}.txt": f"base {i}\n" for i in range(clients)})
    job = submit(lh, src, PYTHON, "-c", SLEEPER)
    jobs.append(job)
    for i in range(clients):
        (src / f"f{i}.txt").write_text(f"new {i}\n")

    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "launcher.cli", "patch", f"f{i}.txt", "--job", job, "--json"],
            cwd=src,
            env=lh.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(clients)
    ]
    results: list[tuple[int, str, str]] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    accepted: dict[int, int] = {}  # revision -> client
    for i, (code, out, err) in enumerate(results):
        assert code in (0, 3), f"client {i} -> {code}\n{out}\n{err}"
        if code == 0:
            accepted[json.loads(out)["revision"]] = i
        else:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and "Traceback" not in err, err
            assert "stale revision" in lines[0] and "launch revisions" in lines[0], err
    assert accepted, results

    head = len(accepted)
    assert sorted(accepted) == list(range(1, head + 1))  # contiguous from 1
    assert_agree(lh, job, head)
    rows = revisions(lh, job)
    assert len(rows) - 1 == sum(1 for code, _, _ in results if code == 0)  # none lost
    for row in rows[1:]:
        assert row["reason"] == "patch"
        assert row["paths"] == [f"f{accepted[row['revision']]}.txt"], row
    expected = {
        f"f{i}.txt": ("file", f"{'new' if i in accepted.values() else 'base'} {i}\n".encode())
        for i in range(clients)
    }
    for rank in (0, 1):
        assert tree(code_dir(lh, rank, job)) == expected


# ------------------------------------------------------- 4: a node down: nothing changes


def test_patch_with_a_node_down_changes_nothing_anywhere(tmp_path: Path) -> None:
    home = LaunchHome()
    try:
        src = write_tree(tmp_path / "src", {"a.txt": "a0\n"})
        job = submit(home, src, PYTHON, "-c", SLEEPER)
        wait_state(home, job, {"running"})
        pid_file = home.path / "state" / "local" / "node1.pid"
        info = json.loads(pid_file.read_text())
        agent1 = psutil.Process(info["pid"])
        assert abs(agent1.create_time() - info["create_time"]) < 0.01
        agent1.send_signal(signal.SIGTERM)
        agent1.wait(10)
        code_before = [tree(code_dir(home, rank, job)) for rank in (0, 1)]

        (src / "a.txt").write_text("a1\n")
        r = home.run("patch", "a.txt", "--job", job, cwd=src)
        line = r.assert_clean_failure(4)
        assert "local1" in line and "unreachable" in line, line

        # patch did not bring the stopped agent back (only submit starts local agents).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, pytest.raises(OSError):
            probe.connect(str(node_socket(home, 1)))
        assert json.loads(pid_file.read_text()) == info

        st = status(home, job)
        live, down = st["nodes"]
        assert (live["node"], live["state"], live["revision"], live["staged"]) == (
            "local0",
            "running",
            0,
            None,
        )
        assert (down["node"], down["state"]) == ("local1", "unreachable")
        assert not (job_dir(home, 0, job) / "staged.json").exists()
        assert not (job_dir(home, 1, job) / "staged.json").exists()
        assert [tree(code_dir(home, rank, job)) for rank in (0, 1)] == code_before
        rows = revisions(home, job)
        assert [(r["revision"], r["nodes"]) for r in rows] == [(0, ["local0"])]
    finally:
        home.close()


# ------------------------------------------------- 5: the launcher killed between phases


@pytest.mark.parametrize(
    ("prepare_on", "commit_on"),
    [([0, 1], [0]), ([0, 1], []), ([0], [0])],
    ids=["committed-on-node0-only", "prepared-nowhere-committed", "node1-never-saw-it"],
)
def test_repair_rolls_a_cut_patch_forward(
    lh: LaunchHome,
    jobs: list[str],
    tmp_path: Path,
    prepare_on: list[int],
    commit_on: list[int],
) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": "a0\n", "b.txt": "b0\n"})
    job = submit(lh, src, PYTHON, "-c", SLEEPER)
    jobs.append(job)
    files = {"a.txt": f"a1 {tmp_path.name}\n".encode()}

    async def cut() -> str:
        """A launcher that dies after prepare (on some nodes) and commit (on some)."""
        async with open_agents(lh) as clients:
            new = await next_bundle(clients[0], job, files)
            for rank in prepare_on:
                await upload(clients[rank], new, files)
                result = await clients[rank].call(
                    "patch_prepare", prepare_params(job, 0, new.bundle_id)
                )
                assert result == {"revision": 1, "paths": ["a.txt"]}
            for rank in commit_on:
                await clients[rank].call("patch_commit", {"job": job, "revision": 1})
            return new.bundle_id

    bundle = asyncio.run(cut())
    st = status(lh, job)
    assert st["diverged"] is True, st
    for rank, node in enumerate(st["nodes"]):
        assert node["revision"] == (1 if rank in commit_on else 0), st
        staged = 1 if rank in prepare_on and rank not in commit_on else None
        assert node["staged"] == staged, st

    r = lh.run("repair", job)
    assert r.code == 0, r.describe()
    assert r.lines()[-1] == f"{job} at r1 on every node", r.describe()
    behind = [NODES[rank] for rank in (0, 1) if rank not in commit_on]
    assert r.lines()[:-1] == [f"{name}: r0 -> r1" for name in behind], r.describe()

    st = assert_agree(lh, job, 1)
    assert [n["state"] for n in st["nodes"]] == ["running", "running"]
    assert [n["bundle"] for n in st["nodes"]] == [bundle, bundle]
    rows = revisions(lh, job)
    assert rows[1]["bundle"] == bundle and rows[1]["paths"] == ["a.txt"]
    for rank in (0, 1):
        assert (code_dir(lh, rank, job) / "a.txt").read_bytes() == files["a.txt"]

    # Each node's own history says the same: tree, parent, reason, author, message.
    mine, theirs = node_histories(lh, job)
    assert mine == theirs

    again = lh.run("repair", job)
    assert again.code == 0 and again.lines()[0] == "all nodes agree", again.describe()


def failed_job(lh: LaunchHome, jobs: list[str], tmp_path: Path) -> str:
    """A job of FAILS_FIRST on 2 nodes, submitted and run until it failed."""
    src = write_tree(tmp_path / "src", {"start.py": FAILS_FIRST})
    job = submit(lh, src, PYTHON, "start.py")
    jobs.append(job)
    wait_state(lh, job, {"failed"})
    return job


def test_repair_of_a_cut_resume_resumes_the_remaining_node(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    job = failed_job(lh, jobs, tmp_path)

    async def cut() -> None:
        """A `launch resume` that died once node 0 had prepared and committed."""
        async with open_agents(lh) as clients:
            st = await clients[0].call("status", {"job": job})
            params = {**prepare_params(job, 0, st["bundle"]), "reason": "resume"}
            await clients[0].call("patch_prepare", params)
            await clients[0].call("patch_commit", {"job": job, "revision": 1})

    asyncio.run(cut())
    st = status(lh, job)
    assert st["diverged"] is True
    assert [(n["state"], n["revision"]) for n in st["nodes"]] == [("running", 1), ("failed", 0)]

    r = lh.run("repair", job)
    assert r.code == 0, r.describe()
    assert r.lines() == ["local1: r0 -> r1", f"{job} at r1 on every node"], r.describe()
    # Node 1 is resumed too, not merely given the revision.
    wait_log(lh, job, "rank {rank} count 1 rev 1")
    st = assert_agree(lh, job, 1)
    assert [(n["state"], n["restart_count"]) for n in st["nodes"]] == [("running", 1)] * 2
    mine, theirs = node_histories(lh, job)
    assert mine == theirs
    assert mine[1][4:] == ("resume", "test@cut", "cut short")


# --------------------------------------------------------- 6: --restart and --signal


def test_patch_restart_restarts_both_ranks_from_the_new_revision(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"start.py": START, "data.txt": "v0\n"})
    job = submit(lh, src, PYTHON, "start.py")
    jobs.append(job)
    wait_log(lh, job, "rank {rank} count 0 rev 0")
    pids = [n["pid"] for n in status(lh, job)["nodes"]]

    (src / "data.txt").write_text("v1\n")
    r = lh.run("patch", "data.txt", "--job", job, "--restart", cwd=src)
    assert r.code == 0, r.describe()
    wait_log(lh, job, "rank {rank} count 1 rev 1")
    st = status(lh, job)
    for node, old_pid in zip(st["nodes"], pids, strict=True):
        assert (node["state"], node["revision"], node["restart_count"]) == ("running", 1, 1)
        assert node["pid"] != old_pid
    for rank in (0, 1):
        lines = log_lines(lh, job, rank)
        assert lines.count(f"rank {rank} count 0 rev 0") == 1
        assert lines.count(f"rank {rank} count 1 rev 1") == 1
        marker = next(i for i, line in enumerate(lines) if line.startswith("── r1 patch"))
        assert lines.index(f"rank {rank} count 1 rev 1") > marker


USR1 = """\
import os, signal, time
rank = os.environ['LAUNCH_NODE_RANK']
def on_usr1(signum, frame):
    with open('data.txt') as f:
        print(f'rank {rank} got usr1 {f.read().strip()}', flush=True)
signal.signal(signal.SIGUSR1, on_usr1)
print(f'rank {rank} ready', flush=True)
while True:
    time.sleep(0.05)
"""


def test_patch_signal_is_delivered_after_the_commit(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"usr1.py": USR1, "data.txt": "v0\n"})
    job = submit(lh, src, PYTHON, "usr1.py")
    jobs.append(job)
    wait_log(lh, job, "rank {rank} ready")

    (src / "data.txt").write_text("v1\n")
    r = lh.run("patch", "data.txt", "--job", job, "--signal", "SIGUSR1", cwd=src)
    assert r.code == 0, r.describe()
    # The handler reads the file: it ran after the new content was live.
    wait_log(lh, job, "rank {rank} got usr1 v1")
    st = status(lh, job)
    assert [(n["state"], n["revision"], n["restart_count"]) for n in st["nodes"]] == [
        ("running", 1, 0)
    ] * 2
    for rank in (0, 1):
        assert not any("got usr1 v0" in line for line in log_lines(lh, job, rank))


# --------------------------------------------------------------------------- 7: resume


def test_resume_starts_an_ended_job_again_as_a_new_revision(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    job = failed_job(lh, jobs, tmp_path)

    r = lh.run("resume", job, "-m", "after the crash")
    assert r.code == 0, r.describe()
    assert r.out == f"{job}@r1: resumed\n", r.describe()
    wait_log(lh, job, "rank {rank} count 1 rev 1")
    st = status(lh, job)
    assert [(n["state"], n["revision"], n["restart_count"]) for n in st["nodes"]] == [
        ("running", 1, 1)
    ] * 2
    rows = revisions(lh, job)
    assert [(x["revision"], x["parent"], x["reason"]) for x in rows] == [
        (0, None, "submit"),
        (1, 0, "resume"),
    ]
    assert rows[1]["bundle"] == rows[0]["bundle"] and rows[1]["paths"] == []
    assert rows[1]["message"] == "after the crash" and rows[1]["nodes"] == NODES

    running = lh.run("resume", job)
    line = running.assert_clean_failure(2)
    assert "patch --restart" in line, line
    assert [r["revision"] for r in revisions(lh, job)] == [0, 1]

    cancelled = lh.run("cancel", job, "--grace", "1")
    assert cancelled.code == 0, cancelled.describe()
    wait_state(lh, job, {"cancelled"})
    r = lh.run("resume", job)
    assert r.code == 0, r.describe()
    wait_log(lh, job, "rank {rank} count 2 rev 2")
    st = assert_agree(lh, job, 2)
    assert [(n["state"], n["restart_count"]) for n in st["nodes"]] == [("running", 2)] * 2
    assert revisions(lh, job)[2]["reason"] == "resume"


# ------------------------------------------------------------ 8: a stale base on the agent


def test_agent_refuses_a_patch_based_on_a_stale_revision(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": "a0\n"})
    job = submit(lh, src, PYTHON, "-c", SLEEPER)
    jobs.append(job)
    (src / "a.txt").write_text("a1\n")
    assert lh.run("patch", "a.txt", "--job", job, cwd=src).code == 0

    files = {"a.txt": b"from a stale launcher\n"}

    async def stale() -> None:
        async with open_agents(lh) as clients:
            new = await next_bundle(clients[0], job, files)
            for client in clients:
                await upload(client, new, files)
                with pytest.raises(StaleRevision) as refused:
                    await client.call("patch_prepare", prepare_params(job, 0, new.bundle_id))
                assert (refused.value.expected, refused.value.actual) == (0, 1)
                assert "launch revisions" in str(refused.value)

    asyncio.run(stale())
    assert_agree(lh, job, 1)
    for rank in (0, 1):
        assert (code_dir(lh, rank, job) / "a.txt").read_text() == "a1\n"

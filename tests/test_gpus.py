"""End to end: GPUs as a shared resource of a cluster. Real agents, each declaring 4 GPUs
(`launch-agent serve --gpus 4`, as an admin would on a machine nvidia-smi cannot see), named
in a launch.toml cluster by their sockets (`unix:/path`), and the real `launch` CLI as a
subprocess in a private LAUNCH_HOME.

What a user sees is what is asserted: each job's CUDA_VISIBLE_DEVICES and LAUNCH_GPUS (its log),
the exit code 6 and the one line naming the busy nodes and the jobs that hold them, "waiting
for capacity" with --wait, `launch status --json`, `launch nodes --json`; and, from the agents
themselves, that no job ever runs on only some of its nodes and no GPU is held twice.

Jobs run with --no-login-shell (a login shell here may wait on pyenv's rehash lock) and wait
for a stop file of their own, so each test ends a job exactly when it means to.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import AgentFactory, AgentProc, wait_for
from launcher_env import PYTHON, LaunchHome, Result, wait_until, write_tree

from agent.protocol.errors import Busy, JobStateError
from agent.protocol.objects import Entry, Manifest, blob_id
from launcher.ops import new_job_id

JOB_RE = re.compile(r"^j-[0-9a-z]+-[0-9a-z]{4}$")
ACTIVE = ("prepared", "running")

JOB_PY = """\
import json, os, time
print("GPUS " + json.dumps([os.environ.get("CUDA_VISIBLE_DEVICES"),
                            os.environ.get("LAUNCH_GPUS")]), flush=True)
stop = os.environ.get("STOP", "")
deadline = time.time() + 120
while time.time() < deadline and not (stop and os.path.exists(stop)):
    time.sleep(0.05)
print("done", flush=True)
"""


# ----------------------------------------------------------------------------- set-up


class Cluster:
    """N agents with 4 declared GPUs each, a source tree whose launch.toml names them as the
    default cluster `sim`, and the CLI in a private home."""

    def __init__(
        self, agents: AgentFactory, lh: LaunchHome, root: Path, n: int, ttl: float | None
    ) -> None:
        extra = ["--gpus", "4"] + ([] if ttl is None else ["--reservation-ttl", str(ttl)])
        self.agents = [agents(f"node{i}", args=extra) for i in range(n)]
        self.names = [f"unix:{a.sock}" for a in self.agents]
        self.lh = lh
        self.root = root
        self.src = write_tree(
            root / "src",
            {
                "job.py": JOB_PY,
                "launch.toml": "[clusters.sim]\n"
                f"hosts = {json.dumps(self.names)}\n"
                "default = true\n",
            },
        )
        self.stops: list[Path] = []
        self.spawned: list[subprocess.Popen[str]] = []

    # -- the CLI

    def run(self, *args: str, lh: LaunchHome | None = None) -> Result:
        return (lh or self.lh).run(*args, cwd=self.src)

    def submit_args(self, stop: Path, *extra: str) -> list[str]:
        return [
            "submit",
            "--no-login-shell",
            "--detach",
            "--dir",
            str(self.src),
            "--env",
            f"STOP={stop}",
            *extra,
            "--",
            PYTHON,
            "job.py",
        ]

    def stop_file(self) -> Path:
        path = self.root / f"stop-{len(self.stops)}"
        self.stops.append(path)
        return path

    def submit(self, *extra: str, lh: LaunchHome | None = None) -> tuple[Result, Path]:
        """`launch submit --detach ...`; the result and the file that ends the job."""
        stop = self.stop_file()
        return self.run(*self.submit_args(stop, *extra), lh=lh), stop

    def started(self, *extra: str) -> tuple[str, Path]:
        """Submit a job that must start; its id and stop file."""
        r, stop = self.submit(*extra)
        assert r.code == 0, r.describe()
        job = r.out.strip().splitlines()[-1]
        assert JOB_RE.match(job), r.describe()
        return job, stop

    def spawn(
        self, *extra: str, lh: LaunchHome | None = None
    ) -> tuple[subprocess.Popen[str], Path, Path]:
        """Start `launch submit --detach ...` in the background: process, stop file, stderr."""
        stop = self.stop_file()
        err = self.root / f"{stop.name}.stderr"
        with open(err, "w") as err_file:
            proc = subprocess.Popen(
                [PYTHON, "-m", "launcher.cli", *self.submit_args(stop, *extra)],
                cwd=self.src,
                env=(lh or self.lh).env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
            )
        self.spawned.append(proc)
        return proc, stop, err

    def gpus_of(self, job: str, nnodes: int) -> dict[int, tuple[str | None, str | None]]:
        """Per rank, (CUDA_VISIBLE_DEVICES, LAUNCH_GPUS) as the job printed them."""
        seen: dict[int, tuple[str | None, str | None]] = {}

        def printed() -> bool:
            r = self.run("logs", job)
            for line in r.lines():
                m = re.match(r"^\[(\d+)\] GPUS (.*)$", line)
                if m:
                    cvd, launch_gpus = json.loads(m[2])
                    seen[int(m[1])] = (cvd, launch_gpus)
            return len(seen) == nnodes

        assert wait_until(printed, 30), (job, seen)
        return seen

    def status(self, job: str, lh: LaunchHome | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = self.run("status", job, "--json", lh=lh).json()
        return answer

    def close(self) -> None:
        for stop in self.stops:
            stop.touch()
        for proc in self.spawned:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def lh(fresh: LaunchHome) -> LaunchHome:
    return fresh


@pytest.fixture
def make_cluster(agents: AgentFactory, lh: LaunchHome, tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(n: int, ttl: float | None = None) -> Cluster:
        cluster = Cluster(agents, lh, tmp_path, n, ttl)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


# ------------------------------------------------------------------------- agent views


def holders(agent: AgentProc) -> dict[int, str | None]:
    """GPU index -> the job holding it (None: free), from node_info."""
    info = agent.call("node_info")
    return {g["index"]: (g["held_by"] or {}).get("job") for g in info["gpus"]}


def held_by(agent: AgentProc, job: str) -> list[int]:
    return sorted(i for i, j in holders(agent).items() if j == job)


def check_consistent(agents: list[AgentProc]) -> None:
    """No job active on only some of the nodes (every job here targets all of them); no GPU
    held by two jobs; every GPU hold belongs to an active job."""
    where: dict[str, set[int]] = {}
    for index, agent in enumerate(agents):
        jobs = agent.call("jobs", {"all_users": True})["jobs"]
        taken: list[int] = []
        for job in jobs:
            if job["state"] in ACTIVE:
                where.setdefault(job["job"], set()).add(index)
                taken.extend(job["gpus"])
        assert len(taken) == len(set(taken)), (agent.sock, jobs)
        active = {j["job"] for j in jobs if j["state"] in ACTIVE}
        for gpu, holder in holders(agent).items():
            assert holder is None or holder in active, (agent.sock, gpu, holder, jobs)
    for job, nodes in where.items():
        assert len(nodes) == len(agents), f"{job} is active on nodes {sorted(nodes)} only"


def node_gpus_csv(indices: list[int]) -> str:
    return ",".join(map(str, indices))


# ------------------------------------------------------------------- 1. sharing a node


def test_two_jobs_share_nodes_with_disjoint_gpus_and_a_third_waits_for_one(
    make_cluster: Any,
) -> None:
    c = make_cluster(2)
    a, stop_a = c.started("--gpus-per-node", "2")
    b, _ = c.started("--gpus-per-node", "2")
    gpus_a, gpus_b = c.gpus_of(a, 2), c.gpus_of(b, 2)
    for rank in (0, 1):
        cvd_a, launch_a = gpus_a[rank]
        cvd_b, launch_b = gpus_b[rank]
        assert cvd_a == launch_a and cvd_b == launch_b
        set_a, set_b = set(cvd_a.split(",")), set(cvd_b.split(","))
        assert len(set_a) == len(set_b) == 2
        assert not set_a & set_b, (rank, cvd_a, cvd_b)  # disjoint on every node
        assert set_a | set_b == {"0", "1", "2", "3"}
        assert held_by(c.agents[rank], a) == sorted(map(int, set_a))
    check_consistent(c.agents)

    # A third asking for 2 more: no GPU is free; it fails at once, naming who holds them.
    r, _ = c.submit("--gpus-per-node", "2")
    line = r.assert_clean_failure(6)
    assert c.names[0] in line and a in line and b in line, line
    assert "0 of 4 free" in line, line
    check_consistent(c.agents)  # it left nothing behind

    # With --wait it waits, then starts as soon as job a ends, on a's GPUs.
    proc, _, err = c.spawn("--gpus-per-node", "2", "--wait")
    assert wait_until(lambda: "waiting for capacity" in err.read_text(), 30), err.read_text()
    assert a in err.read_text() and b in err.read_text()
    time.sleep(1.0)
    assert proc.poll() is None, err.read_text()  # still waiting: nothing is free
    stop_a.touch()
    ended = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    took = time.monotonic() - ended
    assert proc.returncode == 0, err.read_text()
    assert took < 6.0, f"submit returned {took:.1f} s after the job it waited for ended"
    third = out.strip().splitlines()[-1]
    assert JOB_RE.match(third)
    assert c.status(a)["state"] == "succeeded"
    gpus_third = c.gpus_of(third, 2)
    for rank in (0, 1):
        assert gpus_third[rank] == gpus_a[rank]  # exactly the GPUs a gave back
    check_consistent(c.agents)


# ------------------------------------------------------------- 2. all GPUs, or none


def test_default_takes_every_gpu_and_zero_takes_none_beside_it(make_cluster: Any) -> None:
    c = make_cluster(2)
    whole, _ = c.started()
    for rank, (cvd, launch_gpus) in c.gpus_of(whole, 2).items():
        assert cvd == launch_gpus == "0,1,2,3", rank
    for agent in c.agents:
        assert holders(agent) == dict.fromkeys(range(4), whole)

    # Nothing is left: neither another whole-node job nor a one-GPU job can start.
    for extra in ((), ("--gpus-per-node", "1")):
        r, _ = c.submit(*extra)
        line = r.assert_clean_failure(6)
        assert whole in line, line

    # A job asking for no GPUs runs beside it, and sees none.
    none, _ = c.started("--gpus-per-node", "0")
    for rank, (cvd, launch_gpus) in c.gpus_of(none, 2).items():
        assert cvd == "" and launch_gpus == "", (rank, cvd, launch_gpus)
    states = [n["state"] for n in c.status(none)["nodes"]]
    assert states == ["running", "running"]
    assert [n["state"] for n in c.status(whole)["nodes"]] == ["running", "running"]
    for agent in c.agents:
        assert holders(agent) == dict.fromkeys(range(4), whole)  # still all the first job's
    check_consistent(c.agents)


# ------------------------------------------------------------------- 3. choosing nodes


def test_nodes_n_picks_free_nodes_and_names_every_busy_one(make_cluster: Any) -> None:
    c = make_cluster(3)
    # Node 1 is fully held by another job.
    holder, _ = c.started("--hosts", c.names[1])
    assert c.status(holder)["nodes"][0]["node"] == c.names[1]
    assert holders(c.agents[1]) == dict.fromkeys(range(4), holder)

    picked, _ = c.started("--nodes", "2")
    st = c.status(picked)
    assert [n["node"] for n in st["nodes"]] == [c.names[0], c.names[2]]
    assert [n["state"] for n in st["nodes"]] == ["running", "running"]
    for rank, (cvd, _) in c.gpus_of(picked, 2).items():
        assert cvd == "0,1,2,3", rank
    assert holders(c.agents[1]) == dict.fromkeys(range(4), holder)  # untouched

    # Every node is busy now: --nodes 2 fails at once, naming each node and its holder.
    r, _ = c.submit("--nodes", "2")
    line = r.assert_clean_failure(6)
    for name, job in ((c.names[0], picked), (c.names[1], holder), (c.names[2], picked)):
        expected = f"{name}: 0 of 4 GPUs free, 4 needed ({job} of root holds GPU 0,1,2,3)"
        assert expected in line, line
    for agent in c.agents:  # the refused submit prepared nothing anywhere
        assert {j["job"] for j in agent.call("jobs")["jobs"]} <= {holder, picked}


# ------------------------------------------------------------- 4. two launchers racing


def test_two_launchers_racing_for_the_same_nodes_never_start_partially(
    make_cluster: Any,
) -> None:
    c = make_cluster(4)
    other = LaunchHome()  # a second user machine: its own home, same cluster
    try:
        homes = [c.lh, other]
        racers = [c.spawn(lh=home) for home in homes]
        results = []
        for (proc, stop, err), home in zip(racers, homes, strict=True):
            out, _ = proc.communicate(timeout=60)
            results.append((proc.returncode, out, err.read_text(), stop, home))
        assert sorted(code for code, *_ in results) == [0, 6], results
        (_, out, _, win_stop, win_home), (_, _, lose_err, _, _) = sorted(
            results, key=lambda x: x[0]
        )
        winner = out.strip().splitlines()[-1]
        lines = [x for x in lose_err.splitlines() if x.strip()]
        assert len(lines) == 1 and "Traceback" not in lose_err, lose_err
        assert lines[0].startswith("launch: ") and winner in lines[0], lose_err
        check_consistent(c.agents)
        for agent in c.agents:
            assert holders(agent) == dict.fromkeys(range(4), winner)
            running = [j["job"] for j in agent.call("jobs")["jobs"] if j["state"] == "running"]
            assert running == [winner]
        win_stop.touch()  # its records are in the home that submitted it
        assert wait_until(lambda: c.status(winner, win_home)["state"] == "succeeded", 30)

        # Again, both with --wait (two terminals of one user): one starts, the other waits
        # and starts after the first ends; never a partial start in between.
        racers = [c.spawn("--wait"), c.spawn("--wait")]
        first = wait_until(lambda: next((r for r in racers if r[0].poll() is not None), None), 60)
        assert first is not None, [e.read_text() for _, _, e in racers]
        second = next(r for r in racers if r is not first)
        assert first[0].returncode == 0, first[2].read_text()
        first_job = first[0].communicate()[0].strip().splitlines()[-1]
        assert wait_until(lambda: "waiting for capacity" in second[2].read_text(), 30)
        assert first_job in second[2].read_text()
        for _ in range(5):
            check_consistent(c.agents)
            assert second[0].poll() is None
            time.sleep(0.2)
        first[1].touch()
        out, _ = second[0].communicate(timeout=30)
        assert second[0].returncode == 0, second[2].read_text()
        second_job = out.strip().splitlines()[-1]
        assert second_job != first_job
        assert c.status(first_job)["state"] == "succeeded"
        st = c.status(second_job)
        assert [n["state"] for n in st["nodes"]] == ["running"] * 4
        check_consistent(c.agents)
        for agent in c.agents:
            assert holders(agent) == dict.fromkeys(range(4), second_job)
    finally:
        other.close()


# -------------------------------------------------- 5. a launcher dies between phases


def _upload_and_prepare(agent: AgentProc, job: str, rank: int, gpus: int) -> None:
    """What a launcher does before `start`, driven directly over the protocol."""
    data = b"print('never started')\n"
    manifest = Manifest.of([Entry("main.py", "file", len(data), blob_id(data))])
    agent.call("put_manifest", {"manifest": manifest.encode()})
    agent.call("put_blobs", {"blobs": [[blob_id(data), data]]})
    agent.call(
        "prepare",
        {
            "job": job,
            "bundle": manifest.bundle_id,
            "argv": [PYTHON, "main.py"],
            "rank": rank,
            "nnodes": 2,
            "login": False,
            "gpus": gpus,
        },
    )


def test_reservations_of_a_job_never_started_expire_and_the_gpus_come_back(
    make_cluster: Any,
) -> None:
    ttl = 4.0  # long enough for one `launch submit` to be refused within it
    c = make_cluster(2, ttl=ttl)
    abandoned = new_job_id()
    for rank, agent in enumerate(c.agents):
        _upload_and_prepare(agent, abandoned, rank, 4)
    prepared_at = time.monotonic()
    # The launcher "died" here: no start. Its GPUs are held meanwhile.
    for agent in c.agents:
        assert holders(agent) == dict.fromkeys(range(4), abandoned)
        assert agent.call("status", {"job": abandoned})["state"] == "prepared"
    r, _ = c.submit()
    assert time.monotonic() - prepared_at < ttl, "the refusal below must come within the TTL"
    line = r.assert_clean_failure(6)
    assert abandoned in line, line

    # After the TTL the GPUs are free again, and a job needing all of them starts.
    for agent in c.agents:
        wait_for(lambda a=agent: set(holders(a).values()) == {None}, timeout=ttl + 10)
    job, _ = c.started()
    for rank, (cvd, _) in c.gpus_of(job, 2).items():
        assert cvd == "0,1,2,3", rank
    for agent in c.agents:
        assert holders(agent) == dict.fromkeys(range(4), job)
        assert agent.call("status", {"job": abandoned})["state"] == "aborted"
        # A launcher that comes back late cannot start it any more.
        with pytest.raises(JobStateError):
            agent.call("start", {"job": abandoned})
    check_consistent(c.agents)


def test_a_reservation_before_prepare_is_visible_and_expires(make_cluster: Any) -> None:
    """The launcher's first step on node 0 is a bare `reserve` (no job recorded yet): if it
    dies right after, node_info still shows who holds the GPUs until they expire."""
    ttl = 2.0
    c = make_cluster(1, ttl=ttl)
    job = new_job_id()
    assert c.agents[0].call("reserve", {"job": job, "gpus": 3})["gpus"] == [0, 1, 2]
    assert holders(c.agents[0]) == {0: job, 1: job, 2: job, 3: None}
    r, _ = c.submit("--gpus-per-node", "2")
    line = r.assert_clean_failure(6)
    assert job in line and "1 of 4 free" in line, line
    # A prepare refused as Busy may be retried with the same job id once GPUs are free.
    retried = new_job_id()
    with pytest.raises(Busy):
        _upload_and_prepare(c.agents[0], retried, 0, 2)
    wait_for(lambda: set(holders(c.agents[0]).values()) == {None}, timeout=ttl + 10)
    _upload_and_prepare(c.agents[0], retried, 0, 2)
    assert held_by(c.agents[0], retried) == [0, 1]
    c.agents[0].call("abort", {"job": retried})
    assert set(holders(c.agents[0]).values()) == {None}
    started, _ = c.started("--gpus-per-node", "2")
    assert c.gpus_of(started, 1)[0][0] == "0,1"


# ----------------------------------------------------- 6. the agent killed and restarted


def test_holds_of_running_jobs_survive_an_agent_kill_and_are_released_at_the_end(
    make_cluster: Any,
) -> None:
    c = make_cluster(2)
    job, stop = c.started()
    before = [holders(a) for a in c.agents]
    assert before == [dict.fromkeys(range(4), job)] * 2

    c.agents[0].kill9()
    # While node 0's agent is down a submit fails cleanly, naming it unreachable.
    r, _ = c.submit()
    line = r.assert_clean_failure(4)
    assert c.names[0] in line and "unreachable" in line, line
    c.agents[0].start()  # same state directory, socket and --gpus

    assert [holders(a) for a in c.agents] == before
    st = c.status(job)
    assert [n["state"] for n in st["nodes"]] == ["running", "running"]
    r, _ = c.submit()
    line = r.assert_clean_failure(6)
    assert job in line, line

    stop.touch()  # the job ends: the re-adopting agent gives its GPUs back
    assert wait_until(lambda: c.status(job)["state"] == "succeeded", 30)
    for agent in c.agents:
        wait_for(lambda a=agent: set(holders(a).values()) == {None}, timeout=10)
    after, _ = c.started("--gpus-per-node", "4")
    assert {cvd for cvd, _ in c.gpus_of(after, 2).values()} == {"0,1,2,3"}


# --------------------------------------------------------------- 7. launch nodes --json


def test_launch_nodes_json_shows_each_gpu_and_who_holds_it(make_cluster: Any) -> None:
    c = make_cluster(2)
    job, stop = c.started("--hosts", c.names[0], "--gpus-per-node", "2")
    rows = c.run("nodes", "--json").json()
    assert [row["node"] for row in rows] == c.names
    assert all(row["reachable"] for row in rows)
    gpus0, gpus1 = rows[0]["gpus"], rows[1]["gpus"]
    assert [g["index"] for g in gpus0] == [0, 1, 2, 3] == [g["index"] for g in gpus1]
    mine = {"job": job, "owner": 0, "owner_name": "root"}
    assert [g["held_by"] for g in gpus0] == [mine, mine, None, None]
    assert [g["held_by"] for g in gpus1] == [None] * 4
    assert all(g["name"] == "declared" and g["uuid"] for g in gpus0 + gpus1)

    stop.touch()
    assert wait_until(lambda: c.status(job)["state"] == "succeeded", 30)
    rows = c.run("nodes", "--json").json()
    assert all(g["held_by"] is None for row in rows for g in row["gpus"])

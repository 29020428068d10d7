"""End to end over real SSH: the `launch` CLI (a subprocess) drives 4 simulated nodes, each a
real `launch-agent` reached through a real OpenSSH sshd on 127.0.0.11..14, through the
connection holder. Host keys are checked (failing closed); the fallback through
`launch-agent dial` is exercised against an sshd with `AllowTcpForwarding no`.

Needs root (sshd); skipped with the reason otherwise. Jobs start with --no-login-shell and run
this venv's interpreter.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import sshd
from agents import AgentFactory, AgentProc
from launcher_env import (
    PYTHON,
    LaunchHome,
    Result,
    agent_command,
    process_gone,
    wait_state,
    write_tree,
)

pytestmark = pytest.mark.skipif(sshd.available() is not None, reason=str(sshd.available()))

HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]


def cluster_toml(hosts: list[str], sock_dir: Path, ssh_config: Path, name: str = "sim") -> str:
    quoted = ", ".join(f'"{h}"' for h in hosts)
    return (
        f"[clusters.{name}]\n"
        f"hosts = [{quoted}]\n"
        f'socket = "{sock_dir}/n{{index}}.sock"\n'
        f'ssh_config = "{ssh_config}"\n'
        f'agent_command = "{agent_command()}"\n'
        "default = true\n"
    )


@dataclass
class Cluster:
    server: sshd.SshServer
    factory: AgentFactory
    agents: list[AgentProc]
    src: Path
    home: LaunchHome

    def submit(self, *args: str, src: Path | None = None, timeout: float = 120) -> Result:
        return self.home.run(
            "submit", "--no-login-shell", *args, cwd=src or self.src, timeout=timeout
        )

    def job_ids(self) -> list[set[str]]:
        return [{j["job"] for j in a.call("jobs")["jobs"]} for a in self.agents]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """sshd for 4 nodes, 4 user-mode agents (n0..n3.sock) and a source tree whose launch.toml
    names them. Everything is stopped by pid afterwards: holder, agents and jobs, sshd."""
    root = tmp_path_factory.mktemp("ssh")
    server = sshd.SshServer(4)
    factory = AgentFactory(root / "agents")
    home = LaunchHome()
    try:
        server.start()
        agents = [factory(f"n{i}") for i in range(4)]
        src = root / "src"
        src.mkdir()
        (src / "launch.toml").write_text(cluster_toml(HOSTS, factory.sock_dir, server.ssh_config))
        yield Cluster(server, factory, agents, src, home)
    finally:
        try:
            home.close()  # the holder, by its published pid
        finally:
            factory.close()
            server.stop()


def job_of(r: Result) -> str:
    found = re.search(r"job (j-\S+)", r.err)
    assert found, r.describe()
    return found.group(1)


# ----------------------------------------------------------------------- submit over SSH


ENV_PRINTER = """\
import os
e = os.environ
print(f"rank {e['NODE_RANK']} master {e['MASTER_ADDR']}:{e['MASTER_PORT']} "
      f"nnodes {e['NNODES']} launch {e['LAUNCH_NODE_RANK']}/{e['LAUNCH_NUM_NODES']}")
"""


def test_submit_on_four_nodes_over_ssh_and_connections_persist(cluster: Cluster) -> None:
    write_tree(cluster.src, {"env_printer.py": ENV_PRINTER})
    r = cluster.submit("--", PYTHON, "env_printer.py")
    assert r.code == 0, r.describe() + cluster.home.holder_log()
    lines = sorted(r.lines())
    assert len(lines) == 4, r.describe()
    ports = set()
    for rank, line in enumerate(lines):
        m = re.fullmatch(
            rf"\[{rank}\] rank {rank} master 127\.0\.0\.11:(\d+) nnodes 4 launch {rank}/4", line
        )
        assert m, r.describe()
        ports.add(m[1])
    assert len(ports) == 1  # one rendezvous port for all
    job = job_of(r)
    holder = cluster.home.holder_pid()
    # One holder for all four nodes, and it is the one whose pid was published.
    assert holder is not None and cluster.home.holder_processes() == [holder]

    # The next commands make no SSH login: the holder kept the connections.
    logins = cluster.server.accepted()
    assert logins >= 4
    st = cluster.home.run("status", job, "--json").json()
    assert [n["state"] for n in st["nodes"]] == ["succeeded"] * 4
    assert [n["node"] for n in st["nodes"]] == HOSTS
    assert st["diverged"] is False
    nodes = cluster.home.run("nodes", "--json", cwd=cluster.src).json()
    assert [n["node"] for n in nodes] == HOSTS
    for node in nodes:
        assert node["reachable"] is True
        assert node["hostname"] and node["cpus"] >= 1 and node["memory_total"] > 0
    assert cluster.server.accepted() == logins
    assert cluster.home.holder_pid() == holder


TREE_DIGEST = """\
import hashlib, pathlib
digest = hashlib.sha256()
for path in sorted(pathlib.Path("pkg").rglob("*.py")):
    digest.update(path.name.encode() + b"\\0" + path.read_bytes())
print("tree", digest.hexdigest(), flush=True)
"""


def test_a_large_cold_tree_arrives_whole_each_blob_sent_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A 12 MB tree, several freeze batches: sent while the freeze still reads it, and
    compressed over SSH. Each node is sent every blob exactly once, every rank reads exactly
    the bytes frozen, and the next submit sends none."""
    token = tmp_path.name  # content no agent holds yet
    files = {"digest.py": f"# {token}\n{TREE_DIGEST}"}
    for n in range(300):
        rng = random.Random(f"{token}-{n}")
        files[f"pkg/m{n // 50}/f{n:03d}.py"] = "".join(
            f"value_{n}_{i} = {rng.random()!r}  # {rng.getrandbits(64):x}\n" for i in range(700)
        )
    files["launch.toml"] = (cluster.src / "launch.toml").read_text() + f"# {token}\n"
    src = write_tree(tmp_path / "big", files)
    assert sum(len(t) for t in files.values()) > 10 * 2**20
    expected = hashlib.sha256()
    for path in sorted((src / "pkg").rglob("*.py")):
        expected.update(path.name.encode() + b"\0" + path.read_bytes())

    args = ("--json", "--", PYTHON, "digest.py")
    first = cluster.submit(*args, src=src, timeout=300)
    assert first.code == 0, first.describe() + cluster.home.holder_log()
    assert first.json()["sent_blobs"] == [len(files)] * 4
    wait_state(cluster.home, first.json()["job"], {"succeeded"}, timeout=120)
    logs = cluster.home.run("logs", first.json()["job"], cwd=cluster.src)
    assert sorted(logs.lines()) == [f"[{r}] tree {expected.hexdigest()}" for r in range(4)]

    again = cluster.submit(*args, src=src, timeout=300)
    assert again.code == 0, again.describe()
    assert again.json()["sent_blobs"] == [0] * 4
    wait_state(cluster.home, again.json()["job"], {"succeeded"}, timeout=120)


ALL_REDUCE = """\
import os
from datetime import timedelta

import torch
import torch.distributed as dist

rank = int(os.environ["NODE_RANK"])
world = int(os.environ["NNODES"])
assert world == int(os.environ["LAUNCH_NUM_NODES"])
dist.init_process_group(
    "gloo", init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=90)
)
value = torch.tensor([rank + 1.0])
dist.all_reduce(value)
print(f"rank {rank} sum {int(value.item())}", flush=True)
dist.destroy_process_group()
"""


def test_torch_all_reduce_across_four_nodes(cluster: Cluster) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when numpy is absent
        pytest.importorskip(
            "torch", reason="torch is not installed (CI installs torch==2.13.0, CPU build)"
        )
    write_tree(cluster.src, {"all_reduce.py": ALL_REDUCE})
    r = cluster.submit("--", PYTHON, "all_reduce.py", timeout=240)
    assert r.code == 0, r.describe()
    sums = sorted(line for line in r.lines() if " sum " in line)
    assert sums == [f"[{rank}] rank {rank} sum 10" for rank in range(4)], r.describe()


# ---------------------------------------------------------------------- dial fallback


def test_submit_falls_back_to_dial_when_sshd_forbids_forwarding(
    cluster: Cluster, tmp_path: Path
) -> None:
    hosts = HOSTS[:2]
    home = LaunchHome()
    strict = sshd.SshServer(2, allow_forwarding=False)
    try:
        strict.start()
        src = write_tree(
            tmp_path / "src",
            {
                "launch.toml": cluster_toml(
                    hosts, cluster.factory.sock_dir, strict.ssh_config, "strict"
                ),
                "main.py": "import os\nprint('dialled', os.environ['NODE_RANK'])\n",
            },
        )
        # `dial` runs through root's shell rc on the node (pyenv here): allow it time.
        r = home.run("submit", "--no-login-shell", "--", PYTHON, "main.py", cwd=src, timeout=240)
        assert r.code == 0, r.describe() + strict.log.read_text() + home.holder_log()
        assert sorted(r.lines()) == ["[0] dialled 0", "[1] dialled 1"]
        log = strict.log.read_text()
        # sshd refused the forwarding, and the streams went through `launch-agent dial`.
        assert "but the request was denied" in log, log
        assert "Starting session: command" in log, log
        st = home.run("status", job_of(r), "--json", cwd=src).json()
        assert [n["state"] for n in st["nodes"]] == ["succeeded"] * 2
    finally:
        try:
            home.close()
        finally:
            strict.stop()


# ------------------------------------------------------------------ failing closed


def test_unknown_host_key_fails_closed_and_names_the_node(cluster: Cluster, tmp_path: Path) -> None:
    unknown = HOSTS[2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        "".join(
            line + "\n"
            for line in cluster.server.known_hosts.read_text().splitlines()
            if f"[{unknown}]" not in line
        )
    )
    config = tmp_path / "ssh_config"
    config.write_text(
        cluster.server.ssh_config.read_text().replace(
            str(cluster.server.known_hosts), str(known_hosts)
        )
    )
    src = write_tree(
        tmp_path / "src",
        {
            "launch.toml": cluster_toml(HOSTS, cluster.factory.sock_dir, config),
            "main.py": "print('must not run')\n",
        },
    )
    before = cluster.job_ids()
    r = cluster.submit("--", PYTHON, "main.py", src=src)
    line = r.assert_clean_failure(4)
    assert unknown in line, line
    assert "host key" in line and "ssh-keyscan" in line, line
    assert f"-p {cluster.server.port}" in line, line  # the port the config gives
    assert cluster.job_ids() == before  # no job on any node, the trusted ones included


def test_one_agent_down_starts_nothing_and_nodes_shows_why(cluster: Cluster) -> None:
    down = cluster.agents[2]
    write_tree(cluster.src, {"main.py": "print('must not run')\n"})
    before = cluster.job_ids()
    down.stop()
    try:
        r = cluster.submit("--", PYTHON, "main.py")
        line = r.assert_clean_failure(4)
        assert HOSTS[2] in line, line
        after = [a.call("jobs")["jobs"] for i, a in enumerate(cluster.agents) if i != 2]
        for jobs, old in zip(after, before[:2] + before[3:], strict=True):
            new = [j for j in jobs if j["job"] not in old]
            # It never started anywhere (aborted would be fine; prepared or running not).
            assert all(j["state"] == "aborted" for j in new), new

        # The tree is frozen while the nodes are opened: with a bad tree as well, the tree's
        # problem is the one told (it is the one to fix first), and nothing is prepared.
        (cluster.src / "leak").symlink_to("/etc/passwd")
        try:
            r = cluster.submit("--", PYTHON, "main.py")
        finally:
            (cluster.src / "leak").unlink()
        line = r.assert_clean_failure(2)
        assert "leak" in line and HOSTS[2] not in line, line
        assert [a.call("jobs")["jobs"] for i, a in enumerate(cluster.agents) if i != 2] == after

        nodes = cluster.home.run("nodes", "--json", cwd=cluster.src).json()
        by_name: dict[str, Any] = {n["node"]: n for n in nodes}
        assert list(by_name) == HOSTS
        assert by_name[HOSTS[2]]["reachable"] is False
        assert by_name[HOSTS[2]]["error"], by_name[HOSTS[2]]
        for host in (HOSTS[0], HOSTS[1], HOSTS[3]):
            assert by_name[host]["reachable"] is True
            assert by_name[host]["cpus"] >= 1

        # A first contact (a fresh holder, which cannot yet tell a refused forward from a
        # missing socket) asks the node through `launch-agent dial`, which names the cause.
        fresh = LaunchHome()
        try:
            r = fresh.run(
                "submit", "--no-login-shell", "--", PYTHON, "main.py", cwd=cluster.src, timeout=180
            )
            line = r.assert_clean_failure(4)
            assert HOSTS[2] in line and "no agent at" in line, line
            assert "cannot reach" in line, line
        finally:
            fresh.close()
    finally:
        down.start()
    assert cluster.agents[2].call("node_info")["cpus"] >= 1


def test_holder_is_stopped_by_its_published_pid(cluster: Cluster) -> None:
    """A fresh home: the first command starts a holder; teardown stops exactly that one."""
    home = LaunchHome()
    try:
        r = home.run("nodes", "--json", cwd=cluster.src)
        assert r.code == 0, r.describe()
        pid = home.holder_pid()
        assert pid is not None
        assert home.holder_processes() == [pid]  # the 4 nodes share one holder
        started = psutil.Process(pid).create_time()
    finally:
        home.close()
    assert process_gone(pid, started)
    assert home.holder_processes() == []
    assert not home.path.exists()

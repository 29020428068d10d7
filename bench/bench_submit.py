"""Time until my code runs on 8 nodes: `launch submit` against rsync + ssh, side by side.

The nodes: one real OpenSSH sshd on 127.0.0.11..18 (tests/sshd.py) and, behind it, eight real
`launch-agent`s (user mode) with their state on tmpfs (/dev/shm/launch-bench/nodes/nI): a
real node has its own fast disk, and one shared virtual disk would serialise all eight.

launch:  `launch submit --detach --no-login-shell --dir TREE -- /bin/sh -c 'touch M/$RANK'`
         through the connection holder (started, with its 8 SSH connections, by an untimed
         `launch nodes` first), the installed `launch` script, so through the command server
         that command also started (launcher/entry.py), as for any user.
rsync:   what a SkyPilot user's sync does: `rsync -a` over SSH to the 8 nodes at once (over
         ControlMaster connections opened before timing), each followed, as soon as that
         node's rsync has finished, by `ssh NODE "cd DIR && touch M/I"` over the same master.
         Targets are on tmpfs too (/dev/shm/launch-bench/rsync/nI).

A run is timed from the start of the command(s) until all 8 marker files exist (polled every
5 ms): the same finish line for both sides. Cases, on the corpus (bench/corpus.py):
  cold      launch: agents restarted on empty state, the launcher's local store and stat
            cache removed (its holder and SSH connections kept); rsync: empty targets.
  one file  a line appended to one .py file (about 32 KiB) after a successful sync by both;
            everything else warm.
Launch and rsync runs alternate (the order swaps every repetition), one untimed warm-up each,
then REPS timed runs; before each run the file system is synced and the machine waited on
until it is quiet. All 8 "nodes" share this machine's CPUs: the figures measure total work
more than a real cluster's latency.

Optional peer, on one node: `ray job submit --working-dir` to a local Ray head on loopback,
Ray in its own virtual environment (BASE/ray-venv, installed once; skipped with a note if it
does not install within 10 minutes, or with LAUNCH_BENCH_RAY=0). LAUNCH_BENCH_HOME=DIR puts
the launcher's own files (LAUNCH_HOME) under DIR instead of the disk.

Remote shells: Debian's bash reads root's ~/.bashrc for commands run by sshd, and here that
runs `pyenv init` (about 100 ms a command). As in the team's baselines (setup-nodes.sh),
sshd gives sessions SHLVL=1 so the rsync side gets a clean shell; launch runs no remote
shell at all (the agent's socket is forwarded).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import BASE, RESULTS
from bench.corpus import PROJECT, VERSION, corpus, file_count

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import sshd  # noqa: E402  (tests/sshd.py)
from agents import AgentProc, kill_jobs, stop_processes  # noqa: E402  (tests/agents.py)

NODES = 8
REPS = 5
TARGETS = {"one_file": 0.5, "cold": 0.8}
SHM = Path(os.environ.get("LAUNCH_BENCH_SHM", "/dev/shm/launch-bench"))
WORK = BASE / "work" / "submit"
POLL_S = 0.005
RUN_TIMEOUT_S = 300.0
QUIET_CORES = float(os.environ.get("BENCH_QUIET_CORES", "0.25"))
QUIET_WAIT_S = float(os.environ.get("BENCH_QUIET_WAIT_S", "60"))
BIN = Path(sys.executable).parent
LAUNCH = str(BIN / "launch")
AGENT_COMMAND = str(BIN / "launch-agent")
CLK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- machine


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine so far (every process: client, sshd, agents)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK


def wait_quiet() -> float:
    """Wait (up to QUIET_WAIT_S) until other processes use < QUIET_CORES cores; the load seen."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        c0, t0 = machine_cpu(), time.perf_counter()
        time.sleep(0.2)
        load = (machine_cpu() - c0) / (time.perf_counter() - t0)
        if load < QUIET_CORES or time.monotonic() > deadline:
            return load
        time.sleep(1.0)


# ---------------------------------------------------------------------------- set-up


class Bench:
    """sshd, agents, holder and ControlMasters for one run; `close()` stops each by pid."""

    def __init__(self, tree: Path) -> None:
        self.project = WORK / "project"
        self.tree = self.project / "tree"
        # LAUNCH_HOME (the launcher's store, stat caches, holder): the user's own disk, as
        # on a laptop; LAUNCH_BENCH_HOME=DIR puts it in DIR/launch-bench-home (e.g. on tmpfs).
        elsewhere = os.environ.get("LAUNCH_BENCH_HOME")
        self.home = Path(elsewhere) / "launch-bench-home" if elsewhere else WORK / "home"
        shutil.rmtree(WORK, ignore_errors=True)
        shutil.rmtree(SHM, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)
        self.project.mkdir(parents=True)
        for i in range(NODES):
            self.rsync_dir(i).mkdir(parents=True)
        shutil.copytree(tree, self.tree, symlinks=True)
        self.edit_file = pick_edit_file(self.tree)
        self.edits = 0
        self.short = Path(tempfile.mkdtemp(prefix="lbs-", dir="/tmp"))  # sockets, masters
        self.env = {**os.environ, "LAUNCH_HOME": str(self.home)}
        self.server: sshd.SshServer | None = None
        self.agents: list[AgentProc] = []
        self.masters_up = False
        self.runs = 0

    # sshd ---------------------------------------------------------------------------

    def start_sshd(self) -> None:
        self.server = sshd.SshServer(NODES)
        self.server.start()
        # A clean remote shell for the rsync side (see the module's docstring): sshd
        # re-executes itself on SIGHUP with the same pid and re-reads its configuration.
        config = self.server.dir / "sshd_config"
        config.write_text(config.read_text() + "SetEnv SHLVL=1\n")
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.ssh_run(0, "true", mux=False)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or self.server.proc.poll() is not None:
                    raise
                time.sleep(0.1)
        shlvl = self.ssh_run(0, "echo $SHLVL", mux=False).strip()
        if shlvl != "2":
            raise RuntimeError(f"remote shell SHLVL={shlvl!r}: ~/.bashrc would run")

    def host(self, i: int) -> str:
        assert self.server is not None
        return str(self.server.addresses[i])

    def ssh_opts(self) -> list[str]:
        assert self.server is not None
        return [
            "ssh",
            "-F",
            str(self.server.ssh_config),
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.short}/cm-%h-%p",
            "-o",
            "ControlPersist=600",
        ]

    def ssh_run(self, i: int, command: str, mux: bool = True) -> str:
        assert self.server is not None
        base = self.ssh_opts() if mux else ["ssh", "-F", str(self.server.ssh_config)]
        return str(
            subprocess.run(
                [*base, self.host(i), command], check=True, capture_output=True, text=True
            ).stdout
        )

    def start_masters(self) -> None:
        self.masters_up = True
        for i in range(NODES):
            subprocess.run(
                [*self.ssh_opts(), "-o", "ControlMaster=yes", "-N", "-f", self.host(i)],
                check=True,
            )
            subprocess.run(
                [*self.ssh_opts(), "-O", "check", self.host(i)], check=True, capture_output=True
            )

    def stop_masters(self) -> None:
        if not self.masters_up:
            return
        for i in range(NODES):
            subprocess.run([*self.ssh_opts(), "-O", "exit", self.host(i)], capture_output=True)
        self.masters_up = False

    # agents -------------------------------------------------------------------------

    def node_state(self, i: int) -> Path:
        return SHM / "nodes" / f"n{i}"

    def start_agents(self) -> None:
        """Eight agents on empty state directories (tmpfs), on the same sockets as before."""
        self.stop_agents()
        for i in range(NODES):
            shutil.rmtree(self.node_state(i), ignore_errors=True)
        self.agents = [
            AgentProc(self.node_state(i), self.short / f"n{i}.sock").start() for i in range(NODES)
        ]

    def stop_agents(self) -> None:
        for agent in self.agents:
            agent.stop()
            kill_jobs(agent.state)
        self.agents = []

    def write_config(self) -> None:
        assert self.server is not None
        hosts = ", ".join(f'"{a}"' for a in self.server.addresses)
        (self.project / "launch.toml").write_text(
            "[clusters.bench]\n"
            f"hosts = [{hosts}]\n"
            f'socket = "{self.short}/n{{index}}.sock"\n'
            f'ssh_config = "{self.server.ssh_config}"\n'
            f'agent_command = "{AGENT_COMMAND}"\n'
            "default = true\n"
        )

    def launch(
        self, *args: str, timeout: float = RUN_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LAUNCH, *args],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def holder_pid(self) -> int | None:
        try:
            return int(json.loads((self.home / "run" / "holder.pid").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def stop_holder(self) -> None:
        from launcher.holder import stop_holder

        stop_holder(self.home / "run" / "holder.sock")

    def stop_command_server(self) -> None:
        from launcher.cmdserver import stop_server

        stop_server(self.home / "run" / "cmd.sock")

    def close(self) -> None:
        steps = (self.stop_holder, self.stop_command_server, self.stop_masters, self.stop_agents)
        for step in steps:
            try:
                step()
            except Exception as exc:  # clean up the rest regardless
                print(f"clean-up: {step.__name__}: {exc}", file=sys.stderr)
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.short, ignore_errors=True)
        shutil.rmtree(SHM, ignore_errors=True)
        shutil.rmtree(WORK, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    # cases ----------------------------------------------------------------------------

    def rsync_dir(self, i: int) -> Path:
        return SHM / "rsync" / f"n{i}"

    def rsync_argv(self, i: int) -> list[str]:
        """`rsync -a` of the tree to node i's target, over the node's ControlMaster."""
        ssh_e = " ".join(shlex.quote(x) for x in self.ssh_opts())
        return ["rsync", "-a", "-e", ssh_e, f"{self.tree}/", f"{self.host(i)}:{self.rsync_dir(i)}/"]

    def cold_launch(self) -> None:
        self.start_agents()
        shutil.rmtree(self.home / "cache", ignore_errors=True)

    def cold_rsync(self) -> None:
        for i in range(NODES):
            shutil.rmtree(self.rsync_dir(i), ignore_errors=True)
            self.rsync_dir(i).mkdir(parents=True)

    def edit(self) -> None:
        self.edits += 1
        with open(self.edit_file, "a") as f:
            f.write(f"# bench edit {self.edits}\n")

    def markers(self) -> Path:
        self.runs += 1
        path = SHM / "markers" / f"r{self.runs}"
        path.mkdir(parents=True)
        return path

    def submit_args(self, command: str, nodes: int = NODES) -> list[str]:
        """`launch submit` of the tree, detached, running `command` through /bin/sh."""
        return [
            "submit",
            "--detach",
            "--no-login-shell",
            *(["--nodes", str(nodes)] if nodes != NODES else []),
            "--dir",
            str(self.tree),
            "--",
            "/bin/sh",
            "-c",
            command,
        ]

    def run_launch(self, nodes: int = NODES) -> dict[str, Any]:
        marks = self.markers()
        argv = [LAUNCH, *self.submit_args(f"touch {marks}/$LAUNCH_NODE_RANK", nodes)]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            c0, t0 = machine_cpu(), time.perf_counter()
            proc = subprocess.Popen(
                argv,
                cwd=self.project,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
            exited = None

            def failed() -> str | None:
                nonlocal exited
                if exited is None and proc.poll() is not None:
                    exited = time.perf_counter() - t0
                    if proc.returncode != 0:
                        err.seek(0)
                        return f"launch submit exited {proc.returncode}: {err.read().decode()}"
                return None

            try:
                seconds = wait_markers(marks, t0, failed, nodes)
            except BaseException:
                proc.kill()  # ours, by its Popen: never left behind on a failure
                proc.wait()
                raise
            cpu = machine_cpu() - c0
            proc.wait(RUN_TIMEOUT_S)
            if exited is None:
                exited = time.perf_counter() - t0
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"launch submit exited {proc.returncode}: {err.read().decode()}")
            err.seek(0)
            said = err.read().decode()
        return {"s": seconds, "cli_exit_s": exited, "mcpu_s": cpu, "said": said.strip()}

    def run_rsync(self) -> dict[str, Any]:
        """Per node, one thread: rsync, then (as soon as it has finished) the ssh start."""
        marks = self.markers()
        synced: list[float] = [0.0] * NODES
        errors: list[str] = []

        def node(i: int) -> None:
            rsync = self.rsync_argv(i)
            start = [*self.ssh_opts(), self.host(i), f"cd {self.rsync_dir(i)} && touch {marks}/{i}"]
            for n, argv in enumerate((rsync, start)):
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
                if done.returncode != 0:
                    errors.append(
                        f"node {i}: {argv[0]} exited {done.returncode}: "
                        f"{done.stderr.decode(errors='replace')}"
                    )
                    return
                if n == 0:
                    synced[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=node, args=(i,)) for i in range(NODES)]
        c0, t0 = machine_cpu(), time.perf_counter()
        for thread in threads:
            thread.start()
        seconds = wait_markers(marks, t0, lambda: errors[0] if errors else None)
        cpu = machine_cpu() - c0
        for thread in threads:
            thread.join(RUN_TIMEOUT_S)
        if errors:
            raise RuntimeError(errors[0])
        return {"s": seconds, "rsync_done_max_s": max(synced), "mcpu_s": cpu}


def wait_markers(
    marks: Path, t0: float, step: Callable[[], str | None], count: int = NODES
) -> float:
    """Seconds from t0 until `count` marker files exist in `marks`, polling every POLL_S."""
    deadline = t0 + RUN_TIMEOUT_S
    while True:
        problem = step()
        if problem:
            raise RuntimeError(problem)
        if len(os.listdir(marks)) >= count:
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not all {count} markers in {marks} after {RUN_TIMEOUT_S} s")
        time.sleep(POLL_S)


def pick_edit_file(root: Path) -> Path:
    """The .py file whose size is closest to 32 KiB (deterministic, as in the rsync baselines)."""
    best: tuple[int, str] | None = None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                key = (abs(os.path.getsize(path) - 32768), path)
                best = min(best, key) if best else key
    assert best is not None, f"no .py file in {root}"
    return Path(best[1])


# ---------------------------------------------------------------------------- running


Side = tuple[Callable[[], None], Callable[[], dict[str, Any]]]  # (untimed setup, timed run)


def measure(
    sides: dict[str, Side], reps: int, before_pair: Callable[[], None] = lambda: None
) -> dict[str, list[dict[str, Any]]]:
    """One untimed warm-up pair, then `reps` timed pairs; the order swaps every pair."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for k in range(reps + 1):
        before_pair()
        order = list(sides) if k % 2 == 0 else list(reversed(sides))
        for side in order:
            setup, action = sides[side]
            setup()
            os.sync()
            load = wait_quiet()
            result = action()
            result["bg_load"] = load
            tag = "warm-up" if k == 0 else f"run {k}"
            print(
                f"  {side:<6} {tag:<7} {result['s'] * 1000:8.1f} ms  "
                f"(machine cpu {result['mcpu_s']:.2f} s, background {load:.2f} cores)",
                file=sys.stderr,
                flush=True,
            )
            if k > 0:
                out[side].append(result)
    return out


def summary(runs: dict[str, list[dict[str, Any]]], target: float | None) -> dict[str, Any]:
    """Median, min, max per side; ratio = launch's median over the other side's."""
    res: dict[str, Any] = {}
    for side, items in runs.items():
        times = [r["s"] for r in items]
        res[side] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "mcpu_median_s": statistics.median(r["mcpu_s"] for r in items),
            "bg_load_max": max(r["bg_load"] for r in items),
            "runs": items,
        }
    (other,) = [side for side in runs if side != "launch"]
    ratio = res["launch"]["median_s"] / res[other]["median_s"]
    res.update(ratio=ratio, target=target, met=None if target is None else ratio <= target)
    return res


def run(reps: int | None = None) -> dict[str, Any]:
    why = sshd.available()
    if why is not None:
        print(f"bench submit: skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    if shutil.which("rsync") is None:
        print("bench submit: skipped: rsync is not installed", file=sys.stderr)
        return {"skipped": "rsync not installed"}
    reps = reps or REPS
    tree = corpus()
    files, size = file_count(tree)
    bench = Bench(tree)
    results: dict[str, Any] = {
        "corpus": {"project": PROJECT, "version": VERSION, "files": files, "bytes": size},
        "nodes": NODES,
        "cpus": os.cpu_count(),
        "reps": reps,
        "edited": str(bench.edit_file.relative_to(bench.tree)),
        "launch_home": str(bench.home),
    }
    try:
        bench.start_sshd()
        bench.start_agents()
        bench.write_config()
        # Warm both connection paths, untimed: the holder with its 8 SSH connections, and
        # the 8 ControlMasters.
        nodes = bench.launch("nodes", "--json")
        if nodes.returncode != 0 or not all(n["reachable"] for n in json.loads(nodes.stdout)):
            raise RuntimeError(f"launch nodes failed: {nodes.stdout}{nodes.stderr}")
        holder = bench.holder_pid()
        bench.start_masters()
        logins = bench.server.accepted() if bench.server else 0

        print(
            f"\n== cold: {PROJECT} {VERSION}, {files:,} files, {size / 1e6:.1f} MB, {NODES} nodes",
            file=sys.stderr,
        )
        cold = measure(
            {
                "launch": (bench.cold_launch, bench.run_launch),
                "rsync": (bench.cold_rsync, bench.run_rsync),
            },
            reps,
        )
        results["cold"] = summary(cold, TARGETS["cold"])

        print(f"\n== one file changed ({results['edited']})", file=sys.stderr)
        # Both sides start from a successful sync of the current tree; then every pair of
        # runs sees exactly one file changed since its own previous run.
        bench.run_launch()
        bench.run_rsync()
        one = measure(
            {"launch": (_nothing, bench.run_launch), "rsync": (_nothing, bench.run_rsync)},
            reps,
            before_pair=bench.edit,
        )
        results["one_file"] = summary(one, TARGETS["one_file"])

        results["holder_kept"] = holder is not None and bench.holder_pid() == holder
        results["ssh_logins_during_timed_runs"] = (
            bench.server.accepted() - logins if bench.server else None
        )
        check_copies(bench)
        results["ray"] = ray_peer(bench, reps)
    finally:
        bench.close()
    _report(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "submit.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    return results


def _nothing() -> None:
    pass


def check_copies(bench: Bench) -> None:
    """The last rsync target of every node equals the tree (launch's copies are checked by
    the agent itself, which verifies every blob)."""
    for i in range(NODES):
        diff = subprocess.run(
            ["diff", "-r", "-q", str(bench.tree), str(bench.rsync_dir(i))],
            capture_output=True,
            text=True,
        )
        if diff.returncode != 0:
            raise RuntimeError(f"rsync target of node {i} differs: {diff.stdout[:500]}")


# ------------------------------------------------------------------------ Ray (optional)

RAY_VENV = BASE / "ray-venv"
RAY_TMP = Path("/tmp/lbray")  # short: Ray puts Unix sockets under it
RAY_INSTALL_TIMEOUT_S = 600
# Ray replaces a loopback node address with the machine's routable one unless this is set
# (the single-machine mode it uses on macOS and Windows); never start Ray here without it.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_peer(bench: Bench, reps: int) -> dict[str, Any]:
    """On one node: `launch submit --nodes 1` against `ray job submit --working-dir` to a
    local Ray head on loopback, in its own virtual environment. Skipped with a note when Ray
    does not install within RAY_INSTALL_TIMEOUT_S or would not stay on loopback."""
    why = "disabled by LAUNCH_BENCH_RAY=0" if os.environ.get("LAUNCH_BENCH_RAY") == "0" else None
    why = why or _install_ray()
    if why:
        print(f"\nRay: skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    ray = RayHead()
    try:
        why = ray.start()
        if why:
            print(f"\nRay: skipped: {why}", file=sys.stderr)
            return {"skipped": why}
        one = lambda: bench.run_launch(1)  # noqa: E731
        print("\n== 1 node, cold: launch (fresh agent, no local cache) vs ray", file=sys.stderr)
        cold = measure({"launch": (bench.cold_launch, one), "ray": (bench.edit, ray.submit)}, reps)
        print("\n== 1 node, one file changed: launch vs ray", file=sys.stderr)
        bench.run_launch(1)
        changed = measure(
            {"launch": (_nothing, one), "ray": (_nothing, ray.submit)}, reps, before_pair=bench.edit
        )
        return {
            "version": ray.version,
            "listening": ray.listening,
            "cold": summary(cold, None),
            "one_file": summary(changed, None),
        }
    finally:
        ray.stop()


def _install_ray() -> str | None:
    ray = RAY_VENV / "bin" / "ray"
    if ray.exists():
        return None
    print(f"installing ray[default] into {RAY_VENV} (once)...", file=sys.stderr)
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
        subprocess.run(
            [str(RAY_VENV / "bin" / "pip"), "install", "-q", "ray[default]"],
            check=True,
            timeout=RAY_INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(RAY_VENV, ignore_errors=True)
        return f"ray did not install within {RAY_INSTALL_TIMEOUT_S} s"
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(RAY_VENV, ignore_errors=True)
        return f"ray did not install: {exc}"
    print(f"ray installed in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return None


class RayHead:
    """A single-node Ray cluster on loopback with its own temp dir; stopped by pid."""

    def __init__(self) -> None:
        self.env = {**os.environ, **RAY_ENV}
        self.ray = str(RAY_VENV / "bin" / "ray")
        self.version = ""
        self.listening: list[str] = []
        self.dashboard = ""
        self.gcs = ""

    def start(self) -> str | None:
        python = str(RAY_VENV / "bin" / "python")
        probe = "import ray._private.services as s; print(s.resolve_ip_for_localhost('127.0.0.1'))"
        ip = subprocess.run(
            [python, "-c", probe], env=self.env, capture_output=True, text=True
        ).stdout.strip()
        if not ip.startswith("127."):
            return f"Ray would use node address {ip!r}, not loopback"
        self.version = subprocess.run(
            [self.ray, "--version"], env=self.env, capture_output=True, text=True
        ).stdout.strip()
        shutil.rmtree(RAY_TMP, ignore_errors=True)
        gcs, dash, agent, client = _free_ports(4)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.gcs = f"127.0.0.1:{gcs}"
        started = subprocess.run(
            [
                self.ray, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                f"--ray-client-server-port={client}", "--num-cpus=2",
                f"--temp-dir={RAY_TMP}", "--disable-usage-stats",
            ],
            env=self.env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        if started.returncode != 0:
            return f"ray start failed: {started.stdout[-1000:]}{started.stderr[-1000:]}"
        self.listening = sorted(
            f"{c.laddr.ip}:{c.laddr.port}"
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in {p.pid for p in self.processes()}
        )
        outside = [a for a in self.listening if not _loopback(a.rsplit(":", 1)[0])]
        if outside:
            return f"Ray listens outside loopback: {outside}"
        print(f"Ray {self.version}: head on loopback, listening {self.listening}", file=sys.stderr)
        return None

    def processes(self) -> list[psutil.Process]:
        """Every process of our cluster: those naming our temp dir, and their descendants."""
        found: dict[int, psutil.Process] = {}
        marks = [
            str(RAY_TMP),
            *([self.gcs] if self.gcs else []),
        ]  # the client proxy names only the GCS
        for proc in psutil.process_iter(["cmdline"]):
            if any(m in arg for arg in proc.info["cmdline"] or () for m in marks):
                found[proc.pid] = proc
                with contextlib.suppress(psutil.Error):
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        found.pop(os.getpid(), None)
        return list(found.values())

    def submit(self) -> dict[str, Any]:
        marks = SHM / "markers" / f"ray-{time.monotonic_ns()}"
        marks.mkdir(parents=True)
        argv = [
            self.ray, "job", "submit", "--address", self.dashboard, "--no-wait",
            "--working-dir", str(WORK / "project" / "tree"), "--",
            "sh", "-c", f"touch {marks}/0",
        ]  # fmt: skip
        c0, t0 = machine_cpu(), time.perf_counter()
        proc = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

        def failed() -> str | None:
            if proc.poll() not in (None, 0):
                return f"ray job submit exited {proc.returncode}: {proc.stdout.read().decode()}"  # type: ignore[union-attr]
            return None

        try:
            seconds = wait_markers(marks, t0, failed, 1)
        finally:
            if proc.poll() is None:
                proc.wait(RUN_TIMEOUT_S)
        cpu = machine_cpu() - c0
        assert proc.stdout is not None
        proc.stdout.close()
        return {"s": seconds, "mcpu_s": cpu}

    def stop(self) -> None:
        stop_processes(self.processes(), grace=15)
        shutil.rmtree(RAY_TMP, ignore_errors=True)


def _loopback(ip: str) -> bool:
    """A loopback address, or a wildcard (which peer-ray.sh also accepts, and reports)."""
    ip = ip.removeprefix("::ffff:")
    return ip.startswith("127.") or ip in ("0.0.0.0", "::", "::1")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


SIDES = ("launch", "rsync")


def _span(side: dict[str, Any]) -> str:
    return f"{side['median_s']:.3f} [{side['min_s']:.3f}, {side['max_s']:.3f}]"


def _report(r: dict[str, Any]) -> None:
    c = r["corpus"]
    print(f"\n## time until the code runs on {r['nodes']} nodes: launch submit vs rsync + ssh")
    print(
        f"\n{c['project']} {c['version']} sdist, {c['files']:,} files, {c['bytes'] / 1e6:.1f} MB; "
        f"{r['cpus']} CPUs shared by all {r['nodes']} simulated nodes; node state and rsync "
        f"targets on tmpfs; medians of {r['reps']} alternating runs after one warm-up. "
        "Time: from the command's start until every node's job has run (a marker file).\n"
    )
    print("| case | launch s, median [min, max] | rsync + ssh s | ratio | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for key, name in (("cold", "cold"), ("one_file", "one file changed")):
        s = r[key]
        verdict = "met" if s["met"] else "MISSED"
        print(
            f"| {name} | {_span(s['launch'])} | {_span(s['rsync'])} | "
            f"{s['ratio']:.2f}x | <= {s['target']}x {verdict} |"
        )
    print(
        "\nmachine CPU, median s (every process on the machine) launch / rsync: cold "
        f"{r['cold']['launch']['mcpu_median_s']:.2f} / {r['cold']['rsync']['mcpu_median_s']:.2f}, "
        f"one file {r['one_file']['launch']['mcpu_median_s']:.2f} / "
        f"{r['one_file']['rsync']['mcpu_median_s']:.2f}; background load before runs <= "
        f"{max(r[k][s]['bg_load_max'] for k in ('cold', 'one_file') for s in SIDES):.2f} "
        f"cores; holder kept its connections: {r['holder_kept']}; new SSH logins during the "
        f"timed runs: {r['ssh_logins_during_timed_runs']}"
    )
    ray = r.get("ray", {})
    if "skipped" in ray:
        print(f"\nRay Jobs peer: skipped: {ray['skipped']}")
    elif ray:
        print(
            f"\n### 1 node: launch submit --nodes 1 vs {ray['version']}: ray job submit "
            "--working-dir (local head on loopback; Ray uploads a new package for any change)\n"
        )
        print("| case | launch s, median [min, max] | ray s | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for key, name in (
            ("cold", "cold (Ray: a tree it has not seen)"),
            ("one_file", "one file changed"),
        ):
            s = ray[key]
            print(f"| {name} | {_span(s['launch'])} | {_span(s['ray'])} | {s['ratio']:.2f}x |")

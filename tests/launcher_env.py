"""Helpers shared by the end-to-end tests of the `launch` CLI (test_launcher_local.py and
test_launcher_ssh.py): a private LAUNCH_HOME that runs the real CLI as a subprocess, and the
clean-up of everything such a home may have started (the connection holder, the command
server, local agents and their jobs), always by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents import kill_jobs

from launcher import cmdserver, holder
from launcher import home as home_mod

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the venv's interpreter: what every test job runs
LAUNCH_SCRIPT = str(Path(sys.executable).parent / "launch")  # the installed entry point


def agent_command() -> str:
    """Absolute path of the venv's `launch-agent` (what `dial` runs on a node)."""
    beside = Path(sys.executable).parent / "launch-agent"
    return str(beside if beside.exists() else REPO / ".venv" / "bin" / "launch-agent")


@dataclass
class Result:
    args: list[str]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.describe()
        return json.loads(self.out)

    def lines(self) -> list[str]:
        return self.out.splitlines()

    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def describe(self) -> str:
        return (
            f"launch {' '.join(self.args)} -> {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        )

    def assert_clean_failure(self, code: int) -> str:
        """Exit `code`, no traceback anywhere, and exactly one error line; that line."""
        assert self.code == code, self.describe()
        assert "Traceback" not in self.err and "Traceback" not in self.out, self.describe()
        lines = self.err_lines()
        assert len(lines) == 1, self.describe()
        return lines[0]


@contextlib.contextmanager
def home_env(path: Path) -> Iterator[None]:
    """LAUNCH_HOME set in this process, for launcher.home's paths (holder socket...)."""
    old = os.environ.get("LAUNCH_HOME")
    os.environ["LAUNCH_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LAUNCH_HOME"]
        else:
            os.environ["LAUNCH_HOME"] = old


class LaunchHome:
    """One isolated LAUNCH_HOME (short, under /tmp: Unix socket paths are limited to 107
    bytes) and the `launch` CLI run in it as a subprocess."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="lh-", dir="/tmp"))
        config = self.path / "config"  # no user-level launch.toml leaks in
        config.mkdir()
        self.env = {
            **os.environ,
            "LAUNCH_HOME": str(self.path),
            "XDG_CONFIG_HOME": str(config),
            # A safety net only: every test stops the holder itself.
            "LAUNCH_HOLDER_IDLE": "300",
            "NO_COLOR": "1",
        }
        self.env.pop("FORCE_COLOR", None)
        with home_env(self.path):  # where launcher.home puts the holder for this home
            self._holder_socket = home_mod.holder_socket()

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 90) -> Result:
        argv = [str(a) for a in args]
        proc = subprocess.run(
            [PYTHON, "-m", "launcher.cli", *argv],
            cwd=cwd or self.path,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(argv, proc.returncode, proc.stdout, proc.stderr)

    def run_script(self, *args: str, cwd: Path | None = None, timeout: float = 90) -> Result:
        """The installed `launch` script (launcher/entry.py): through the command server
        when one runs for this home."""
        argv = [str(a) for a in args]
        proc = subprocess.run(
            [LAUNCH_SCRIPT, *argv],
            cwd=cwd or self.path,
            env={**self.env, "LAUNCH_COMMAND_SERVER": "1"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(argv, proc.returncode, proc.stdout, proc.stderr)

    def command_socket(self) -> Path:
        return self.path / "run" / "cmd.sock"

    def command_server(self) -> psutil.Process | None:
        """The command server of this home, if one runs (by the pid it published)."""
        try:
            info = json.loads(self.command_socket().with_suffix(".pid").read_text())
            proc = psutil.Process(info["pid"])
        except (FileNotFoundError, ValueError, KeyError, psutil.NoSuchProcess):
            return None
        if abs(proc.create_time() - info["create_time"]) > 0.01:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc

    def holder_socket(self) -> Path:
        return self._holder_socket

    def holder_pid(self) -> int | None:
        pid_file = self.holder_socket().with_suffix(".pid")
        try:
            return int(json.loads(pid_file.read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def holder_processes(self) -> list[int]:
        """Pids of every holder process serving this home's socket (to prove there is one)."""
        sock = str(self.holder_socket())
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if sock in (proc.info["cmdline"] or []):
                    found.append(proc.pid)
        return found

    def holder_log(self) -> str:
        try:
            return self.holder_socket().with_suffix(".log").read_text()
        except FileNotFoundError:
            return ""

    def stop_holder(self) -> None:
        holder.stop_holder(self.holder_socket())

    def local_states(self) -> list[Path]:
        with home_env(self.path):
            local = home_mod.local_dir()
        return sorted(p for p in local.glob("node*") if p.is_dir()) if local.exists() else []

    def close(self) -> None:
        """Stop what this home started, by pid: local agents (`launch local down`, which also
        stops the holder), the jobs they ran, the holder; then remove the directory."""
        try:
            if self.local_states():
                self.run("local", "down", timeout=60)
                for state in self.local_states():
                    kill_jobs(state)
        finally:
            self.stop_holder()
            cmdserver.stop_server(self.command_socket())
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def local_agents(count: int) -> Iterator[LaunchHome]:
    """A LAUNCH_HOME with `count` local agents (local0...); all stopped by pid after."""
    home = LaunchHome()
    try:
        up = home.run("local", "up", str(count))
        assert up.code == 0, up.describe()
        yield home
    finally:
        home.close()


def write_tree(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def process_gone(pid: int, create_time: float) -> bool:
    """True when that very process (pid and start time) no longer runs."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01:
            return True
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def status(lh: LaunchHome, job: str) -> dict[str, Any]:
    """`launch status JOB --json`."""
    answer: dict[str, Any] = lh.run("status", job, "--json").json()
    return answer


def revisions(lh: LaunchHome, job: str) -> list[dict[str, Any]]:
    """`launch revisions JOB --json`."""
    rows: list[dict[str, Any]] = lh.run("revisions", job, "--json").json()
    return rows


def wait_state(lh: LaunchHome, job: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    """Poll `launch status` until every node of JOB is in one of `states`; the last status."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(status(lh, job))
        return all(n["state"] in states for n in seen["nodes"])

    assert wait_until(reached, timeout), seen
    return seen

"""Real `launch-agent` processes for tests: started on a private socket and state directory,
awaited through systemd's own readiness protocol (a test NOTIFY_SOCKET), stopped by pid.

Sockets live in a short directory under /tmp because a Unix socket path is limited to 107
bytes, which pytest's tmp_path easily exceeds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from agent.daemon import call_once

REPO = Path(__file__).resolve().parent.parent


class AgentProc:
    """One agent process. `start()` returns once it said READY=1; `kill9()`, `stop()`."""

    def __init__(
        self,
        state: Path,
        sock: Path,
        *,
        user_mode: bool = True,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.state = state
        self.extra_args = list(args or [])  # more `serve` options, e.g. ["--gpus", "4"]
        self.sock = sock
        self.user_mode = user_mode
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> AgentProc:
        notify_dir = Path(tempfile.mkdtemp(prefix="ln-", dir="/tmp"))
        notify_path = notify_dir / "notify"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify_path))
        listener.settimeout(timeout)
        args = [
            sys.executable,
            "-m",
            "agent",
            "serve",
            "--socket",
            str(self.sock),
            "--state",
            str(self.state),
        ]
        if self.user_mode:
            args.append("--user")
        args.extend(self.extra_args)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **self.env}
        self.stderr_path = self.state.parent / f"{self.state.name}.agent.log"
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO
            )
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    message = listener.recv(4096).decode()
                except TimeoutError:
                    break
                self.messages.append(message)
                if "READY=1" in message.split("\n"):
                    return self
            raise RuntimeError(f"agent did not become ready: {self.stderr_path.read_text()}")
        finally:
            listener.close()
            shutil.rmtree(notify_dir, ignore_errors=True)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return call_once(self.sock, method, params or {})

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def children(pid: int, marker: str) -> list[psutil.Process]:
    """The children of `pid` whose command line contains `marker` (one that ends while it is
    looked at is left out)."""
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if marker in " ".join(child.cmdline()):
                found.append(child)
    return found


def stop_processes(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM each, SIGKILL those still there after `grace` seconds, and reap them."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def kill_jobs(state: Path) -> None:
    """Stop every shim (and so every job process) that an agent under `state` started.

    By pid, published by each shim with its start time, never by name.
    """
    import json

    for shim_file in (state / "jobs").glob("*/shim.json"):
        with contextlib.suppress(Exception):
            info = json.loads(shim_file.read_text())
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) > 0.01:
                continue
            # SIGTERM first: a login shell killed outright in its profile can leave lock files
            # behind (pyenv's rehash lock makes every later login shell wait 60 s).
            stop_processes([proc, *proc.children(recursive=True)], grace=3)


class AgentFactory:
    """Makes agents for one test and stops all of them, and their jobs, afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock_dir = Path(tempfile.mkdtemp(prefix="la-", dir="/tmp"))
        self.agents: list[AgentProc] = []

    def __call__(self, name: str = "node0", **kwargs: Any) -> AgentProc:
        agent = AgentProc(self.root / name, self.sock_dir / f"{name}.sock", **kwargs)
        self.agents.append(agent)
        return agent.start()

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
            kill_jobs(agent.state)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")

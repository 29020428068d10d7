"""Every path the agent uses: its state directory layout and, through `JobPaths`, every file
that belongs to one job. No other module builds these paths by hand.

Layout under the state directory:
    store/                 content-addressed objects (agent/store.py)
    revlog.sqlite          jobs, revisions, events (agent/revlog.py)
    spares/<bundle>/       pristine trees the next job's code directory is made from
    jobs/<job>/            one job (root-owned, 0711: traversable, not listable)
        code/              the live code directory (read-only files)
        outputs/           LAUNCH_OUTPUT_DIR, owned by the job's user
        log                stdout and stderr, interleaved, appended by the job itself
        spec.json          what the shim needs to start the job (written by the agent)
        env.sh             the environment overlay the job's login shell sources
        shim.json          {pid, create_time} published by the shim at start
        exit.json          {code, signal, cancelled} published by the shim at the end
        cancel.json        {grace_s} written by the agent before it signals the shim
        revision.json      LAUNCH_REVISION_FILE
        metrics/metrics.jsonl   LAUNCH_METRICS_FILE
        staged/            the files of a prepared patch, renamed into code/ at commit
        staged.json        what that patch is (published last: the prepare's commit point)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def helper_env() -> dict[str, str]:
    """The environment of the agent's own helper processes (`python -S -m agent.forkserver`,
    `-m agent.spares`): no site start-up, so PYTHONPATH names the two places they import
    from, this package and psutil. Never passed on to a job."""
    import psutil

    roots = [Path(__file__).resolve().parent.parent, Path(psutil.__file__).resolve().parent.parent]
    return {"PATH": BASE_PATH, "PYTHONPATH": os.pathsep.join(map(str, roots)), "LANG": "C.UTF-8"}


def die_with_agent(agent_pid: int) -> bool:
    """In a helper process: be killed when the agent that started it ends, even by SIGKILL
    (PR_SET_PDEATHSIG). False when the agent is already gone (it died before the death
    signal was set): the helper should leave at once."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    return os.getppid() == agent_pid


def check_job_id(job: str) -> str:
    """Job ids become directory names: allow only `j-` plus lowercase letters, digits, dashes."""
    from agent.protocol.errors import InvalidParams

    if not (job.startswith("j-") and 3 <= len(job) <= 64 and set(job) <= JOB_ID_CHARS):
        raise InvalidParams(f"invalid job id {job!r}", job)
    return job


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def revlog(self) -> Path:
        return self.root / "revlog.sqlite"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def runtime(self) -> Path:
        """Where the agent puts launch_runtime.py, on every job's PYTHONPATH."""
        return self.root / "runtime"

    @property
    def spares(self) -> Path:
        return self.root / "spares"

    def job(self, job: str) -> JobPaths:
        return JobPaths(self.jobs / check_job_id(job))


@dataclass(frozen=True)
class JobPaths:
    root: Path

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def env_overlay(self) -> Path:
        return self.root / "env.sh"

    @property
    def shim(self) -> Path:
        return self.root / "shim.json"

    @property
    def exit(self) -> Path:
        return self.root / "exit.json"

    @property
    def cancel(self) -> Path:
        return self.root / "cancel.json"

    @property
    def revision(self) -> Path:
        return self.root / "revision.json"

    @property
    def metrics_dir(self) -> Path:
        """Owned by the job's user, who appends to the metrics file; a directory of its own so
        the agent can watch it without waking on every log write."""
        return self.root / "metrics"

    @property
    def metrics(self) -> Path:
        return self.metrics_dir / "metrics.jsonl"

    @property
    def secrets(self) -> Path:
        """Values of --env names that look secret: kept out of every record, read only by
        the agent when it starts the job."""
        return self.root / "secrets.json"

    @property
    def staged(self) -> Path:
        """Files of a prepared patch, waiting for commit (same filesystem as code/)."""
        return self.root / "staged"

    @property
    def staged_record(self) -> Path:
        return self.root / "staged.json"


def publish_json(path: Path, value: Any, mode: int = 0o644) -> None:
    """Write a file that another process polls: temp file, fsync, rename. A reader sees the
    old content or the new, never a torn write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, json.dumps(value, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The published value, or None when the file does not exist (yet)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None

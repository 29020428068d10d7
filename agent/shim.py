"""The per-job supervisor: `python -m agent.shim JOBDIR`.

The agent starts one shim per job in its own session; the shim outlives the agent (invariant 5).
It becomes a child subreaper, so every process the job leaves behind, even one that called
setsid and lost its parent, is re-parented here and can still be found and stopped. It starts
the job in its own process group as the owner (uid, gid, groups from spec.json), with stdout
and stderr both on the job's log file, so the output is interleaved in the order written and
nothing is lost while the agent is away. When the job ends it stops what remains of the tree,
reaps it, and publishes exit.json by temp file and rename.

SIGTERM to the shim means cancel: SIGTERM to the whole tree, SIGKILL after the grace period
named in cancel.json. The shim waits for signals with sigtimedwait, so it uses no CPU while
the job runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.paths import JobPaths, publish_json, read_json

PR_SET_CHILD_SUBREAPER = 36
# Stragglers left when the main process exits get this long after SIGTERM.
STRAGGLER_GRACE_S = 2.0
DEFAULT_GRACE_S = 10.0


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _signal_tree(sig: int) -> int:
    """Send sig to every descendant; return how many were still there."""
    import psutil  # after the job has started (see run)

    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    return len(procs)


def reap_children(main_pid: int = -1, status: dict[str, int | None] | None = None) -> None:
    """Collect every exited child; remember the main process's exit status in `status`."""
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == main_pid and status is not None:
            if os.WIFSIGNALED(code):
                status["signal"] = os.WTERMSIG(code)
                status["code"] = 128 + os.WTERMSIG(code)
            else:
                status["code"] = os.WEXITSTATUS(code)


def _publish_self(paths: JobPaths) -> None:
    """shim.json: how a restarted agent finds this shim (the agent records the same itself
    when it starts the shim). Written once the job runs: psutil's import is a good part of
    the shim's start-up, and the job need not wait for it."""
    import psutil

    me = psutil.Process()
    publish_json(paths.shim, {"pid": me.pid, "create_time": me.create_time()})


def run(paths: JobPaths) -> int:
    spec = read_json(paths.spec)
    assert spec is not None, f"{paths.spec} is missing"
    _become_subreaper()
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)

    waited = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    status: dict[str, int | None] = {"code": None, "signal": None}
    try:
        child = subprocess.Popen(
            spec["command"],
            cwd=spec["cwd"],
            env=spec["env"],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            process_group=0,
            user=spec.get("uid"),
            group=spec.get("gid"),
            extra_groups=spec.get("groups"),
            umask=spec.get("umask", 0o022),
            # The child must not inherit the shim's blocked signals.
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, set()),
        )
    except OSError as exc:
        _publish_self(paths)
        os.write(log_fd, f"launch: cannot start {spec['command'][-1]!r}: {exc}\n".encode())
        publish_json(
            paths.exit,
            {"code": 127, "signal": None, "cancelled": False, "ended_ns": time.time_ns()},
        )
        return 0

    _publish_self(paths)
    cancelled = False
    deadline: float | None = None
    while status["code"] is None or _signal_tree(0) > 0:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if status["code"] is not None and deadline is None:
            # The main process ended; stop what it left behind.
            _signal_tree(signal.SIGTERM)
            deadline = time.monotonic() + STRAGGLER_GRACE_S
            continue
        got = (
            signal.sigwaitinfo(waited) if timeout is None else signal.sigtimedwait(waited, timeout)
        )
        if got is None or (deadline is not None and time.monotonic() >= deadline):
            _signal_tree(signal.SIGKILL)
            deadline = time.monotonic() + 60.0  # SIGKILL cannot be refused; just reap
        elif got.si_signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) and not cancelled:
            cancelled = True
            grace = (read_json(paths.cancel) or {}).get("grace_s", DEFAULT_GRACE_S)
            _signal_tree(signal.SIGTERM)
            deadline = time.monotonic() + float(grace)
        reap_children(child.pid, status)
    reap_children(child.pid, status)
    publish_json(
        paths.exit,
        {
            "code": status["code"],
            "signal": status["signal"],
            "cancelled": cancelled,
            "ended_ns": time.time_ns(),
        },
    )
    os.close(log_fd)
    return 0


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m agent.shim JOBDIR")
    sys.exit(run(JobPaths(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()

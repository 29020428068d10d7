"""Starting shims fast: a warm process that forks one per job.

A shim started as a new interpreter (`python -S -m agent.shim`) spends ~25 ms of CPU on
start-up and imports before the job runs; a node starting eight jobs at once, or a small
node starting many, pays that every time. The agent instead keeps one helper process, the
fork server, that has imported the shim once, and asks it over a private socket pair to
fork a shim for a job directory: ~1 ms, the job runs at once. The fork is the shim as
agent/shim.py describes it (own session, subreaper, log, exit.json), so nothing else changes:
the shim outlives the agent and the server alike, and a restarted agent re-adopts it.

The server answers each request with the shim's pid and a pidfd of it, opened before the
server could reap it: the agent watches exactly that process, however soon the job ends.
The server dies with the agent (PR_SET_PDEATHSIG, and end of file on its socket); a shim
does not (the death signal is not inherited across fork).

Protocol (SOCK_SEQPACKET, one message each way): request = the job directory (UTF-8);
reply = b"ok PID CREATE_TIME" with the pidfd attached, or b"error MESSAGE".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

from agent import shim
from agent.paths import JobPaths, die_with_agent

PR_SET_NAME = 15
MAX_MESSAGE = 4096
SPAWN_TIMEOUT_S = 10.0


class ForkServerError(OSError):
    """The fork server could not start a shim (the agent turns this into a failed start)."""


class ForkServer:
    """The agent's side: start the server when the agent starts serving, or again on the
    next use after it died (from the event loop's thread: the death signal follows the
    thread that started it), and ask it for shims."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    def spawn(self, job_root: Path) -> tuple[int, float, int]:
        """Fork a shim for `job_root`: (pid, process start time as psutil gives it, pidfd),
        read before the shim could be reaped, so right even for a job over at once. A server
        that died is started again once; ForkServerError if the shim cannot be started."""
        for attempt in (1, 2):
            sock = self._connected()
            try:
                sock.send(os.fsencode(job_root))
                message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
            except OSError:  # a broken pipe, or no answer in time (TimeoutError)
                message, fds = b"", []
            if message.startswith(b"ok ") and len(fds) == 1:
                pid, create_time = message[3:].split()
                return int(pid), float(create_time), fds[0]
            for fd in fds:
                os.close(fd)
            if message.startswith(b"error "):
                raise ForkServerError(message[6:].decode(errors="replace"))
            self.close()  # it died (end of file or a broken pipe): start a new one
            if attempt == 2:
                raise ForkServerError("the fork server ended without answering")
        raise AssertionError("unreachable")

    def start(self) -> None:
        """Start the server ahead of its first use, so no job's start waits for a new
        interpreter; a failure is left for spawn() to report."""
        with contextlib.suppress(ForkServerError):
            self._connected()

    def _connected(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                # -S: no site start-up; helper_env's PYTHONPATH names what it imports.
                [
                    sys.executable,
                    "-S",
                    "-m",
                    "agent.forkserver",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=self.env,
            )
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot start the fork server: {exc}") from None
        finally:
            theirs.close()
        ours.settimeout(SPAWN_TIMEOUT_S)  # a server that hangs is replaced, not waited on
        self.sock = ours
        return ours

    def close(self) -> None:
        """Stop the server (its shims keep running) and reap it."""
        if self.sock is not None:
            self.sock.close()  # end of file: it leaves
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ------------------------------------------------------------------------- the server


def serve(sock: socket.socket) -> None:
    """Answer requests until the agent closes its end; reap the shims as they end."""
    import psutil  # each shim imports it once its job runs: here, once

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        sel.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                    shim.reap_children()
                    continue
                request = sock.recv(MAX_MESSAGE)
                if not request:
                    return
                try:
                    pid = _fork(JobPaths(Path(os.fsdecode(request))), (sock, wake_r, wake_w))
                    pidfd = os.pidfd_open(pid)
                except OSError as exc:
                    sock.send(f"error {exc}".encode()[:MAX_MESSAGE])
                    continue
                # Not reaped before this loop's next turn: the child is there, alive or not.
                create_time = psutil.Process(pid).create_time()
                try:
                    socket.send_fds(sock, [f"ok {pid} {create_time!r}".encode()], [pidfd])
                finally:
                    os.close(pidfd)


def _fork(paths: JobPaths, close: tuple[socket.socket, int, int]) -> int:
    log_fd = os.open(
        paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
    )
    try:
        pid = os.fork()
    except OSError:
        os.close(log_fd)
        raise
    if pid:
        os.close(log_fd)
        return pid
    # The shim. Never return into the server's loop, whatever happens.
    code = 1
    try:
        os.setsid()
        # Its command line stays the server's; `ps -o comm` and top show this name instead.
        ctypes.CDLL(None).prctl(PR_SET_NAME, b"launch-shim", 0, 0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock, wake_r, wake_w = close
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log_fd, 2)  # a shim that fails says so in the job's log
        os.close(null)
        os.close(log_fd)
        code = shim.run(paths)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    """`python -S -m agent.forkserver FD AGENT_PID` (started by ForkServer)."""
    fd, agent_pid = map(int, sys.argv[1:])
    if not die_with_agent(agent_pid):
        return
    sock = socket.socket(fileno=fd)
    with contextlib.suppress(KeyboardInterrupt):
        serve(sock)


if __name__ == "__main__":
    main()

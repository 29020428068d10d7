"""The command server: `python -m launcher.cmdserver SOCKET`, started by launcher/entry.py.

One per user and LAUNCH_HOME. It imports everything a command needs once (asyncio, click,
launch's modules), then waits on a Unix socket (mode 0600 in the runtime directory; a peer of
another uid is refused by SO_PEERCRED). For each command it forks a worker that takes the
client's file descriptors as its stdin, stdout and stderr, its working directory,
environment, umask and command line, runs the ordinary CLI and reports the exit status; the
client forwards its signals to the worker by pid. The server itself holds no connection and
runs no event loop, so a fork is clean: a worker is an ordinary `launch` process that skipped
its imports. It leaves after IDLE_S without a command, or at once when a client's code key
(launcher/entry.py) differs from its own: an upgrade never runs old code twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from launcher import pidfile
from launcher.entry import Frames, code_key, frame

IDLE_S = 600.0


def preload() -> None:
    """What a command would import: here, once, before any fork."""
    import asyncio  # noqa: F401

    import launcher.cli
    import launcher.fleet
    import launcher.freeze
    import launcher.history
    import launcher.logs
    import launcher.ops
    import launcher.upload  # noqa: F401


def serve(path: Path, idle_s: float = IDLE_S) -> None:
    with open(path.with_suffix(".lock"), "ab") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another server of this home is starting or serving
        preload()
        key = code_key()
        listener = _bind(path)
        pidfile.publish(pid_path(path))
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, _leave)
        workers: set[int] = set()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(listener, selectors.EVENT_READ)
                sel.register(wake_r, selectors.EVENT_READ)
                while True:
                    ready = sel.select(None if workers else idle_s)
                    if not ready:
                        return  # idle
                    for sel_key, _ in ready:
                        if sel_key.fileobj is wake_r:
                            with contextlib.suppress(BlockingIOError):
                                os.read(wake_r, 512)
                            _reap(workers)
                        elif not _accept(listener, key, workers, (wake_r, wake_w, lock.fileno())):
                            return  # a client runs other code: leave for a fresh server
        finally:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(listener.fileno()).st_ino:
                    path.unlink()
            listener.close()


def _bind(path: Path) -> socket.socket:
    """Listen on `path`, replacing it atomically (a stale socket of a dead server included)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    listener.bind(str(temp))
    os.chmod(temp, 0o600)
    os.replace(temp, path)
    listener.listen(64)
    return listener


def _leave(*_: Any) -> None:
    raise SystemExit(0)  # through serve's clean-up: the socket goes


def _accept(listener: socket.socket, key: str, workers: set[int], close: tuple[int, ...]) -> bool:
    """Serve one client; False when its code differs from ours (the server should leave)."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            return True
        conn.settimeout(10)  # a client that connects and says nothing is dropped
        data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        request = Frames(conn, data).next()
        if request is None or len(fds) != 3:
            return True
        if request.get("key") != key:
            conn.sendall(frame({"stale": True}))
            return False
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            listener.close()
            _worker(conn, request, fds, close)  # never returns
        workers.add(pid)
        return True
    except (OSError, ValueError):
        return True
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _worker(
    conn: socket.socket, request: dict[str, Any], fds: list[int], close: tuple[int, ...]
) -> None:
    """The forked worker: become the client's command, run the CLI, report the status."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in close:  # the server's: the lock above all, or no new server could start
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        # Line by line on a terminal, as a command started there would write (the server's
        # own stdout, a log file, made it block-buffered).
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=os.isatty(1))
        os.umask(int(request["umask"]))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        sys.argv = [str(a) for a in request["argv"]]
        conn.sendall(frame({"pid": os.getpid()}))
        _interrupt_when_gone(conn)
        code = _run_cli()
        # Done: the client leaves as soon as it has the status, and its leaving (seen by the
        # thread above) must not interrupt what is left: a KeyboardInterrupt here printed a
        # traceback on the client's terminal after a successful command had returned.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn.sendall(frame({"exit": code}))
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _interrupt_when_gone(conn: socket.socket) -> None:
    """A client that ends before its command (killed: it forwards the signals it can catch)
    interrupts the command as Ctrl-C would, rather than leave it running for nobody."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                pass
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="client", daemon=True).start()


def _run_cli() -> int:
    from launcher.cli import main

    try:
        # Named as the client was called (click would name the server's module otherwise).
        main(prog_name=os.path.basename(sys.argv[0]))
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def _reap(workers: set[int]) -> None:
    for pid in list(workers):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
        workers.discard(pid)


def pid_path(path: Path) -> Path:
    return path.with_suffix(".pid")


def stop_server(path: Path) -> bool:
    """Stop the command server of socket `path` by the pid it published (checked against its
    start time); its workers finish their commands."""
    return pidfile.stop(pid_path(path))


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(sys.argv[1]))


if __name__ == "__main__":
    main()

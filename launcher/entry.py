"""The `launch` command's entry point: hand the command to the command server, or run it here.

A Python command that uses asyncio and click spends about 100 ms importing before it does
anything, on every invocation. The command server (launcher/cmdserver.py) is a per-user
background process that has imported all of it once and forks a worker per command, as
Mercurial's chg does: this module, which imports almost nothing, passes it the command line,
working directory, environment, umask and the terminal's file descriptors (0, 1, 2), forwards
the signals it gets (Ctrl-C) to the worker, and exits with the worker's exit status. The
worker is the ordinary CLI, writing straight to this command's stdout and stderr.

Without a server (the first command, or after 10 idle minutes) the command runs in this
process and starts one in the background for the next. A server running other code than this
installation's (an upgrade, an edited checkout) says so and leaves; the command then runs
here. LAUNCH_COMMAND_SERVER=0 runs every command in its own process.

Frames on the socket are a 4-byte big-endian length and a JSON object:
  client -> server  {"key", "argv", "cwd", "env", "umask"}, with fds 0, 1, 2 attached
  server -> client  {"pid": worker} then {"exit": code}, or {"stale": true}
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys

TYPE_CHECKING = False  # typing itself is not imported: ~3 ms of every command
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 2**20
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def main() -> None:
    if os.environ.get("LAUNCH_COMMAND_SERVER", "1") != "0":
        code = via_server()
        if code is not None:
            sys.exit(code)
    from launcher.cli import main as cli_main

    cli_main()


def socket_path() -> str:
    override = os.environ.get("LAUNCH_HOME")
    if override:  # as launcher.home has it, without importing pathlib and platformdirs
        run = os.path.join(override, "run")
        os.makedirs(run, mode=0o700, exist_ok=True)
        return os.path.join(run, "cmd.sock")
    from launcher import home

    return str(home.runtime_dir() / "cmd.sock")


def code_key() -> str:
    """What identifies the code a process runs: the interpreter and every module of launch
    (path, size, mtime). A server whose key differs from its client's is stale."""
    parts = [sys.executable]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("launcher", "agent", "agent/protocol"):
        with os.scandir(os.path.join(root, package)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    parts.append(f"{package}/{entry.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def via_server() -> int | None:
    """Run this command in a worker of the command server: its exit status, or None when
    there is no server to run it (one is started in the background for the next command)."""
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        start_server(path)
        return None
    with sock:
        request = {
            "key": code_key(),
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": _umask(),
        }
        # Signals are forwarded to the worker; one that comes before the worker is known
        # (Ctrl-C at once) is kept and forwarded then, or, if the command runs here after
        # all, delivered here.
        worker: list[int] = []
        pending: list[int] = []

        def forward(signum: int, _frame: Any) -> None:
            if not worker:
                pending.append(signum)
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker[0], signum)

        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
        frames = Frames(sock)
        try:
            socket.send_fds(sock, [frame(request)], [0, 1, 2])
            reply = frames.next()
        except (OSError, ValueError):  # a closed descriptor to pass, a server gone away
            reply = None
        if reply is None or "pid" not in reply:
            if reply is not None and reply.get("stale"):
                start_server(path)  # the stale one is leaving: one with this code, for later
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for caught in pending:
                signal.raise_signal(caught)
            return None
        worker.append(int(reply["pid"]))
        for caught in pending:
            forward(caught, None)
        try:
            reply = frames.next()
        except (OSError, ValueError):
            reply = None
    if reply is None or "exit" not in reply:
        print("launch: the command ended without an exit status (killed?)", file=sys.stderr)
        return 1
    return int(reply["exit"])


def start_server(path: str) -> None:
    """Start the command server in the background, unless one is starting already (its own
    lock decides); never waits for it."""
    import subprocess

    try:
        with open(path.removesuffix(".sock") + ".log", "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "launcher.cmdserver", path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
    except OSError:
        pass  # no server: every command runs in its own process, as before


def frame(value: dict[str, Any]) -> bytes:
    body = json.dumps(value).encode()
    return HEADER.pack(len(body)) + body


class Frames:
    """Frames read from a socket, in order (two may arrive in one read)."""

    def __init__(self, sock: socket.socket, first: bytes = b"") -> None:
        self.sock = sock
        self.data = bytearray(first)  # bytes received with the descriptors, if any

    def next(self) -> dict[str, Any] | None:
        """The next frame, or None at end of file."""
        while True:
            if len(self.data) >= HEADER.size:
                (length,) = HEADER.unpack_from(self.data)
                if length > MAX_FRAME:
                    raise OSError("command server frame too large")
                if len(self.data) >= HEADER.size + length:
                    body = bytes(self.data[HEADER.size : HEADER.size + length])
                    del self.data[: HEADER.size + length]
                    value = json.loads(body)
                    return value if isinstance(value, dict) else None
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.data += chunk


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    main()

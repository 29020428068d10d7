"""A real OpenSSH sshd on loopback for tests and benchmarks: simulated nodes at 127.0.0.11,
127.0.0.12, ... on one port, with generated host and client keys and a known_hosts file.
Host-key checking stays on everywhere; nothing listens outside 127.0.0.0/8.

Needs root (sshd must switch to the logged-in user) and Debian's openssh-server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> str | None:
    """None if an sshd can be run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root to run sshd (CI runs as root)"
    if not os.path.exists(SSHD):
        return "sshd not installed (apt-get install openssh-server; .ci/run does)"
    return None


def _free_port(addresses: list[str]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        ok = True
        for address in addresses:
            with socket.socket() as probe:
                try:
                    probe.bind((address, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return int(port)
    raise RuntimeError("no free port on the node addresses")


class SshServer:
    """One sshd serving `count` simulated nodes. Use as a context manager."""

    def __init__(self, count: int, *, allow_forwarding: bool = True) -> None:
        self.count = count
        self.allow_forwarding = allow_forwarding
        self.dir = Path(tempfile.mkdtemp(prefix="lsshd-", dir="/tmp"))
        self.addresses = [f"127.0.0.{11 + i}" for i in range(count)]
        self.port = _free_port(self.addresses)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_key(self) -> Path:
        return self.dir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def __enter__(self) -> SshServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        d = self.dir
        for key in ("host_ed25519", "client_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)],
                check=True,
            )
        (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
        host_pub = (d / "host_ed25519.pub").read_text().split()[:2]
        self.known_hosts.write_text(
            "".join(f"[{a}]:{self.port} {host_pub[0]} {host_pub[1]}\n" for a in self.addresses)
        )
        listen = "".join(f"ListenAddress {a}\n" for a in self.addresses)
        forwarding = "yes" if self.allow_forwarding else "no"
        (d / "sshd_config").write_text(
            f"Port {self.port}\n{listen}HostKey {d / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n"
            f"AllowTcpForwarding {forwarding}\nAllowStreamLocalForwarding yes\n"
            "KexAlgorithms curve25519-sha256\nMaxStartups 100:30:200\nMaxSessions 100\n"
            "LogLevel VERBOSE\n"
        )
        self.ssh_config.write_text(
            "Host 127.0.0.*\n"
            f"  Port {self.port}\n  User root\n  IdentityFile {self.client_key}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {self.known_hosts}\n"
            "  StrictHostKeyChecking yes\n  KexAlgorithms curve25519-sha256\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.addresses[-1], self.port), timeout=1),
            ):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {self.log.read_text()}")

    def accepted(self) -> int:
        """How many SSH logins sshd has accepted so far (to prove connections are reused)."""
        return self.log.read_text().count("Accepted publickey")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

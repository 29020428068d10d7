"""SSH to the nodes: the only module that imports asyncssh.

One SSH connection per node, made as OpenSSH would make it: ~/.ssh/config (or the cluster's
ssh_config), known_hosts checked and failing closed, the user's keys and ssh-agent. Through
it the agent's Unix socket is opened as a `direct-streamlocal` channel; where sshd refuses
that (`AllowTcpForwarding no` also refuses it in OpenSSH 9.2), it runs `launch-agent dial`
instead and speaks over its stdin and stdout.

Every asyncssh or OS error becomes NodeUnreachable naming the node, here and nowhere else.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.encryption import get_default_encryption_algs

from agent.protocol.errors import NodeUnreachable

CONNECT_TIMEOUT_S = 15.0
KEEPALIVE_S = 30
# `dial` runs through the user's shell on the node, whose rc files may be slow (pyenv, conda).
DIAL_TIMEOUT_S = 90.0
DIAL_OK = b"launch-agent dial: connected\n"
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@dataclass(frozen=True)
class SshTarget:
    """Where and how to reach one node's agent over SSH."""

    host: str
    socket: str
    user: str | None = None
    port: int | None = None
    ssh_config: str | None = None
    agent_command: str = "launch-agent"
    connect_timeout: float = CONNECT_TIMEOUT_S

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.host, self.user, self.port, self.ssh_config)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SshTarget:
        return cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})


@dataclass
class AgentStream:
    reader: Any
    writer: Any
    address: str  # the node's address as this connection reached it (for MASTER_ADDR)
    via: str  # "forward" or "dial"


async def _resolved(target: SshTarget) -> tuple[int | None, str]:
    """The port and known_hosts file a connection to `target` uses once its ssh_config is
    applied (for advice in an error message)."""
    try:
        options = await asyncssh.SSHClientConnectionOptions.construct(
            config=[target.ssh_config] if target.ssh_config else (),
            host=target.host,
            port=target.port or (),
        )
    except (OSError, asyncssh.Error, ValueError):
        return target.port, "~/.ssh/known_hosts"
    files = options.known_hosts
    known = files[0] if isinstance(files, list) and files and isinstance(files[0], str) else ""
    return options.port, known or "~/.ssh/known_hosts"


def _reason(
    target: SshTarget, exc: BaseException, resolved: tuple[int | None, str] | None = None
) -> str:
    """A one-line reason for a failed connection, with what to do where we can say it."""
    where = f"{target.host}" + (f":{target.port}" if target.port else "")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        port_no, known_hosts = resolved or (target.port, "~/.ssh/known_hosts")
        port = f"-p {port_no} " if port_no and port_no != 22 else ""
        return (
            f"host key of {where} is unknown or changed ({exc.reason}); check its "
            f"fingerprint, then add it: ssh-keyscan {port}{target.host} >> {known_hosts}"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"SSH authentication to {where} failed: check your key or ssh-agent ({exc.reason})"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"SSH disconnected: {exc.reason}"
    if isinstance(exc, asyncssh.ChannelOpenError):
        return f"cannot open the agent socket {target.socket}: {exc.reason}"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer from {where} within {target.connect_timeout:.0f} s"
    if isinstance(exc, OSError):
        return f"{where}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class SshPool:
    """Open SSH connections by target; one per node, shared by every stream to it."""

    def __init__(self) -> None:
        self._conns: dict[tuple[Any, ...], asyncssh.SSHClientConnection] = {}
        self._locks: dict[tuple[Any, ...], asyncio.Lock] = {}
        # How streams to each node went last time: "forward" or "dial".
        self._via: dict[tuple[Any, ...], str] = {}

    async def connection(self, target: SshTarget) -> asyncssh.SSHClientConnection:
        lock = self._locks.setdefault(target.key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(target.key)
            if conn is not None and not conn.is_closed():
                return conn
            config = [target.ssh_config] if target.ssh_config else ()
            options: dict[str, Any] = {
                "config": config,
                "connect_timeout": target.connect_timeout,
                "keepalive_interval": KEEPALIVE_S,
            }
            if target.user:
                options["username"] = target.user
            if target.port:
                options["port"] = target.port
            ciphers = _cipher_preference(target.ssh_config)
            if ciphers:
                options["encryption_algs"] = ciphers
            try:
                conn = await asyncssh.connect(target.host, **options)
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                resolved = None
                if isinstance(exc, asyncssh.HostKeyNotVerifiable):
                    resolved = await _resolved(target)
                raise NodeUnreachable(target.host, _reason(target, exc, resolved)) from None
            self._conns[target.key] = conn
            return conn

    async def open_agent(self, target: SshTarget) -> AgentStream:
        """A byte stream to the node's agent, by forwarding or, if refused, by dial."""
        conn = await self.connection(target)
        peer = conn.get_extra_info("peername")
        address = peer[0] if peer else target.host
        key = (*target.key, target.socket)
        if self._via.get(key) != "dial":
            try:
                reader, writer = await conn.open_unix_connection(target.socket)
                self._via[key] = "forward"
                return AgentStream(reader, writer, address, "forward")
            except asyncssh.ChannelOpenError as exc:
                # OpenSSH answers a direct-streamlocal refused by `AllowTcpForwarding no` with
                # the same "open failed" as a socket nobody listens on (and other servers may
                # not know the channel type). Only where forwarding worked before does it mean
                # the agent is down; otherwise `dial` goes and says which it is.
                if self._via.get(key) == "forward":
                    raise NodeUnreachable(target.host, _no_agent(target, exc.reason)) from None
            except (OSError, asyncssh.Error) as exc:
                raise NodeUnreachable(target.host, _reason(target, exc)) from None
        stream = await self._dial(conn, target, address)
        self._via[key] = "dial"
        return stream

    async def _dial(
        self, conn: asyncssh.SSHClientConnection, target: SshTarget, address: str
    ) -> AgentStream:
        command = f"{target.agent_command} dial --announce --socket {shlex.quote(target.socket)}"
        try:
            process = await conn.create_process(command, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            raise NodeUnreachable(target.host, _reason(target, exc)) from None
        # `dial --announce` says one line once it reached the agent; anything else (it could
        # not connect, or is not installed) ends with the reason on stderr.
        reason = f"`{command}` did not connect"
        try:
            line = await asyncio.wait_for(process.stdout.readline(), DIAL_TIMEOUT_S)
        except (TimeoutError, OSError, asyncssh.Error):
            line, reason = b"", f"no answer from `{command}` within {DIAL_TIMEOUT_S:.0f} s"
        if line == DIAL_OK:
            return AgentStream(process.stdout, process.stdin, address, "dial")
        try:
            err = await asyncio.wait_for(process.stderr.read(), 5)
        except (TimeoutError, OSError, asyncssh.Error):
            err = b""
        process.close()
        said = [x for x in err.decode("utf-8", "replace").splitlines() if x.strip()]
        raise NodeUnreachable(target.host, _no_agent(target, said[-1].strip() if said else reason))

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        for conn in self._conns.values():
            await conn.wait_closed()
        self._conns.clear()


def _no_agent(target: SshTarget, reason: str) -> str:
    return (
        f"no agent at {target.socket} ({reason}); start it there: "
        "launch-agent serve (or deploy/install.sh)"
    )


def _cipher_preference(ssh_config: str | None) -> list[str] | None:
    """AES-GCM first, unless an ssh_config chooses ciphers itself (or may, by Include).

    asyncssh does ChaCha20-Poly1305 in Python packet by packet; AES-GCM is one OpenSSL call
    a packet: about 2.5 times less CPU for the holder, which carries every node's upload.
    Both are the ones OpenSSH prefers; only the order changes.
    """
    path = Path(os.path.expanduser(ssh_config or "~/.ssh/config"))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    if re.search(r"(?im)^\s*(ciphers|include)\b", text):
        return None
    defaults = [a.decode() for a in get_default_encryption_algs()]
    fast = [a for a in FAST_CIPHERS if a in defaults]
    return fast + [a for a in defaults if a not in fast] if fast else None


def default_ssh_config() -> str | None:
    path = Path(os.path.expanduser("~/.ssh/config"))
    return str(path) if path.is_file() else None

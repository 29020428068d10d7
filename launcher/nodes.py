"""Which nodes a command talks to, and how to open each: clusters from launch.toml, `--hosts`,
DeepSpeed/MPI hostfiles, and the embedded default, agents on this machine started on demand.

A `Node` is plain data (it is stored in the launcher's records); `open_node` turns one into an
AgentClient: straight to the socket for a local node, through the connection holder for an
SSH node, so this process never imports asyncssh.

launch.toml (project root, else the user's config directory):
    [clusters.lab]
    hosts = ["gpu1", "alice@gpu2:2222"]
    socket = "/run/launch-agent/agent.sock"   # optional; "{host}" and "{index}" expand
    ssh_config = "~/.ssh/config"               # optional
    agent_command = "launch-agent"             # optional, for the `dial` fallback
    default = true
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.protocol.errors import InvalidParams, NodeUnreachable
from launcher import home
from launcher.client import AgentClient, open_client, open_unix_client

SYSTEM_SOCKET = "/run/launch-agent/agent.sock"
CONFIG_NAME = "launch.toml"
HOST_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class Node:
    """One node as the launcher reaches it. kind "local": `socket` on this machine."""

    name: str
    kind: str  # "local" or "ssh"
    socket: str
    host: str = ""
    user: str | None = None
    port: int | None = None
    ssh_config: str | None = None
    agent_command: str = "launch-agent"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Node:
        return cls(**value)


# ----------------------------------------------------------------------- configuration


def find_config(start: Path) -> Path | None:
    """launch.toml in `start` or a parent, else in the user's config directory."""
    for directory in [start.resolve(), *start.resolve().parents]:
        if (directory / CONFIG_NAME).is_file():
            return directory / CONFIG_NAME
    import platformdirs

    user = platformdirs.user_config_path("launch") / CONFIG_NAME
    return user if user.is_file() else None


def load_clusters(start: Path) -> dict[str, dict[str, Any]]:
    path = find_config(start)
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidParams(f"{path}: {exc}; fix the file or remove it") from None
    clusters = data.get("clusters", {})
    if not isinstance(clusters, dict):
        raise InvalidParams(f"{path}: [clusters] must be a table of clusters")
    return clusters


def parse_host(spec: str, index: int, cluster: dict[str, Any]) -> Node:
    """`alias`, `host:port`, `user@host:port` (IPv6 in brackets) into an SSH node;
    `unix:/path/agent.sock` into an agent on this machine (several agents on one machine)."""
    if spec.strip().startswith("unix:"):
        path = os.path.expanduser(spec.strip().removeprefix("unix:"))
        return Node(name=spec.strip(), kind="local", socket=path)
    match = HOST_RE.match(spec.strip())
    if not match:
        raise InvalidParams(f"cannot read host {spec!r}: expected [user@]host[:port]")
    host = match["host"].strip("[]")
    sock = str(cluster.get("socket", SYSTEM_SOCKET)).format(host=host, index=index)
    ssh_config = cluster.get("ssh_config")
    return Node(
        name=spec.strip(),
        kind="ssh",
        socket=sock,
        host=host,
        user=match["user"],
        port=int(match["port"]) if match["port"] else None,
        ssh_config=os.path.expanduser(ssh_config) if ssh_config else None,
        agent_command=str(cluster.get("agent_command", "launch-agent")),
    )


def read_hostfile(path: Path) -> list[str]:
    """DeepSpeed/MPI hostfile: one `host slots=N` per line; # comments."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InvalidParams(f"cannot read hostfile {path}: {exc.strerror}") from None
    hosts = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    if not hosts:
        raise InvalidParams(f"hostfile {path} lists no hosts")
    return hosts


def resolve_nodes(
    *,
    nodes: int | None,
    hosts: str | None,
    hostfile: Path | None,
    cluster: str | None,
    start: Path,
    candidates: bool = False,
) -> list[Node]:
    """The nodes a submit runs on, in rank order.

    --hosts or --hostfile pin exact hosts (with the named or default cluster's settings);
    --cluster or a default cluster gives its hosts; with none configured, --nodes N means N
    agents on this machine. With `candidates`, a cluster's hosts are all returned, for the
    caller to choose --nodes N of them that can take the job now.
    """
    clusters = load_clusters(start)
    if cluster is not None and cluster not in clusters:
        known = ", ".join(sorted(clusters)) or "none configured"
        raise InvalidParams(f"no cluster named {cluster!r} in launch.toml (known: {known})")
    chosen = cluster or next((n for n, c in clusters.items() if c.get("default")), None)
    settings = clusters.get(chosen, {}) if chosen else {}
    if hosts or hostfile:
        specs = [h for h in (hosts or "").split(",") if h.strip()]
        if hostfile:
            specs += read_hostfile(hostfile)
    elif chosen:
        specs = list(settings.get("hosts", []))
        if not specs:
            raise InvalidParams(f"cluster {chosen!r} lists no hosts")
    else:
        return local_nodes(nodes or 1)
    if nodes is not None:
        if nodes > len(specs):
            raise InvalidParams(f"--nodes {nodes} but only {len(specs)} hosts are given")
        if not (candidates and not (hosts or hostfile)):
            specs = specs[:nodes]
    return [parse_host(spec, i, settings) for i, spec in enumerate(specs)]


# ------------------------------------------------------------------------ local agents


def local_nodes(count: int) -> list[Node]:
    if count < 1:
        raise InvalidParams("--nodes must be at least 1")
    return [
        Node(name=f"local{i}", kind="local", socket=str(_local_socket(i))) for i in range(count)
    ]


def _local_socket(index: int) -> Path:
    return home.runtime_dir() / "local" / f"node{index}.sock"


def _local_state(index: int) -> Path:
    return home.local_dir() / f"node{index}"


def ensure_local_agents(nodes: list[Node], timeout: float = 20.0) -> list[str]:
    """Start, in the background, each local node's agent that is not already serving.

    Returns the names of the agents started. Each is awaited through its READY=1, the same
    readiness systemd uses, so no command races an agent that is still starting.
    """
    started = []
    for node in nodes:
        if node.kind != "local" or _answers(Path(node.socket)):
            continue
        if not re.fullmatch(r"local\d+", node.name):
            continue  # a `unix:` host of a cluster: not ours to start; open_node says why
        index = int(node.name.removeprefix("local"))
        _start_local_agent(index, timeout)
        started.append(node.name)
    return started


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def _start_local_agent(index: int, timeout: float) -> None:
    sock, state = _local_socket(index), _local_state(index)
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="launch-") as tmp:
        notify_path = Path(tmp) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify_path))
            listener.settimeout(timeout)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
            with open(state.parent / f"node{index}.log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "agent",
                        "serve",
                        "--user",
                        "--socket",
                        str(sock),
                        "--state",
                        str(state),
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            _write_pid(index, proc.pid)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if b"READY=1" in listener.recv(4096).split(b"\n"):
                        return
                except TimeoutError:
                    break
                if proc.poll() is not None:
                    break
    raise NodeUnreachable(
        f"local{index}", f"agent did not start; see {state.parent / f'node{index}.log'}"
    )


def _write_pid(index: int, pid: int) -> None:
    import psutil

    path = home.local_dir() / f"node{index}.pid"
    path.write_text(json.dumps({"pid": pid, "create_time": psutil.Process(pid).create_time()}))


def stop_local_agents() -> list[str]:
    """Stop every local agent by the pid we recorded (checked by start time). Jobs go on."""
    import psutil

    stopped = []
    for pid_file in sorted(home.local_dir().glob("node*.pid")):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, psutil.NoSuchProcess):
            info = json.loads(pid_file.read_text())
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) < 0.01:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
                stopped.append(pid_file.stem)
        pid_file.unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------- opening


@contextlib.asynccontextmanager
async def open_node(node: Node) -> AsyncIterator[tuple[AgentClient, str]]:
    """An AgentClient for `node` and the node's address as reached (for MASTER_ADDR)."""
    if node.kind == "local":
        async with open_unix_client(node.name, Path(node.socket)) as client:
            yield client, "127.0.0.1"
        return
    from launcher.holder import open_via_holder

    target = {
        "host": node.host,
        "socket": node.socket,
        "user": node.user,
        "port": node.port,
        "ssh_config": node.ssh_config,
        "agent_command": node.agent_command,
    }
    reader, writer, address = await open_via_holder(home.holder_socket(), target, node.name)
    async with open_client(node.name, reader, writer) as client:
        yield client, address or node.host

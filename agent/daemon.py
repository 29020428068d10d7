"""`launch-agent`: serve (the daemon), dial (the SSH fallback bridge), status, fsck.

`serve` recovers before it listens: it removes stale temp objects, re-adopts live jobs and
finalises those that ended while it was away, then binds the socket, sets its mode, and only
then says READY=1 to systemd (or to a test's NOTIFY_SOCKET). SIGTERM stops the agent and
never the jobs: each runs under its own shim in its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import platformdirs

from agent import __version__
from agent.notify import sd_notify, watchdog_interval
from agent.paths import StatePaths
from agent.protocol.errors import LaunchError

SYSTEM_SOCKET = Path("/run/launch-agent/agent.sock")
SYSTEM_STATE = Path("/var/lib/launch-agent")

log = logging.getLogger("launch-agent")


@dataclass(frozen=True)
class Config:
    socket: Path
    state: Path
    system: bool
    gpus: int | None = None  # declared GPUs; None: ask nvidia-smi
    reservation_ttl_s: float = 120.0
    spare_trees: int = 2


def user_socket() -> Path:
    # Without XDG_RUNTIME_DIR (root in a container, cron) platformdirs falls back to
    # /tmp/runtime-UID and says so; that fallback is what we want, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return platformdirs.user_runtime_path("launch-agent") / "agent.sock"


def user_state() -> Path:
    return platformdirs.user_state_path("launch-agent")


def resolve_config(user: bool, sock: Path | None, state: Path | None) -> Config:
    """System mode when run as root unless --user; --socket and --state override either."""
    system = os.geteuid() == 0 and not user
    if sock is None:
        sock = SYSTEM_SOCKET if system else user_socket()
    if state is None:
        state = SYSTEM_STATE if system else user_state()
    return Config(socket=sock.absolute(), state=state.absolute(), system=system)


async def run_agent(config: Config) -> None:
    from agent.handlers import Agent
    from agent.jobs import JobManager
    from agent.revlog import RevLog
    from agent.server import bind_socket, check_socket_dir, serve
    from agent.store import Store

    # Refuse an unsafe socket directory first: before any state is created or job re-adopted.
    config.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_socket_dir(config.socket.parent)
    state = StatePaths(config.state)
    state.root.mkdir(parents=True, exist_ok=True, mode=0o755 if config.system else 0o700)
    store = Store(state.store)
    store.clean_tmp()
    revlog = RevLog(state.revlog)
    hostname = socket.gethostname()
    from agent.gpus import GpuLedger, discover

    ledger = GpuLedger(revlog, discover(config.gpus, hostname), config.reservation_ttl_s)
    from agent.spares import Spares

    spares = Spares(state.spares, store, config.spare_trees)
    spares.clean()
    jobs = JobManager(state, store, revlog, hostname, ledger, spares)
    agent = Agent(
        state=state, store=store, revlog=revlog, jobs=jobs, hostname=hostname, system=config.system
    )
    from agent.background import start_watching

    drift = start_watching(jobs, store, revlog, spares)
    install_runtime(state)
    counts = jobs.recover()
    log.info("recovered jobs: %s", counts)
    sock = bind_socket(config.socket, 0o666 if config.system else 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tg:
            server = tg.create_task(serve(agent, sock, None if config.system else os.geteuid()))
            interval = watchdog_interval()
            pinger = tg.create_task(_watchdog(interval)) if interval else None
            watching = tg.create_task(drift.run())
            mode = "system" if config.system else "user"
            log.info("serving on %s (%s mode, state %s)", config.socket, mode, config.state)
            sd_notify(f"READY=1\nSTATUS=serving on {config.socket}\nMAINPID={os.getpid()}")
            jobs.warm_up()
            await stop.wait()
            sd_notify("STOPPING=1")
            server.cancel()
            watching.cancel()
            if pinger:
                pinger.cancel()
    finally:
        with contextlib.suppress(FileNotFoundError):
            config.socket.unlink()
        sock.close()
        jobs.close()
        revlog.close()


def install_runtime(state: StatePaths) -> None:
    """Put launch_runtime.py (agent/runtime.py, standard library only) where every job's
    PYTHONPATH finds it, readable by all: a job imports it whatever its Python."""
    source = Path(__file__).with_name("runtime.py").read_bytes()
    state.runtime.mkdir(mode=0o755, exist_ok=True)
    target = state.runtime / "launch_runtime.py"
    if not target.exists() or target.read_bytes() != source:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(source)
        tmp.chmod(0o644)
        tmp.replace(target)


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------ commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="launch-agent")
def main() -> None:
    """The launch agent: keeps the store, the revision log and the jobs of this node."""


_socket_opt = click.option(
    "--socket", "sock", type=click.Path(path_type=Path), help="Unix socket path (default: by mode)."
)
_state_opt = click.option(
    "--state", type=click.Path(path_type=Path), help="State directory (default: by mode)."
)
_user_opt = click.option(
    "--user",
    is_flag=True,
    help="User mode: serve only your uid, under your runtime and state "
    "directories (the default when not root).",
)


@main.command()
@_user_opt
@_socket_opt
@_state_opt
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=None,
    help="Declare this many GPUs (as Slurm's gres.conf does) instead of asking nvidia-smi.",
)
@click.option(
    "--reservation-ttl",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds a prepared job's GPU reservation lasts if it is never started.",
)
@click.option(
    "--spare-trees",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Keep this many pristine copies of recently run trees, so the next job's code "
    "directory is a rename plus the files that changed (0: build every one in full).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log each connection.")
def serve(
    user: bool,
    sock: Path | None,
    state: Path | None,
    gpus: int | None,
    reservation_ttl: float,
    spare_trees: int,
    verbose: bool,
) -> None:
    """Serve the agent protocol on a Unix socket (no TCP port, ever)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="launch-agent: %(message)s",
        stream=sys.stderr,
    )
    config = dataclasses.replace(
        resolve_config(user, sock, state),
        gpus=gpus,
        reservation_ttl_s=reservation_ttl,
        spare_trees=spare_trees,
    )
    try:
        asyncio.run(run_agent(config))
    except* (LaunchError, PermissionError) as group:
        for exc in group.exceptions:
            click.echo(f"launch-agent: {exc}", err=True)
        sys.exit(2)


@main.command()
@_user_opt
@_socket_opt
@click.option(
    "--announce",
    is_flag=True,
    help="Once connected, write the line `launch-agent dial: connected` to stdout first "
    "(so the caller can tell a bridge that works from one that failed).",
)
def dial(user: bool, sock: Path | None, announce: bool) -> None:
    """Bridge stdin and stdout to the agent's socket (for SSH servers that refuse
    stream forwarding, as `docker -H ssh://` does)."""
    config = resolve_config(user, sock, None)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(config.socket))
    except OSError as exc:
        sys.exit(f"launch-agent dial: cannot reach {config.socket}: {exc.strerror}")
    if announce:
        os.write(1, b"launch-agent dial: connected\n")

    def upstream() -> None:
        while data := os.read(0, 256 * 1024):
            conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := conn.recv(256 * 1024):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]


@main.command()
@_user_opt
@_socket_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(user: bool, sock: Path | None, as_json: bool) -> None:
    """Show this node's agent, its resources and your jobs."""
    config = resolve_config(user, sock, None)
    try:
        info = call_once(config.socket, "node_info", {})
        jobs = call_once(config.socket, "jobs", {})["jobs"]
    except (OSError, LaunchError) as exc:
        sys.exit(f"launch-agent: cannot reach the agent at {config.socket}: {exc}")
    if as_json:
        click.echo(json.dumps({"node": info, "jobs": jobs}, indent=2, default=str))
        return
    gib = 2**30
    click.echo(
        f"agent {info['agent']} (protocol {info['protocol']}) on {info['hostname']}, "
        f"up {info['uptime_s']} s, rss {info['agent_rss'] / 2**20:.0f} MiB"
    )
    click.echo(
        f"cpus {info['cpus']}, load {info['load'][0]:.2f}, memory "
        f"{info['memory_available'] / gib:.1f}/{info['memory_total'] / gib:.1f} GiB free, "
        f"disk {info['disk_free'] / gib:.1f} GiB free, gpus {len(info['gpus'])}"
    )
    for job in jobs:
        click.echo(
            f"{job['job']}  {job['state']:<10} r{job['revision']}  "
            f"rank {job['rank']}/{job['nnodes']}  {' '.join(job['argv'])}"
        )


def exchange(
    conn: socket.socket, rpc: Any, method: str, params: Any, on_notification: Any = None
) -> Any:
    """Send one request on a blocking socket and return its Response event (error or not);
    notifications that arrive meanwhile go to `on_notification`."""
    from agent.protocol.rpc import CLOSED, NEED_DATA, Notification, Response

    rid, data = rpc.send_request(method, params)
    conn.sendall(data)
    while True:
        event = rpc.next_event()
        if event is NEED_DATA:
            rpc.receive_data(conn.recv(256 * 1024))
        elif event is CLOSED:
            raise ConnectionError(f"agent closed the connection during {method}")
        elif isinstance(event, Notification) and on_notification is not None:
            on_notification(event)
        elif isinstance(event, Response) and event.id == rid:
            return event


def call_once(path: Path, method: str, params: dict[str, Any]) -> Any:
    """One blocking request after hello; enough for this command, which needs no asyncio."""
    from agent.protocol.rpc import Connection, Role

    rpc = Connection(Role.CLIENT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        for name, args in (("hello", rpc.hello_params("launch-agent")), (method, params)):
            response = exchange(conn, rpc, name, args)
            if response.error:
                raise response.error
    return response.result


@main.command()
@_user_opt
@_state_opt
def fsck(user: bool, state: Path | None) -> None:
    """Re-hash every stored object and name each one that does not match (exit 1)."""
    from agent.store import Store

    config = resolve_config(user, None, state)
    store_dir = StatePaths(config.state).store
    if not store_dir.is_dir():
        sys.exit(f"launch-agent fsck: no store at {store_dir} (use --state)")
    bad = 0
    store = Store(store_dir)
    for object_id, problem in store.fsck():
        bad += 1
        click.echo(f"{object_id}: {problem}")
    checked = store.count()
    if bad:
        click.echo(f"fsck: {bad} bad object(s) of {checked}", err=True)
        sys.exit(1)
    click.echo(f"fsck: {checked} objects, all match their names")

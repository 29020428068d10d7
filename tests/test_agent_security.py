"""The agent's security contract (DESIGN.md invariant 6, "Transport and wire"), on real processes.

- Who calls is learnt from the kernel (SO_PEERCRED), never from a message: a job runs as the
  user who submitted it, and only that user (or root) may see, read, stop or forget it.
- No TCP port, ever; and no socket in a directory that someone else could change.
- Malformed, oversized and fuzzed frames cost the sender its connection (or an error), never
  the agent: everyone else keeps being answered and memory stays bounded.
- systemd's readiness and watchdog protocol is spoken; an idle agent costs next to nothing.

Users are acted out by forked children that drop their privileges for good (setgroups,
setgid, setuid) before they connect: the agent sees them exactly as it would see a real login.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import pwd
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from agents import AgentFactory, AgentProc, kill_jobs, wait_for
from conftest import submit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.daemon import call_once, exchange
from agent.protocol import messages
from agent.protocol.errors import (
    ChecksumMismatch,
    InternalError,
    InvalidManifest,
    InvalidParams,
    JobNotFound,
    LaunchError,
    PermissionDenied,
    UnknownMethod,
)
from agent.protocol.objects import Entry, Manifest, blob_id
from agent.protocol.rpc import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    Connection,
    Response,
    Role,
)
from agent.server import PRE_HELLO_MAX_FRAME

REPO = Path(__file__).resolve().parent.parent
LAUNCH_AGENT = Path(sys.executable).parent / "launch-agent"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: creates OS users and runs a system-mode agent"
)
HEADER = struct.Struct(">I")
HELLO = ("hello", {"version": messages.PROTOCOL_VERSION, "client": "test_agent_security"})

# The job of each user: who it runs as and where home is, then stays alive to be acted on.
# A system binary: other users cannot execute anything under /root (the venv's python).
JOB_ARGV = ["/bin/sh", "-c", "id -u; echo $HOME; sleep 30"]


@pytest.fixture
def agents() -> Iterator[AgentFactory]:
    """conftest's `agents` (and so `agent`), rooted in a directory of our own: pytest's
    tmp_path may be removed under a running agent by another pytest run on the same machine
    (tmp_path_retention_policy = "none")."""
    root = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    factory = AgentFactory(root)
    try:
        yield factory
    finally:
        factory.close()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------- helpers: users


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


def _create_user(prefix: str) -> User:
    for _ in range(20):
        name = f"{prefix}-{random.randrange(10_000):04d}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            break
    else:
        raise RuntimeError("no free user name")
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@pytest.fixture
def two_users() -> Iterator[tuple[User, User]]:
    if not IS_ROOT:
        pytest.skip("needs root: creates OS users and runs a system-mode agent")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    made: list[User] = []
    try:
        made.append(_create_user("lt-a"))
        made.append(_create_user("lt-b"))
        yield made[0], made[1]
    finally:
        failures = []
        for user in made:
            # Any process left running as the user would make userdel refuse.
            leftovers = []
            for proc in psutil.process_iter(["uids"]):
                with contextlib.suppress(psutil.Error):
                    if proc.info["uids"] and user.uid in proc.info["uids"]:
                        proc.kill()
                        leftovers.append(proc)
            psutil.wait_procs(leftovers, timeout=10)
            run = subprocess.run(["userdel", "-r", user.name], capture_output=True, text=True)
            with contextlib.suppress(KeyError):
                pwd.getpwnam(user.name)
                failures.append(f"userdel -r {user.name}: {run.stderr.strip()}")
        assert not failures, failures


def as_user(user: User | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in a forked child as `user` (None: stay root); its return value comes back
    pickled through a pipe. The child drops its privileges for good before doing anything, so
    the kernel, not this code, tells the agent who is calling."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_fd)
            if user is not None:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
                assert os.getuid() == os.geteuid() == user.uid
            try:
                payload: Any = ("ok", fn(*args))
            except BaseException as exc:  # everything back to the parent, as plain data
                payload = ("raised", type(exc).__name__, str(exc))
            data = pickle.dumps(payload)
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view) :]
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the child failed before answering"
    outcome = pickle.loads(b"".join(chunks))
    if outcome[0] == "raised":
        raise AssertionError(f"child raised {outcome[1]}: {outcome[2]}")
    return outcome[1]


def session(sock: Path, calls: list[tuple[str, Any]]) -> dict[str, Any]:
    """Make `calls` one after another on one connection (hello included by the caller, so a
    test can send a forged one). Each outcome is ["ok", result] or ["err", code, class name,
    message]; `log` notifications are collected too. Plain data only: it crosses a pipe."""
    rpc = Connection(Role.CLIENT)
    outcomes: list[list[Any]] = []
    logs: list[Any] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        for method, params in calls:
            event = exchange(
                conn,
                rpc,
                method,
                params,
                lambda n: logs.append(n.params) if n.method == "log" else None,
            )
            if event.error is not None:
                err = event.error
                outcomes.append(["err", err.code, type(err).__name__, err.message])
            else:
                outcomes.append(["ok", event.result])
    return {"outcomes": outcomes, "logs": logs}


def calls_as(user: User | None, sock: Path, *calls: tuple[str, Any]) -> list[list[Any]]:
    """hello, then `calls`, as `user`; the outcomes of `calls` (hello must succeed)."""
    result = as_user(user, session, sock, [HELLO, *calls])
    hello, *rest = result["outcomes"]
    assert hello[0] == "ok", hello
    return list(rest)


def ok(outcome: list[Any]) -> Any:
    assert outcome[0] == "ok", f"expected success, got {outcome}"
    return outcome[1]


def refused(outcome: list[Any], error: type[LaunchError] = PermissionDenied) -> None:
    assert outcome[0] == "err", f"expected {error.__name__}, got success: {outcome}"
    assert outcome[1] == error.code and outcome[2] == error.__name__, outcome


def log_text(sock: Path, user: User | None, job: str) -> str:
    result = as_user(user, session, sock, [HELLO, ("logs", {"job": job, "offset": 0})])
    hello, logs_outcome = result["outcomes"]
    ok(hello)
    ok(logs_outcome)
    return b"".join(n["data"] for n in result["logs"] if n["job"] == job).decode()


def submit_as(user: User, sock: Path, job: str, *, start: bool = True) -> list[list[Any]]:
    """Upload a one-file bundle, prepare and (optionally) start JOB_ARGV, all as `user`."""
    data = f"owned by {user.name}\n".encode()
    manifest = Manifest.of([Entry("README", "file", len(data), blob_id(data))])
    calls: list[tuple[str, Any]] = [
        ("put_manifest", {"manifest": manifest.encode()}),
        ("put_blobs", {"blobs": [[blob_id(data), data]]}),
        ("prepare", {"job": job, "bundle": manifest.bundle_id, "argv": JOB_ARGV}),
    ]
    if start:
        calls.append(("start", {"job": job}))
    outcomes = calls_as(user, sock, *calls)
    for outcome in outcomes:
        ok(outcome)
    return outcomes


@pytest.fixture
def system_agent() -> Iterator[AgentProc]:
    """A system-mode agent (root, no --user): socket 0666 in a 0755 directory, state in a
    0755 directory, so every local user can reach it and their jobs can enter their code
    directories, as under /run/launch-agent and /var/lib/launch-agent."""
    if not IS_ROOT:
        pytest.skip("needs root: a system-mode agent")
    base = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    base.chmod(0o755)
    (base / "run").mkdir(mode=0o755)
    (base / "state").mkdir(mode=0o755)
    (base / "run").chmod(0o755)
    (base / "state").chmod(0o755)
    proc = AgentProc(base / "state", base / "run" / "agent.sock", user_mode=False)
    try:
        yield proc.start()
    finally:
        proc.stop()
        kill_jobs(proc.state)
        shutil.rmtree(base, ignore_errors=True)


def agent_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


# -------------------------------------------------------------------- a. users and the kernel


@needs_root
def test_jobs_run_as_their_owner_and_only_owner_or_root_may_touch_them(
    two_users: tuple[User, User], system_agent: AgentProc
) -> None:
    # (two_users first: the agent, and with it every job, is stopped before userdel runs.)
    a, b = two_users
    sock = system_agent.sock
    assert system_agent.call("hello", {"version": messages.PROTOCOL_VERSION})["system"] is True

    submit_as(a, sock, "j-sec-a")
    submit_as(a, sock, "j-sec-a-prepared", start=False)
    submit_as(b, sock, "j-sec-b")

    # A's job runs with A's uid and A's HOME: read back through the protocol, as A.
    text = wait_for(lambda: (t := log_text(sock, a, "j-sec-a")).count("\n") >= 2 and t)
    assert text.splitlines()[:2] == [str(a.uid), a.home], text
    b_text = wait_for(lambda: (t := log_text(sock, b, "j-sec-b")).count("\n") >= 2 and t)
    assert b_text.splitlines()[:2] == [str(b.uid), b.home], b_text
    # ... and the process itself, as the kernel sees it.
    status_a = ok(calls_as(a, sock, ("status", {"job": "j-sec-a"}))[0])
    assert status_a["state"] == "running" and status_a["owner"] == a.uid
    job_procs = psutil.Process(status_a["pid"]).children(recursive=True)
    assert job_procs, "the job has no process under its shim"
    assert {p.uids().real for p in job_procs} == {a.uid}
    assert {p.uids().effective for p in job_procs} == {a.uid}
    assert {p.gids().real for p in job_procs} == {a.gid}

    # Listing: each user sees only their own jobs, even when asking for all users.
    for user, mine in ((a, {"j-sec-a", "j-sec-a-prepared"}), (b, {"j-sec-b"})):
        for params in ({}, {"all_users": True}):
            listed = {j["job"] for j in ok(calls_as(user, sock, ("jobs", params))[0])["jobs"]}
            assert listed == mine, (user.name, params, listed)
        info = ok(calls_as(user, sock, ("node_info", {}))[0])
        assert set(info["my_jobs"]) == mine  # prepared and running jobs are active

    # B may do nothing to A's jobs, whatever it tries.
    b_tries = calls_as(
        b,
        sock,
        ("status", {"job": "j-sec-a"}),
        ("logs", {"job": "j-sec-a", "offset": 0}),
        ("logs", {"job": "j-sec-a", "offset": 0, "follow": True}),
        ("revisions", {"job": "j-sec-a"}),
        ("cancel", {"job": "j-sec-a", "grace_s": 0}),
        ("abort", {"job": "j-sec-a"}),
        ("abort", {"job": "j-sec-a-prepared"}),
        ("start", {"job": "j-sec-a-prepared"}),
        ("cancel", {"job": "j-sec-a-prepared"}),
        ("status", {"job": "j-sec-a-p"}),  # by unique prefix, too
    )
    for outcome in b_tries:
        refused(outcome)
    # None of it had any effect, and no byte of A's log reached B.
    result = as_user(b, session, sock, [HELLO, ("logs", {"job": "j-sec-a", "offset": 0})])
    assert result["logs"] == []
    a_view = calls_as(
        a, sock, ("status", {"job": "j-sec-a"}), ("status", {"job": "j-sec-a-prepared"})
    )
    assert ok(a_view[0])["state"] == "running"
    assert ok(a_view[1])["state"] == "prepared"
    assert psutil.pid_exists(status_a["pid"])

    # The uid comes from the kernel: B claiming to be A changes nothing.
    forged = as_user(
        b,
        session,
        sock,
        [
            ("hello", {"version": messages.PROTOCOL_VERSION, "client": "a", "uid": a.uid}),
            ("hello", {"version": messages.PROTOCOL_VERSION, "client": f"uid={a.uid}"}),
            ("jobs", {"uid": a.uid}),
            ("jobs", {"owner": a.uid, "all_users": True}),
            ("status", {"job": "j-sec-a", "uid": a.uid}),
            ("status", {"job": "j-sec-a"}),
        ],
    )["outcomes"]
    refused(forged[0], InvalidParams)  # there is no uid field to forge
    assert ok(forged[1])["uid"] == b.uid != a.uid
    refused(forged[2], InvalidParams)
    refused(forged[3], InvalidParams)
    refused(forged[4], InvalidParams)
    refused(forged[5], PermissionDenied)
    # Each user's hello names the uid the kernel gave, and root's is 0.
    assert as_user(a, call_once, sock, "hello", {"version": 1})["uid"] == a.uid
    assert as_user(b, call_once, sock, "hello", {"version": 1})["uid"] == b.uid
    assert call_once(sock, "hello", {"version": 1})["uid"] == 0

    # Root can do all of it.
    root = calls_as(
        None,
        sock,
        ("jobs", {"all_users": True}),
        ("status", {"job": "j-sec-a"}),
        ("revisions", {"job": "j-sec-a"}),
        ("abort", {"job": "j-sec-a-prepared"}),
        ("cancel", {"job": "j-sec-a", "grace_s": 5}),
    )
    assert {j["job"] for j in ok(root[0])["jobs"]} >= {"j-sec-a", "j-sec-a-prepared", "j-sec-b"}
    assert ok(root[1])["owner"] == a.uid
    assert len(ok(root[2])["revisions"]) == 1
    assert ok(root[3])["state"] == "aborted"
    assert ok(root[4])["state"] == "cancelled"
    assert log_text(sock, None, "j-sec-a").splitlines()[:2] == [str(a.uid), a.home]
    # B's job was never touched by any of this.
    assert ok(calls_as(b, sock, ("status", {"job": "j-sec-b"}))[0])["state"] == "running"
    # B, owner of its own job, may cancel it.
    assert (
        ok(calls_as(b, sock, ("cancel", {"job": "j-sec-b", "grace_s": 5}))[0])["state"]
        == "cancelled"
    )

    # Someone else cannot even take over a job id that is already used.
    refused(
        calls_as(
            b,
            sock,
            ("prepare", {"job": "j-sec-a", "bundle": "0" * 64, "argv": ["/bin/true"]}),
        )[0],
        PermissionDenied,
    )


# ----------------------------------------------------------------------- b. no TCP, safe dir


def test_agent_and_its_jobs_bind_no_inet_socket(agent: AgentProc) -> None:
    submit(agent, "j-noinet", {"a": b"x"}, ["/bin/sh", "-c", "sleep 30"])
    wait_for(lambda: len(agent_tree(agent.pid)) >= 3)  # agent, shim, job
    for proc in agent_tree(agent.pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            assert proc.net_connections(kind="inet") == [], proc
    # The agent's own sockets: only AF_UNIX ones.
    families = {c.family for c in psutil.Process(agent.pid).net_connections(kind="all")}
    assert families <= {socket.AF_UNIX}, families
    assert agent.call("cancel", {"job": "j-noinet", "grace_s": 1})["state"] == "cancelled"


@needs_root
def test_system_agent_binds_no_inet_socket(system_agent: AgentProc) -> None:
    submit(system_agent, "j-noinet-sys", {"a": b"x"}, ["/bin/sh", "-c", "sleep 30"])
    wait_for(lambda: len(agent_tree(system_agent.pid)) >= 3)
    for proc in agent_tree(system_agent.pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            assert proc.net_connections(kind="inet") == [], proc


def _serve_refused(sock_dir: Path, state: Path) -> str:
    """`launch-agent serve` on a socket in sock_dir must refuse: non-zero, one line, no socket,
    no state touched. Returns that line."""
    sock = sock_dir / "agent.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    run = subprocess.run(
        [str(LAUNCH_AGENT), "serve", "--socket", str(sock), "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert run.returncode != 0
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert str(sock_dir) in lines[0] and "Traceback" not in run.stderr
    assert not sock.exists() and not sock.is_symlink()
    assert os.listdir(sock_dir) == []
    assert not state.exists(), "state was touched before the socket directory was checked"
    return lines[0]


@pytest.mark.parametrize(
    "mode", [0o777, 0o775, 0o1777, 0o757], ids=["0777", "0775", "01777", "0757"]
)
def test_refuses_a_socket_directory_others_can_write(tmp_path: Path, mode: int) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="lw-", dir="/tmp"))
    try:
        sock_dir.chmod(mode)
        assert "writable by group or others" in _serve_refused(sock_dir, tmp_path / "st")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@needs_root
def test_refuses_a_socket_directory_owned_by_someone_else(tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="lw-", dir="/tmp"))
    try:
        sock_dir.chmod(0o755)
        os.chown(sock_dir, 65533, 65533)  # a uid that is neither root nor us
        assert "owned by uid 65533" in _serve_refused(sock_dir, tmp_path / "st")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_accepts_a_socket_directory_only_its_owner_can_write(agents: Any) -> None:
    # The control for the test above: the same agent, a 0755 directory, serves.
    agents.sock_dir.chmod(0o755)
    agent = agents("ok")
    assert agent.call("hello", {"version": 1})["uid"] == os.geteuid()


# --------------------------------------------------------------------------- c. hostile frames


class Raw:
    """A client that writes whatever bytes it likes and reads frames back by hand."""

    def __init__(self, sock: Path, timeout: float = 10.0) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.settimeout(timeout)
        self.conn.connect(str(sock))
        self.buffer = b""
        self.next_id = 1

    def close(self) -> None:
        self.conn.close()

    def send(self, data: bytes) -> None:
        # The agent may hang up before it has read everything: that is one allowed answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.conn.sendall(data)

    def send_frame(self, message: Any) -> None:
        body = msgpack.packb(message, use_bin_type=True)
        self.send(HEADER.pack(len(body)) + body)

    def request(self, method: Any, params: Any) -> int:
        rid = self.next_id
        self.next_id += 1
        self.send_frame([0, rid, method, params])
        return rid

    def read_message(self) -> Any | None:
        """The next message, or None once the agent closed the connection. Times out (fails)
        if the agent neither answers nor closes."""
        while True:
            if len(self.buffer) >= HEADER.size:
                (length,) = HEADER.unpack_from(self.buffer)
                assert length <= DEFAULT_MAX_FRAME
                if len(self.buffer) >= HEADER.size + length:
                    body = self.buffer[HEADER.size : HEADER.size + length]
                    self.buffer = self.buffer[HEADER.size + length :]
                    return msgpack.unpackb(body, raw=False)
            try:
                chunk = self.conn.recv(256 * 1024)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert self.buffer == b"", "the agent closed inside a frame"
                return None
            self.buffer += chunk

    def read_until_closed(self) -> list[Any]:
        out = []
        while (message := self.read_message()) is not None:
            out.append(message)
        return out

    def hello(self) -> None:
        rid = self.request("hello", dict(HELLO[1]))
        response = self.read_message()
        assert response is not None and response[:3] == [1, rid, None], response


def assert_error_response(message: Any, rid: int | None = None) -> int:
    """A well-formed error response (to `rid` if given); returns its code."""
    assert isinstance(message, list) and len(message) == 4 and message[0] == 1, message
    if rid is not None:
        assert message[1] == rid, message
    error = message[2]
    assert isinstance(error, list) and len(error) == 3, message
    assert isinstance(error[0], int) and isinstance(error[1], str), message
    assert message[3] is None
    return error[0]


class WellBehaved:
    """One long-lived, polite connection that must keep getting answers throughout."""

    def __init__(self, sock: Path) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.settimeout(10)
        self.conn.connect(str(sock))
        self.rpc = Connection(Role.CLIENT)
        self.answers = 0
        assert self.call(*HELLO)["version"] == messages.PROTOCOL_VERSION

    def call(self, method: str, params: Any) -> Any:
        rid, data = self.rpc.send_request(method, params)
        self.conn.sendall(data)
        while True:
            event = self.rpc.next_event()
            if event is NEED_DATA:
                self.rpc.receive_data(self.conn.recv(256 * 1024))
            elif event is CLOSED:
                raise AssertionError("the agent closed a well-behaved connection")
            elif isinstance(event, Response) and event.id == rid:
                if event.error:
                    raise event.error
                self.answers += 1
                return event.result

    def check(self) -> None:
        assert self.call("node_info", {})["protocol"] == messages.PROTOCOL_VERSION


@pytest.fixture
def fuzz_target(agents: Any) -> Iterator[tuple[AgentProc, WellBehaved]]:
    agent = agents("fuzz")
    polite = WellBehaved(agent.sock)
    try:
        yield agent, polite
    finally:
        polite.conn.close()


def _msgpack_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=20)
        | st.binary(max_size=20)
    )
    # A named function, not a lambda: hypothesis would parse this file's source to describe a
    # lambda, and CPython 3.11.7 can fail that deep in the stack (gh-106905).
    return st.recursive(scalars, _containers, max_leaves=12)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


VALUES = _msgpack_values()
FIELD_NAMES = sorted(
    {f.name for cls in messages.METHODS.values() for f in dataclasses.fields(cls)} | {"uid"}
)
FUZZ = settings(
    # Bounded for CI; LAUNCH_FUZZ_EXAMPLES=5000 for a longer hunt.
    max_examples=int(os.environ.get("LAUNCH_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_fixed_hostile_frames(fuzz_target: tuple[AgentProc, WellBehaved]) -> None:
    agent, polite = fuzz_target

    def closes_without_answer(payload: bytes, *, after_hello: bool = False) -> None:
        """The agent hangs up on its own (we never close our side)."""
        raw = Raw(agent.sock)
        try:
            if after_hello:
                raw.hello()
            raw.send(payload)
            assert raw.read_until_closed() == []
        finally:
            raw.close()
        polite.check()

    # Oversized announcements: refused on the header alone, before any body is buffered.
    closes_without_answer(HEADER.pack(0xFFFFFFFF))
    closes_without_answer(HEADER.pack(0xFFFFFFFF), after_hello=True)
    closes_without_answer(HEADER.pack(PRE_HELLO_MAX_FRAME + 1) + b"\x00" * 1024)
    closes_without_answer(HEADER.pack(DEFAULT_MAX_FRAME + 1), after_hello=True)
    # Garbage msgpack: a reserved byte, truncated values, trailing bytes, ext types, maps
    # with non-string keys, a bare value instead of a message, absurd nesting.
    for body in (
        b"\xc1",
        b"\x92\x00",
        b"\xdb\xff\xff\xff\xff",
        b"\x94\x00\x01\xa5hello\x80\x00",
        msgpack.packb(msgpack.ExtType(5, b"x")),
        msgpack.packb([0, 1, "hello", msgpack.ExtType(1, b"")]),
        msgpack.packb({1: 2}, strict_types=False),
        msgpack.packb([0, 1, "hello", {1: 2}]),
        msgpack.packb(42),
        msgpack.packb([]),
        msgpack.packb([7, 1, "hello", {}]),
        msgpack.packb([0, -1, "hello", {}]),
        msgpack.packb([0, 1, 5, {}]),
        msgpack.packb([True, 1, "hello", {}]),
        b"\x91" * 60_000 + b"\xc0",
    ):
        closes_without_answer(HEADER.pack(len(body)) + body)
    closes_without_answer(HEADER.pack(1) + b"\xc1", after_hello=True)
    closes_without_answer(HEADER.pack(200_001) + b"\x91" * 200_000 + b"\xc0", after_hello=True)
    # Requests before hello, and a second hello while the first is pending: closed.
    for first in ("node_info", "jobs", "status", "nonexistent"):
        closes_without_answer(_frame([0, 1, first, {}]))
    closes_without_answer(HEADER.pack(0))  # an empty frame is no message
    closes_without_answer(_frame([2, "log", {}]))  # a notification before hello
    closes_without_answer(_frame([1, 1, None, {}]), after_hello=True)  # a response, to a server
    # A stream that ends inside a frame.
    raw = Raw(agent.sock)
    raw.send(HEADER.pack(100) + b"\x00" * 10)
    raw.conn.shutdown(socket.SHUT_WR)
    assert raw.read_until_closed() == []
    raw.close()

    # After hello: an unknown method or bad parameters get an error, and the connection lives.
    bundle = submit_bundle(agent)
    raw = Raw(agent.sock)
    raw.hello()
    cases: list[tuple[Any, Any, type[LaunchError]]] = [
        ("no_such_method", {}, UnknownMethod),
        ("__class__", {}, UnknownMethod),
        ("", {}, UnknownMethod),
        ("status", {"job": 123}, InvalidParams),
        ("status", {}, InvalidParams),
        ("status", [], InvalidParams),
        ("status", None, InvalidParams),
        ("status", {"job": "j-x", "extra": 1}, InvalidParams),
        ("logs", {"job": "j-x", "offset": "0"}, InvalidParams),
        ("logs", {"job": "j-x", "offset": True}, InvalidParams),
        ("logs", {"job": "j-x", "offset": -1}, InvalidParams),
        ("cancel", {"job": "j-x", "grace_s": 1.5}, InvalidParams),
        ("missing", {"blobs": "abc"}, InvalidParams),
        ("missing", {"blobs": [1, 2]}, InvalidParams),
        ("put_blobs", {"blobs": [["a"]]}, InvalidParams),
        ("put_blobs", {"blobs": [["a", "not bytes"]]}, InvalidParams),
        ("put_blobs", {"zipped": b"not zlib"}, InvalidParams),
        ("put_blobs", {"zipped": zlib.compress(b"\x93\x01\x02")}, InvalidParams),  # no list
        ("put_blobs", {"zipped": zlib.compress(msgpack.packb([["a", b"x"]]))}, InvalidManifest),
        ("put_blobs", {"zipped": zlib.compress(b"\x90")[:-3]}, InvalidParams),  # cut short
        ("put_blobs", {"zipped": zlib.compress(b"\x90") + b"more"}, InvalidParams),
        # A small message that inflates past the frame limit is refused, not inflated.
        ("put_blobs", {"zipped": zlib.compress(bytes(DEFAULT_MAX_FRAME + 1), 9)}, InvalidParams),
        ("prepare", {"job": "j-x", "bundle": "b", "argv": []}, InvalidParams),
        ("prepare", {"job": "j-x", "bundle": "b", "argv": "sh"}, InvalidParams),
        ("prepare", {"job": "j-x", "bundle": "b", "argv": ["sh"], "env": {"A": 1}}, InvalidParams),
        ("prepare", {"job": "../../etc", "bundle": bundle, "argv": ["sh"]}, InvalidParams),
        ("prepare", {"job": "j-/../../x", "bundle": bundle, "argv": ["sh"]}, InvalidParams),
        ("prepare", {"job": "j-x", "bundle": "../" * 20, "argv": ["sh"]}, InvalidManifest),
        ("cat", {"id": "../../../etc/passwd"}, InvalidManifest),
        ("status", {"job": "j-nope"}, JobNotFound),
        ("jobs", {"all_users": "yes"}, InvalidParams),
        ("hello", {"version": 1, "uid": 1234}, InvalidParams),
    ]
    for method, params, error in cases:
        rid = raw.request(method, params)
        message = raw.read_message()
        assert message is not None, f"{method} {params!r}: connection closed"
        code = assert_error_response(message, rid)
        assert code == error.code, (method, params, message)
        polite.check()
    raw.close()
    assert agent.proc is not None and agent.proc.poll() is None
    jobs_dir = agent.state / "jobs"
    assert not jobs_dir.exists() or list(jobs_dir.iterdir()) == []  # nothing was prepared
    assert not (agent.state.parent / "etc").exists()


def test_put_blobs_compressed_are_verified_and_stored(agent: AgentProc) -> None:
    """Blobs sent zipped (protocol 2) are stored as any others, each checked against its id;
    one wrong blob refuses the batch."""
    blobs = [f"line {n}\n".encode() * 50 for n in range(40)]
    items = [[blob_id(b), b] for b in blobs]
    zipped = messages.zip_blobs(items)
    assert zipped is not None and len(zipped) < sum(len(b) for b in blobs) / 3
    assert agent.call("put_blobs", {"zipped": zipped}) == {"stored": len(blobs)}
    assert agent.call("missing", {"blobs": [i for i, _ in items]}) == {"missing": []}
    assert agent.call("cat", {"id": items[7][0]})["data"] == blobs[7]

    forged = [[blob_id(b"other"), b"not other"], *[[blob_id(b), b] for b in (b"x", b"y")]]
    with pytest.raises(ChecksumMismatch):
        agent.call("put_blobs", {"zipped": zlib.compress(msgpack.packb(forged))})
    assert agent.call("missing", {"blobs": [blob_id(b"x")]}) == {"missing": [blob_id(b"x")]}


def submit_bundle(agent: AgentProc) -> str:
    data = b"print('hi')\n"
    manifest = Manifest.of([Entry("main.py", "file", len(data), blob_id(data))])
    agent.call("put_manifest", {"manifest": manifest.encode()})
    agent.call("put_blobs", {"blobs": [[blob_id(data), data]]})
    return manifest.bundle_id


def _frame(message: Any) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def test_fuzzed_frames_never_hurt_the_agent(fuzz_target: tuple[AgentProc, WellBehaved]) -> None:
    agent, polite = fuzz_target
    proc = psutil.Process(agent.pid)
    rss_before = proc.memory_info().rss
    answers: dict[str, int] = {"closed": 0, "errors": 0, "results": 0}

    @FUZZ
    @given(data=st.binary(max_size=300), split=st.integers(0, 300), hello_first=st.booleans())
    def raw_bytes(data: bytes, split: int, hello_first: bool) -> None:
        raw = Raw(agent.sock)
        try:
            if hello_first:
                raw.hello()
            raw.send(data[:split])
            raw.send(data[split:])
            raw.conn.shutdown(socket.SHUT_WR)
            for message in raw.read_until_closed():  # never hangs: it ends with a close
                assert_error_response(message)
                answers["errors"] += 1
            answers["closed"] += 1
        finally:
            raw.close()
        polite.check()

    @FUZZ
    @given(
        method=st.sampled_from(sorted(messages.METHODS)) | st.text(max_size=12),
        params=VALUES
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), VALUES, max_size=4),
    )
    def requests_after_hello(method: str, params: Any) -> None:
        raw = Raw(agent.sock)
        try:
            raw.hello()
            rid = raw.request(method, params)
            message = raw.read_message()
            assert message is not None, f"closed on {method!r} {params!r}"
            assert isinstance(message, list) and message[:2] == [1, rid], message
            if message[2] is None:
                answers["results"] += 1
            else:
                code = assert_error_response(message, rid)
                # Bad input is the caller's error, named as such; never the agent's crash.
                assert code != InternalError.code, (method, params, message)
                answers["errors"] += 1
            # The connection still serves this client.
            follow = raw.request("node_info", {})
            reply = raw.read_message()
            assert reply is not None and reply[:3] == [1, follow, None], reply
        finally:
            raw.close()
        polite.check()

    @FUZZ
    @given(frames=st.lists(VALUES, min_size=1, max_size=4), hello_first=st.booleans())
    def arbitrary_messages(frames: list[Any], hello_first: bool) -> None:
        raw = Raw(agent.sock)
        try:
            if hello_first:
                raw.hello()
            for message in frames:
                raw.send(_frame(message))
            raw.conn.shutdown(socket.SHUT_WR)
            for message in raw.read_until_closed():
                assert isinstance(message, list) and len(message) == 4 and message[0] == 1
        finally:
            raw.close()
        polite.check()

    raw_bytes()
    requests_after_hello()
    arbitrary_messages()

    assert agent.proc is not None and agent.proc.poll() is None, "the agent died"
    assert polite.answers >= FUZZ.max_examples
    assert answers["closed"] > 0 and answers["errors"] > 0
    rss_after = proc.memory_info().rss
    print(
        f"\nfuzz: {answers}, polite answers {polite.answers}; agent rss before "
        f"{rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB"
    )
    assert rss_after < rss_before + 50 * 2**20
    # The agent still has nothing to complain about: bad peers are not its failures.
    log = agent.stderr_path.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_many_idle_strangers_do_not_block_others(agent: AgentProc) -> None:
    """Connections that never say hello (or stall inside a frame) hold no one else up."""
    stalled = []
    try:
        for i in range(50):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(agent.sock))
            if i % 2:
                conn.sendall(HEADER.pack(1000) + b"\x00" * 10)  # half a frame, then nothing
            stalled.append(conn)
        started = time.monotonic()
        assert agent.call("node_info", {})["protocol"] == messages.PROTOCOL_VERSION
        assert time.monotonic() - started < 5
    finally:
        for conn in stalled:
            conn.close()
    assert agent.call("node_info", {})["protocol"] == messages.PROTOCOL_VERSION


# ---------------------------------------------------------------------- d. systemd notify


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """Our own directory under /tmp: short enough for socket paths, and out of reach of another
    pytest run's clean-up of its base temp (tmp_path_retention_policy = "none")."""
    path = Path(tempfile.mkdtemp(prefix="ln-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_with_notify(
    tmp_path: Path, extra_env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """The agent (user mode) started by hand with our NOTIFY_SOCKET and `extra_env`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify"), **extra_env)
    sock = tmp_path / "agent.sock"
    args = ["serve", "--user", "--socket", str(sock), "--state", str(tmp_path / "state")]
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        cwd=REPO,
    )
    log.close()
    return proc, listener


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _receive(listener: socket.socket, until: float) -> list[tuple[float, str]]:
    """Datagrams (arrival time, text) until the monotonic deadline."""
    out = []
    while (left := until - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            out.append((time.monotonic(), listener.recv(4096).decode()))
        except TimeoutError:
            break
    return out


def _wait_ready(listener: socket.socket, proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listener.settimeout(deadline - time.monotonic())
        try:
            message = listener.recv(4096).decode()
        except TimeoutError:
            break
        lines = message.split("\n")
        if "READY=1" in lines:
            assert f"MAINPID={proc.pid}" in lines
            return
    raise AssertionError(f"no READY=1: {(tmp_path / 'agent.log').read_text()}")


def test_ready_then_watchdog_pings(private_dir: Path) -> None:
    tmp_path = private_dir
    proc, listener = _start_with_notify(tmp_path, {"WATCHDOG_USEC": "200000"})
    try:
        _wait_ready(listener, proc, tmp_path)
        started = time.monotonic()
        pings = [t for t, m in _receive(listener, started + 1.0) if "WATCHDOG=1" in m.split("\n")]
        assert len(pings) >= 3, pings
        # Half the watchdog period apart (100 ms), not a busy loop.
        assert len(pings) <= 15, len(pings)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        # Sent before it exited, so already queued on our socket.
        rest = [m for _, m in _receive(listener, time.monotonic() + 0.5)]
        assert any("STOPPING=1" in m.split("\n") for m in rest), rest
    finally:
        _stop(proc)
        listener.close()


@pytest.mark.parametrize(
    "extra", [{}, {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}], ids=["unset", "other-pid"]
)
def test_no_watchdog_pings_unless_asked(private_dir: Path, extra: dict[str, str]) -> None:
    tmp_path = private_dir
    proc, listener = _start_with_notify(tmp_path, extra)
    try:
        _wait_ready(listener, proc, tmp_path)
        later = [m for _, m in _receive(listener, time.monotonic() + 1.0)]
        assert not any("WATCHDOG=1" in m.split("\n") for m in later), later
        assert proc.poll() is None
    finally:
        _stop(proc)
        listener.close()


# ------------------------------------------------------------------------------- e. idle cost


def test_idle_agent_costs_nothing(agent: AgentProc, record_property: Any) -> None:
    proc = psutil.Process(agent.pid)
    time.sleep(0.5)  # let start-up settle
    # Its one helper, the fork server (agent/forkserver.py), counts as the agent's cost.
    (server,) = proc.children(recursive=True)
    assert "agent.forkserver" in " ".join(server.cmdline())
    both = (proc, server)
    before = [p.cpu_times() for p in both]
    time.sleep(10)
    after = [p.cpu_times() for p in both]
    cpu = sum((a.user + a.system) - (b.user + b.system) for a, b in zip(after, before, strict=True))
    rss = sum(p.memory_info().rss for p in both)
    record_property("idle_cpu_s", round(cpu, 4))
    record_property("rss_bytes", rss)
    print(
        f"\nidle agent and fork server: {cpu:.3f} s CPU over 10 s, rss {rss / 2**20:.1f} MiB"
        f" (agent {proc.memory_info().rss / 2**20:.1f} MiB)"
    )
    assert proc.children(recursive=True) == [server]
    assert cpu < 0.1, f"an idle agent used {cpu:.3f} s of CPU in 10 s"
    assert rss < 60 * 2**20, f"rss {rss / 2**20:.1f} MiB"

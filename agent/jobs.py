"""Job lifecycle on one node: prepare (code directory and revision 0), start (the shim),
cancel, abort, end, and re-adoption of live jobs after the agent restarts.

States: prepared -> running -> succeeded | failed | cancelled; prepared -> aborted; a job whose
shim vanished without an exit file (the node rebooted) becomes lost. The agent learns that a
shim ended through a pidfd registered with the event loop, so it costs nothing while jobs run
and works as well for a shim it re-adopted as for one it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shlex
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent import secrets
from agent.codedir import read_staged
from agent.forkserver import ForkServer, ForkServerError
from agent.gpus import GpuLedger
from agent.paths import BASE_PATH, JobPaths, StatePaths, helper_env, publish_json, read_json
from agent.protocol.errors import (
    InvalidParams,
    JobNotFound,
    JobStateError,
    LaunchError,
    ObjectMissing,
    PermissionDenied,
)
from agent.protocol.messages import Prepare, Start
from agent.protocol.objects import Manifest, Revision, Source, check_object_id
from agent.revlog import Job, RevLog
from agent.spares import Spares
from agent.store import Store


@dataclass(frozen=True)
class Owner:
    """Who a job runs as, read from the password database by uid (never from a message)."""

    uid: int
    gid: int
    name: str
    home: str
    shell: str

    @classmethod
    def of(cls, uid: int) -> Owner:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise PermissionDenied(f"uid {uid} has no account on this node", uid) from None
        shell = pw.pw_shell if pw.pw_shell and os.access(pw.pw_shell, os.X_OK) else "/bin/sh"
        if shell.endswith(("/nologin", "/false")):
            shell = "/bin/sh"
        return cls(uid, pw.pw_gid, pw.pw_name, pw.pw_dir, shell)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class JobManager:
    def __init__(
        self,
        state: StatePaths,
        store: Store,
        revlog: RevLog,
        hostname: str,
        gpus: GpuLedger | None = None,
        spares: Spares | None = None,
    ) -> None:
        self.state = state
        self.spares = spares
        self.gpus = gpus or GpuLedger(revlog, [])
        self.store = store
        self.revlog = revlog
        self.hostname = hostname
        self.is_root = os.geteuid() == 0
        self._ended: dict[str, asyncio.Event] = {}
        self._pidfds: dict[str, int] = {}
        self._forks = ForkServer(helper_env())
        self._started: set[int] = set()  # shims this agent started (the rest it adopted)
        self._preparing: set[str] = set()
        self._restarting: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        # Set by the daemon (the drift watcher): told when a job runs and when it ends.
        self.on_running: Callable[[str, JobPaths], None] = lambda job_id, paths: None
        self.on_ended: Callable[[str], None] = lambda job_id: None
        self.on_started: Callable[[str], None] = lambda job_id: None

    def adopted(self, job_id: str) -> bool:
        """Whether this agent re-adopted the job at start-up instead of starting it."""
        return self.revlog.get(job_id).shim_pid not in self._started

    def lock(self, job_id: str) -> asyncio.Lock:
        """Held while a job's code directory changes (patch prepare and commit, drift check)."""
        return self._locks.setdefault(job_id, asyncio.Lock())

    # ----------------------------------------------------------------------- access

    def owned(self, job_ref: str, uid: int) -> Job:
        """The job if `uid` may see and act on it (its owner, or root), else JobNotFound-like
        PermissionDenied. Other users' jobs are reported as not theirs, never described."""
        job = self.revlog.resolve(job_ref)
        if uid not in (0, job.owner):
            raise PermissionDenied(f"job {job.id} belongs to another user", job.id)
        return job

    def paths(self, job_id: str) -> JobPaths:
        return self.state.job(job_id)

    # ---------------------------------------------------------------------- prepare

    async def prepare(self, p: Prepare, uid: int) -> dict[str, Any]:
        """Phase one: check every object is here, build the code directory, record r0.

        Idempotent for the same job and bundle, so a launcher may retry after a cut link.
        """
        try:
            existing = self.revlog.get(p.job)
        except JobNotFound:
            existing = None
        if existing is not None:
            if existing.owner != uid and uid != 0:
                raise PermissionDenied(f"job {p.job} belongs to another user", p.job)
            head = self.revlog.head(p.job)
            if existing.state == "prepared" and head.bundle == p.bundle:
                return self._prepared(existing)
            raise JobStateError(f"job {p.job} already exists here ({existing.state})", p.job)

        if p.reason not in ("submit", "rerun"):
            raise InvalidParams(f"prepare: reason {p.reason!r} is not submit or rerun", p.job)
        if p.near:
            check_object_id(p.near, "near bundle")
        owner = Owner.of(uid)
        manifest = self.store.get_manifest(p.bundle)
        missing = self.store.lacks(manifest)
        if missing:
            raise ObjectMissing(missing)
        if p.job in self._preparing:
            raise JobStateError(f"job {p.job} is being prepared by another call", p.job)
        self._preparing.add(p.job)
        try:
            gpus = self.gpus.reserve(p.job, p.gpus, uid)  # Busy, before anything is built
        except BaseException:
            self._preparing.discard(p.job)  # else a retried prepare of this job is refused
            raise
        try:
            paths = self.paths(p.job)
            await asyncio.to_thread(self._build_code_dir, paths, manifest, uid, p.near)
        except BaseException:
            self.gpus.release(p.job)
            raise
        finally:
            self._preparing.discard(p.job)
        if self.is_root:
            for owned in (paths.outputs, paths.metrics_dir):
                os.chown(owned, owner.uid, owner.gid)
        recorded_env, secret_env = secrets.split(dict(p.env))
        secret_env = {k: v for k, v in secret_env.items() if v != secrets.REDACTED}
        redacted = [k for k, v in p.env.items() if secrets.is_secret(k) and v == secrets.REDACTED]
        # A rerun: the secret values of the job it repeats, kept on that job's nodes only (a
        # rerun without secrets may run anywhere).
        if p.env_from and redacted:
            try:
                source = self.owned(p.env_from, uid)
            except JobNotFound:
                raise InvalidParams(
                    f"{p.env_from} did not run here: its values of {', '.join(sorted(redacted))}"
                    " are kept only on its own nodes (rerun it there, or submit with --env)",
                    p.job,
                ) from None
            secret_env = {**secrets.load(self.paths(source.id).secrets), **secret_env}
        now = time.time_ns()
        revision = Revision(
            job=p.job,
            number=0,
            parent=None,
            bundle=p.bundle,
            reason=p.reason,
            author=p.author or f"{owner.name}@{self.hostname}",
            at_ns=now,
            paths=(),
            message=p.message,
            step=None,
            source=Source.from_wire(p.source),
        ).check()
        job = Job(
            id=p.job,
            owner=uid,
            name=p.name,
            argv=list(p.argv),
            env=recorded_env,
            rank=p.rank,
            nnodes=p.nnodes,
            peers=list(p.peers),
            state="prepared",
            head=0,
            created_ns=now,
            login=p.login,
            gpus=len(gpus),
        )
        secrets.save(paths.secrets, secret_env)
        if p.init_from:
            self.revlog.add_fact(p.job, "init_from", p.init_from)
        if p.data:
            self.revlog.add_fact(p.job, "data_request", {"dirs": p.data, "hash": p.data_hash})
        self.publish_revision(paths, revision)
        self.revlog.create_job(job, revision)
        return self._prepared(job)

    def warm_up(self) -> None:
        """Start the fork server now, from the event loop's thread, so that no job's start
        waits for a new interpreter (about 40 ms of CPU): not even the first after boot."""
        self._forks.start()

    def _build_code_dir(
        self, paths: JobPaths, manifest: Manifest, owner: int, near: str = ""
    ) -> None:
        self.state.jobs.mkdir(mode=0o711, exist_ok=True)
        if paths.root.exists():
            # Left by a prepare that crashed before it was recorded.
            _remove_tree(paths.root)
        paths.root.mkdir(mode=0o711)
        staging = paths.root / ".code.tmp"
        if self.spares is None or not self.spares.fill(staging, manifest, owner, near):
            self.store.materialize(manifest, staging)
        staging.rename(paths.code)
        paths.outputs.mkdir(mode=0o755)
        paths.metrics_dir.mkdir(mode=0o755)

    def _prepared(self, job: Job) -> dict[str, Any]:
        return {
            "job": job.id,
            "bundle": self.revlog.head(job.id).bundle,
            "port": free_port(),
            "code_dir": str(self.paths(job.id).code),
        }

    def publish_revision(self, paths: JobPaths, revision: Revision) -> None:
        publish_json(
            paths.revision,
            {
                "job": revision.job,
                "revision": revision.number,
                "bundle": revision.bundle,
                "paths": list(revision.paths),
                "reason": revision.reason,
            },
        )

    # ------------------------------------------------------------------------ start

    def start(self, p: Start, uid: int) -> dict[str, Any]:
        """Phase two: start the shim of a prepared job."""
        job = self.owned(p.job, uid)
        if job.state == "running":
            return self.status(job.id)  # a retried start is harmless
        if job.state != "prepared":
            raise JobStateError(f"job {job.id} is {job.state}; only a prepared job starts", job.id)
        held = self.gpus.confirm(job.id)
        if len(held) != job.gpus:  # the reservation expired and the GPUs went to others
            self.gpus.reserve(job.id, job.gpus)  # Busy if they are still taken
            self.gpus.confirm(job.id)
        self.revlog.update(job.id, master_addr=p.master_addr, master_port=p.master_port)
        job = self.revlog.get(job.id)
        self._spawn(job)
        return self.status(job.id)

    def _spawn(self, job: Job) -> None:
        paths = self.paths(job.id)
        owner = Owner.of(job.owner)
        head = self.revlog.head(job.id)
        variables = self._job_variables(job, paths, head)
        overlay = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(variables.items()))
        # The overlay may hold secrets passed with --env: only the job's owner reads it.
        paths.env_overlay.unlink(missing_ok=True)
        fd = os.open(paths.env_overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            if self.is_root:
                os.fchown(fd, owner.uid, owner.gid)
            f.write(overlay)
        base_env = {
            "HOME": owner.home,
            "USER": owner.name,
            "LOGNAME": owner.name,
            "SHELL": owner.shell,
            "PATH": BASE_PATH,
            "LANG": "C.UTF-8",
        }
        # The login shell reads the owner's profile (PATH, modules, conda), then the overlay
        # puts the submitter's values and ours on top, then execs the command itself. Without
        # login, /bin/sh reads no profile at all: only the base environment and the overlay.
        shell = [owner.shell, "-lc"] if job.login else ["/bin/sh", "-c"]
        command = [*shell, '. "$0" && exec "$@"', str(paths.env_overlay), *job.argv]
        spec: dict[str, Any] = {"command": command, "env": base_env, "cwd": str(paths.code)}
        if self.is_root:
            spec.update(uid=owner.uid, gid=owner.gid, groups=os.getgrouplist(owner.name, owner.gid))
        publish_json(paths.spec, spec, mode=0o600)
        for stale in (paths.exit, paths.shim, paths.cancel):
            stale.unlink(missing_ok=True)
        try:
            pid, create_time, pidfd = self._forks.spawn(paths.root)
        except ForkServerError as exc:
            raise JobStateError(f"cannot start the shim of job {job.id}: {exc}", job.id) from None
        self._started.add(pid)
        self.revlog.update(
            job.id,
            state="running",
            started_ns=time.time_ns(),
            shim_pid=pid,
            shim_start=create_time,
            start_revision=head.number,
        )
        self._watch(job.id, pid, pidfd)
        self.on_started(job.id)

    def job_variables(self, job_id: str) -> dict[str, str]:
        """The variables the job's command gets on top of its login environment."""
        job = self.revlog.get(job_id)
        return self._job_variables(job, self.paths(job_id), self.revlog.head(job_id))

    def _init_from_path(self, job: Job) -> str:
        """LAUNCH_INIT_FROM: where the parent artifact is on this node ("" if not here)."""
        facts = self.revlog.facts(job.id, "init_from")
        if not facts:
            return ""
        parent = facts[-1]["data"]
        try:
            path = self.paths(str(parent.get("job", ""))).outputs / str(parent.get("path", ""))
        except LaunchError:
            return ""
        return str(path) if path.exists() else ""

    def _job_variables(self, job: Job, paths: JobPaths, head: Revision) -> dict[str, str]:
        master_addr = job.master_addr or "127.0.0.1"
        master_port = str(job.master_port or 29500)
        ours = {
            "LAUNCH_JOB": job.id,
            "LAUNCH_REVISION": str(head.number),
            "LAUNCH_BUNDLE": head.bundle,
            "LAUNCH_CODE_DIR": str(paths.code),
            "LAUNCH_OUTPUT_DIR": str(paths.outputs),
            "LAUNCH_NODE_RANK": str(job.rank),
            "LAUNCH_NUM_NODES": str(job.nnodes),
            "LAUNCH_RESTART_COUNT": str(job.restart_count),
            "LAUNCH_REVISION_FILE": str(paths.revision),
            "LAUNCH_METRICS_FILE": str(paths.metrics),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": master_port,
            "NNODES": str(job.nnodes),
            "NODE_RANK": str(job.rank),
            "PET_MASTER_ADDR": master_addr,
            "PET_MASTER_PORT": master_port,
            "PET_NNODES": str(job.nnodes),
            "PET_NODE_RANK": str(job.rank),
            # Only this job's GPUs are visible to it (none: an empty list hides them all).
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus.of(job.id))),
            "LAUNCH_GPUS": ",".join(map(str, self.gpus.of(job.id))),
            "LAUNCH_INIT_FROM": self._init_from_path(job),
        }
        # Live logs by default; a submitter may still choose otherwise with --env. The
        # runtime helper (launch_runtime) is importable, before the submitter's own path.
        pythonpath = ":".join(p for p in (str(self.state.runtime), job.env.get("PYTHONPATH")) if p)
        env = {**job.env, **secrets.load(paths.secrets)}  # the recorded env has them redacted
        # No bytecode caches: a job running as root could write __pycache__/ into its code
        # directory on import, and the drift watcher would rightly record that as a revision.
        defaults = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        return {**defaults, **env, "PYTHONPATH": pythonpath, **ours}

    # ------------------------------------------------------------------- ending

    def _watch(self, job_id: str, pid: int, fd: int | None = None) -> None:
        """Call _on_shim_exit when the shim ends, through a pidfd (given, or opened here) on
        the event loop."""
        self._ended[job_id] = asyncio.Event()  # a fresh one: a restarted job ends anew
        if fd is None:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._on_shim_exit(job_id)
                return
        self._pidfds[job_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._on_shim_exit, job_id)
        self.on_running(job_id, self.paths(job_id))

    def _on_shim_exit(self, job_id: str) -> None:
        self.on_ended(job_id)
        fd = self._pidfds.pop(job_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        job = self.revlog.get(job_id)
        self._finalise(job)
        self._ended.setdefault(job_id, asyncio.Event()).set()

    def _finalise(self, job: Job) -> None:
        """Record how a job whose shim is gone ended, from its exit file."""
        result = read_json(self.paths(job.id).exit)
        if result is None:
            state, code, sig = "lost", None, None
        else:
            code, sig = result.get("code"), result.get("signal")
            if result.get("cancelled"):
                state = "cancelled"
            else:
                state = "succeeded" if code == 0 else "failed"
        ended = (result or {}).get("ended_ns") or time.time_ns()
        self.revlog.update(job.id, state=state, exit_code=code, exit_signal=sig, ended_ns=ended)
        if job.id not in self._restarting:
            self.gpus.release(job.id)

    async def wait_ended(self, job_id: str) -> None:
        job = self.revlog.get(job_id)
        if not job.active:
            return
        await self._ended.setdefault(job_id, asyncio.Event()).wait()

    # ------------------------------------------------------------------ cancel, abort

    async def cancel(self, job_ref: str, uid: int, grace_s: int) -> dict[str, Any]:
        job = self.owned(job_ref, uid)
        if job.state == "prepared":
            return self.abort(job.id, uid)
        if job.state != "running":
            return self.status(job.id)
        paths = self.paths(job.id)
        publish_json(paths.cancel, {"grace_s": max(0, grace_s)})
        shim = self._live_shim(job)
        if shim is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                shim.terminate()
        await self.wait_ended(job.id)
        return self.status(job.id)

    async def restart(self, job_id: str, grace_s: int = 10) -> None:
        """Stop the running job gracefully (SIGTERM, grace, SIGKILL), then start it again from
        its head revision with LAUNCH_RESTART_COUNT one higher; a job that had ended simply
        starts again (resume)."""
        job = self.revlog.get(job_id)
        if job.state == "running":
            publish_json(self.paths(job_id).cancel, {"grace_s": max(0, grace_s)})
            shim = self._live_shim(job)
            self._restarting.add(job_id)  # its GPUs stay held across the restart
            try:
                if shim is not None:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        shim.terminate()
                await self.wait_ended(job_id)
            finally:
                self._restarting.discard(job_id)
        else:  # a resume: the job ended and gave its GPUs back; take them again
            self.gpus.reserve(job_id, job.gpus)
            self.gpus.confirm(job_id)
        self.revlog.update(
            job_id,
            restart_count=job.restart_count + 1,
            exit_code=None,
            exit_signal=None,
            ended_ns=None,
        )
        self._spawn(self.revlog.get(job_id))

    def signal_job(self, job_id: str, signum: int) -> bool:
        """Send signum to the job's main process group (the shim's direct child)."""
        job = self.revlog.get(job_id)
        shim = self._live_shim(job)
        if shim is None:
            return False
        for child in shim.children():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signum)
        return True

    def abort(self, job_ref: str, uid: int) -> dict[str, Any]:
        """Forget a job that was prepared but never started (the other phase failed)."""
        job = self.owned(job_ref, uid)
        if job.state != "prepared":
            raise JobStateError(f"job {job.id} is {job.state}; only a prepared job aborts", job.id)
        _remove_tree(self.paths(job.id).code)
        self.revlog.update(job.id, state="aborted", ended_ns=time.time_ns())
        self.gpus.release(job.id)
        return self.status(job.id)

    def _live_shim(self, job: Job) -> psutil.Process | None:
        """The job's shim if that very process still runs (pid and start time both match)."""
        if job.shim_pid is None:
            return None
        try:
            proc = psutil.Process(job.shim_pid)
            if job.shim_start is not None and abs(proc.create_time() - job.shim_start) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None

    # ---------------------------------------------------------------------- recovery

    def recover(self) -> dict[str, int]:
        """At start-up: re-adopt live shims, finalise jobs that ended meanwhile, mark the rest
        lost. A pid now used by an unrelated process is not adopted (start time differs)."""
        counts = {"adopted": 0, "finalised": 0, "lost": 0}
        for job in self.revlog.jobs(states=("running",)):
            if job.shim_pid is None:
                published = read_json(self.paths(job.id).shim) or {}
                if published.get("pid"):
                    self.revlog.update(
                        job.id, shim_pid=published["pid"], shim_start=published.get("create_time")
                    )
                    job = self.revlog.get(job.id)
            if self._live_shim(job) is not None:
                assert job.shim_pid is not None
                self._watch(job.id, job.shim_pid)
                counts["adopted"] += 1
            else:
                self._finalise(job)
                counts["finalised" if self.revlog.get(job.id).state != "lost" else "lost"] += 1
        return counts

    def close(self) -> None:
        self._forks.close()
        loop = asyncio.get_running_loop()
        for fd in self._pidfds.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._pidfds.clear()

    # ------------------------------------------------------------------------ views

    def status(self, job_id: str) -> dict[str, Any]:
        job = self.revlog.get(job_id)
        head = self.revlog.head(job_id)
        return {
            "job": job.id,
            "name": job.name,
            "owner": job.owner,
            "state": job.state,
            "revision": job.head,
            "bundle": head.bundle,
            "argv": job.argv,
            "rank": job.rank,
            "nnodes": job.nnodes,
            "pid": job.shim_pid,
            "exit_code": job.exit_code,
            "signal": job.exit_signal,
            "created_ns": job.created_ns,
            "started_ns": job.started_ns,
            "ended_ns": job.ended_ns,
            "restart_count": job.restart_count,
            "staged": staged.number if (staged := read_staged(self.paths(job.id))) else None,
            "staged_bundle": staged.bundle if staged else None,
            "env": job.env,
            "login": job.login,
            "gpus": self.gpus.of(job.id),
            "node": self.hostname,
        }


def _remove_tree(path: Path) -> None:
    """Remove a tree the agent created (its directories are writable by the agent; rmtree
    never follows a symlink out of it)."""
    shutil.rmtree(path, ignore_errors=not path.exists())

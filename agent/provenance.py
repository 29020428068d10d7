"""What produced a file: artifacts (recorded when the job closes them, hashed in the
background, with a sidecar NAME.launch.json beside each), the job's environment at every
start (interpreter, packages, machine, GPUs, environment with secrets redacted), fingerprints
of its input data, and the artifact it was initialised from.

The agent runs as root and the output and data directories belong to users, so everything
here reads and writes as the user would: artifacts and sidecars through directory descriptors
that refuse symlinks; data fingerprints and the environment probe in processes that run as
the job's user.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent import secrets
from agent.jobs import JobManager, Owner
from agent.patches import last_step
from agent.paths import JobPaths
from agent.revlog import Job, RevLog
from agent.store import DIR_FLAGS, open_dir, safe_component

SIDECAR = ".launch.json"
# The environment probe runs the job's interpreter (~0.2 s of CPU) at the lowest nice value:
# on a node starting its jobs it yields to them (weight 15 against 1024), yet it is not starved
# for good by a job that keeps every core busy, as SCHED_IDLE could be.
NICE = ["nice", "-n", "19"] if shutil.which("nice") else []
PROBE = (
    "import json, sys, importlib.metadata as m; print(json.dumps({'version': sys.version, "
    "'executable': sys.executable, 'packages': sorted(f\"{d.metadata['Name']}=={d.version}\" "
    "for d in m.distributions() if d.metadata['Name'])}))"
)


# --------------------------------------------------------------------------- artifacts


def record_artifact(jobs: JobManager, revlog: RevLog, job_id: str, rel: str) -> bool:
    """Hash output file `rel` of the job (never following a symlink) and record it with the
    step and revisions live now; then write its sidecar. False if it is gone or not a file."""
    if rel.endswith(SIDECAR) or "/." in f"/{rel}":
        return False  # our own sidecars, and hidden temp files of atomic writers
    job = revlog.get(job_id)
    paths = jobs.paths(job_id)
    parts = rel.split("/")
    try:
        root = os.open(paths.outputs, DIR_FLAGS)
    except OSError:
        return False
    try:
        parent = open_dir(root, parts[:-1])
    except (OSError, ValueError):
        return False
    finally:
        os.close(root)
    try:
        fd = os.open(safe_component(parts[-1]), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError:
        os.close(parent)
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if _being_written(job, st):
            return False  # a writer still has it open: its close records it
        with open(fd, "rb", buffering=0, closefd=False) as f:
            digest = hashlib.file_digest(f, "sha256")
        head = revlog.get(job_id).head
        since = list(range(job.start_revision, head + 1))
        sha256, step = digest.hexdigest(), last_step(paths)
        record: dict[str, Any] = {
            "job": job_id,
            "node": jobs.hostname,
            "rank": job.rank,
            "path": rel,
            "size": st.st_size,
            "sha256": sha256,
            "step": step,
            "revision": head,
            "revisions_since_start": since,
            "bundle": revlog.revision(job_id, head).bundle,
            "closed_ns": time.time_ns(),
        }
        revlog.add_artifact(
            job_id,
            rel,
            record["closed_ns"],
            st.st_size,
            sha256,
            step,
            head,
            since,
        )
        _write_sidecar(parent, parts[-1] + SIDECAR, record, job.owner if jobs.is_root else None)
        return True
    finally:
        os.close(fd)
        os.close(parent)


def _being_written(job: Job, st: os.stat_result) -> bool:
    """Whether a process of the job has this very file (device, inode) open for writing.
    Hashing it now would record a partial file and compete with the writer."""
    if job.shim_pid is None:
        return False
    try:
        shim = psutil.Process(job.shim_pid)
        if job.shim_start is not None and abs(shim.create_time() - job.shim_start) > 0.01:
            return False  # that pid is another process now: the job has ended
        procs = [shim, *shim.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.stat(f"/proc/{proc.pid}/fd/{fd}")
                if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{proc.pid}/fdinfo/{fd}") as f:
                    flags = next(line for line in f if line.startswith("flags:")).split()[1]
            except (OSError, StopIteration, IndexError):
                continue
            if int(flags, 8) & (os.O_WRONLY | os.O_RDWR):
                return True
    return False


def _write_sidecar(dir_fd: int, name: str, record: dict[str, Any], owner: int | None) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, json.dumps(record, indent=2, sort_keys=True).encode())
        if owner is not None:
            os.fchown(fd, owner, -1)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


# ------------------------------------------------------------------------- environment


def record_environment(jobs: JobManager, revlog: RevLog, job_id: str) -> dict[str, Any]:
    """The machine and interpreter the job runs on, at this start; secrets redacted."""
    job = revlog.get(job_id)
    paths = jobs.paths(job_id)
    owner = Owner.of(job.owner)
    variables = jobs.job_variables(job_id)
    fact: dict[str, Any] = {
        "restart": job.restart_count,
        "revision": job.head,
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "gpus": jobs.gpus.describe(),
        "env": secrets.redact(variables),
        "argv": job.argv,
        "python": _probe_python(job.argv, owner, paths, variables, jobs.is_root),
    }
    revlog.add_fact(job_id, "environment", fact)
    return fact


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _probe_python(
    argv: list[str], owner: Owner, paths: JobPaths, variables: dict[str, str], as_root: bool
) -> dict[str, Any] | None:
    """Version, executable and installed packages of the interpreter the job runs, asked of
    that interpreter itself, as the job's user, in the job's environment."""
    python = argv[0] if "python" in os.path.basename(argv[0]) else "python3"
    env = {
        "HOME": owner.home,
        "USER": owner.name,
        "PATH": variables.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        **variables,
    }
    kwargs: dict[str, Any] = {}
    if as_root:
        kwargs = {
            "user": owner.uid,
            "group": owner.gid,
            "extra_groups": os.getgrouplist(owner.name, owner.gid),
        }
    try:
        out = subprocess.run(
            # At low priority: the record must never slow the jobs the node is starting.
            [
                *NICE,
                "/bin/sh",
                "-c",
                '. "$0" && exec "$@"',
                str(paths.env_overlay),
                python,
                "-c",
                PROBE,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=paths.code,
            env=env,
            check=True,
            **kwargs,
        ).stdout
        value = json.loads(out.strip().splitlines()[-1])
        return value if isinstance(value, dict) else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# -------------------------------------------------------------------------------- data


def fingerprint_data(
    jobs: JobManager, revlog: RevLog, job_id: str, dirs: list[str], with_hash: bool
) -> None:
    """File list (size, mtime, and with_hash the SHA-256) of each input directory, read as the
    job's user: a fingerprint never shows what its owner could not read."""
    job = revlog.get(job_id)
    owner = Owner.of(job.owner)
    result = run_as(owner if jobs.is_root else None, _walk_all, dirs, with_hash)
    revlog.add_fact(job_id, "data", result)


def _walk_all(dirs: list[str], with_hash: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for top in dirs:
        files = []
        error = ""
        try:
            for dirpath, dirnames, filenames in os.walk(top, onerror=_raise):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    st = os.lstat(full)
                    row: list[Any] = [os.path.relpath(full, top), st.st_size, st.st_mtime_ns]
                    if with_hash and stat.S_ISREG(st.st_mode):
                        row.append(_sha256_file(full))
                    files.append(row)
        except OSError as exc:
            error = f"{exc.strerror}: {exc.filename}"
        out[top] = {
            "files": files,
            "count": len(files),
            "bytes": sum(f[1] for f in files),
            "error": error,
        }
    return out


def _raise(exc: OSError) -> None:
    raise exc


def _sha256_file(path: str) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_as(owner: Owner | None, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a forked child running as `owner` (None: as we are); its JSON result."""
    if owner is None:
        return fn(*args)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, compute, report, leave
        try:
            os.close(read_fd)
            os.setgroups(os.getgrouplist(owner.name, owner.gid))
            os.setgid(owner.gid)
            os.setuid(owner.uid)
            data = json.dumps(fn(*args)).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view) :]
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as f:
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": "fingerprint failed"}
    return json.loads(b"".join(chunks))

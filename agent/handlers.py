"""One function per protocol method. Each receives the agent, the caller as the kernel named
it (SO_PEERCRED), the validated parameters, and a way to send notifications.

A handler raises LaunchError subclasses for refusals; server.py turns them into wire errors.
Work that blocks on the disk for long (storing blobs, building a code directory) runs in a
worker thread; the revision log is only touched from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from agent import __version__, patches
from agent import metrics as metrics_mod
from agent.jobs import JobManager, Owner
from agent.paths import StatePaths, check_job_id
from agent.protocol import messages as m
from agent.protocol.errors import InvalidParams, JobNotFound
from agent.protocol.objects import Entry, Manifest, check_object_id, from_delta, object_kind
from agent.protocol.rpc import DEFAULT_MAX_FRAME, negotiate
from agent.revlog import ACTIVE, RevLog
from agent.store import Store

Notify = Callable[[str, Any], Awaitable[None]]
LOG_CHUNK = 256 * 1024
LOG_POLL_S = 0.1
GET_BLOBS_MAX = 32 * 2**20


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int


@dataclass
class Agent:
    """Everything a handler may use; built once by the daemon."""

    state: StatePaths
    store: Store
    revlog: RevLog
    jobs: JobManager
    hostname: str
    system: bool
    started: float = field(default_factory=time.time)


async def hello(agent: Agent, caller: Caller, p: m.Hello, notify: Notify) -> Any:
    return {
        "version": negotiate(p.version),
        "agent": __version__,
        "node": agent.hostname,
        "uid": caller.uid,
        "system": agent.system,
    }


async def node_info(agent: Agent, caller: Caller, p: m.NodeInfo, notify: Notify) -> Any:
    mem = psutil.virtual_memory()
    disk = shutil.disk_usage(agent.state.root)
    addresses = sorted(
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET
    )
    running = agent.revlog.jobs(states=ACTIVE)
    return {
        "agent": __version__,
        "protocol": m.PROTOCOL_VERSION,
        "hostname": agent.hostname,
        "addresses": addresses,
        "cpus": os.cpu_count(),
        "load": list(os.getloadavg()),
        "memory_total": mem.total,
        "memory_available": mem.available,
        "disk_free": disk.free,
        "gpus": agent.jobs.gpus.describe(),
        "jobs_running": len(running),
        "my_jobs": [j.id for j in running if caller.uid in (0, j.owner)],
        "uptime_s": int(time.time() - agent.started),
        "agent_rss": psutil.Process().memory_info().rss,
    }


async def missing(agent: Agent, caller: Caller, p: m.Missing, notify: Notify) -> Any:
    return {"missing": agent.store.missing(p.blobs)}


async def put_blobs(agent: Agent, caller: Caller, p: m.PutBlobs, notify: Notify) -> Any:
    def store() -> int:
        items = m.unzip_blobs(p.zipped, DEFAULT_MAX_FRAME) if p.zipped else []
        return agent.store.put_many([*items, *m.blob_items(p.blobs)])

    return {"stored": await asyncio.to_thread(store)}


async def put_manifest(agent: Agent, caller: Caller, p: m.PutManifest, notify: Notify) -> Any:
    puts: list[Entry] = []
    if p.base:
        base = agent.store.get_manifest(check_object_id(p.base, "base bundle"))
        manifest, encoded, puts = from_delta(base, p.puts, p.deletes, p.bundle)
        if p.blobs:
            await asyncio.to_thread(agent.store.put_many, m.blob_items(p.blobs))
    else:
        manifest, encoded = Manifest.decode(p.manifest), p.manifest
    # Validated either way: no need to decode again to store it.
    bundle = agent.store.put_manifest(manifest, encoded=encoded)
    return {"bundle": bundle, "missing": agent.store.lacks(manifest, p.base, puts)}


async def prepare(agent: Agent, caller: Caller, p: m.Prepare, notify: Notify) -> Any:
    if not p.argv:
        raise InvalidParams("prepare: empty command")
    return await agent.jobs.prepare(p, caller.uid)


async def start(agent: Agent, caller: Caller, p: m.Start, notify: Notify) -> Any:
    return agent.jobs.start(p, caller.uid)


async def abort(agent: Agent, caller: Caller, p: m.Abort, notify: Notify) -> Any:
    try:
        return agent.jobs.abort(p.job, caller.uid)
    except JobNotFound:
        # Prepare never got as far as the job: give back what `reserve` held for it (only
        # the caller's own reservation; root may give back any).
        agent.jobs.gpus.release(check_job_id(p.job), None if caller.uid == 0 else caller.uid)
        return {}


async def reserve(agent: Agent, caller: Caller, p: m.Reserve, notify: Notify) -> Any:
    return {"gpus": agent.jobs.gpus.reserve(check_job_id(p.job), p.gpus, caller.uid)}


async def cancel(agent: Agent, caller: Caller, p: m.Cancel, notify: Notify) -> Any:
    return await agent.jobs.cancel(p.job, caller.uid, p.grace_s)


async def jobs(agent: Agent, caller: Caller, p: m.Jobs, notify: Notify) -> Any:
    owner = None if (caller.uid == 0 and p.all_users) else caller.uid
    return {"jobs": [agent.jobs.status(j.id) for j in agent.revlog.jobs(owner=owner)]}


async def status(agent: Agent, caller: Caller, p: m.Status, notify: Notify) -> Any:
    return agent.jobs.status(agent.jobs.owned(p.job, caller.uid).id)


async def revisions(agent: Agent, caller: Caller, p: m.Revisions, notify: Notify) -> Any:
    job = agent.jobs.owned(p.job, caller.uid)
    return {"revisions": [r.encode() for r in agent.revlog.revisions(job.id)]}


async def logs(agent: Agent, caller: Caller, p: m.Logs, notify: Notify) -> Any:
    """Send the log from p.offset as `log` notifications; with follow, until the job ends.

    Offsets are byte positions in the log file, so a client that reconnects with the last
    offset it saw continues exactly there: no line lost, none repeated.
    """
    if p.offset < 0:
        raise InvalidParams("logs: offset must be >= 0")
    job = agent.jobs.owned(p.job, caller.uid)
    path = agent.jobs.paths(job.id).log
    offset = p.offset
    while True:
        # Read the state before the data: whatever was written before the job ended is
        # then read before we stop.
        ended = not agent.revlog.get(job.id).active
        chunk = await asyncio.to_thread(_read_at, path, offset)
        if chunk:
            await notify("log", {"job": job.id, "offset": offset, "data": chunk})
            offset += len(chunk)
            continue
        if ended or not p.follow:
            return {"offset": offset, "state": agent.revlog.get(job.id).state}
        await _wait_more(agent, job.id)


def _read_at(path: os.PathLike[str], offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


async def _wait_more(agent: Agent, job_id: str) -> None:
    """Until the log may have grown: a short poll while someone follows (never when idle),
    cut short when the job ends."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(agent.jobs.wait_ended(job_id), LOG_POLL_S)


async def cat(agent: Agent, caller: Caller, p: m.Cat, notify: Notify) -> Any:
    object_id = agent.store.resolve(p.id)
    data = agent.store.get(object_id)
    return {"id": object_id, "kind": object_kind(data), "data": data}


async def patch_prepare(agent: Agent, caller: Caller, p: m.PatchPrepare, notify: Notify) -> Any:
    author = f"{Owner.of(caller.uid).name}@{agent.hostname}"
    return await patches.prepare(agent.jobs, agent.store, agent.revlog, p, caller.uid, author)


async def patch_commit(agent: Agent, caller: Caller, p: m.PatchCommit, notify: Notify) -> Any:
    return await patches.commit(agent.jobs, agent.revlog, p, caller.uid)


async def patch_abort(agent: Agent, caller: Caller, p: m.PatchAbort, notify: Notify) -> Any:
    return patches.abort(agent.jobs, p, caller.uid)


async def get_blobs(agent: Agent, caller: Caller, p: m.GetBlobs, notify: Notify) -> Any:
    """Stored blobs by id. Any local user may read blobs by id, as with `cat`: an id is
    only known to whoever had the content (or its manifest) in the first place."""
    total = 0
    out: list[list[Any]] = []
    for object_id in p.blobs:
        data = await asyncio.to_thread(agent.store.get, check_object_id(object_id, "blob id"))
        total += len(data)
        if total > GET_BLOBS_MAX and out:
            break  # the client asks again for the rest
        out.append([object_id, data])
    return {"blobs": out}


async def metrics(agent: Agent, caller: Caller, p: m.Metrics, notify: Notify) -> Any:
    job = agent.jobs.owned(p.job, caller.uid)
    metrics_mod.ingest(agent.revlog, agent.jobs.paths(job.id), job.id)
    return metrics_mod.series(agent.revlog, job.id, p.buckets)


async def find_artifacts(agent: Agent, caller: Caller, p: m.FindArtifacts, notify: Notify) -> Any:
    if p.job:
        job = agent.jobs.owned(p.job, caller.uid)
        rows = agent.revlog.artifacts(job_id=job.id)
        rows = [r for r in rows if not p.path or r["path"] == p.path]
    else:
        rows = agent.revlog.artifacts(sha256=p.sha256.lower())
    out = []
    for row in rows:
        job = agent.revlog.get(row["job"])
        if caller.uid in (0, job.owner):
            out.append({**row, "node": agent.hostname, "rank": job.rank})
    return {"artifacts": out}


async def facts(agent: Agent, caller: Caller, p: m.Facts, notify: Notify) -> Any:
    job = agent.jobs.owned(p.job, caller.uid)
    return {"facts": agent.revlog.facts(job.id)}


HANDLERS: dict[str, Callable[[Agent, Caller, Any, Notify], Awaitable[Any]]] = {
    "hello": hello,
    "node_info": node_info,
    "missing": missing,
    "put_blobs": put_blobs,
    "put_manifest": put_manifest,
    "prepare": prepare,
    "start": start,
    "abort": abort,
    "cancel": cancel,
    "jobs": jobs,
    "status": status,
    "logs": logs,
    "cat": cat,
    "revisions": revisions,
    "patch_prepare": patch_prepare,
    "patch_commit": patch_commit,
    "patch_abort": patch_abort,
    "get_blobs": get_blobs,
    "metrics": metrics,
    "reserve": reserve,
    "find_artifacts": find_artifacts,
    "facts": facts,
}
assert HANDLERS.keys() == m.METHODS.keys(), "every method has exactly one handler"

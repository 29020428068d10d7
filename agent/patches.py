"""Changing a job's code on this node: prepare a patch (stage it), commit it (make it live and
record revision N+1), or abort it. The launcher runs these in two phases over all nodes of a
job (invariant 2); here each step is made safe to retry and to survive an agent restart.

One patch at a time is staged per job. A second patch based on the same head is refused with
StaleRevision while the first is staged, so two launchers racing each other can never commit
different revisions N+1 on different nodes: the launcher prepares node 0 first, and node 0
admits exactly one of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from agent import codedir, metrics
from agent.codedir import Staged
from agent.jobs import JobManager
from agent.paths import JobPaths
from agent.protocol import messages as m
from agent.protocol.errors import InvalidParams, JobStateError, ObjectMissing, StaleRevision
from agent.protocol.objects import REASONS, Revision, changes, diff, from_delta
from agent.revlog import RevLog
from agent.store import Store

METRICS_TAIL = 64 * 1024


async def prepare(
    jobs: JobManager, store: Store, revlog: RevLog, p: m.PatchPrepare, uid: int, author: str
) -> dict[str, Any]:
    job = jobs.owned(p.job, uid)
    if job.state in ("aborted", "prepared"):
        raise JobStateError(f"job {job.id} is {job.state}; it has no live code to patch", job.id)
    if p.reason not in REASONS or p.reason in ("submit", "rerun"):
        raise InvalidParams(f"patch_prepare: reason {p.reason!r} is not patch, resume or drift")
    paths = jobs.paths(job.id)
    # Check and stage under the job's lock: two prepares racing through the awaited stage
    # would both pass the check, then overwrite each other's staged files and record.
    async with jobs.lock(job.id):
        head = revlog.head(job.id)
        staged = codedir.read_staged(paths)
        if staged is not None:
            if staged.base == p.base and staged.bundle == p.bundle:
                return {"revision": staged.number, "paths": staged.paths}  # a retried prepare
            raise StaleRevision(p.base, staged.number)  # another patch holds the next number
        if p.base != head.number:
            raise StaleRevision(p.base, head.number)
        head_manifest = store.get_manifest(head.bundle)
        if p.puts or p.deletes:
            new, encoded, puts = from_delta(head_manifest, p.puts, p.deletes, p.bundle)
            # The changes are what the delta names (the tree need not be compared), and
            # only their blobs can be missing: the head's are here, its tree was built.
            changed = changes(head_manifest, puts, p.deletes)
            await asyncio.to_thread(store.put_many, m.blob_items(p.blobs))
            wanted = {c.new.blob for c in changed if c.new is not None and c.new.kind != "symlink"}
            missing = store.missing(wanted)
            if missing:
                raise ObjectMissing(missing)
            store.put_manifest(new, encoded=encoded)
        else:
            new = store.get_manifest(p.bundle)
            missing = store.missing(new.blobs())
            if missing:
                raise ObjectMissing(missing)
            changed = diff(head_manifest, new)
        staged = Staged(
            number=head.number + 1,
            base=head.number,
            bundle=p.bundle,
            puts=[c.path for c in changed if c.new is not None],
            deletes=[c.path for c in changed if c.new is None],
            author=p.author or author,
            message=p.message,
            staged_ns=time.time_ns(),
            options={"reason": p.reason},
        )
        added = [c.new for c in changed if c.new is not None]
        await asyncio.to_thread(codedir.stage, store, paths, staged, added)
    return {"revision": staged.number, "paths": staged.paths}


async def commit(jobs: JobManager, revlog: RevLog, p: m.PatchCommit, uid: int) -> dict[str, Any]:
    job = jobs.owned(p.job, uid)
    paths = jobs.paths(job.id)
    staged = codedir.read_staged(paths)
    if staged is None or staged.number != p.revision:
        if job.head == p.revision:  # committed already: a retried commit is harmless
            rev = revlog.revision(job.id, p.revision)
            return {"revision": rev.number, "at_ns": rev.at_ns, "paths": list(rev.paths)}
        raise JobStateError(f"job {job.id} has no staged revision r{p.revision}", job.id)
    signum = _signal_number(p.signal) if p.signal else None
    async with jobs.lock(job.id):
        head = revlog.head(job.id)
        if head.number != staged.base:  # the code changed meanwhile (drift): refuse cleanly
            codedir.drop(paths)
            raise StaleRevision(staged.base, head.number)
        await asyncio.to_thread(codedir.swap, paths, staged)
        revision = record(
            jobs,
            revlog,
            job.id,
            staged.number,
            staged.bundle,
            staged.options.get("reason", "patch"),
            staged.author,
            tuple(staged.paths),
            staged.message,
        )
    at_ns = revision.at_ns
    if p.restart or revision.reason == "resume":
        await jobs.restart(job.id, p.grace_s)
    elif signum is not None:
        jobs.signal_job(job.id, signum)
    return {"revision": revision.number, "at_ns": at_ns, "paths": list(revision.paths)}


def record(
    jobs: JobManager,
    revlog: RevLog,
    job_id: str,
    number: int,
    bundle: str,
    reason: str,
    author: str,
    changed: tuple[str, ...],
    message: str,
) -> Revision:
    """Append revision `number` (its parent the current head, by compare-and-swap), then
    tell the job: its revision file, and a marker line in its log."""
    paths = jobs.paths(job_id)
    metrics.ingest(revlog, paths, job_id)  # points written so far belong to the old revision
    head = revlog.head(job_id)
    revision = Revision(
        job=job_id,
        number=number,
        parent=number - 1,
        bundle=bundle,
        reason=reason,
        author=author,
        at_ns=time.time_ns(),
        paths=changed,
        message=message,
        step=last_step(paths),
        source=head.source,
    ).check()
    revlog.append_revision(revision)
    jobs.publish_revision(paths, revision)
    _log_marker(paths, revision)
    return revision


async def check_drift(
    jobs: JobManager, store: Store, revlog: RevLog, job_id: str, changed: set[str] | None = None
) -> None:
    """If the live code directory no longer matches the head, freeze what is there into the
    store and record it as a revision with reason drift: the history never misses a change."""
    async with jobs.lock(job_id):
        job = revlog.get(job_id)
        if not job.active:
            return
        paths = jobs.paths(job_id)
        head = revlog.head(job_id)
        head_manifest = store.get_manifest(head.bundle)
        manifest, blobs = await asyncio.to_thread(
            codedir.scan, paths.code, store.has, head_manifest, changed
        )
        if manifest.bundle_id == head.bundle:
            return
        await asyncio.to_thread(store.put_many, blobs)
        store.put_manifest(manifest)
        record(
            jobs,
            revlog,
            job_id,
            head.number + 1,
            manifest.bundle_id,
            "drift",
            f"unknown@{jobs.hostname}",
            tuple(c.path for c in diff(head_manifest, manifest)),
            "changed on the node, not through launch",
        )


def abort(jobs: JobManager, p: m.PatchAbort, uid: int) -> dict[str, Any]:
    job = jobs.owned(p.job, uid)
    paths = jobs.paths(job.id)
    staged = codedir.read_staged(paths)
    if (
        staged is not None
        and staged.number == p.revision
        and (not p.bundle or p.bundle == staged.bundle)
    ):
        codedir.drop(paths)
    return {}


def _signal_number(name: str) -> int:
    name = name.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidParams(f"unknown signal {name!r} (e.g. SIGUSR1, SIGHUP)") from None


def _log_marker(paths: JobPaths, revision: Revision) -> None:
    """A line in the job's log where the revision took effect."""
    shown = ", ".join(revision.paths[:5]) + (" ..." if len(revision.paths) > 5 else "")
    line = f"── r{revision.number} {revision.reason} {shown} by {revision.author} ──\n"
    fd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def last_step(paths: JobPaths) -> int | None:
    """The last `{"step": N}` the job appended to its metrics file, if any."""
    try:
        with open(paths.metrics, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - METRICS_TAIL))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return None

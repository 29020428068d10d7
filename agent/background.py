"""The work the agent does on its own, off the request path: drift checks of code
directories, metrics ingestion, artifact records, the environment and data records made
when a job starts, and the spare tree of a started job's bundle (agent/spares.py). The
watcher (agent/watcher.py) debounces and runs it; this module says what each kind of key
means."""

from __future__ import annotations

import asyncio

from agent import codedir, metrics, patches, provenance
from agent.jobs import JobManager
from agent.paths import JobPaths
from agent.revlog import RevLog
from agent.spares import Spares
from agent.store import Store
from agent.watcher import ARTIFACT, ENVIRONMENT, METRICS, SPARE, WATCH, DriftWatcher


def start_watching(
    jobs: JobManager, store: Store, revlog: RevLog, spares: Spares | None = None
) -> DriftWatcher:
    """A watcher wired to the job manager's lifecycle; the caller runs `watcher.run()`."""

    async def on_key(key: str) -> None:
        if key.startswith(SPARE):
            if spares is not None:
                owner, _, bundle = key.removeprefix(SPARE).partition(":")
                await spares.build(int(owner), bundle)
        elif key.startswith(METRICS):
            job_id = key.removeprefix(METRICS)
            metrics.ingest(revlog, jobs.paths(job_id), job_id)
        elif key.startswith(ARTIFACT):
            job_id, _, rel = key.removeprefix(ARTIFACT).partition(":")
            await asyncio.to_thread(provenance.record_artifact, jobs, revlog, job_id, rel)
        elif key.startswith(WATCH):
            job_id = key.removeprefix(WATCH)
            if revlog.get(job_id).active:
                # Watching a large tree adds one inotify watch per directory: done here, off
                # the start request, which returns as soon as the job runs.
                code = jobs.paths(job_id).code
                since = revlog.head(job_id).at_ns  # the last change made through launch
                await asyncio.to_thread(watcher.watch_code, job_id, code)
                if jobs.adopted(job_id):  # edits made while no agent watched: look once
                    await patches.check_drift(jobs, store, revlog, job_id)
                else:  # edits made since the start, before the watch was in place
                    early = await asyncio.to_thread(codedir.changed_since, code, since)
                    if early:
                        await patches.check_drift(jobs, store, revlog, job_id, early)
        elif key.startswith(ENVIRONMENT):
            await _on_start(key.removeprefix(ENVIRONMENT))
        else:
            await patches.check_drift(jobs, store, revlog, key, watcher.take_changes(key))

    async def _on_start(job_id: str) -> None:
        await asyncio.to_thread(provenance.record_environment, jobs, revlog, job_id)
        requests = revlog.facts(job_id, "data_request")
        if requests and not revlog.facts(job_id, "data"):  # inputs: once, at the first start
            req = requests[-1]["data"]
            await asyncio.to_thread(
                provenance.fingerprint_data,
                jobs,
                revlog,
                job_id,
                list(req["dirs"]),
                bool(req["hash"]),
            )

    def on_ended(job_id: str) -> None:
        watcher.unwatch(job_id)
        metrics.ingest(revlog, jobs.paths(job_id), job_id)

    watcher = DriftWatcher(on_key)

    # A started or re-adopted job is watched, a started one has its environment recorded:
    # both in the background.
    def on_running(job_id: str, paths: JobPaths) -> None:
        watcher.watch_outputs(job_id, paths.metrics_dir, paths.outputs)
        watcher.poke(WATCH + job_id)

    jobs.on_running = on_running

    def on_started(job_id: str) -> None:
        watcher.poke(ENVIRONMENT + job_id)
        # A spare of its tree, for its owner's next job.
        watcher.poke(f"{SPARE}{revlog.get(job_id).owner}:{revlog.head(job_id).bundle}")

    jobs.on_started = on_started
    jobs.on_ended = on_ended
    return watcher

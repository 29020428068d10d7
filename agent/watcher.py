"""Drift: the agent watches the code directory of every running job, so that a change made
there by any other means (someone edited a file on the node) becomes a revision. It also
watches each job's metrics directory, so reported steps are read as they are written.

One watchdog Observer (inotify; its thread blocks in the kernel, so nothing runs while nothing
changes) watches all code directories, for writes, creations, deletions and moves only: a job
reading its own code (imports) wakes nothing. An event merely queues the job for a check on
the event loop; after `debounce_s` of quiet, `check(job)` compares the tree with the head and
records a drift revision if they differ (agent/patches.py). A patch commit holds the job's
lock while it swaps files, so the check that its own events cause finds nothing to record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

log = logging.getLogger("launch-agent")

# Keys of metrics watches: the job id after this prefix.
METRICS = "metrics:"
CHANGES: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DriftWatcher, job_id: str) -> None:
        self.watcher = watcher
        self.job_id = job_id

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        self.watcher.poke(self.job_id)


class DriftWatcher:
    def __init__(self, check: Callable[[str], Awaitable[None]], debounce_s: float = 0.2) -> None:
        self.check = check
        self.debounce_s = debounce_s
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.observer = Observer()
        self.watches: dict[str, ObservedWatch] = {}

    def watch(self, job_id: str, code: Path, metrics_dir: Path) -> None:
        """Watch a running job: its code directory (drift) and its metrics directory."""
        self.unwatch(job_id)
        for key, path, recursive in ((job_id, code, True), (METRICS + job_id, metrics_dir, False)):
            try:
                self.watches[key] = self.observer.schedule(
                    _Handler(self, key), str(path), recursive=recursive, event_filter=CHANGES
                )
            except OSError as exc:  # e.g. the inotify watch limit: say so, keep serving
                log.warning("cannot watch %s: %s", path, exc)

    def unwatch(self, job_id: str) -> None:
        for key in (job_id, METRICS + job_id):
            watch = self.watches.pop(key, None)
            if watch is not None:
                with contextlib.suppress(KeyError, OSError):
                    self.observer.unschedule(watch)

    def poke(self, job_id: str) -> None:
        """From the observer's thread: queue a check of this job."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, job_id)

    async def run(self) -> None:
        """Debounce pokes and run checks, until cancelled."""
        self.observer.start()
        due: dict[str, float] = {}
        try:
            while True:
                timeout = max(0.0, min(due.values()) - time.monotonic()) if due else None
                try:
                    job_id = await asyncio.wait_for(self.queue.get(), timeout)
                    due[job_id] = time.monotonic() + self.debounce_s
                    continue
                except TimeoutError:
                    pass
                now = time.monotonic()
                for job_id in [j for j, t in due.items() if t <= now]:
                    del due[job_id]
                    try:
                        await self.check(job_id)
                    except Exception:
                        log.exception("drift check of %s failed", job_id)
        finally:
            self.observer.stop()
            self.observer.join()

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
import os
import threading
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

# Keys of metrics and outputs watches, and of work queued at a job's start.
METRICS = "metrics:"
ARTIFACT = "artifact:"
ENVIRONMENT = "environment:"
WATCH = "watch:"
SPARE = "spare:"
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
    """Pokes `key`. A code directory's handler also notes which paths changed (the drift
    check looks at those only); an outputs handler's key names the file
    (`artifact:JOB:PATH`)."""

    def __init__(
        self, watcher: DriftWatcher, key: str, root: Path | None = None, code: Path | None = None
    ) -> None:
        self.watcher = watcher
        self.key = key
        self.root = root
        self.code = code

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if self.code is not None:
            for path in (event.src_path, getattr(event, "dest_path", "")):
                if path:
                    rel = os.path.relpath(os.fsdecode(path), self.code)
                    if not rel.startswith(".."):
                        self.watcher.note_change(self.key, rel)
        if self.root is None:
            self.watcher.poke(self.key)
            return
        if event.is_directory or event.event_type not in ("closed", "moved", "created"):
            return  # an artifact is recorded when it is closed after writing, or moved in
        # "created" too: a file moved in from outside the outputs, or one already written in a
        # directory that appeared before its watch did, is reported by watchdog only as
        # created. A file created by a writer still at work is skipped (record_artifact
        # checks); its close records it.
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        rel = os.path.relpath(path, self.root)
        if not rel.startswith(".."):
            self.watcher.poke(f"{self.key}:{rel}")


class DriftWatcher:
    def __init__(self, check: Callable[[str], Awaitable[None]], debounce_s: float = 0.2) -> None:
        self.check = check
        self.debounce_s = debounce_s
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.observer = Observer()
        self.watches: dict[str, ObservedWatch] = {}
        self.changed: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def watch_outputs(self, job_id: str, metrics_dir: Path, outputs: Path) -> None:
        """Watch a running job's metrics directory and outputs (artifacts): at once, as the
        job starts, so nothing it writes is missed (both are small then)."""
        self._schedule(
            [
                (METRICS + job_id, metrics_dir, False, None),
                (ARTIFACT + job_id, outputs, True, outputs),
            ]
        )

    def watch_code(self, job_id: str, code: Path) -> None:
        """Watch a running job's code directory for drift (one inotify watch per directory:
        the caller does this off the start request)."""
        self._schedule([(job_id, code, True, None)], code=code)

    def note_change(self, job_id: str, rel: str) -> None:
        """From the observer's thread: `rel` changed in the job's code directory."""
        with self._lock:
            self.changed.setdefault(job_id, set()).add(rel)

    def take_changes(self, job_id: str) -> set[str]:
        """The paths changed since the last call ("." when unknown: look at everything)."""
        with self._lock:
            return self.changed.pop(job_id, set())

    def _schedule(
        self, specs: list[tuple[str, Path, bool, Path | None]], code: Path | None = None
    ) -> None:
        for key, path, recursive, root in specs:
            old = self.watches.pop(key, None)
            if old is not None:
                with contextlib.suppress(KeyError, OSError):
                    self.observer.unschedule(old)
            try:
                self.watches[key] = self.observer.schedule(
                    _Handler(self, key, root, code),
                    str(path),
                    recursive=recursive,
                    event_filter=CHANGES,
                )
            except OSError as exc:  # e.g. the inotify watch limit: say so, keep serving
                log.warning("cannot watch %s: %s", path, exc)

    def unwatch(self, job_id: str) -> None:
        for key in (job_id, METRICS + job_id, ARTIFACT + job_id):
            watch = self.watches.pop(key, None)
            if watch is not None:
                with contextlib.suppress(KeyError, OSError):
                    self.observer.unschedule(watch)

    def poke(self, key: str) -> None:
        """From any thread: queue work under `key` (debounced; one at a time per key)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, key)

    async def run(self) -> None:
        """Debounce pokes and run each due check as its own task, until cancelled. A key
        poked while its check runs is checked again after it: nothing is missed, and one
        slow check (hashing a large artifact) never holds up the others."""
        self.observer.start()
        due: dict[str, float] = {}
        running: set[str] = set()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    timeout = max(0.0, min(due.values()) - time.monotonic()) if due else None
                    try:
                        key = await asyncio.wait_for(self.queue.get(), timeout)
                        if key.startswith(METRICS):
                            # Read at most debounce_s after a write, however often the job
                            # reports: were each write to postpone the read, a job reporting
                            # faster than that would be read only once it stopped, every
                            # point stamped with that moment.
                            due.setdefault(key, time.monotonic() + self.debounce_s)
                        else:
                            due[key] = time.monotonic() + self.debounce_s
                        continue
                    except TimeoutError:
                        pass
                    now = time.monotonic()
                    for key in [k for k, t in due.items() if t <= now and k not in running]:
                        del due[key]
                        running.add(key)
                        tg.create_task(self._check(key, running))
                    for key in [k for k, t in due.items() if t <= now]:
                        due[key] = now + self.debounce_s  # its check still runs: later
        finally:
            self.observer.stop()
            self.observer.join()

    async def _check(self, key: str, running: set[str]) -> None:
        try:
            await self.check(key)
        except Exception:
            log.exception("check of %s failed", key)
        finally:
            running.discard(key)

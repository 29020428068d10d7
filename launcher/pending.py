"""The launcher's local store with its writes held back: this module owns keeping a submit's
freeze in memory until the job has started, and writing it to disk then.

Why: a cold submit reads and hashes a tree in a fraction of the time it takes to create one
file per blob in the local store on a laptop's disk (measured: 6,043 blobs, 0.4 s to read and
hash, 0.6-1.2 s to create on ext4). The nodes need the bytes, not this machine's copy of them,
so they are sent from memory and written here after the start (`settle`), while the job runs.

Nothing is lost or trusted early: blobs, then manifests, then the stat cache (`later`) are
written in that order, as a freeze without this would. The stat cache is what lets the next
freeze skip reading a file, and it is only trusted when its bundle's manifest is in the store
(launcher/scan.py), so a launcher that dies before `settle` leaves a store that merely lacks
this freeze: the next one reads the tree again. Past `budget` bytes, blobs are written at once.
Once settled, the store writes through: a freeze still running on its thread when its submit
was interrupted (Ctrl-C) goes on storing in order, and never races `settle`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from agent.protocol.objects import Manifest

if TYPE_CHECKING:
    from agent.store import Store

PENDING_BYTES = 256 * 2**20  # blobs kept in memory at most; more are written as they come
STREAM_BATCH_BYTES = 4 * 2**20  # a freeze's batches: nothing is synced per batch here


class PendingStore:
    """A Store whose `put_many`, `put_manifest` and `later` wait for `settle()`."""

    def __init__(self, store: Store, budget: int = PENDING_BYTES) -> None:
        self.store = store
        self.budget = budget
        self.lock = threading.Lock()  # a freeze's thread, and settle() on another
        self.settled = False
        self.blobs: dict[str, bytes] = {}  # hashed from the bytes by the freeze that read them
        self.size = 0
        self.manifests: list[tuple[Manifest, bytes | None]] = []
        self.after: list[Callable[[], None]] = []
        # Told of each batch stored (from the freeze's thread), so an upload can send it
        # while the freeze goes on; batches are smaller (batch_bytes) for that.
        self.on_blobs: Callable[[list[tuple[str, bytes]]], None] | None = None
        self.batch_bytes = STREAM_BATCH_BYTES

    def has(self, object_id: str) -> bool:
        return (
            object_id in self.blobs
            or any(m.bundle_id == object_id for m, _ in self.manifests)
            or self.store.has(object_id)
        )

    def missing(self, ids: Iterable[str]) -> list[str]:
        return [i for i in self.store.missing(ids) if i not in self.blobs]

    def get(self, object_id: str) -> bytes:
        data = self.blobs.get(object_id)
        return self.store.get(object_id) if data is None else data

    def read(self, object_id: str) -> bytes:
        data = self.blobs.get(object_id)
        return self.store.read(object_id) if data is None else data

    def get_manifest(self, bundle_id: str) -> Manifest:
        for manifest, _ in self.manifests:
            if manifest.bundle_id == bundle_id:
                return manifest
        return self.store.get_manifest(bundle_id)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> int:
        with self.lock:
            batch = [(i, d) for i, d in items if i not in self.blobs]
            size = sum(len(d) for _, d in batch)
            if self.settled or self.size + size > self.budget:
                self._write_blobs()
                stored = self.store.put_many(batch)
            else:
                self.blobs.update(batch)
                self.size += size
                stored = len(batch)
        if self.on_blobs is not None and batch:
            self.on_blobs(batch)
        return stored

    def put_manifest(self, manifest: Manifest, encoded: bytes | None = None) -> str:
        with self.lock:
            if self.settled:
                return self.store.put_manifest(manifest, encoded=encoded)
            self.manifests.append((manifest, encoded))
            return manifest.bundle_id

    def later(self, step: Callable[[], None]) -> None:
        """Run `step` in `settle`, after everything stored before it."""
        with self.lock:
            if not self.settled:
                self.after.append(step)
                return
        step()

    def settle(self) -> None:
        """Write what was held back, in order; from then on, write through."""
        with self.lock:
            self.settled = True
            self._write_blobs()
            while self.manifests:
                manifest, encoded = self.manifests.pop(0)
                self.store.put_manifest(manifest, encoded=encoded)
            steps, self.after = self.after, []
        for step in steps:
            step()

    def _write_blobs(self) -> None:
        if self.blobs:
            self.store.put_many(self.blobs.items())  # verifies each against its id
            self.blobs.clear()
            self.size = 0


def run_later(store: Store | PendingStore, step: Callable[[], None]) -> None:
    """`step` now, or after a pending store's writes."""
    if isinstance(store, PendingStore):
        store.later(step)
    else:
        step()

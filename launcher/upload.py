"""Giving nodes a bundle: this module owns sending the manifest (as a delta to one the nodes
probably hold, when there is one) and then only the blobs each node lacks, read once from the
launcher's local store for every node that needs them, in batches, with the next batch on its
way while a node stores the last (it verifies every blob).

A freeze that reads much (a cold tree) need not finish before the nodes get anything: the
batches it stores are fed (`BlobFeed`) to `stream_blobs`, which sends each node the blobs of
a batch it lacks while the freeze reads the next; the manifest then finds little missing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.protocol.errors import LaunchError, ObjectMissing
from agent.protocol.messages import zip_blobs
from agent.protocol.objects import Entry, Manifest, delta
from agent.protocol.rpc import Packed, pack_params
from launcher.fleet import NodeConn, on_each, on_each_settled

BATCH_BYTES = 4 * 2**20
INLINE_BYTES = 8 * 2**20  # new content up to this travels with the manifest or patch
READ_AHEAD = 4  # batches of blobs read and kept for the nodes that need them
IN_FLIGHT = 3  # batches on their way to one node at most: one stored, the others coming
# Batches a freeze stores of FEED_MIN_BYTES or more are sent while it goes on. Smaller ones
# (a few edited files) wait for the manifest, which carries small content itself: asking a
# node first would cost a round trip.
FEED_MIN_BYTES = 2**20


@dataclass
class UploadProgress:
    """What an upload reports as it goes (bytes); the CLI draws a bar from it."""

    # More to send (bytes, blobs, summed over the nodes): once, or batch by batch while a
    # freeze still reads (stream_blobs).
    on_upload_add: Callable[[int, int], None] = lambda nbytes, nblobs: None
    on_upload: Callable[[int], None] = lambda nbytes: None
    on_upload_end: Callable[[], None] = lambda: None


async def upload_bundle(
    conns: list[NodeConn],
    manifest: Manifest,
    store: Any,
    progress: UploadProgress | None = None,
    base: str | None = None,
    changes: Sequence[Entry] | None = None,
    then: Callable[[NodeConn], Awaitable[Any]] | None = None,
) -> list[list[str]]:
    """Give every node the manifest and the blobs it lacks (from the local store); returns
    the blobs each node was sent. With `base`, a bundle the nodes probably hold (the last one
    sent from this tree), the manifest travels as its changes to that one, with the content
    they add when it is small: a node then decodes and checks only what changed, not
    thousands of entries, and a small change needs no second round trip. `changes`, when
    given, are the entries that differ from `base` with the same paths (what a freeze saw):
    then the trees are not compared here either. `then(node)` runs on each node as soon as
    that node holds everything (a submit prepares it), while others still receive theirs:
    node by node, not after the slowest."""
    progress = progress or UploadProgress()
    full = {"manifest": manifest.encode()}  # once, not once per node
    sizes = {e.blob: e.size for e in manifest.entries}
    change = None
    if base is not None and base != manifest.bundle_id and store.has(base):
        if changes is not None:
            puts, deletes = [e.to_wire() for e in changes], list[str]()
            added = sorted({e.blob for e in changes if e.kind != "symlink"})
        else:
            puts, deletes, added = delta(store.get(base), manifest)
        change = {"base": base, "bundle": manifest.bundle_id, "puts": puts, "deletes": deletes}
        # The content the changes add goes with them when it is small: one round trip less.
        if sum(sizes[b] for b in added) <= INLINE_BYTES:
            change["blobs"] = [[b, store.get(b)] for b in added]
    answers = await on_each(conns, lambda c: _put_manifest(c, full, change), "upload")
    missing = [lacked for _, lacked in answers]
    total = sum(sizes[b] for ids in missing for b in ids)
    progress.on_upload_add(total, sum(len(ids) for ids in missing))
    reader = _BatchReader(store, _worth_zipping(conns))
    plans = {c.rank: _batches(ids, sizes) for c, ids in zip(conns, missing, strict=True)}

    async def give(conn: NodeConn) -> None:
        await _send_blobs(conn, plans[conn.rank], reader, progress.on_upload)
        if then is not None:
            await then(conn)

    try:
        await on_each(conns, give, "upload" if then is None else "upload or prepare")
    finally:
        reader.close()
        progress.on_upload_end()
    return [inline + lacked for inline, lacked in answers]


async def _put_manifest(
    conn: NodeConn, full: dict[str, Any], change: dict[str, Any] | None
) -> tuple[list[str], list[str]]:
    """(blobs sent with the manifest, blobs the node still lacks)."""
    if change is not None:
        with contextlib.suppress(ObjectMissing):  # the node lacks the base: send it all
            result = await conn.client.call("put_manifest", change)
            return [b for b, _ in change.get("blobs", [])], list(result["missing"])
    result = await conn.client.call("put_manifest", full)
    return [], list(result["missing"])


def _worth_zipping(conns: Sequence[NodeConn]) -> bool:
    """Whether to send blobs compressed: to nodes over SSH (each byte is encrypted, sent and
    decrypted, per node; on a real network, it is also the slow part) that all speak
    protocol 2. To an agent on this machine, a copy costs less than inflating."""
    return all(c.node.kind == "ssh" and c.client.version >= 2 for c in conns)


def _batches(ids: list[str], sizes: dict[str, int]) -> list[tuple[str, ...]]:
    """`ids` in order, cut in batches of up to BATCH_BYTES by the manifest's sizes."""
    out: list[tuple[str, ...]] = []
    batch: list[str] = []
    size = 0
    for blob in ids:
        if batch and size + sizes[blob] > BATCH_BYTES:
            out.append(tuple(batch))
            batch, size = [], 0
        batch.append(blob)
        size += sizes[blob]
    if batch:
        out.append(tuple(batch))
    return out


class _BatchReader:
    """Reads a batch of blobs from the local store once for every node that lacks the same
    blobs (usually all of them), in a worker thread, ahead of its use, and encodes it once as
    put_blobs params (with its size in bytes). At most READ_AHEAD batches are kept; a node
    that falls further behind reads its own again."""

    def __init__(self, store: Any, zipped: bool = False) -> None:
        self.store = store
        self.zipped = zipped
        self.reads: dict[tuple[str, ...], asyncio.Future[tuple[Packed, int]]] = {}

    def read(self, batch: tuple[str, ...]) -> asyncio.Future[tuple[Packed, int]]:
        future = self.reads.get(batch)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._read, batch))
            self.reads[batch] = future
            while len(self.reads) > READ_AHEAD:  # forget the oldest read that has finished
                old = next((b for b, f in self.reads.items() if f.done()), None)
                if old is None:
                    break
                self._drop(old)
        return future

    def _read(self, batch: tuple[str, ...]) -> tuple[Packed, int]:
        items = [[blob, self.store.read(blob)] for blob in batch]
        size = sum(len(data) for _, data in items)
        zipped = zip_blobs(items) if self.zipped else None
        if zipped is not None:
            return pack_params({"zipped": zipped}), size
        return pack_params({"blobs": items}), size

    def _drop(self, batch: tuple[str, ...]) -> None:
        future = self.reads.pop(batch)
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # whoever needs it reads again; no "never retrieved" warning

    def close(self) -> None:
        """After every node is done with its batches."""
        while self.reads:
            self._drop(next(iter(self.reads)))


async def _send_blobs(
    conn: NodeConn,
    batches: list[tuple[str, ...]],
    reader: _BatchReader,
    on_bytes: Callable[[int], None],
) -> None:
    """Send the node's batches, the next ones on their way while the agent stores the last
    (it verifies every blob)."""
    sender = _Sender(conn, on_bytes)
    try:
        for k, batch in enumerate(batches):
            if k + 1 < len(batches):
                reader.read(batches[k + 1])  # read ahead
            await sender.send(*await reader.read(batch))
        await sender.drain()
    finally:
        sender.cancel()


class _Sender:
    """put_blobs calls on their way to one node, at most IN_FLIGHT at once: one being
    stored, the next ones arriving. Each batch's bytes are counted once it is stored."""

    def __init__(self, conn: NodeConn, on_bytes: Callable[[int], None]) -> None:
        self.conn = conn
        self.on_bytes = on_bytes
        self.inflight: collections.deque[tuple[asyncio.Future[Any], int]] = collections.deque()

    async def send(self, params: Packed, size: int) -> None:
        call = asyncio.ensure_future(self.conn.client.call("put_blobs", params))
        self.inflight.append((call, size))
        if len(self.inflight) >= IN_FLIGHT:
            await self._landed()

    async def drain(self) -> None:
        while self.inflight:
            await self._landed()

    async def _landed(self) -> None:
        await self.inflight[0][0]
        self.on_bytes(self.inflight.popleft()[1])

    def cancel(self) -> None:
        for call, _ in self.inflight:
            call.cancel()


class BlobFeed:
    """Batches of blob ids a freeze has stored, in order, as it stores them. Filled from the
    freeze's thread (`push`); read on the event loop by any number of readers, each from the
    first batch (a submit that retries on other nodes reads it again)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batches: list[tuple[str, ...]] = []
        self.closed = False
        self._more = asyncio.Event()

    def push(self, items: Sequence[tuple[str, bytes]]) -> None:
        """From any thread: a batch just stored (only batches of FEED_MIN_BYTES or more)."""
        if sum(len(data) for _, data in items) >= FEED_MIN_BYTES:
            # The loop is gone only when the submit is: nobody is left to send to.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._add, tuple(i for i, _ in items))

    def close(self) -> None:
        """On the loop: no more batches (the freeze ended, however it ended)."""
        self.closed = True
        self._wake()

    def _add(self, batch: tuple[str, ...]) -> None:
        self.batches.append(batch)
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    async def follow(self) -> AsyncIterator[tuple[str, ...]]:
        n = 0
        while True:
            if n < len(self.batches):
                n += 1
                yield self.batches[n - 1]
            elif self.closed:
                return
            else:
                await self._more.wait()


async def stream_blobs(
    conns: list[NodeConn], store: Any, feed: BlobFeed, progress: UploadProgress
) -> list[list[str] | LaunchError]:
    """Send each node the blobs of every batch in `feed` that it lacks, as the batches come,
    until the feed is closed; per node, the blobs sent, or what went wrong there (the
    upload that follows names it)."""
    reader = _BatchReader(store, _worth_zipping(conns))

    async def follow(conn: NodeConn) -> list[str]:
        sent: list[str] = []
        sender = _Sender(conn, progress.on_upload)
        try:
            async for batch in feed.follow():
                answer = await conn.client.call("missing", {"blobs": list(batch)})
                lacking = tuple(answer["missing"])  # sorted: nodes alike share one encoding
                if not lacking:
                    continue
                params, size = await reader.read(lacking)
                progress.on_upload_add(size, len(lacking))
                await sender.send(params, size)
                sent.extend(lacking)
            await sender.drain()
        finally:
            sender.cancel()
        return sent

    try:
        return await on_each_settled(conns, follow)
    finally:
        reader.close()

"""Following the logs of a job's nodes: each node's log streamed from a byte offset (so a
reconnect continues exactly where it stopped), merged into whole lines prefixed by rank,
coloured on a terminal; and the job's exit code once every node has ended."""

from __future__ import annotations

import asyncio
from typing import Any, TextIO

from agent.protocol.errors import JobStateError, NodeUnreachable
from launcher.fleet import NodeConn
from launcher.nodes import Node, open_node
from launcher.ops import Submitted, job_record, status

COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "red"]
ANSI = {"cyan": 36, "magenta": 35, "green": 32, "yellow": 33, "blue": 34, "red": 31}


class LineWriter:
    """Merges the logs of several nodes into whole lines, each prefixed with its rank."""

    def __init__(self, out: TextIO, nnodes: int, colour: bool) -> None:
        self.out = out
        self.width = len(str(max(nnodes - 1, 0)))
        self.colour = colour
        self.partial: dict[int, bytes] = {}

    def prefix(self, rank: int) -> str:
        tag = f"[{rank:>{self.width}}]"
        if self.colour:
            return f"\x1b[{ANSI[COLOURS[rank % len(COLOURS)]]}m{tag}\x1b[0m "
        return f"{tag} "

    def feed(self, rank: int, data: bytes) -> None:
        data = self.partial.pop(rank, b"") + data
        *lines, rest = data.split(b"\n")
        if rest:
            self.partial[rank] = rest
        if lines:
            prefix = self.prefix(rank)
            text = "".join(f"{prefix}{line.decode('utf-8', 'replace')}\n" for line in lines)
            self.out.write(text)
            self.out.flush()

    def close(self, rank: int) -> None:
        rest = self.partial.pop(rank, b"")
        if rest:
            self.feed(rank, rest + b"\n")


async def follow_node_logs(
    node: Node,
    rank: int,
    job: str,
    writer: LineWriter,
    *,
    follow: bool,
    conn: NodeConn | None = None,
    offset: int = 0,
    retries: int = 30,
) -> dict[str, Any]:
    """Stream one node's log from `offset` until the job ends there (or once, without follow).

    A broken connection is reopened and the stream goes on from the last offset received,
    so no byte is lost or repeated.
    """
    attempt = 0
    while True:
        try:
            if conn is not None:
                return await _stream(conn, job, rank, writer, follow, offset)
            async with open_node(node) as (client, address):
                return await _stream(
                    NodeConn(rank, node, client, address), job, rank, writer, follow, offset
                )
        except NodeUnreachable as exc:
            offset = getattr(exc, "log_offset", offset)
            attempt += 1
            conn = None
            if attempt > retries:
                raise
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        finally:
            writer.close(rank)


async def _stream(
    conn: NodeConn, job: str, rank: int, writer: LineWriter, follow: bool, offset: int
) -> dict[str, Any]:
    position = offset

    def on_log(params: dict[str, Any]) -> None:
        nonlocal position
        if params.get("offset") == position:  # exactly the next bytes: never twice
            data = params["data"]
            writer.feed(rank, data)
            position += len(data)

    try:
        with conn.client.listen("log", job, on_log):
            result: dict[str, Any] = await conn.client.call(
                "logs", {"job": job, "offset": offset, "follow": follow}
            )
    except NodeUnreachable as exc:
        exc.log_offset = position  # type: ignore[attr-defined]
        raise
    return result


async def logs(ref: str, *, follow: bool, rank: int | None, out: TextIO, colour: bool) -> int:
    record = job_record(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    writer = LineWriter(out, len(nodes), colour)
    chosen = [(r, n) for r, n in enumerate(nodes) if rank is None or r == rank]
    if not chosen:
        raise JobStateError(f"job {record.id} has no node of rank {rank}", record.id)
    async with asyncio.TaskGroup() as tg:
        for r, node in chosen:
            tg.create_task(follow_node_logs(node, r, record.id, writer, follow=follow))
    return 0


async def follow_submitted(sub: Submitted, out: TextIO, colour: bool) -> int:
    """After submit: follow every node's log to the end, then the job's exit code."""
    writer = LineWriter(out, len(sub.nodes), colour)
    results: list[dict[str, Any]] = [{} for _ in sub.nodes]

    async def one(rank: int, node: Node) -> None:
        results[rank] = await follow_node_logs(node, rank, sub.job, writer, follow=True)

    async with asyncio.TaskGroup() as tg:
        for rank, node in enumerate(sub.nodes):
            tg.create_task(one(rank, node))
    statuses = await status(sub.job)
    return exit_code_of(statuses["nodes"])


def exit_code_of(nodes: list[dict[str, Any]]) -> int:
    """0 when every rank succeeded; else the first failing rank's code (1 if it has none)."""
    for node in nodes:
        if node.get("state") != "succeeded":
            code = node.get("exit_code")
            return code if isinstance(code, int) and code > 0 else 1
    return 0

"""Talking to N nodes at once: open them all together, run one call on each, and report every
node's failure by name.

Each node's connection is held by its own task in one TaskGroup for as long as the fleet is
open (an asyncio TaskGroup must be left by the task that entered it). `on_each` lets every
call finish before it judges: a prepare cut short on one node while another still runs could
otherwise leave a half-prepared job that nobody aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.protocol.errors import LaunchError, NodeUnreachable
from launcher.client import AgentClient
from launcher.nodes import Node, open_node
from launcher.scope import background_tasks

T = TypeVar("T")


@dataclass
class NodeConn:
    rank: int
    node: Node
    client: AgentClient
    address: str

    @property
    def name(self) -> str:
        return self.node.name


def failed(message: str, failures: Sequence[LaunchError]) -> ExceptionGroup[LaunchError]:
    return ExceptionGroup(message, list(failures))


@contextlib.asynccontextmanager
async def open_fleet(nodes: Sequence[Node]) -> AsyncIterator[list[NodeConn]]:
    """Open every node at once. If any cannot be reached, raise an ExceptionGroup of
    NodeUnreachable, one per such node, and nothing else happens."""
    async with open_fleet_settled(nodes) as items:
        failures = [x for x in items if isinstance(x, LaunchError)]
        if failures:
            raise failed(f"{len(failures)} of {len(nodes)} nodes unreachable", failures)
        yield [x for x in items if isinstance(x, NodeConn)]


async def on_each(
    conns: Sequence[NodeConn], call: Callable[[NodeConn], Awaitable[T]], what: str = "call"
) -> list[T]:
    """Run `call` on every node at once and wait for all; an ExceptionGroup naming each node
    that failed, or the results in rank order."""
    return all_or_raise(await on_each_settled(conns, call), what)


def all_or_raise(results: Sequence[T | LaunchError], what: str = "call") -> list[T]:
    """Settled per-node results as they are, or an ExceptionGroup naming each node that
    failed (`what` failed on K of N nodes)."""
    failures = [r for r in results if isinstance(r, LaunchError)]
    if failures:
        raise failed(f"{what} failed on {len(failures)} of {len(results)} nodes", failures)
    return [r for r in results if not isinstance(r, LaunchError)]


async def on_each_settled(
    conns: Sequence[NodeConn], call: Callable[[NodeConn], Awaitable[T]]
) -> list[T | LaunchError]:
    """Like on_each, but each node's failure is returned in its place (best-effort cleanup,
    views that show unreachable nodes)."""
    results: list[Any] = [None] * len(conns)

    async def run(index: int, conn: NodeConn) -> None:
        try:
            results[index] = await call(conn)
        except LaunchError as exc:
            exc.node = exc.node or conn.name
            results[index] = exc

    async with asyncio.TaskGroup() as tg:
        for index, conn in enumerate(conns):
            tg.create_task(run(index, conn))
    return results


@contextlib.asynccontextmanager
async def open_fleet_settled(nodes: Sequence[Node]) -> AsyncIterator[list[NodeConn | LaunchError]]:
    """Open what can be opened; an unreachable node's place holds its error (for views)."""
    out: list[NodeConn | LaunchError | None] = [None] * len(nodes)
    opened = [asyncio.Event() for _ in nodes]
    release = asyncio.Event()

    async def hold(rank: int, node: Node) -> None:
        try:
            async with open_node(node) as (client, address):
                out[rank] = NodeConn(rank, node, client, address)
                opened[rank].set()
                await release.wait()
        except LaunchError as exc:
            exc.node = exc.node or node.name
            out[rank] = exc
        except OSError as exc:
            out[rank] = NodeUnreachable(node.name, exc.strerror or str(exc))
        finally:
            opened[rank].set()

    async with background_tasks() as scope:
        for rank, node in enumerate(nodes):
            scope.spawn(hold(rank, node))
        try:
            for event in opened:
                await event.wait()
            yield [x for x in out if x is not None]
        finally:
            release.set()

"""Choosing nodes on a shared cluster (pure logic, no I/O): given each candidate's node_info,
pick N that can take a job asking for G GPUs each now, fewest busy GPUs first and in the
cluster's order otherwise; or say which nodes are busy with what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    index: int  # position in the cluster's host list
    name: str
    info: dict[str, Any] | None  # None: unreachable
    error: str = ""

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list((self.info or {}).get("gpus", []))

    @property
    def busy(self) -> int:
        return sum(1 for g in self.gpus if g.get("held_by"))

    def fits(self, gpus_per_node: int) -> bool:
        """-1 asks for every GPU of the node, so every one must be free."""
        if self.info is None:
            return False
        free = len(self.gpus) - self.busy
        want = len(self.gpus) if gpus_per_node < 0 else gpus_per_node
        return free >= want and want <= len(self.gpus)


def choose(candidates: list[Candidate], count: int, gpus_per_node: int) -> list[Candidate] | None:
    """N candidates that can take the job, in rank order, or None when fewer can."""
    fitting = [c for c in candidates if c.fits(gpus_per_node)]
    if len(fitting) < count:
        return None
    picked = sorted(fitting, key=lambda c: (c.busy, c.index))[:count]
    return sorted(picked, key=lambda c: c.index)


def busy_report(candidates: list[Candidate], gpus_per_node: int) -> list[str]:
    """One line per node that cannot take the job: what holds it."""
    lines = []
    for c in candidates:
        if c.fits(gpus_per_node):
            continue
        if c.info is None:
            lines.append(f"{c.name}: unreachable ({c.error})")
            continue
        held: dict[str, tuple[str, list[int]]] = {}
        for g in c.gpus:
            holder = g.get("held_by")
            if holder:
                held.setdefault(holder["job"], (holder["owner_name"], []))[1].append(g["index"])
        what = "; ".join(
            f"{job} of {owner} holds GPU {','.join(map(str, idx))}"
            for job, (owner, idx) in sorted(held.items())
        )
        want = len(c.gpus) if gpus_per_node < 0 else gpus_per_node
        lines.append(
            f"{c.name}: {len(c.gpus) - c.busy} of {len(c.gpus)} GPUs free, "
            f"{want} needed" + (f" ({what})" if what else "")
        )
    return lines

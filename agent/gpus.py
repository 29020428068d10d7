"""The GPUs of this node and which job holds each: discovered from nvidia-smi, or declared by
the admin (`launch-agent serve --gpus N`, as Slurm's gres.conf declares them; also how tests run
on machines without GPUs).

A job reserves its GPUs at prepare, atomically on this node (one SQLite transaction), so two
jobs never share a GPU. A reservation that is never started expires after `ttl_s` (its
launcher died between the phases) and the GPUs come back; start makes it last until the job
ends. Reservations are rows in the revision log, so they survive an agent restart.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from agent.protocol.errors import Busy
from agent.revlog import RevLog

DEFAULT_TTL_S = 120.0


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mib: int


def discover(declared: int | None, hostname: str) -> list[Gpu]:
    """Declared GPUs when the admin said how many, else those nvidia-smi lists."""
    if declared is not None:
        return [Gpu(i, f"GPU-declared-{hostname}-{i}", "declared", 0) for i in range(declared)]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            memory = int(parts[3]) if parts[3].isdigit() else 0
            gpus.append(Gpu(int(parts[0]), parts[1], parts[2], memory))
    return gpus


class GpuLedger:
    def __init__(self, revlog: RevLog, gpus: list[Gpu], ttl_s: float = DEFAULT_TTL_S) -> None:
        self.revlog = revlog
        self.gpus = gpus
        self.ttl_s = ttl_s

    def reserve(self, job: str, count: int, owner: int | None = None) -> list[int]:
        """Hold `count` free GPUs for `job` (-1: every GPU of the node), or Busy naming who
        holds them. Holds of prepared jobs whose reservation expired are taken back first."""
        want = len(self.gpus) if count < 0 else count
        if want > len(self.gpus):
            raise Busy(
                f"{want} GPUs asked, this node has {len(self.gpus)}",
                {"free": 0, "total": len(self.gpus), "holders": []},
            )
        now = time.time_ns()
        got = self.revlog.reserve_gpus(
            job, [g.index for g in self.gpus], want, now, now + int(self.ttl_s * 1e9), owner
        )
        if got is None:
            holders = self.holders()
            free = len(self.gpus) - len(holders)
            who = ", ".join(sorted({f"{h['job']} ({h['owner_name']})" for h in holders.values()}))
            raise Busy(
                f"{want} GPUs asked, {free} of {len(self.gpus)} free; held by {who}",
                {
                    "free": free,
                    "total": len(self.gpus),
                    "holders": sorted({h["job"] for h in holders.values()}),
                },
            )
        return got

    def confirm(self, job: str) -> list[int]:
        """At start: the job's GPUs are its own until it ends."""
        return self.revlog.confirm_gpus(job)

    def release(self, job: str, owner: int | None = None) -> None:
        self.revlog.release_gpus(job, owner)

    def of(self, job: str) -> list[int]:
        return sorted(i for i, h in self.holders().items() if h["job"] == job)

    def holders(self) -> dict[int, dict[str, Any]]:
        return self.revlog.gpu_holders(time.time_ns())

    def describe(self) -> list[dict[str, Any]]:
        """Each GPU with who holds it (None when free), for node_info."""
        holders = self.holders()
        return [{**asdict(g), "held_by": holders.get(g.index)} for g in self.gpus]

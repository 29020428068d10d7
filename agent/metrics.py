"""The job's metrics, as it reports them: `{"step": N, ...}` lines appended to
LAUNCH_METRICS_FILE. The agent reads each new complete line soon after it is written (the
watcher wakes it) and keeps it with its wall time, the revision live and the restart count at
that moment, so a resume that rewinds the step adds points and never overwrites old ones.
Queries over a long run come back bucketed by step (min, max, last), so a curve stays small.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from agent.paths import JobPaths
from agent.revlog import RevLog

MAX_LINE = 64 * 1024


def ingest(revlog: RevLog, paths: JobPaths, job_id: str) -> int:
    """Read the complete lines appended since the last call; returns how many points."""
    job = revlog.get(job_id)
    offset = job.metrics_offset
    try:
        size = os.path.getsize(paths.metrics)
    except OSError:
        return 0
    if size < offset:  # the file was replaced or truncated: read it anew
        offset = 0
    if size == offset:
        return 0
    with open(paths.metrics, "rb") as f:
        f.seek(offset)
        data = f.read(size - offset)
    end = data.rfind(b"\n") + 1  # a partial last line waits for its newline
    if end == 0:
        return 0
    now = time.time_ns()
    points = []
    for line in data[:end].splitlines():
        point = _parse(line)
        if point is not None:
            step, values = point
            points.append(
                (
                    now,
                    step,
                    job.head,
                    job.restart_count,
                    json.dumps(values, sort_keys=True).encode(),
                )
            )
    revlog.add_metrics(job_id, points, offset + end)
    return len(points)


def _parse(line: bytes) -> tuple[int, dict[str, float]] | None:
    if len(line) > MAX_LINE:
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    step = value.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    values = {
        k: float(v)
        for k, v in value.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }
    return step, values


def series(revlog: RevLog, job_id: str, buckets: int = 0) -> dict[str, Any]:
    """Every point, or with `buckets` > 0 the steps cut into that many equal ranges, each with
    min, max and last of every metric."""
    rows = revlog.metrics(job_id)
    points = [
        {"at_ns": at, "step": step, "revision": rev, "restart": restart, "values": json.loads(data)}
        for at, step, rev, restart, data in rows
    ]
    if buckets <= 0 or not points:
        return {"points": points}
    low = min(p["step"] for p in points)
    high = max(p["step"] for p in points)
    width = max(1, math.ceil((high - low + 1) / buckets))
    out: dict[int, dict[str, Any]] = {}
    for p in points:
        index = (p["step"] - low) // width
        bucket = out.setdefault(
            index,
            {
                "from": low + index * width,
                "to": low + (index + 1) * width - 1,
                "count": 0,
                "metrics": {},
            },
        )
        bucket["count"] += 1
        for key, v in p["values"].items():
            lo, hi, _ = bucket["metrics"].get(key, (v, v, v))
            bucket["metrics"][key] = (min(lo, v), max(hi, v), v)
    return {"buckets": [out[i] for i in sorted(out)]}

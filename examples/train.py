"""A small training loop in plain Python (no dependencies), used by `make demo` and the tests.

It fits y = 3x + 1 by gradient descent, prints its loss as it goes, and writes a checkpoint
to $LAUNCH_OUTPUT_DIR (or ./outputs when run by hand). Each rank trains on its own shard.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

try:  # put on PYTHONPATH by the agent; without launch, training works the same
    import launch_runtime as runtime
except ImportError:  # pragma: no cover - run by hand
    runtime = None

STEPS = int(os.environ.get("TRAIN_STEPS", "30"))
LR = float(os.environ.get("TRAIN_LR", "0.1"))
SLEEP = float(os.environ.get("TRAIN_SLEEP", "0.05"))


def main() -> None:
    rank = int(os.environ.get("LAUNCH_NODE_RANK", "0"))
    world = int(os.environ.get("LAUNCH_NUM_NODES", "1"))
    revision = os.environ.get("LAUNCH_REVISION", "-")
    rng = random.Random(rank)
    data = [(x, 3 * x + 1) for x in (rng.uniform(-1, 1) for _ in range(64))]
    w, b = 0.0, 0.0
    print(f"rank {rank}/{world} starting at revision r{revision}", flush=True)
    if runtime is not None:
        runtime.on_patch(
            lambda rev: print(
                f"now at revision r{rev['revision']}: {', '.join(rev['paths'])}", flush=True
            )
        )
    for step in range(1, STEPS + 1):
        gw = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
        gb = sum(2 * (w * x + b - y) for x, y in data) / len(data)
        w, b = w - LR * gw, b - LR * gb
        loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
        if runtime is not None:
            runtime.report(step, loss=loss)
        if step % 5 == 0 or step == STEPS:
            print(f"step {step:3d}  loss {loss:.5f}  w {w:.3f}  b {b:.3f}", flush=True)
        time.sleep(SLEEP)
    out = Path(os.environ.get("LAUNCH_OUTPUT_DIR", "outputs"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.json"
    checkpoint.write_text(json.dumps({"w": w, "b": b, "step": STEPS, "loss": loss}))
    print(f"wrote {checkpoint}", flush=True)


if __name__ == "__main__":
    main()

"""Benchmarks against peers (git, rsync over SSH), run with `make bench` (`python -m bench`).

Each `bench_NAME.py` module in this package is one benchmark: it defines `run(reps)` that
measures, prints a markdown table and returns its results (also written as JSON under
RESULTS). `python -m bench` runs them all; `python -m bench NAME...` runs some.
"""

from __future__ import annotations

import os
from pathlib import Path

# Everything a benchmark downloads or builds lives here, outside the work tree, and is kept
# between runs (a corpus is downloaded once).
BASE = Path(os.environ.get("LAUNCH_BENCH_DIR", "/tmp/launch-bench"))
RESULTS = BASE / "results"

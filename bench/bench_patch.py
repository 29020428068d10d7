"""Patch latency: one small file changed in the tree of a job running on 8 simulated nodes,
until the new bytes are in the job's code directory on every node. Side by side in one run:

  warm   `launch watch FILE` already running (connections open), the file saved; and, for
         information, `launch watch` of the whole tree (it freezes the tree on each save)
  cold   a fresh `launch patch FILE` command (the holder's SSH connections are up)
  rsync  `rsync -a` of the tree with that one change to the same 8 nodes over ControlMaster

Targets (the revisions issue): warm <= 100 ms median and <= 0.3x rsync; cold <= 1.0x rsync.
The simulated nodes, sshd and rsync are set up as in bench_submit.py (tmpfs node state).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.bench_submit import (
    LAUNCH,
    NODES,
    POLL_S,
    RESULTS,
    Bench,
    machine_cpu,
    sshd,
    wait_quiet,
)
from bench.corpus import PROJECT, VERSION, corpus, file_count

REPS = 7
TARGETS = {"warm_ms": 100.0, "warm_ratio": 0.3, "cold_ratio": 1.0}


class PatchBench(Bench):
    job = ""

    def submit_sleeper(self) -> None:
        done = self.launch(*self.submit_args("sleep 3600"))
        if done.returncode != 0:
            raise RuntimeError(f"submit failed: {done.stderr}")
        self.job = done.stdout.strip().splitlines()[-1]

    def live(self, i: int) -> Path:
        rel = self.edit_file.relative_to(self.tree)
        return self.node_state(i) / "jobs" / self.job / "code" / rel

    def wait_live(self, content: bytes, t0: float, also: Any = None) -> float:
        """Seconds from t0 until every node's live copy holds `content`."""
        deadline = t0 + 120
        pending = set(range(NODES))
        while pending:
            for i in list(pending):
                try:
                    if self.live(i).read_bytes() == content:
                        pending.discard(i)
                except OSError:
                    pass
            if also is not None and (problem := also()):
                raise RuntimeError(problem)
            if time.perf_counter() > deadline:
                raise RuntimeError(f"nodes {sorted(pending)} never got the patch")
            if pending:
                time.sleep(POLL_S / 5)
        return time.perf_counter() - t0

    def rsync_dir_live(self, i: int) -> Path:
        return self.rsync_dir(i) / self.edit_file.relative_to(self.tree)

    def run_rsync_change(self, content: bytes) -> float:
        errors: list[str] = []

        def node(i: int) -> None:
            done = subprocess.run(
                self.rsync_argv(i),
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            if done.returncode != 0:
                errors.append(done.stderr.decode(errors="replace"))

        threads = [threading.Thread(target=node, args=(i,)) for i in range(NODES)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        if errors:
            raise RuntimeError(errors[0])
        assert all(self.rsync_dir_live(i).read_bytes() == content for i in range(NODES))
        return seconds


def _exited(watcher: subprocess.Popen[str]) -> str | None:
    return "watch exited" if watcher.poll() is not None else None


def run(reps: int | None = None) -> dict[str, Any]:
    why = sshd.available()
    if why is not None:
        print(f"bench patch: skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    reps = reps or REPS
    tree = corpus()
    files, size = file_count(tree)
    bench = PatchBench(tree)
    times: dict[str, list[float]] = {"warm": [], "warm_tree": [], "cold": [], "rsync": []}
    watcher: subprocess.Popen[str] | None = None
    try:
        bench.start_sshd()
        bench.start_agents()
        bench.write_config()
        bench.start_masters()
        bench.submit_sleeper()
        bench.run_rsync_change(bench.edit_file.read_bytes())  # rsync targets start in sync
        rel = str(bench.edit_file.relative_to(bench.tree))
        print(
            f"\n== patch of {rel} on {NODES} nodes ({PROJECT} {VERSION}, {files:,} files)",
            file=sys.stderr,
        )

        def edit() -> bytes:
            bench.edit()
            return bench.edit_file.read_bytes()

        for k in range(reps + 1):
            # cold: a fresh `launch patch` command
            content = edit()
            wait_quiet()
            t0 = time.perf_counter()
            done = bench.launch("patch", "--job", bench.job, str(bench.edit_file))
            if done.returncode != 0:
                raise RuntimeError(f"launch patch failed: {done.stderr}")
            cold = bench.wait_live(content, t0)
            rsync = bench.run_rsync_change(content)
            if k:
                times["cold"].append(cold)
                times["rsync"].append(rsync)
            print(f"  cold {cold * 1000:7.1f} ms   rsync {rsync * 1000:7.1f} ms", file=sys.stderr)

        # warm: `launch watch FILE` (the target's case), then `launch watch` of the whole
        # tree (the default: it freezes the tree on each save), for information
        for case, paths in (("warm", [str(bench.edit_file)]), ("warm_tree", [])):
            watcher = subprocess.Popen(
                [LAUNCH, "watch", "--job", bench.job, *paths],
                cwd=bench.project,
                env=bench.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert watcher.stdout is not None
            watcher.stdout.readline()  # "watching ..." once its connections are open
            for k in range(reps + 1):
                wait_quiet()
                c0 = machine_cpu()
                t0 = time.perf_counter()
                content = edit()
                warm = bench.wait_live(content, t0, partial(_exited, watcher))
                watcher.stdout.readline()  # its line for this revision
                if k:
                    times[case].append(warm)
                print(
                    f"  {case:9s} {warm * 1000:7.1f} ms (machine cpu {machine_cpu() - c0:.2f} s)",
                    file=sys.stderr,
                )
            watcher.terminate()
            watcher.wait(10)
            watcher = None
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(10)
        bench.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "corpus": {"project": PROJECT, "version": VERSION, "files": files, "bytes": size},
        "nodes": NODES,
        "reps": reps,
        "edited": rel,
        "median_ms": {k: v * 1000 for k, v in med.items()},
        "runs_ms": {k: [x * 1000 for x in v] for k, v in times.items()},
        "warm_ratio": med["warm"] / med["rsync"],
        "cold_ratio": med["cold"] / med["rsync"],
        "targets": TARGETS,
    }
    result["met"] = {
        "warm_ms": result["median_ms"]["warm"] <= TARGETS["warm_ms"],
        "warm_ratio": result["warm_ratio"] <= TARGETS["warm_ratio"],
        "cold_ratio": result["cold_ratio"] <= TARGETS["cold_ratio"],
    }
    print("\n| patch of one file, 8 nodes | median | vs rsync | target |")
    print("|---|---|---|---|")
    print(
        f"| warm (`launch watch`) | {result['median_ms']['warm']:.0f} ms | "
        f"{result['warm_ratio']:.2f}x | <= 100 ms, <= 0.3x |"
    )
    print(
        f"| cold (`launch patch`) | {result['median_ms']['cold']:.0f} ms | "
        f"{result['cold_ratio']:.2f}x | <= 1.0x |"
    )
    print(f"| rsync -a (ControlMaster) | {result['median_ms']['rsync']:.0f} ms | 1.00x | |")
    print(
        f"| `launch watch` of the whole tree (information) | {med['warm_tree'] * 1000:.0f} ms | "
        f"{med['warm_tree'] / med['rsync']:.2f}x | |"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "patch.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return result

"""Freeze against git on a real tree (bench/corpus.py): cold and warm, side by side.

cold: `freeze` into a fresh store with no stat cache, against `git init && git add -A &&
      git write-tree` in a fresh copy of the tree (git's own way to snapshot a tree from
      nothing). Target: at most 1.5x git.
warm: `freeze` again with the stat cache (nothing changed), against `git status` in the same
      prepared repository. Target: at most 1.0x git.

Each pair runs alternately (the order swapped every repetition) and the medians are compared,
so that a noisy neighbour hurts both sides alike. Nothing is dropped from the page cache:
both sides read warm files, and the file system is synced before each timed run, so neither
pays for the other's writes. A freeze is timed in-process (the interpreter is already up, as
in `launch submit`), including `bundle_id`; git is timed as a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from agent.store import Store
from bench import BASE, RESULTS
from bench.corpus import PROJECT, VERSION, corpus, file_count
from launcher.freeze import freeze

WORK = BASE / "work" / "freeze"
COLD_REPS = 5
WARM_REPS = 21
TARGETS = {"cold": 1.5, "warm": 1.0}
GIT_ID = ("-c", "user.name=bench", "-c", "user.email=bench@localhost")


def run(reps: int | None = None) -> dict[str, Any]:
    tree = corpus()
    files, size = file_count(tree)
    dirs = sum(1 for p in tree.rglob("*") if p.is_dir())
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    repo = _prepared_repo(tree)

    load_before = os.getloadavg()
    cold = _cold(tree, repo, reps or COLD_REPS)
    warm = _warm(repo, reps or WARM_REPS)
    plain = _plain(tree, reps or COLD_REPS)
    results: dict[str, Any] = {
        # Other work on the machine slows both sides, but launch more: it runs three git
        # processes and itself, which on an idle machine overlap on two cores.
        "load_average": [load_before, os.getloadavg()],
        "corpus": {
            "project": PROJECT,
            "version": VERSION,
            "files": files,
            "dirs": dirs,
            "bytes": size,
        },
        "cpus": os.cpu_count(),
        "cold": cold,
        "warm": warm,
        "plain": plain,
    }
    _report(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "freeze.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    shutil.rmtree(WORK, ignore_errors=True)
    return results


def _prepared_repo(tree: Path) -> Path:
    """A copy of the corpus committed to git, its index refreshed by one `git status`."""
    repo = WORK / "repo"
    shutil.copytree(tree, repo, symlinks=True)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, *GIT_ID, "commit", "-q", "-m", "corpus")
    _git(repo, "status")
    return repo


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _cold(tree: Path, repo: Path, reps: int) -> dict[str, Any]:
    ours: list[float] = []
    theirs: list[float] = []

    def launch(i: int) -> None:
        store = Store(WORK / f"store-{i}")
        os.sync()
        ours.append(_timed(partial(_bundle, repo, store, None)))
        shutil.rmtree(store.root)

    def git(i: int) -> None:
        copy = WORK / f"copy-{i}"
        shutil.copytree(tree, copy, symlinks=True)
        os.sync()
        script = "git init -q && git add -A && git write-tree >/dev/null"
        theirs.append(_timed(lambda: subprocess.run(["sh", "-c", script], cwd=copy, check=True)))
        shutil.rmtree(copy)

    _alternate(reps, launch, git)
    return _summary(ours, theirs, TARGETS["cold"])


def _warm(repo: Path, reps: int) -> dict[str, Any]:
    store = Store(WORK / "store-warm")
    cache = WORK / "statcache"
    first = freeze(repo, store, cache_path=cache)
    ours: list[float] = []
    cpu: list[float] = []
    theirs: list[float] = []
    read: list[int] = []

    def launch(_: int) -> None:
        os.sync()
        started = time.process_time()
        seconds = _timed(lambda: read.append(freeze(repo, store, cache_path=cache).bytes_read))
        cpu.append(time.process_time() - started)
        ours.append(seconds)

    def git(_: int) -> None:
        os.sync()
        theirs.append(
            _timed(
                lambda: subprocess.run(
                    ["git", "status"], cwd=repo, check=True, stdout=subprocess.DEVNULL
                )
            )
        )

    _alternate(reps, launch, git)
    summary = _summary(ours, theirs, TARGETS["warm"])
    summary["launch_cpu_median_s"] = statistics.median(cpu)
    summary["bytes_read"] = read
    summary["dirty"] = first.source.dirty
    return summary


def _plain(tree: Path, reps: int) -> dict[str, Any]:
    """For information: the same tree as a plain directory (no git: the .gitignore walk)."""
    cold: list[float] = []
    warm: list[float] = []
    cache = WORK / "statcache-plain"
    for i in range(reps):
        store = Store(WORK / f"store-plain-{i}")
        os.sync()
        cold.append(_timed(partial(_bundle, tree, store, cache)))
        os.sync()
        warm.append(_timed(partial(_bundle, tree, store, cache)))
        shutil.rmtree(store.root)
        cache.unlink()
    return {
        "cold_median_s": statistics.median(cold),
        "cold_s": cold,
        "warm_median_s": statistics.median(warm),
        "warm_s": warm,
    }


def _bundle(root: Path, store: Store, cache: Path | None) -> str:
    return freeze(root, store, cache_path=cache).bundle_id


def _alternate(reps: int, a: Callable[[int], None], b: Callable[[int], None]) -> None:
    for i in range(reps):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        first(i)
        second(i)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _summary(ours: list[float], theirs: list[float], target: float) -> dict[str, Any]:
    a, b = statistics.median(ours), statistics.median(theirs)
    return {
        "launch_median_s": a,
        "git_median_s": b,
        "ratio": a / b,
        "target": target,
        "met": a / b <= target,
        "launch_s": ours,
        "git_s": theirs,
    }


def _report(r: dict[str, Any]) -> None:
    c = r["corpus"]
    cold, warm, plain = r["cold"], r["warm"], r["plain"]
    print(
        f"\n## freeze vs git: {c['project']} {c['version']} sdist, {c['files']:,} files in "
        f"{c['dirs']:,} directories, {c['bytes'] / 1e6:.1f} MB"
    )
    before, after = r["load_average"]
    print(
        f"\n{r['cpus']} CPUs, load average {before[0]:.1f} before and {after[0]:.1f} after; "
        f"medians of {len(cold['launch_s'])} (cold) and {len(warm['launch_s'])} (warm) "
        "alternating runs; warm page cache on both sides, file system synced before each "
        "timed run.\n"
    )
    print("| measurement | launch s | git s | ratio | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    rows = [
        ("cold: freeze, fresh store, no cache / git init + add -A + write-tree, fresh copy", cold),
        ("warm: re-freeze with stat cache / git status", warm),
    ]
    for name, s in rows:
        verdict = "met" if s["met"] else "MISSED"
        print(
            f"| {name} | {s['launch_median_s']:.3f} | {s['git_median_s']:.3f} | "
            f"{s['ratio']:.2f}x | <= {s['target']}x {verdict} |"
        )
    print(
        f"| plain directory (no git), cold / warm | {plain['cold_median_s']:.3f} / "
        f"{plain['warm_median_s']:.3f} | | | (information) |"
    )
    print(
        f"\nwarm: bytes read per re-freeze {sorted(set(warm['bytes_read']))}, CPU median "
        f"{warm['launch_cpu_median_s'] * 1000:.1f} ms, source dirty={warm['dirty']}"
    )

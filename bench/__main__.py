"""`python -m bench [NAME...] [--reps N]`: run every benchmark (bench/bench_*.py), or those
named. A new benchmark is a new `bench_NAME.py` with a `run(reps: int | None) -> dict`."""

from __future__ import annotations

import argparse
import compileall
import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = str(Path(__file__).parent)
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([here])
        if m.name.startswith("bench_")
    )


def compile_sources() -> None:
    """Byte-compile launch's own modules once, as `pip install` does for a user. Under
    PYTHONDONTWRITEBYTECODE (set on some machines) every `launch` and `launch-agent` process
    would otherwise compile them again at start-up, and the figures would measure that."""
    repo = Path(__file__).resolve().parent.parent
    for package in ("launcher", "agent"):
        compileall.compile_dir(repo / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(names)}")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})")
    compile_sources()
    for name in args.names or names:
        module = importlib.import_module(f"bench.bench_{name}")
        module.run(args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

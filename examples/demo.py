"""`make demo`: two agents on this machine, examples/train.py on both, its logs, its status.

No SSH server and no cluster are needed: with no cluster configured, `--nodes 2` means two
agents on this machine, started on demand. They are stopped again at the end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCH = [sys.executable, "-m", "launcher.cli"]


def launch(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    print(f"\n$ launch {' '.join(args)}", flush=True)
    return subprocess.run(
        [*LAUNCH, *args], text=True, check=False, stdout=subprocess.PIPE if capture else None
    )


def main() -> int:
    try:
        launch("local", "up", "2")
        # --no-login-shell: both ranks start at once on this one machine, and a login shell
        # whose profile runs `pyenv init` waits up to 60 s on pyenv's rehash lock when two
        # start together. On real nodes (one rank each) the default login shell is right.
        submitted = launch(
            "submit",
            "--nodes",
            "2",
            "--name",
            "demo",
            "--dir",
            str(HERE),
            "--no-login-shell",
            "--",
            "python3",
            "train.py",
        )
        launch("ls")
        launch("status", "demo")
        launch("freeze", str(HERE))
        return submitted.returncode
    finally:
        launch("local", "down")


if __name__ == "__main__":
    sys.exit(main())

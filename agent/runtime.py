"""The in-job helper for Python jobs run by launch (standard library only).

The agent installs this file as `launch_runtime` on every job's PYTHONPATH:

    import launch_runtime as lr
    lr.report(step, loss=0.31)            # a point of the job's metrics (launch metrics JOB)
    lr.current_revision()                 # {"job", "revision", "bundle", "paths", "reason"}
    lr.on_patch(lambda rev: lr.reload_changed_modules())   # when a patch lands

Everything goes through files named in the environment, so any language can do the same:
the job reads LAUNCH_REVISION_FILE (JSON, replaced atomically by the agent) and appends
`{"step": N, ...}` lines to LAUNCH_METRICS_FILE. Outside launch every call is a harmless no-op.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_seen_revision: int | None = None


def current_revision() -> dict[str, Any] | None:
    """The revision now live in the code directory, or None outside launch."""
    path = os.environ.get("LAUNCH_REVISION_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def report(step: int, **metrics: float) -> None:
    """Append one point {"step": step, **metrics} to the job's metrics file. The agent keeps
    it with the time, the live revision and the restart count; the last step reported is
    what the next revision records."""
    path = os.environ.get("LAUNCH_METRICS_FILE")
    if not path:
        return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def on_patch(
    callback: Callable[[dict[str, Any]], None],
    signum: int = signal.SIGUSR1,
    poll_s: float | None = 1.0,
) -> None:
    """Call callback(revision) when a new revision becomes live: at once when the patch sends
    `signum` (`launch patch --signal SIGUSR1`), and otherwise within `poll_s` seconds (a
    background thread reads the revision file; None turns polling off)."""
    global _seen_revision
    first = current_revision()
    _seen_revision = first.get("revision") if first else None

    def fire() -> None:
        global _seen_revision
        rev = current_revision()
        with _lock:
            if rev is None or rev.get("revision") == _seen_revision:
                return
            _seen_revision = rev.get("revision")
        callback(rev)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, lambda *_: fire())
    if poll_s is not None:

        def poll() -> None:
            while True:
                time.sleep(poll_s)
                fire()

        threading.Thread(target=poll, name="launch-on-patch", daemon=True).start()


def reload_changed_modules(paths: list[str] | None = None) -> list[str]:
    """Reload the imported modules whose files a patch changed (default: the paths of the
    current revision). Returns the names reloaded. Objects created from the old code keep it;
    new calls into the module use the new code."""
    if paths is None:
        rev = current_revision() or {}
        paths = list(rev.get("paths", []))
    code_dir = os.environ.get("LAUNCH_CODE_DIR", os.getcwd())
    changed = {os.path.realpath(os.path.join(code_dir, p)) for p in paths}
    reloaded = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.realpath(file) in changed:
            importlib.reload(module)
            reloaded.append(name)
    return reloaded

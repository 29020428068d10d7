"""The pid file of a per-user background process (the connection holder, the command
server): written by the process itself, and the only way anything stops it: by that pid,
checked against the process's start time, so a reused pid is never signalled."""

from __future__ import annotations

import json
from pathlib import Path


def publish(path: Path) -> None:
    """Write this process's pid and start time to `path` (temp file, rename)."""
    import psutil

    me = psutil.Process()
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time()}))
    temp.replace(path)


def stop(path: Path, timeout: float = 10.0) -> bool:
    """SIGTERM the process `path` names, if it is still that process, and wait for it;
    whether one was stopped."""
    import psutil

    try:
        info = json.loads(path.read_text())
        proc = psutil.Process(info["pid"])
        if abs(proc.create_time() - info["create_time"]) > 0.01:
            return False
        proc.terminate()
        proc.wait(timeout)
        return True
    except (FileNotFoundError, psutil.NoSuchProcess, json.JSONDecodeError, KeyError):
        return False

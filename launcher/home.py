"""Where the launcher keeps its own files on this machine: the local object store and stat
caches (cache directory), job records and local agents (state directory), and the sockets of
the connection holder and local agents (runtime directory). `LAUNCH_HOME` puts all of them
under one directory instead, which tests and demos use to stay out of the user's files."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import platformdirs


def _base(kind: str) -> Path:
    override = os.environ.get("LAUNCH_HOME")
    if override:
        return Path(override) / kind
    with warnings.catch_warnings():
        # No XDG_RUNTIME_DIR: platformdirs falls back to /tmp/runtime-UID, which is fine.
        warnings.simplefilter("ignore")
        if kind == "cache":
            return platformdirs.user_cache_path("launch")
        if kind == "state":
            return platformdirs.user_state_path("launch")
        return platformdirs.user_runtime_path("launch")


def cache_dir() -> Path:
    return _base("cache")


def state_dir() -> Path:
    return _base("state")


def runtime_dir() -> Path:
    path = _base("run")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def store_dir() -> Path:
    """The launcher's own object store: every blob it froze, so it can send them later."""
    return cache_dir() / "store"


def stat_cache_path(root: Path) -> Path:
    """One stat cache per frozen directory, named by its absolute path."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "statcache" / f"{key}.cache"


def records_path() -> Path:
    return state_dir() / "records.sqlite"


def local_dir() -> Path:
    """Agents started on this machine for the embedded default (`--nodes N`, no cluster)."""
    return state_dir() / "local"


def holder_socket() -> Path:
    return runtime_dir() / "holder.sock"

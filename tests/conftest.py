"""Shared fixtures: real agents (tests/agents.py) and a helper to submit a small job."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents import AgentFactory, AgentProc
from launcher_env import LaunchHome, local_agents

from agent.protocol.objects import Entry, Manifest, blob_id


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[AgentFactory]:
    """Call `agents("name")` to start a real agent; all are stopped, with their jobs, after."""
    factory = AgentFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def agent(agents: AgentFactory) -> AgentProc:
    return agents("node0")


def submit(
    agent: AgentProc, job: str, files: dict[str, bytes], argv: list[str], **prepare: Any
) -> dict[str, Any]:
    """Upload `files` as a bundle, prepare and start `argv` on one agent; the start result.

    Jobs start without a login shell unless a test asks (`login=True`): on these machines
    root's profile runs `pyenv init`, whose rehash lock stalls login shells started together
    (and a shell killed inside its profile leaves the lock behind for 60 s)."""
    prepare.setdefault("login", False)
    entries = [Entry(path, "file", len(data), blob_id(data)) for path, data in files.items()]
    manifest = Manifest.of(entries)
    agent.call("put_manifest", {"manifest": manifest.encode()})
    agent.call("put_blobs", {"blobs": [[blob_id(d), d] for d in files.values()]})
    agent.call("prepare", {"job": job, "bundle": manifest.bundle_id, "argv": argv, **prepare})
    return agent.call("start", {"job": job})  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lh() -> Iterator[LaunchHome]:
    """One LAUNCH_HOME with two local agents for a test module; all stopped by pid after."""
    with local_agents(2) as home:
        yield home


@pytest.fixture
def fresh() -> Iterator[LaunchHome]:
    """A LAUNCH_HOME of its own: nothing started in it beforehand."""
    home = LaunchHome()
    try:
        yield home
    finally:
        home.close()

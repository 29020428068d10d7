"""`launch-agent fsck` names every stored object whose bytes no longer match its name, and
says so with a non-zero exit; a healthy store passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.protocol.objects import blob_id
from agent.store import Store


def fsck(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fsck", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fsck_names_a_corrupted_object_and_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    blobs = [f"blob {i}\n".encode() for i in range(5)]
    store.put_many([(blob_id(b), b) for b in blobs])

    healthy = fsck(tmp_path)
    assert healthy.returncode == 0, healthy.stderr
    assert "5 objects, all match" in healthy.stdout

    victim = blob_id(blobs[2])
    path = store.path(victim)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))

    broken = fsck(tmp_path)
    assert broken.returncode == 1
    assert victim in broken.stdout
    assert all(blob_id(b) not in broken.stdout for i, b in enumerate(blobs) if i != 2)
    assert "Traceback" not in broken.stderr


def test_fsck_without_a_store_is_one_clear_line(tmp_path: Path) -> None:
    result = fsck(tmp_path / "nothing")
    assert result.returncode != 0
    assert "no store at" in result.stderr
    assert "Traceback" not in result.stderr

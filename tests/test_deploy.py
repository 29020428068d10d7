"""deploy/: the systemd unit is valid and says what DESIGN.md needs; install.sh is sound,
documented and idempotent (run for real into a temporary prefix)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import SYSTEM_SOCKET, SYSTEM_STATE

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "launch-agent.service"
INSTALL = REPO / "deploy" / "install.sh"
VENV_AGENT = Path(sys.executable).parent / "launch-agent"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)

# Sandboxing options every job would inherit, which would break GPU jobs run as their users.
MUST_NOT_SET = (
    "NoNewPrivileges",
    "PrivateDevices",
    "DevicePolicy",
    "DeviceAllow",
    "ProtectClock",
    "ProtectHome",
    "ProtectSystem",
    "PrivateTmp",
    "PrivateNetwork",
    "RestrictAddressFamilies",
    "MemoryDenyWriteExecute",
    "SystemCallFilter",
    "CapabilityBoundingSet",
    "ProtectKernelModules",
    "ProtectKernelTunables",
    "ProtectControlGroups",
    "OOMScoreAdjust",
)


def unit_settings(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order; comments and blank lines dropped."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def with_exec_start(text: str, agent: Path) -> str:
    """The unit with ExecStart pointing at `agent` (systemd-analyze checks it exists)."""
    replaced, count = re.subn(
        r"^ExecStart=/opt/launch-agent/venv/bin/launch-agent ",
        f"ExecStart={agent} ",
        text,
        flags=re.MULTILINE,
    )
    assert count == 1
    return replaced


# ------------------------------------------------------------------------------------ the unit


@needs_analyze
def test_unit_verifies_without_a_single_warning(tmp_path: Path) -> None:
    assert VENV_AGENT.is_file(), "the venv has no launch-agent script (pip install -e .)"
    copy = tmp_path / "launch-agent.service"  # the unit's name comes from the file's
    copy.write_text(with_exec_start(UNIT.read_text(), VENV_AGENT))
    run = verify(copy)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr


@needs_analyze
def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    # The control for the test above: the same check fails on a unit with mistakes in it.
    text = with_exec_start(UNIT.read_text(), VENV_AGENT)
    copy = tmp_path / "launch-agent.service"
    copy.write_text(text.replace("KillMode=process", "KillMode=process\nWatchdogSecs=30"))
    assert "Unknown key" in verify(copy).stderr
    copy.write_text(UNIT.read_text())  # ExecStart names a binary that is not installed here
    if not Path("/opt/launch-agent/venv/bin/launch-agent").exists():
        run = verify(copy)
        assert run.returncode != 0 and "launch-agent" in run.stderr


def test_unit_settings() -> None:
    settings = unit_settings(UNIT.read_text())

    def one(key: str, section: str = "Service") -> str:
        values = settings.get((section, key))
        assert values is not None and len(values) == 1, (key, values)
        return values[0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "always"
    assert one("KillMode") == "process"
    assert one("ExecStart") == "/opt/launch-agent/venv/bin/launch-agent serve"
    assert one("RuntimeDirectory") == "launch-agent"
    assert one("RuntimeDirectoryMode") == "0755"
    assert one("StateDirectory") == "launch-agent"
    assert one("WantedBy", "Install") == "multi-user.target"
    # The directories systemd makes are the ones the agent uses in system mode.
    assert Path("/run") / one("RuntimeDirectory") == SYSTEM_SOCKET.parent
    assert Path("/var/lib") / one("StateDirectory") == SYSTEM_STATE
    # No --socket/--state/--user: system mode with those defaults.
    assert one("ExecStart").split()[1:] == ["serve"]


def test_unit_sets_no_hardening_that_breaks_jobs_and_says_why() -> None:
    text = UNIT.read_text()
    settings = unit_settings(text)
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for option in MUST_NOT_SET:
        assert not any(key == option for _, key in settings), f"{option} is set"
        assert option in comments, f"no comment says why {option} is not set"
    # KillMode=process is explained where it is set.
    assert re.search(r"#[^\n]*outlive[^\n]*\n(#[^\n]*\n)*KillMode=process", text), (
        "KillMode=process needs its reason in a comment just above it"
    )


# --------------------------------------------------------------------------------- install.sh


def test_install_script_parses() -> None:
    run = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert os.access(INSTALL, os.X_OK), "install.sh is not executable"
    head = INSTALL.read_text().splitlines()
    assert head[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in head


def test_install_help() -> None:
    for flag in ("--help", "-h"):
        run = subprocess.run([str(INSTALL), flag], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("Usage: ")
        for word in ("--prefix", "--unit-dir", "--no-start", "LAUNCH_PREFIX", "daemon-reload"):
            assert word in run.stdout
    bad = subprocess.run([str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "--bogus" in bad.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_passes_shellcheck() -> None:
    run = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _snapshot_source(dest: Path) -> Path:
    """A frozen copy of what pip needs from the repository: others may edit the work tree
    while this test runs, and the second install must see exactly the same source."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("agent", "launcher"):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    return dest


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A directory of our own: pytest's tmp_path may be cleaned by another pytest run on the
    same machine (tmp_path_retention_policy = "none") while a slow test still uses it."""
    path = Path(tempfile.mkdtemp(prefix="launch-install-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_install_into_a_sandbox_twice(sandbox: Path) -> None:
    """install.sh for real, into a temporary prefix and unit directory: the first run creates
    and installs, the second finds nothing to do; each says what it did."""
    tmp_path = sandbox
    prefix, units = tmp_path / "opt", tmp_path / "units"
    source = _snapshot_source(tmp_path / "src")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
        "LAUNCH_PREFIX": str(prefix),
        "LAUNCH_UNIT_DIR": str(units),
        "LAUNCH_PYTHON": sys.executable,
    }

    def install(*args: str) -> str:
        run = subprocess.run(
            [str(INSTALL), *args, str(source)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    first = install("--no-start")
    venv = prefix / "venv"
    agent = venv / "bin" / "launch-agent"
    unit = units / "launch-agent.service"
    assert f"venv: created {venv}" in first
    assert "pip: installed launch-agent, version" in first
    assert f"unit: wrote {unit}" in first
    assert "systemd: skipped (--no-start)" in first
    assert agent.is_file() and os.access(agent, os.X_OK)
    version = subprocess.run([str(agent), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "launch-agent" in version.stdout
    written = unit.read_text()
    assert written == with_exec_start(UNIT.read_text(), agent)
    assert unit.stat().st_mode & 0o777 == 0o644
    if SYSTEMD_ANALYZE is not None:  # the unit as installed, with its real ExecStart
        run = verify(unit)
        assert run.returncode == 0 and run.stderr.strip() == "", run.stderr
    mtime = unit.stat().st_mtime_ns

    # Again, this time letting it reach systemd: it must still not touch the real one (the
    # unit is not in /etc/systemd/system; in a container systemd is not running at all).
    second = install()
    assert f"venv: {venv} exists, kept" in second
    assert "already installed, unchanged" in second
    assert f"unit: {unit} is up to date" in second
    assert unit.stat().st_mtime_ns == mtime
    assert ("systemd: not running here" in second) or ("not enabling it" in second), second
    assert second.rstrip().endswith("install.sh: done")
    assert sorted(p.name for p in units.iterdir()) == ["launch-agent.service"]  # no temp left

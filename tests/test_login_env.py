"""A job runs in its owner's login environment by default (as an SSH command would), and
without it when asked (`login: False`, the CLI's --no-login-shell)."""

from __future__ import annotations

import os
import pwd

import pytest
from agents import wait_for
from conftest import submit

SHELL = pwd.getpwuid(os.geteuid()).pw_shell


def _log(agent, job: str) -> str:  # type: ignore[no-untyped-def]
    wait_for(lambda: agent.call("status", {"job": job})["state"] != "running", timeout=120)
    path = agent.state / "jobs" / job / "log"
    return path.read_text()


@pytest.mark.skipif(not SHELL.endswith("bash"), reason="the check uses bash's login_shell flag")
def test_default_is_the_owners_login_shell(agent) -> None:  # type: ignore[no-untyped-def]
    submit(
        agent,
        "j-login",
        {"x": b""},
        ["/bin/sh", "-c", 'echo "shell=$SHELL home=$HOME"'],
        login=True,
    )
    # The overlay ran inside `$SHELL -l`; the command itself is exec-ed afterwards, so ask
    # the agent's recorded command line instead of the job.
    spec = (agent.state / "jobs" / "j-login" / "spec.json").read_text()
    assert '"-lc"' in spec
    assert f"shell={SHELL} home={pwd.getpwuid(os.geteuid()).pw_dir}" in _log(agent, "j-login")


def test_no_login_shell_reads_no_profile(agent) -> None:  # type: ignore[no-untyped-def]
    submit(agent, "j-plain", {"x": b""}, ["/bin/sh", "-c", 'echo "path=$PATH"'], login=False)
    spec = (agent.state / "jobs" / "j-plain" / "spec.json").read_text()
    assert '"-lc"' not in spec
    assert "path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in _log(
        agent, "j-plain"
    )

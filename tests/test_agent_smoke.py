"""A first end-to-end check of one real agent: submit, follow logs, exit code."""

from __future__ import annotations

import sys

from agents import wait_for
from conftest import submit


def test_job_runs_and_logs_are_complete(agent):
    code = b"import os\nfor i in range(5):\n    print('line', i, os.environ['LAUNCH_NODE_RANK'])\nraise SystemExit(3)\n"
    submit(agent, "j-smoke", {"main.py": code}, [sys.executable, "main.py"])
    status = wait_for(lambda: (s := agent.call("status", {"job": "j-smoke"}))["state"] != "running" and s)
    assert status["state"] == "failed"
    assert status["exit_code"] == 3
    data = b""
    result = agent.call("logs", {"job": "j-smoke", "offset": 0})
    assert result["offset"] > 0

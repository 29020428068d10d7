"""The fork server (agent/forkserver.py) that starts every shim: it ends with its agent while
the jobs it started live on, a killed one is replaced at the next start, and the shims it
forked are reaped as they end. Real agents, real jobs."""

from __future__ import annotations

import os

import psutil
from agents import AgentProc, children, wait_for
from test_agent_jobs import COUNTER, alive, job_paths, log_bytes, run_job, wait_ended


def fork_servers(agent: AgentProc) -> list[psutil.Process]:
    """The agent's fork server processes (one, from the moment the agent serves)."""
    assert agent.proc is not None
    return children(agent.proc.pid, "agent.forkserver")


def shim_of(agent: AgentProc, job: str) -> psutil.Process:
    return psutil.Process(agent.call("status", {"job": job})["pid"])


def test_a_shim_is_forked_by_the_server_in_its_own_session(agents):
    agent = agents("node0")
    # Started with the agent: not even the first job's start waits for it.
    (early,) = wait_for(lambda: fork_servers(agent), timeout=10)
    run_job(agent, "j-forked", "print('hello', flush=True)\n")
    wait_ended(agent, "j-forked")
    assert log_bytes(agent, "j-forked") == b"hello\n"
    (server,) = fork_servers(agent)
    assert server.pid == early.pid

    run_job(agent, "j-forked-2", COUNTER)
    shim = shim_of(agent, "j-forked-2")
    assert shim.ppid() == server.pid
    assert psutil.Process(shim.pid).status() != psutil.STATUS_ZOMBIE
    # Its own session and process group, as a shim started by the agent had.
    assert os.getsid(shim.pid) == shim.pid != os.getsid(server.pid)
    assert agent.call("cancel", {"job": "j-forked-2", "grace_s": 1})["state"] == "cancelled"


def test_the_server_ends_with_its_agent_and_the_job_lives_on(agents):
    agent = agents("node0")
    run_job(agent, "j-outlives", COUNTER)
    wait_for(lambda: log_bytes(agent, "j-outlives").count(b"\n") >= 2)
    (server,) = fork_servers(agent)
    shim = shim_of(agent, "j-outlives")

    agent.kill9()
    wait_for(lambda: not alive(server.pid), timeout=10)  # PR_SET_PDEATHSIG
    assert alive(shim.pid)
    printed = log_bytes(agent, "j-outlives").count(b"\n")
    wait_for(lambda: log_bytes(agent, "j-outlives").count(b"\n") > printed + 2, timeout=10)

    agent.start()  # re-adopts the shim, and starts a new server
    assert agent.call("status", {"job": "j-outlives"})["pid"] == shim.pid
    assert agent.call("cancel", {"job": "j-outlives", "grace_s": 1})["state"] == "cancelled"
    assert not alive(shim.pid)

    # A graceful stop ends the server too (end of file on its socket).
    run_job(agent, "j-after", "print('again', flush=True)\n")
    (server,) = fork_servers(agent)
    wait_ended(agent, "j-after")
    agent.stop()
    wait_for(lambda: not alive(server.pid), timeout=10)


def test_a_killed_server_is_replaced_at_the_next_start(agents):
    agent = agents("node0")
    run_job(agent, "j-first", "print('one', flush=True)\n")
    wait_ended(agent, "j-first")
    (server,) = fork_servers(agent)
    server.kill()
    wait_for(lambda: not alive(server.pid), timeout=10)  # a zombie until the agent needs it

    run_job(agent, "j-second", "print('two', flush=True)\n")
    status = wait_ended(agent, "j-second")
    assert (status["state"], log_bytes(agent, "j-second")) == ("succeeded", b"two\n")
    (replacement,) = fork_servers(agent)
    assert replacement.pid != server.pid


def test_shims_that_end_are_reaped(agents):
    agent = agents("node0")
    jobs = [f"j-reap-{n}" for n in range(6)]
    for job in jobs:
        run_job(agent, job, "import sys\nsys.exit(3)\n")
    for job in jobs:
        status = wait_ended(agent, job)
        assert (status["state"], status["exit_code"]) == ("failed", 3)
        assert job_paths(agent, job).exit.exists()
    (server,) = fork_servers(agent)
    wait_for(lambda: server.children() == [], timeout=10)  # no zombie left behind

"""The command server (launcher/cmdserver.py) behind the installed `launch` script
(launcher/entry.py): a command run through it behaves as one run in its own process (output,
errors, exit codes, working directory, environment), Ctrl-C reaches it, and a server that
runs other code or died never gets in the way. The real script, a real server, real agents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from launcher_env import LAUNCH_SCRIPT, LaunchHome, local_agents, wait_until, write_tree

import launcher


def serving(lh: LaunchHome) -> psutil.Process:
    """Run a first command (in its own process: it starts the server); the server."""
    first = lh.run_script("--version")
    assert first.code == 0, first.describe()
    assert wait_until(lambda: lh.command_server() is not None and lh.command_socket().exists())
    server = lh.command_server()
    assert server is not None
    return server


def test_a_command_through_the_server_is_the_same_command(fresh: LaunchHome, tmp_path: Path):
    lh = fresh
    server = serving(lh)
    tree = write_tree(tmp_path / "src", {"train.py": "print('hi')\n", "data/a.txt": "a\n"})

    # Its working directory and output: a freeze of "." where the caller stands.
    through = lh.run_script("freeze", "--json", cwd=tree)
    alone = lh.run("freeze", "--json", cwd=tree)
    assert through.code == 0, through.describe()
    assert json.loads(through.out)["bundle"] == json.loads(alone.out)["bundle"]

    # Its errors and exit codes, named as the caller named it.
    missing = lh.run_script("status", "j-nope")
    assert missing.assert_clean_failure(2) == lh.run("status", "j-nope").err.strip()
    usage = lh.run_script("bogus")
    assert usage.code == 2 and "Usage: launch " in usage.err, usage.describe()

    # Its environment is the caller's, not the server's.
    elsewhere = tmp_path / "other-config"
    (elsewhere / "launch").mkdir(parents=True)
    (elsewhere / "launch" / "launch.toml").write_text("[clusters.x]\nhosts = [\n")  # broken
    env = {**lh.env, "LAUNCH_COMMAND_SERVER": "1", "XDG_CONFIG_HOME": str(elsewhere)}
    broken = subprocess.run(
        [LAUNCH_SCRIPT, "nodes"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert broken.returncode == 2 and "launch.toml" in broken.stderr, broken.stderr
    assert lh.command_server() == server  # one server served all of them


@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_the_command_in_the_worker_ends_with_its_caller(tmp_path: Path, how: str):
    """Ctrl-C reaches the worker (exit 130, as in-process); a caller killed outright (it
    cannot forward SIGKILL) interrupts its worker too, which never runs on for nobody."""
    with local_agents(1) as lh:
        serving(lh)
        src = write_tree(tmp_path / "src", {"loop.py": LOOP})
        submitted = lh.run(
            "submit", "--detach", "--name", "loop", "--", sys.executable, "loop.py", cwd=src
        )
        assert submitted.code == 0, submitted.describe()
        with subprocess.Popen(
            [LAUNCH_SCRIPT, "logs", "-f", "loop"],
            env={**lh.env, "LAUNCH_COMMAND_SERVER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as follow:
            try:
                assert follow.stdout is not None and follow.stderr is not None
                assert "tick" in follow.stdout.readline()  # the worker writes to our pipe
                server = lh.command_server()
                assert server is not None
                (worker,) = server.children()  # the command runs in the server's worker
                if how == "ctrl-c":
                    follow.send_signal(signal.SIGINT)
                    assert follow.wait(20) == 130
                    assert "launch: interrupted" in follow.stderr.read()
                else:
                    follow.kill()
                    follow.wait(20)
                assert wait_until(lambda: not worker.is_running() or worker.status() == "zombie")
            finally:
                if follow.poll() is None:
                    follow.kill()
        assert lh.run("cancel", "loop").code == 0


LOOP = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.2)\n"


def test_a_server_of_other_code_leaves_and_the_command_still_runs(fresh: LaunchHome):
    lh = fresh
    server = serving(lh)
    module = Path(launcher.__file__)
    before = module.stat()
    # An upgrade or an edit of the checkout: the client's code is no longer the server's.
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        result = lh.run_script("--version")
        assert result.code == 0 and "version" in result.out, result.describe()
        assert wait_until(lambda: not server.is_running() or server.status() == "zombie")
        # A server of the code as it is now takes over, for the next command.
        assert wait_until(lambda: lh.command_server() not in (None, server))
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_dead_server_never_fails_a_command(fresh: LaunchHome):
    lh = fresh
    server = serving(lh)
    server.kill()
    server.wait(10)
    result = lh.run_script("ls", "--json")
    assert result.code == 0 and json.loads(result.out) == [], result.describe()
    assert wait_until(lambda: lh.command_server() not in (None, server))
    again = lh.run_script("ls", "--json")
    assert again.code == 0 and json.loads(again.out) == [], again.describe()

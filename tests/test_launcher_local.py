"""End to end: the `launch` CLI as a user runs it with no cluster configured, where
`--nodes N` means N agents on this machine started under LAUNCH_HOME.

Every command runs as a real subprocess; jobs run under real agents and shims. Jobs start
with --no-login-shell (a login shell here may wait on pyenv's rehash lock) and run this
venv's interpreter.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launcher_env import (
    PYTHON,
    LaunchHome,
    process_gone,
    status,
    wait_state,
    wait_until,
    write_tree,
)

JOB_RE = re.compile(r"^j-[0-9a-z]+-[0-9a-z]{4}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def submit(src: Path, *command: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`launch submit` on the two local agents, from the tree `src`."""
    return ["submit", "--nodes", "2", "--no-login-shell", "--dir", str(src), *extra, "--", *command]


# ------------------------------------------------------------------------ submit, follow


def test_submit_follows_both_nodes_logs_once_each_with_rank_prefix(
    lh: LaunchHome, tmp_path: Path
) -> None:
    src = write_tree(
        tmp_path / "src",
        {
            "main.py": "import os\n"
            "rank = os.environ['LAUNCH_NODE_RANK']\n"
            "for i in range(40):\n"
            "    print(f'rank {rank} line {i}')\n"
        },
    )
    # Run from elsewhere: --dir names the tree.
    r = lh.run(*submit(src, PYTHON, "main.py"), cwd=tmp_path)
    assert r.code == 0, r.describe()
    assert "\x1b" not in r.out  # piped: no colour codes
    lines = r.lines()
    expected = [f"[{rank}] rank {rank} line {i}" for rank in (0, 1) for i in range(40)]
    assert sorted(lines) == sorted(expected)  # every line, exactly once, nothing else
    for rank in (0, 1):  # each node's lines in their own order
        mine = [line for line in lines if line.startswith(f"[{rank}] ")]
        assert mine == [f"[{rank}] rank {rank} line {i}" for i in range(40)]
    assert "Traceback" not in r.err
    assert re.search(r"job j-\S+ on 2 node\(s\)", r.err), r.describe()


def test_exit_code_is_the_jobs_when_one_rank_fails(lh: LaunchHome, tmp_path: Path) -> None:
    src = write_tree(
        tmp_path / "src",
        {
            "main.py": "import os, sys\n"
            "rank = int(os.environ['LAUNCH_NODE_RANK'])\n"
            "print(f'rank {rank} done')\n"
            "sys.exit(3 if rank == 1 else 0)\n"
        },
    )
    r = lh.run(*submit(src, PYTHON, "main.py"))
    assert r.code == 3, r.describe()
    assert sorted(r.lines()) == ["[0] rank 0 done", "[1] rank 1 done"]
    job = re.search(r"job (j-\S+)", r.err)
    assert job, r.describe()
    st = status(lh, job.group(1))
    by_rank = {n["rank"]: n for n in st["nodes"]}
    assert (by_rank[0]["state"], by_rank[0]["exit_code"]) == ("succeeded", 0)
    assert (by_rank[1]["state"], by_rank[1]["exit_code"]) == ("failed", 3)


def test_unknown_command_fails_cleanly_on_both_nodes(lh: LaunchHome, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"main.py": "print('unused')\n"})
    r = lh.run(*submit(src, "no-such-command-xyz"))
    assert r.code != 0, r.describe()
    assert "Traceback" not in r.out + r.err
    for rank in (0, 1):
        mine = [line for line in r.lines() if line.startswith(f"[{rank}] ")]
        assert any("no-such-command-xyz" in line and "not found" in line for line in mine), (
            r.describe()
        )
    job = re.search(r"job (j-\S+)", r.err)
    assert job, r.describe()
    assert {n["state"] for n in status(lh, job.group(1))["nodes"]} == {"failed"}


# ------------------------------------------------------- detach, json, status, ls, logs


def test_detach_prints_the_job_id_and_logs_show_it(lh: LaunchHome, tmp_path: Path) -> None:
    src = write_tree(
        tmp_path / "src",
        {"main.py": "import os\nprint('hello from', os.environ['LAUNCH_NODE_RANK'])\n"},
    )
    r = lh.run(*submit(src, PYTHON, "main.py", extra=("--detach",)))
    assert r.code == 0, r.describe()
    job = r.out.strip()
    assert JOB_RE.match(job) and r.out == job + "\n", r.describe()
    st = wait_state(lh, job, {"succeeded"})
    assert [n["exit_code"] for n in st["nodes"]] == [0, 0]
    logs = lh.run("logs", job)
    assert logs.code == 0, logs.describe()
    assert sorted(logs.lines()) == ["[0] hello from 0", "[1] hello from 1"]
    only1 = lh.run("logs", job, "--node", "1")
    assert only1.code == 0 and only1.lines() == ["[1] hello from 1"], only1.describe()


SLEEPER = """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
rank = os.environ['LAUNCH_NODE_RANK']
with open(os.path.join(os.environ['LAUNCH_OUTPUT_DIR'], 'pids'), 'w') as f:
    f.write(f'{os.getpid()} {child.pid}')
print(f'rank {rank} pids {os.getpid()} {child.pid}', flush=True)
time.sleep(300)
"""


def test_json_status_ls_logs_and_cancel_of_a_running_job(lh: LaunchHome, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"sleeper.py": SLEEPER})
    r = lh.run(*submit(src, PYTHON, "sleeper.py", extra=("--json",)))
    submitted = r.json()
    assert set(submitted) == {"job", "bundle", "revision", "nodes", "sent_blobs"}
    assert submitted["revision"] == 0
    assert submitted["nodes"] == ["local0", "local1"]
    assert HEX64.match(submitted["bundle"])
    job = submitted["job"]
    assert JOB_RE.match(job)

    # Both ranks printed their pids: the job and the child it started.
    pids: dict[int, list[int]] = {}

    def both_started() -> bool:
        out = lh.run("logs", job)
        for line in out.lines():
            m = re.match(r"^\[(\d)\] rank \d pids (\d+) (\d+)$", line)
            if m:
                pids[int(m[1])] = [int(m[2]), int(m[3])]
        return len(pids) == 2

    assert wait_until(both_started, 30), pids
    procs = [(pid, psutil.Process(pid).create_time()) for ps in pids.values() for pid in ps]

    st = status(lh, job)
    assert st["job"] == job and st["diverged"] is False
    assert [n["rank"] for n in st["nodes"]] == [0, 1]
    for node in st["nodes"]:
        assert node["state"] == "running"
        assert node["revision"] == 0
        assert node["bundle"] == submitted["bundle"]
        assert node["exit_code"] is None

    listed = {row["job"]: row for row in lh.run("ls", "--json").json()}
    assert job in listed
    assert listed[job]["state"] == "running" and listed[job]["nodes"] == 2

    only1 = lh.run("logs", job, "--node", "1")
    assert only1.code == 0 and len(only1.lines()) == 1, only1.describe()
    assert only1.lines()[0].startswith("[1] rank 1 pids ")

    cancelled = lh.run("cancel", job, "--grace", "5")
    assert cancelled.code == 0, cancelled.describe()
    assert sorted(cancelled.lines()) == ["rank 0: cancelled", "rank 1: cancelled"]
    st = status(lh, job)
    assert [n["state"] for n in st["nodes"]] == ["cancelled", "cancelled"]
    assert st["state"] == "cancelled"
    # No process of the job is left, the child it started included.
    assert wait_until(lambda: all(process_gone(*p) for p in procs), 10), procs
    assert {row["job"]: row for row in lh.run("ls", "--json").json()}[job]["state"] == "cancelled"


# ------------------------------------------------------------------------ upload economy


def test_unchanged_tree_sends_no_blobs_and_one_change_sends_one(
    lh: LaunchHome, tmp_path: Path
) -> None:
    token = tmp_path.name  # unique content: no agent has these blobs yet
    src = write_tree(
        tmp_path / "src",
        {
            "main.py": f"# {token}\nprint('main')\n",
            "lib/util.py": f"# {token}\nX = 1\n",
            "data/config.json": json.dumps({"token": token}),
        },
    )
    first = lh.run(*submit(src, PYTHON, "-c", "pass", extra=("--json",))).json()
    assert first["sent_blobs"] == [3, 3]
    again = lh.run(*submit(src, PYTHON, "-c", "pass", extra=("--json",))).json()
    assert again["sent_blobs"] == [0, 0]
    assert again["bundle"] == first["bundle"] and again["job"] != first["job"]
    (src / "lib" / "util.py").write_text(f"# {token}\nX = 2\n")
    changed = lh.run(*submit(src, PYTHON, "-c", "pass", extra=("--json",))).json()
    assert changed["sent_blobs"] == [1, 1]
    assert changed["bundle"] != first["bundle"]
    for sub in (first, again, changed):
        wait_state(lh, sub["job"], {"succeeded"})


@pytest.mark.parametrize("after_s", [0.4, 0.6, 0.8])
def test_ctrl_c_during_a_cold_submit_starts_all_or_nothing_and_prints_no_traceback(
    lh: LaunchHome, tmp_path: Path, after_s: float
) -> None:
    """Ctrl-C while a large tree is frozen and streamed to the nodes, or while they store
    it: a job runs on every node or on none, the launcher says it was interrupted (no
    traceback), and the next submit of the tree works."""
    token = f"{tmp_path.name}-{after_s}"
    files = {
        f"pkg/f{n:03d}.py": "".join(f"v_{n}_{i} = '{token}'  # {i * n}\n" for i in range(4000))
        for n in range(200)
    }
    src = write_tree(tmp_path / "src", files)
    argv = submit(src, "sleep", "60", extra=("--detach",))
    proc = subprocess.Popen(
        [PYTHON, "-m", "launcher.cli", *argv],
        cwd=lh.path,
        env=lh.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # 130 when interrupted; 0, or killed by the signal, when it came after the job started.
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err)
    nodes = lh.run("nodes", "--json").json()
    running = [set(n["my_jobs"]) for n in nodes]
    assert running[0] == running[1], nodes  # all or nothing
    if proc.returncode == 130:
        assert "launch: interrupted" in err
    for job in running[0]:
        lh.run("cancel", job)

    again = lh.run(*submit(src, PYTHON, "-c", "pass", extra=("--json",))).json()
    wait_state(lh, again["job"], {"succeeded"})


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("missing --dir", ["submit", "--nodes", "1", "--dir", "{tmp}/nope", "--", "true"]),
        ("--env without =", ["submit", "--nodes", "1", "--env", "NOEQUALS", "--", "true"]),
        ("status of unknown job", ["status", "j-nosuchjob"]),
        ("logs of unknown job", ["logs", "j-nosuchjob"]),
        ("cancel of unknown job", ["cancel", "j-nosuchjob"]),
        ("unknown cluster", ["submit", "--cluster", "nope", "--", "true"]),
        ("unknown object", ["cat", "0123456789ab"]),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    fresh: LaunchHome, tmp_path: Path, case: str, args: list[str]
) -> None:
    r = fresh.run(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    line = r.assert_clean_failure(2)
    assert line.startswith("launch: "), r.describe()
    # A refused command starts nothing: no local agent was brought up for it.
    assert fresh.local_states() == [], f"{case}: agents started"


def test_no_command_after_dashes_is_a_usage_error(fresh: LaunchHome, tmp_path: Path) -> None:
    for args in (["submit", "--nodes", "1", "--"], ["submit", "--nodes", "1"]):
        r = fresh.run(*args, cwd=tmp_path)
        assert r.code == 2, r.describe()
        assert "Traceback" not in r.err
        errors = [line for line in r.err_lines() if line.startswith(("Error:", "launch:"))]
        assert len(errors) == 1, r.describe()
    assert fresh.local_states() == []


# --------------------------------------------------------------------------- freeze, cat


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_freeze_json_on_a_git_repo_and_cat_the_manifest(lh: LaunchHome, tmp_path: Path) -> None:
    repo = write_tree(
        tmp_path / "repo",
        {
            "train.py": "print('train')\n",
            "pkg/model.py": "W = 1\n",
            ".gitignore": "*.log\n",
            "run.log": "ignored\n",
        },
    )
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    head = git(repo, "rev-parse", "HEAD")

    frozen = lh.run("freeze", str(repo), "--json").json()
    assert set(frozen) == {"bundle", "files", "bytes", "excluded", "git"}
    assert HEX64.match(frozen["bundle"])
    assert frozen["files"] == 3  # .gitignore, train.py, pkg/model.py; run.log is ignored
    assert frozen["bytes"] == len("print('train')\n") + len("W = 1\n") + len("*.log\n")
    assert isinstance(frozen["excluded"], list)
    assert frozen["git"] == {"commit": head, "branch": "main", "dirty": False}

    shown = lh.run("cat", frozen["bundle"][:12])
    assert shown.code == 0, shown.describe()
    assert shown.lines()[0] == f"manifest {frozen['bundle']}"
    listed = shown.out
    for path in (".gitignore", "train.py", "pkg/model.py"):
        assert re.search(rf"\s{re.escape(path)}$", listed, re.M), listed
    assert "run.log" not in listed

    (repo / "train.py").write_text("print('edited')\n")
    dirty = lh.run("freeze", str(repo), "--json").json()
    assert dirty["git"] == {"commit": head, "branch": "main", "dirty": True}
    assert dirty["bundle"] != frozen["bundle"]

    missing = lh.run("cat", "0123456789ab")
    missing.assert_clean_failure(2)


# ---------------------------------------------------------------------------------- help


def test_help_lists_exit_codes_and_submit_help_works(lh: LaunchHome) -> None:
    top = lh.run("--help")
    assert top.code == 0, top.describe()
    assert "Exit codes" in top.out
    for text in ("0 ok", "1 job failed", "2 usage", "3 stale revision", "4 node unreachable"):
        assert text in " ".join(top.out.split()), top.out
    sub = lh.run("submit", "--help")
    assert sub.code == 0, sub.describe()
    assert "--no-login-shell" in sub.out and "--nodes" in sub.out and "--detach" in sub.out

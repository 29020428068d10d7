"""End to end: what a job lives through on its node, as a user sees it through the `launch`
CLI: hand edits in a node's code directory become drift revisions (invariant 3), the job's
reported metrics come back with their revision and restart, the in-job helper
`launch_runtime` sees patches, `launch watch` patches on save, and `launch rerun` starts a new
job from exactly the code and command of an old one.

Every command runs as a real subprocess against real local agents under a private
LAUNCH_HOME (tests/launcher_env.py). Jobs start with --no-login-shell and run this venv's
interpreter. Each test cancels the jobs it submitted and stops the processes it started.
"""

from __future__ import annotations

import getpass
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import AgentProc, wait_for
from conftest import submit as submit_to_agent
from launcher_env import (
    PYTHON,
    LaunchHome,
    revisions,
    status,
    wait_state,
    wait_until,
    write_tree,
)

from agent.protocol.objects import Revision

HOST = socket.gethostname()
ME = f"{getpass.getuser()}@{HOST}"  # who `launch patch` says made a revision
DRIFT_DEADLINE_S = 2.0

SLEEPER = "import time\ntime.sleep(60)\n"


@pytest.fixture
def jobs(lh: LaunchHome) -> Iterator[list[str]]:
    """Jobs a test submitted: cancelled (harmless if already ended) when it finishes."""
    submitted: list[str] = []
    try:
        yield submitted
    finally:
        for job in submitted:
            lh.run("cancel", job, "--grace", "0")


# --------------------------------------------------------------------------- helpers


def submit(lh: LaunchHome, jobs: list[str], src: Path, *command: str, nodes: int = 1) -> str:
    """`launch submit --detach` from the tree `src`; the job id."""
    r = lh.run(
        "submit",
        "--nodes",
        str(nodes),
        "--no-login-shell",
        "--dir",
        str(src),
        "--detach",
        "--",
        *command,
    )
    assert r.code == 0, r.describe()
    job = r.out.strip()
    jobs.append(job)
    return job


def node_dir(lh: LaunchHome, job: str, rank: int = 0) -> Path:
    """The job's directory on local agent `rank`: code/, log, metrics/..."""
    return lh.path / "state" / "local" / f"node{rank}" / "jobs" / job


def metrics(lh: LaunchHome, job: str, *extra: str) -> dict[str, Any]:
    answer: dict[str, Any] = lh.run("metrics", job, "--json", *extra).json()
    return answer


def hand_edit(path: Path, text: str | None) -> tuple[float, int]:
    """Change a file of a node's code directory by hand, as root (files there are 0444, which
    root may still write); None deletes it. The moment of the write, monotonic and wall."""
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    return time.monotonic(), time.time_ns()


def wait_for_revision(
    lh: LaunchHome, job: str, number: int, since: tuple[float, int]
) -> list[dict[str, Any]]:
    """Poll `launch revisions` until revision `number` shows, for at most DRIFT_DEADLINE_S
    after the write `since`; the revision must also have been recorded within it."""
    started, wall_ns = since
    while True:
        rows = revisions(lh, job)
        if len(rows) > number:
            break
        assert time.monotonic() - started < DRIFT_DEADLINE_S, (
            f"r{number} not recorded {DRIFT_DEADLINE_S} s after the write: {rows}"
        )
        time.sleep(0.05)
    assert len(rows) == number + 1, rows
    rev = rows[number]
    assert rev["at_ns"] - wall_ns < DRIFT_DEADLINE_S * 1e9, (rev, wall_ns)
    return rows


def log_text(lh: LaunchHome, job: str) -> str:
    r = lh.run("logs", job)
    assert r.code == 0, r.describe()
    return r.out


def wait_log(lh: LaunchHome, job: str, pattern: str, timeout: float = 20) -> re.Match[str]:
    found: list[re.Match[str]] = []

    def seen() -> bool:
        m = re.search(pattern, log_text(lh, job), re.M)
        if m:
            found.append(m)
        return m is not None

    assert wait_until(seen, timeout, 0.1), f"{pattern!r} not in the log:\n{log_text(lh, job)}"
    return found[0]


def patch(lh: LaunchHome, job: str, src: Path, *files: str) -> dict[str, Any]:
    """`launch patch FILES --job JOB --json`, run in the job's source tree."""
    result: dict[str, Any] = lh.run("patch", *files, "--job", job, "--json", cwd=src).json()
    return result


# ------------------------------------------------------------------------------ drift


def test_hand_edits_on_a_node_become_drift_revisions(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(
        tmp_path / "src",
        {"main.py": SLEEPER, "lib/util.py": "X = 1\n", "data.txt": "keep me\n"},
    )
    job = submit(lh, jobs, src, PYTHON, "main.py")
    code = node_dir(lh, job) / "code"
    assert wait_until(lambda: status(lh, job)["nodes"][0]["state"] == "running", 20)
    assert (code / "lib/util.py").stat().st_mode & 0o777 == 0o444  # read-only to the job

    # An edit of an existing file.
    rows = wait_for_revision(lh, job, 1, hand_edit(code / "lib/util.py", "X = 2  # by hand\n"))
    r0, r1 = rows
    assert (r0["revision"], r0["reason"]) == (0, "submit")
    assert r1["revision"] == 1 and r1["parent"] == 0
    assert r1["reason"] == "drift"
    assert r1["author"] == f"unknown@{HOST}"
    assert r1["paths"] == ["lib/util.py"]
    assert r1["nodes"] == ["local0"]
    assert r1["bundle"] != r0["bundle"]

    out = tmp_path / "r1"
    r = lh.run("checkout", f"{job}@r1", str(out))
    assert r.code == 0, r.describe()
    assert (out / "lib/util.py").read_text() == "X = 2  # by hand\n"
    assert (out / "main.py").read_text() == SLEEPER
    assert (out / "data.txt").read_text() == "keep me\n"
    before = tmp_path / "r0"
    r = lh.run("checkout", f"{job}@r0", str(before))
    assert r.code == 0, r.describe()
    assert (before / "lib/util.py").read_text() == "X = 1\n"  # the original is kept

    # A new file, then a deleted one: each a drift revision of its own.
    rows = wait_for_revision(lh, job, 2, hand_edit(code / "notes.md", "added on the node\n"))
    assert (rows[2]["reason"], rows[2]["paths"], rows[2]["parent"]) == ("drift", ["notes.md"], 1)
    rows = wait_for_revision(lh, job, 3, hand_edit(code / "data.txt", None))
    assert (rows[3]["reason"], rows[3]["paths"], rows[3]["parent"]) == ("drift", ["data.txt"], 2)
    assert all(row["author"] == f"unknown@{HOST}" for row in rows[1:])

    out3 = tmp_path / "r3"
    r = lh.run("checkout", job, str(out3))  # the head
    assert r.code == 0, r.describe()
    files = sorted(p.relative_to(out3).as_posix() for p in out3.rglob("*") if p.is_file())
    assert files == ["lib/util.py", "main.py", "notes.md"]
    assert (out3 / "notes.md").read_text() == "added on the node\n"

    st = status(lh, job)
    assert st["nodes"][0]["revision"] == 3 and st["nodes"][0]["state"] == "running"
    assert st["diverged"] is False


def test_a_patch_through_launch_is_not_drift(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"main.py": SLEEPER, "lib/util.py": "X = 1\n"})
    job = submit(lh, jobs, src, PYTHON, "main.py")
    assert wait_until(lambda: status(lh, job)["nodes"][0]["state"] == "running", 20)
    (src / "lib/util.py").write_text("X = 3  # patched\n")
    result = patch(lh, job, src, "lib/util.py")
    assert (result["revision"], result["paths"]) == (1, ["lib/util.py"])
    time.sleep(2.0)  # long past the watcher's debounce
    rows = revisions(lh, job)
    assert [(r["revision"], r["reason"]) for r in rows] == [(0, "submit"), (1, "patch")]
    assert rows[1]["author"] == ME and rows[1]["paths"] == ["lib/util.py"]
    assert (node_dir(lh, job) / "code/lib/util.py").read_text() == "X = 3  # patched\n"


def test_drift_on_one_node_of_two_shows_the_job_diverged(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"main.py": SLEEPER, "cfg.txt": "a\n"})
    job = submit(lh, jobs, src, PYTHON, "main.py", nodes=2)
    assert wait_until(
        lambda: [n["state"] for n in status(lh, job)["nodes"]] == ["running", "running"], 20
    )
    assert status(lh, job)["diverged"] is False
    rows = wait_for_revision(lh, job, 1, hand_edit(node_dir(lh, job, 1) / "code/cfg.txt", "b\n"))
    assert rows[0]["nodes"] == ["local0", "local1"]
    assert rows[1]["reason"] == "drift" and rows[1]["nodes"] == ["local1"]
    assert rows[1]["paths"] == ["cfg.txt"]
    st = status(lh, job)
    assert st["diverged"] is True
    assert [(n["rank"], n["revision"]) for n in st["nodes"]] == [(0, 0), (1, 1)]
    assert (node_dir(lh, job, 0) / "code/cfg.txt").read_text() == "a\n"  # node 0 untouched


READER = """\
import os, sys, time
code = os.environ['LAUNCH_CODE_DIR']
sys.path.insert(0, os.path.join(code, 'lib'))
import util  # reading its code by import, too
reads = 0
end = time.monotonic() + 2
while time.monotonic() < end:
    for name in ('main.py', 'lib/util.py', 'data.txt'):
        with open(os.path.join(code, name), 'rb') as f:
            f.read()
    os.listdir(code)
    reads += 1
    time.sleep(0.01)
print(f'reads {reads} X {util.X}', flush=True)
time.sleep(1)  # still running while any check the reads might have caused is due
"""


def test_a_job_reading_its_own_code_makes_no_revision(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(
        tmp_path / "src", {"main.py": READER, "lib/util.py": "X = 1\n", "data.txt": "d\n"}
    )
    job = submit(lh, jobs, src, PYTHON, "main.py")
    st = wait_state(lh, job, {"succeeded", "failed"})
    assert st["nodes"][0]["exit_code"] == 0, log_text(lh, job)
    m = re.search(r"^\[0\] reads (\d+) X 1$", log_text(lh, job), re.M)
    assert m and int(m[1]) >= 50, log_text(lh, job)
    rows = revisions(lh, job)
    assert [(r["revision"], r["reason"], r["paths"]) for r in rows] == [(0, "submit", [])], rows
    assert st["nodes"][0]["revision"] == 0


# ---------------------------------------------------------------------------- metrics

REPORTER = """\
import time
import launch_runtime as lr
for step in range(1, 51):
    lr.report(step, loss=1.0 / step + (step % 7) * 0.01)
    time.sleep(0.02)
print('done', flush=True)
"""


def loss(step: int) -> float:
    return 1.0 / step + (step % 7) * 0.01


def test_metrics_points_buckets_and_a_rewinding_resume(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"train.py": REPORTER})
    job = submit(lh, jobs, src, PYTHON, "train.py")
    st = wait_state(lh, job, {"succeeded", "failed"})
    assert st["nodes"][0]["exit_code"] == 0, log_text(lh, job)

    got = metrics(lh, job)
    assert (got["job"], got["rank"]) == (job, 0)
    points = got["points"]
    assert [p["step"] for p in points] == list(range(1, 51))
    assert {(p["revision"], p["restart"]) for p in points} == {(0, 0)}
    assert [p["values"] for p in points] == [{"loss": loss(s)} for s in range(1, 51)]
    # Points are read as the job writes them (in batches, each stamped when read), not all
    # at once when it ends.
    times = [p["at_ns"] for p in points]
    node = st["nodes"][0]
    assert times == sorted(times) and times[-1] > times[0], times
    assert node["started_ns"] <= times[0] < node["ended_ns"], (node, times)

    summary = metrics(lh, job, "--buckets", "5")
    buckets = summary["buckets"]
    assert [(b["from"], b["to"], b["count"]) for b in buckets] == [
        (1 + 10 * i, 10 + 10 * i, 10) for i in range(5)
    ]
    for b in buckets:
        values = [loss(s) for s in range(b["from"], b["to"] + 1)]
        assert b["metrics"] == {"loss": [min(values), max(values), values[-1]]}

    # The job ended; resume runs it again from step 1. Old points stay, new ones are added.
    r = lh.run("resume", job)
    assert r.code == 0, r.describe()
    assert r.out.strip() == f"{job}@r1: resumed"
    st = wait_state(lh, job, {"succeeded", "failed"})
    assert st["nodes"][0]["restart_count"] == 1 and st["nodes"][0]["exit_code"] == 0
    rows = revisions(lh, job)
    assert [(x["revision"], x["reason"]) for x in rows] == [(0, "submit"), (1, "resume")]
    assert rows[1]["step"] == 50  # the last step reported before the resume

    again = metrics(lh, job)["points"]
    assert len(again) == 100
    assert again[:50] == points  # nothing overwritten
    assert [p["step"] for p in again[50:]] == list(range(1, 51))
    assert {(p["revision"], p["restart"]) for p in again[50:]} == {(1, 1)}
    assert again[50]["at_ns"] >= points[-1]["at_ns"]


PATCHED_TRAINER = """\
import os, time
import launch_runtime as lr
code = os.environ['LAUNCH_CODE_DIR']
step, after = 0, 0
while step < 1000 and after < 10:  # ten steps once the new value is seen
    step += 1
    with open(os.path.join(code, 'value.txt')) as f:
        value = float(f.read())
    lr.report(step, loss=1.0 / step, value=value)
    after += value == 2.0
    time.sleep(0.05)
"""


def test_points_after_a_patch_carry_the_new_revision(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"train.py": PATCHED_TRAINER, "value.txt": "1.0\n"})
    job = submit(lh, jobs, src, PYTHON, "train.py")
    written = node_dir(lh, job) / "metrics" / "metrics.jsonl"

    def step_reached() -> bool:
        try:
            lines = written.read_text().splitlines()
        except FileNotFoundError:
            return False
        return bool(lines) and json.loads(lines[-1])["step"] >= 25

    assert wait_until(step_reached, 20, 0.02)
    (src / "value.txt").write_text("2.0\n")
    assert patch(lh, job, src, "value.txt")["revision"] == 1
    st = wait_state(lh, job, {"succeeded", "failed"})
    assert st["nodes"][0]["exit_code"] == 0, log_text(lh, job)
    assert st["nodes"][0]["restart_count"] == 0

    points = metrics(lh, job)["points"]
    last = points[-1]["step"]
    assert [p["step"] for p in points] == list(range(1, last + 1))
    assert {p["restart"] for p in points} == {0}
    revs = [p["revision"] for p in points]
    assert revs == sorted(revs) and set(revs) == {0, 1}, revs  # r0 points, then r1 points
    last_r0 = max(p["step"] for p in points if p["revision"] == 0)
    assert last_r0 >= 25 and last - last_r0 >= 8, (last_r0, last)
    assert points[0]["values"]["value"] == 1.0 and points[-1]["values"]["value"] == 2.0
    # Within a step or two of the switch the job reads the new value and keeps it.
    assert all(p["values"]["value"] == 2.0 for p in points if p["step"] > last_r0 + 2)
    assert all(p["values"]["value"] == 1.0 for p in points if p["step"] < last_r0 - 2)

    rows = revisions(lh, job)
    assert [(r["revision"], r["reason"]) for r in rows] == [(0, "submit"), (1, "patch")]
    assert rows[0]["step"] is None
    assert rows[1]["step"] is not None and abs(rows[1]["step"] - last_r0) <= 2, (rows, last_r0)


# --------------------------------------------------------------------- launch_runtime

RUNTIME_JOB = """\
import time
import launch_runtime as lr
import helper
print(f"start r{lr.current_revision()['revision']} value {helper.value()}", flush=True)

def patched(rev):
    names = lr.reload_changed_modules()
    now = lr.current_revision()['revision']
    print(f"patched r{rev['revision']} at {time.time_ns()} reloaded {','.join(names)} "
          f"value {helper.value()} now r{now}", flush=True)

lr.on_patch(patched)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


def test_launch_runtime_sees_the_patch_and_reloads_the_helper(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(
        tmp_path / "src",
        {"main.py": RUNTIME_JOB, "helper.py": "def value():\n    return 1\n"},
    )
    job = submit(lh, jobs, src, PYTHON, "main.py")
    wait_log(lh, job, r"^\[0\] start r0 value 1$")
    (src / "helper.py").write_text("def value():\n    return 2\n")
    result = patch(lh, job, src, "helper.py")
    assert (result["revision"], result["paths"]) == (1, ["helper.py"])
    m = wait_log(lh, job, r"^\[0\] patched r(\d+) at (\d+) reloaded (\S*) value (\d+) now r(\d+)$")
    assert m[1] == "1" and m[5] == "1", m[0]
    assert int(m[2]) - result["at_ns"][0] < 1.5e9, "on_patch fired late"
    assert m[3] == "helper" and m[4] == "2", m[0]  # the new code answers
    assert log_text(lh, job).count("patched r") == 1  # fired once
    # Importing (and reloading) the helper made no revision of its own.
    rows = revisions(lh, job)
    assert [(r["revision"], r["reason"]) for r in rows] == [(0, "submit"), (1, "patch")], rows
    assert status(lh, job)["nodes"][0]["state"] == "running"


# ------------------------------------------------------------------------------ watch


def test_watch_patches_on_save_and_stops_on_sigint(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"main.py": SLEEPER, "cfg.txt": "v0\n"})
    job = submit(lh, jobs, src, PYTHON, "main.py")
    assert wait_until(lambda: status(lh, job)["nodes"][0]["state"] == "running", 20)
    out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [PYTHON, "-m", "launcher.cli", "watch", "--job", job],
            cwd=src,
            env=lh.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:

        def lines() -> list[str]:
            return out_path.read_text().splitlines()

        def describe() -> str:
            return f"stdout:\n{out_path.read_text()}\nstderr:\n{err_path.read_text()}"

        assert wait_until(lambda: any(x.startswith("watching ") for x in lines()), 20), describe()

        (src / "cfg.txt").write_text("v1\n")
        assert wait_until(lambda: f"{job}@r1: cfg.txt" in lines(), 15), describe()
        rows = revisions(lh, job)
        assert [(r["revision"], r["reason"], r["paths"]) for r in rows] == [
            (0, "submit", []),
            (1, "patch", ["cfg.txt"]),
        ]
        code_cfg = node_dir(lh, job) / "code/cfg.txt"
        assert code_cfg.read_text() == "v1\n"

        # A burst of saves (a formatter, a script: milliseconds apart) is settled before it
        # is patched: fewer revisions than saves, the last live.
        saves = 5
        for i in range(2, 2 + saves):
            (src / "cfg.txt").write_text(f"v{i}\n")
            time.sleep(0.002)
        last = f"v{1 + saves}\n"
        assert wait_until(lambda: code_cfg.read_text() == last, 15), describe()
        time.sleep(1.5)  # anything still pending would have landed by now
        rows = revisions(lh, job)
        made = rows[2:]
        assert 1 <= len(made) < saves, rows
        assert made == [] or made[0]["revision"] == 2
        assert all(r["reason"] == "patch" and r["paths"] == ["cfg.txt"] for r in made)
        assert code_cfg.read_text() == last
        shown = [x for x in lines() if not x.startswith("watching ")]
        assert shown == [f"{job}@r{n}: cfg.txt" for n in range(1, len(rows))], describe()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, describe()
        assert lines()[-1] == "stopped watching; the job goes on", describe()
        assert "Traceback" not in err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    st = status(lh, job)
    assert st["nodes"][0]["state"] == "running"
    assert st["nodes"][0]["revision"] == len(rows) - 1


# ------------------------------------------------------------------------------ rerun

WAITS_FOR_VALUE = """\
import time
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    with open('value.txt') as f:
        value = f.read().strip()
    if value != '1':
        break
    time.sleep(0.05)
print(f'value {value}', flush=True)
"""


def test_rerun_submits_the_head_code_and_command_as_a_new_job(
    lh: LaunchHome, jobs: list[str], tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"main.py": WAITS_FOR_VALUE, "value.txt": "1\n"})
    job = submit(lh, jobs, src, PYTHON, "main.py", nodes=2)
    (src / "value.txt").write_text("2\n")
    assert patch(lh, job, src, "value.txt")["revision"] == 1
    st = wait_state(lh, job, {"succeeded", "failed"})
    assert [n["exit_code"] for n in st["nodes"]] == [0, 0]
    head = revisions(lh, job)[-1]
    assert head["revision"] == 1

    r = lh.run("rerun", job, "-d", cwd=tmp_path)
    assert r.code == 0, r.describe()
    new = r.out.strip()
    jobs.append(new)
    assert re.fullmatch(r"j-[0-9a-z]+-[0-9a-z]{4}", new) and new != job, r.describe()

    rows = revisions(lh, new)
    assert len(rows) == 1
    r0 = rows[0]
    assert (r0["revision"], r0["reason"], r0["parent"]) == (0, "rerun", None)
    assert r0["message"] == f"rerun of {job}@r1"
    assert r0["bundle"] == head["bundle"]
    assert r0["nodes"] == ["local0", "local1"]

    done = wait_state(lh, new, {"succeeded", "failed"})
    assert done["argv"] == st["argv"] == [PYTHON, "main.py"]
    assert [n["argv"] for n in done["nodes"]] == [[PYTHON, "main.py"]] * 2
    assert [n["exit_code"] for n in done["nodes"]] == [0, 0], log_text(lh, new)
    assert [n["bundle"] for n in done["nodes"]] == [head["bundle"]] * 2
    assert sorted(log_text(lh, new).splitlines()) == ["[0] value 2", "[1] value 2"]


def test_an_edit_in_the_first_moments_of_a_job_is_not_missed(agent: AgentProc) -> None:
    """The code directory's watch is set up just after the start (off the start request);
    an edit made before it is in place is found by the look the agent takes once it is.
    Through the agent's API, not the CLI, to edit within milliseconds of the start."""
    files = {"main.py": SLEEPER.encode(), "lib/util.py": b"X = 1\n"}
    submit_to_agent(agent, "j-early-edit", files, [PYTHON, "main.py"])
    try:
        t0 = time.monotonic()
        hand_edit(agent.state / "jobs" / "j-early-edit" / "code" / "lib" / "util.py", "X = 2\n")

        def drift() -> list[Revision]:
            answer = agent.call("revisions", {"job": "j-early-edit"})
            return [Revision.decode(r) for r in answer["revisions"]][1:]

        (r1,) = wait_for(drift, timeout=DRIFT_DEADLINE_S)
        assert time.monotonic() - t0 < DRIFT_DEADLINE_S
        assert (r1.reason, r1.paths, r1.parent) == ("drift", ("lib/util.py",), 0)
    finally:
        agent.call("cancel", {"job": "j-early-edit"})

"""End to end: which code made these weights. Real `launch` commands (subprocesses) against a
real local agent (local0) under a private LAUNCH_HOME; jobs are real processes that report
steps with launch_runtime and write checkpoints into $LAUNCH_OUTPUT_DIR.

Covered: provenance of a checkpoint copied elsewhere (sidecar removed) through a mid-run
patch; --init-from lineage; `launch diff` of two jobs' input data; secrets that reach the job
but no record or output (nor a rerun's); and a large checkpoint hashed in the background
without slowing the job that writes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from launcher_env import PYTHON, LaunchHome, Result, home_env, wait_until, write_tree

JOB_RE = re.compile(r"job (j-[0-9a-z]+-[0-9a-z]{4})")


@pytest.fixture(scope="module")
def lh() -> Iterator[LaunchHome]:
    """One LAUNCH_HOME with one local agent (local0) for the module; stopped by pid after."""
    home = LaunchHome()
    try:
        up = home.run("local", "up", "1")
        assert up.code == 0, up.describe()
        yield home
    finally:
        home.close()


def submit(lh: LaunchHome, src: Path, *command: str, extra: tuple[str, ...] = ()) -> str:
    """`launch submit --detach` on local0 from tree `src`; the job id."""
    r = lh.run(
        "submit",
        "--nodes",
        "1",
        "--no-login-shell",
        "--detach",
        "--dir",
        str(src),
        *extra,
        "--",
        *command,
    )
    assert r.code == 0, r.describe()
    job = r.out.strip()
    assert job.startswith("j-"), r.describe()
    return job


def state(lh: LaunchHome, job: str) -> str:
    st: dict[str, Any] = lh.run("status", job, "--json").json()
    return str(st["state"])


def wait_done(lh: LaunchHome, job: str, timeout: float = 60) -> None:
    seen: list[str] = []

    def done() -> bool:
        seen.append(state(lh, job))
        return seen[-1] in ("succeeded", "failed", "cancelled")

    assert wait_until(done, timeout, 0.2), seen[-3:]
    assert seen[-1] == "succeeded", (seen[-1], lh.run("logs", job).out)


def log_value(lh: LaunchHome, job: str, key: str, timeout: float = 30) -> str:
    """The value the job printed as `KEY=value` (logs are prefixed with the rank)."""
    pattern = re.compile(rf"^\[0\] {re.escape(key)}=(.*)$", re.M)
    found: list[str] = []

    def printed() -> bool:
        m = pattern.search(lh.run("logs", job).out)
        if m:
            found.append(m.group(1))
        return bool(m)

    assert wait_until(printed, timeout, 0.2), lh.run("logs", job).describe()
    return found[0]


def wait_artifact(lh: LaunchHome, spec: str, timeout: float = 30) -> dict[str, Any]:
    """`launch provenance JOB:PATH --json` once the agent has recorded that artifact."""
    last: list[Result] = []

    def recorded() -> bool:
        last.append(lh.run("provenance", spec, "--json"))
        return last[-1].code == 0

    assert wait_until(recorded, timeout, 0.3), last[-1].describe()
    answer: dict[str, Any] = last[-1].json()
    return answer


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------- 1. provenance through a patch

TRAIN = """\
import os, sys, time
import launch_runtime as lr

out = os.environ['LAUNCH_OUTPUT_DIR']
print(f'OUT={out}', flush=True)
for step in range(1, 201):
    with open('config.txt') as f:
        config = f.read()
    lr.report(step, loss=1.0 / step)
    time.sleep(0.005)
    if step == 100:
        # Hold here until the patch the test makes at step 100 is live (at most 60 s).
        deadline = time.monotonic() + 60
        while (lr.current_revision() or {}).get('revision', 0) < 1:
            if time.monotonic() > deadline:
                sys.exit('no patch came')
            time.sleep(0.01)
with open(os.path.join(out, 'ckpt.bin'), 'wb') as f:
    f.write(config.encode() + os.urandom(256 * 1024))
print('saved', config.strip(), flush=True)
"""


@pytest.fixture(scope="module")
def patched(lh: LaunchHome, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A job patched at step 100 (config.txt) that writes ckpt.bin at step 200."""
    src = write_tree(
        tmp_path_factory.mktemp("patched") / "src",
        {"train.py": TRAIN, "config.txt": "lr=0.1\n"},
    )
    job = submit(lh, src, PYTHON, "train.py")
    out = Path(log_value(lh, job, "OUT"))

    def at_step_100() -> bool:
        points = lh.run("metrics", job, "--json").json()
        steps = [p["step"] for p in points.get("points", [])] if isinstance(points, dict) else []
        return bool(steps) and max(steps) >= 100

    assert wait_until(at_step_100, 30, 0.2), lh.run("metrics", job, "--json").describe()
    (src / "config.txt").write_text("lr=0.05\n")
    p = lh.run("patch", "--job", job, str(src / "config.txt"), "-m", "lower lr", cwd=src)
    assert p.code == 0, p.describe()
    assert p.out.strip() == f"{job}@r1: config.txt", p.describe()
    wait_done(lh, job)
    assert "saved lr=0.05" in lh.run("logs", job).out
    by_spec = wait_artifact(lh, f"{job}:ckpt.bin")
    return {"job": job, "src": src, "out": out, "by_spec": by_spec}


def test_metrics_before_the_patch_are_r0_and_after_it_r1(
    lh: LaunchHome, patched: dict[str, Any]
) -> None:
    points = lh.run("metrics", patched["job"], "--json").json()["points"]
    assert sorted(p["step"] for p in points) == list(range(1, 201))
    assert {p["revision"] for p in points if p["step"] < 100} == {0}
    assert {p["revision"] for p in points if p["step"] > 101} == {1}


def test_provenance_of_a_moved_copy_names_job_node_and_both_revisions(
    lh: LaunchHome, patched: dict[str, Any], tmp_path: Path
) -> None:
    job, original = patched["job"], patched["out"] / "ckpt.bin"
    sidecar = original.with_name("ckpt.bin.launch.json")
    assert sidecar.is_file(), sorted(os.listdir(patched["out"]))
    recorded = json.loads(sidecar.read_text())
    sha = sha256_of(original)
    assert recorded["sha256"] == sha and recorded["job"] == job

    moved = tmp_path / "shipped" / "weights.bin"
    moved.parent.mkdir()
    shutil.copyfile(original, moved)
    assert not moved.with_name("weights.bin.launch.json").exists()  # no sidecar travels

    answer = lh.run("provenance", str(moved), "--json").json()
    assert {"sha256", "job", "node", "revision", "chain", "lineage"} <= answer.keys()
    assert answer["sha256"] == sha
    assert answer["job"] == job
    assert answer["node"] == "local0"
    assert answer["revision"] == 1
    assert answer["path"] == "ckpt.bin"
    assert 195 <= answer["step"] <= 200, answer["step"]
    chain = {row["revision"]: row for row in answer["chain"]}
    assert sorted(chain) == [0, 1], answer["chain"]
    assert chain[0]["reason"] == "submit" and chain[0]["paths"] == []
    assert chain[1]["reason"] == "patch" and chain[1]["paths"] == ["config.txt"]
    assert chain[1]["message"] == "lower lr"
    assert chain[1]["parent"] == 0
    assert 100 <= chain[1]["step"] <= 102, chain[1]  # the job waited at step 100 for it
    assert answer["lineage"] == []

    # The same answer by JOB:PATH, and in words.
    assert patched["by_spec"] == answer
    text = lh.run("provenance", str(moved))
    assert text.code == 0, text.describe()
    assert f"written by {job} on local0" in text.out and "under r1" in text.out, text.out


# ------------------------------------------------------------------- 2. --init-from lineage

PARENT = """\
import os
with open(os.path.join(os.environ['LAUNCH_OUTPUT_DIR'], 'ckpt.bin'), 'wb') as f:
    f.write(os.urandom(64 * 1024))
"""

CHILD = """\
import hashlib, os
import launch_runtime as lr
path = os.environ['LAUNCH_INIT_FROM']
print(f'INIT={path}', flush=True)
with open(path, 'rb') as f:
    print(f'INIT_SHA={hashlib.sha256(f.read()).hexdigest()}', flush=True)
lr.report(7, loss=0.5)
with open(os.path.join(os.environ['LAUNCH_OUTPUT_DIR'], 'model.bin'), 'wb') as f:
    f.write(os.urandom(64 * 1024))
"""


def test_init_from_gives_the_parent_path_and_lineage_links_both_jobs(
    lh: LaunchHome, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"parent.py": PARENT, "child.py": CHILD})
    first = submit(lh, src, PYTHON, "parent.py")
    wait_done(lh, first)
    parent_art = wait_artifact(lh, f"{first}:ckpt.bin")

    second = submit(lh, src, PYTHON, "child.py", extra=("--init-from", f"{first}:ckpt.bin"))
    wait_done(lh, second)
    init = Path(log_value(lh, second, "INIT"))
    assert init.name == "ckpt.bin" and init.is_file(), init
    assert sha256_of(init) == parent_art["sha256"]
    assert log_value(lh, second, "INIT_SHA") == parent_art["sha256"]
    assert init.with_name("ckpt.bin.launch.json").is_file()  # the first job's own output

    tree = lh.run("lineage", second, "--json").json()
    assert tree["job"] == second
    assert len(tree["parents"]) == 1, tree
    parent = tree["parents"][0]
    assert parent["job"] == first
    assert parent["path"] == "ckpt.bin"
    assert parent["sha256"] == parent_art["sha256"]
    assert parent["revision"] == 0
    assert parent["parent"]["job"] == first and parent["parent"]["parents"] == []
    words = lh.run("lineage", second)
    assert words.code == 0 and first in words.out and second in words.out, words.describe()

    child_art = wait_artifact(lh, f"{second}:model.bin")
    assert child_art["job"] == second and child_art["step"] == 7
    assert [e["job"] for e in child_art["lineage"]] == [first]
    entry = child_art["lineage"][0]
    assert entry["sha256"] == parent_art["sha256"] and entry["path"] == "ckpt.bin"
    assert [row["revision"] for row in entry["chain"]] == [0]

    # A rerun of the second job starts from the same artifact, and says so.
    again = lh.run("rerun", second)
    assert again.code == 0, again.describe()
    assert f"[0] INIT={init}" in again.lines(), again.describe()
    third = JOB_RE.search(again.err)
    assert third, again.describe()
    rerun_tree = lh.run("lineage", third.group(1), "--json").json()
    assert [p["job"] for p in rerun_tree["parents"]] == [first], rerun_tree


# ------------------------------------------------------------------------ 3. diff of data


def job_facts(lh: LaunchHome, job: str) -> dict[str, Any]:
    """What the launcher reads for `launch diff` (in this process, against the same home)."""
    from launcher import provenance

    with home_env(lh.path):
        facts: dict[str, Any] = asyncio.run(provenance.job_facts(job))
    return facts


def wait_facts(lh: LaunchHome, job: str, data: bool) -> dict[str, Any]:
    """Facts of `job` once its environment (and with `data`, its data) is recorded."""
    seen: list[dict[str, Any]] = []

    def recorded() -> bool:
        seen.append(job_facts(lh, job))
        return bool(seen[-1]["environment"]) and (bool(seen[-1]["data"]) or not data)

    assert wait_until(recorded, 60, 0.3), seen[-1]
    return seen[-1]


def test_diff_shows_exactly_the_data_file_removed_between_two_jobs(
    lh: LaunchHome, tmp_path: Path
) -> None:
    data = write_tree(
        (tmp_path / "data").resolve(),
        {"a.txt": "alpha\n", "b.txt": "beta\n", "sub/c.txt": "gamma\n"},
    )
    src = write_tree(tmp_path / "src", {"main.py": "print('ok')\n"})
    args = ("--data", str(data), "--data-hash")
    job_a = submit(lh, src, PYTHON, "main.py", extra=args)
    wait_done(lh, job_a)
    facts_a = wait_facts(lh, job_a, data=True)
    files_a = {row[0] for row in facts_a["data"][str(data)]["files"]}
    assert files_a == {"a.txt", "b.txt", "sub/c.txt"}, facts_a["data"]

    (data / "b.txt").unlink()
    job_b = submit(lh, src, PYTHON, "main.py", extra=args)
    wait_done(lh, job_b)
    wait_facts(lh, job_b, data=True)

    r = lh.run("diff", job_a, job_b)
    assert r.code == 0, r.describe()
    assert r.out == (
        "command: no difference\n"
        "environment: no difference\n"
        "packages: no difference\n"
        "data:\n"
        f"  - {data}/b.txt\n"
        "nodes: no difference\n"
    ), r.out


# ----------------------------------------------------------------------------- 4. secrets

SECRET_JOB = """\
import hashlib, os, sys
import launch_runtime as lr
value = os.environ.get('API_TOKEN', '')
print('token ok' if hashlib.sha256(value.encode()).hexdigest() == sys.argv[1] else 'token BAD',
      flush=True)
lr.report(1, loss=1.0)
with open(os.path.join(os.environ['LAUNCH_OUTPUT_DIR'], 'out.bin'), 'wb') as f:
    f.write(os.urandom(4096))
"""


def files_with(root: Path, needle: bytes, skip: set[Path]) -> list[Path]:
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path in skip or not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if needle in data:
                found.append(path)
    return found


def test_secret_reaches_the_job_and_its_rerun_but_no_record_or_output(
    lh: LaunchHome, tmp_path: Path
) -> None:
    value = f"tok-{uuid.uuid4().hex}"
    digest = hashlib.sha256(value.encode()).hexdigest()
    src = write_tree(tmp_path / "src", {"main.py": SECRET_JOB})
    job = submit(lh, src, PYTHON, "main.py", digest, extra=("-e", f"API_TOKEN={value}"))
    wait_done(lh, job)
    assert lh.run("logs", job).lines() == ["[0] token ok"]
    art = wait_artifact(lh, f"{job}:out.bin")
    facts = wait_facts(lh, job, data=False)
    assert facts["environment"]["env"]["API_TOKEN"] == "<redacted>"

    rerun = lh.run("rerun", job)
    assert rerun.code == 0, rerun.describe()
    assert rerun.lines() == ["[0] token ok"], rerun.describe()
    rerun_job = JOB_RE.search(rerun.err)
    assert rerun_job, rerun.describe()
    wait_facts(lh, rerun_job.group(1), data=False)

    outputs = [
        lh.run("status", job, "--json"),
        lh.run("status", rerun_job.group(1), "--json"),
        lh.run("diff", job, rerun_job.group(1)),
        lh.run("provenance", f"{job}:out.bin", "--json"),
        lh.run("revisions", job, "--json"),
        lh.run("revisions", rerun_job.group(1), "--json"),
        lh.run("logs", job),
        lh.run("ls", "--json"),
    ]
    for r in outputs:
        assert r.code == 0, r.describe()
        assert value not in r.out + r.err, r.describe()
    assert value not in json.dumps(art) + json.dumps(facts)
    assert value not in json.dumps(job_facts(lh, rerun_job.group(1)))

    # The job's own runtime inputs hold it, readable by its owner only; nothing else does.
    inputs = sorted(
        p for p in lh.path.rglob("*") if p.name in ("env.sh", "secrets.json") and p.is_file()
    )
    holding = [p for p in inputs if value.encode() in p.read_bytes()]
    assert {p.name for p in holding} == {"env.sh", "secrets.json"}, inputs
    assert {p.parent.name for p in holding} >= {job, rerun_job.group(1)}, holding
    for p in holding:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    leaked = files_with(lh.path, value.encode(), skip=set(holding))
    assert leaked == [], leaked


# -------------------------------------------------------------- 5. large checkpoint, slow

BIG_WRITER = """\
import os, sys, time
size, chunk = int(sys.argv[1]), 8 * 2**20
block = os.urandom(chunk)
path = os.path.join(os.environ['LAUNCH_OUTPUT_DIR'], 'big.bin')
start = time.perf_counter()
with open(path, 'wb') as f:
    for _ in range(size // chunk):
        f.write(block)
elapsed = time.perf_counter() - start
print(f'WRITE_S={elapsed:.3f}', flush=True)
"""


def timed_write(path: Path, size: int) -> float:
    block, chunk = os.urandom(8 * 2**20), 8 * 2**20
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(block)
    return time.perf_counter() - start


@pytest.mark.slow
def test_hashing_a_large_checkpoint_does_not_delay_the_job(
    lh: LaunchHome, tmp_path: Path
) -> None:
    # The job's outputs live under LAUNCH_HOME: 2 GB if that disk has room for the job's
    # file and our baseline (with margin), else 512 MB.
    free = shutil.disk_usage(lh.path).free
    size = 2 * 2**30 if free > 3 * 2 * 2**30 else 512 * 2**20
    if size < 2 * 2**30:
        print(f"only {free >> 20} MB free under {lh.path}: using 512 MB", file=sys.stderr)
    baseline_file = lh.path / "baseline.bin"  # same filesystem, not watched by the agent
    src = write_tree(tmp_path / "src", {"big.py": BIG_WRITER})
    big: Path | None = None
    try:
        baseline = timed_write(baseline_file, size)
        baseline_file.unlink()
        job = submit(lh, src, PYTHON, "big.py", str(size))
        written = float(log_value(lh, job, "WRITE_S", timeout=120))
        assert written < 3 * baseline + 1, (written, baseline)
        wait_done(lh, job, timeout=120)
        big = lh.path / "local"  # located below, once recorded
        began = time.monotonic()
        art = wait_artifact(lh, f"{job}:big.bin", timeout=60)
        assert time.monotonic() - began < 60
        assert art["size"] == size
        found = [p for p in lh.path.rglob("big.bin") if job in str(p)]
        assert len(found) == 1, found
        big = found[0]
        assert art["sha256"] == sha256_of(big)
    finally:
        baseline_file.unlink(missing_ok=True)
        if big is not None and big.is_file():
            big.unlink()

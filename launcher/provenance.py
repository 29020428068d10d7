"""Which code made these weights: `launch provenance FILE | JOB:PATH` finds the job, node and
revision chain behind a file by its SHA-256 (or its sidecar), `launch lineage JOB` follows
--init-from parents across jobs, and `launch diff JOB_A JOB_B` compares everything recorded
about two jobs: code, command, environment, packages, data and nodes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from agent.protocol.errors import InvalidParams, JobNotFound, LaunchError
from launcher import home
from launcher.fleet import NodeConn, on_each_settled, open_fleet, open_fleet_settled
from launcher.history import _revision_row, find_job, revisions_on
from launcher.nodes import Node
from launcher.records import Records

SIDECAR = ".launch.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _known_nodes() -> list[Node]:
    """Every node a job of ours ever ran on, once each."""
    records = Records(home.records_path())
    try:
        jobs = records.all(limit=10_000)
    finally:
        records.close()
    seen: dict[str, Node] = {}
    for record in jobs:
        for n in record.nodes:
            node = Node.from_dict(n)
            seen.setdefault(f"{node.kind}:{node.user}@{node.host}:{node.port}:{node.socket}", node)
    return list(seen.values())


async def _find(nodes: list[Node], params: dict[str, Any]) -> list[tuple[Node, dict[str, Any]]]:
    """Artifact records matching `params` on any of these nodes (unreachable ones skipped)."""
    found: list[tuple[Node, dict[str, Any]]] = []
    async with open_fleet_settled(nodes) as items:
        conns = [x for x in items if isinstance(x, NodeConn)]
        answers = await on_each_settled(conns, lambda c: c.client.call("find_artifacts", params))
        for conn, answer in zip(conns, answers, strict=True):
            if isinstance(answer, dict):
                found.extend((conn.node, a) for a in answer["artifacts"])
    return found


async def resolve_artifact(spec: str) -> dict[str, Any]:
    """`JOB:PATH` (a path under the job's outputs) to its latest artifact record."""
    job_ref, sep, path = spec.partition(":")
    if not sep or not path:
        raise InvalidParams(f"{spec!r}: expected JOB:PATH, a file under the job's outputs")
    record = find_job(job_ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    found = await _find(nodes, {"job": record.id, "path": path})
    if not found:
        raise JobNotFound(f"{record.id}:{path} (no such artifact recorded; see its outputs)")
    node, artifact = max(found, key=lambda x: (x[1]["closed_ns"], -x[1]["rank"]))
    return {**artifact, "node_name": node.name, "_node": node}


async def provenance(target: str) -> dict[str, Any]:
    local = Path(target)
    if local.is_file():
        sha = sha256_file(local)
        sidecar = local.with_name(local.name + SIDECAR)
        nodes = _known_nodes()
        if sidecar.is_file():
            try:
                hint = json.loads(sidecar.read_text())
                nodes = [Node.from_dict(n) for n in find_job(hint["job"]).nodes] or nodes
            except (ValueError, KeyError, LaunchError):
                pass
        found = await _find(nodes, {"sha256": sha})
        if not found and nodes != _known_nodes():
            found = await _find(_known_nodes(), {"sha256": sha})
        if not found:
            raise JobNotFound(f"{target} (sha256 {sha[:12]}): no job of yours wrote this file")
        node, artifact = min(found, key=lambda x: x[1]["closed_ns"])  # the first to write it
        artifact = {**artifact, "node_name": node.name, "_node": node}
    else:
        artifact = await resolve_artifact(target)
    return await _describe(artifact, seen=set())


async def _describe(artifact: dict[str, Any], seen: set[str]) -> dict[str, Any]:
    node: Node = artifact["_node"]
    async with open_fleet([node]) as conns:
        revs = await revisions_on(conns[0], artifact["job"])
        facts = (await conns[0].client.call("facts", {"job": artifact["job"]}))["facts"]
    chain = [_revision_row(r) for r in revs if r.number <= artifact["revision"]]
    for row in chain:
        row["live_since_start"] = row["revision"] in artifact.get("since", [])
    lineage = []
    seen.add(artifact["job"])
    for fact in facts:
        if fact["kind"] != "init_from":
            continue
        parent = fact["data"]
        entry: dict[str, Any] = {
            "job": parent.get("job"),
            "path": parent.get("path"),
            "sha256": parent.get("sha256"),
            "revision": parent.get("revision"),
        }
        if parent.get("job") and parent["job"] not in seen:
            try:
                more = await _describe(
                    await resolve_artifact(f"{parent['job']}:{parent['path']}"), seen
                )
                entry["chain"], entry["lineage"] = more["chain"], more["lineage"]
            except LaunchError as exc:
                entry["error"] = str(exc)
        lineage.append(entry)
    return {
        "sha256": artifact["sha256"],
        "job": artifact["job"],
        "node": artifact["node_name"],
        "host": artifact["node"],
        "rank": artifact["rank"],
        "path": artifact["path"],
        "size": artifact["size"],
        "step": artifact["step"],
        "revision": artifact["revision"],
        "since": artifact.get("since", []),
        "chain": chain,
        "lineage": lineage,
    }


async def lineage(ref: str) -> dict[str, Any]:
    """JOB and, recursively, the jobs and artifacts it was initialised from."""
    record = find_job(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet(nodes[:1]) as conns:
        facts = (await conns[0].client.call("facts", {"job": record.id}))["facts"]
    parents = []
    for fact in facts:
        if fact["kind"] == "init_from":
            parent = dict(fact["data"])
            try:
                parent["parent"] = await lineage(parent["job"])
            except LaunchError as exc:
                parent["error"] = str(exc)
            parents.append(parent)
    return {"job": record.id, "name": record.name, "argv": record.argv, "parents": parents}


# ---------------------------------------------------------------------------- diff


async def job_facts(ref: str) -> dict[str, Any]:
    """Everything recorded about a job, for diff: command, nodes, latest environment, data."""
    record = find_job(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet(nodes) as conns:
        status = await conns[0].client.call("status", {"job": record.id})
        per_node = await on_each_settled(
            conns, lambda c: c.client.call("facts", {"job": record.id})
        )
    environment: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for answer in per_node:
        if isinstance(answer, LaunchError):
            continue
        # The latest environment (one is recorded at every start) of the first node that
        # answers; the data is fingerprinted once, at the first start.
        starts = [f["data"] for f in answer["facts"] if f["kind"] == "environment"]
        if starts and not environment:
            environment = starts[-1]
        for fact in answer["facts"]:
            if fact["kind"] == "data" and not data:
                data = fact["data"]
    return {
        "job": record.id,
        "argv": status["argv"],
        "nodes": [n.name for n in nodes],
        "environment": environment,
        "data": data,
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Sections of differences between two jobs' facts; a section without any is one line."""
    out: list[str] = []

    def section(name: str, lines: list[str]) -> None:
        out.append(f"{name}: no difference\n" if not lines else f"{name}:\n")
        out.extend(f"  {line}\n" for line in lines)

    section(
        "command",
        [] if a["argv"] == b["argv"] else [f"- {' '.join(a['argv'])}", f"+ {' '.join(b['argv'])}"],
    )
    env_a, env_b = a["environment"].get("env", {}), b["environment"].get("env", {})
    volatile = ("LAUNCH_", "MASTER_PORT", "PET_MASTER_PORT")
    keys = sorted(k for k in env_a.keys() | env_b.keys() if not k.startswith(volatile))
    section(
        "environment",
        [
            line
            for k in keys
            if env_a.get(k) != env_b.get(k)
            for line in ([f"- {k}={env_a[k]}"] if k in env_a else [])
            + ([f"+ {k}={env_b[k]}"] if k in env_b else [])
        ],
    )
    pkgs_a = set((a["environment"].get("python") or {}).get("packages", []))
    pkgs_b = set((b["environment"].get("python") or {}).get("packages", []))
    section(
        "packages",
        [f"- {p}" for p in sorted(pkgs_a - pkgs_b)] + [f"+ {p}" for p in sorted(pkgs_b - pkgs_a)],
    )
    data_lines = []
    for top in sorted(a["data"].keys() | b["data"].keys()):
        files_a = {f[0]: f[1:] for f in a["data"].get(top, {}).get("files", [])}
        files_b = {f[0]: f[1:] for f in b["data"].get(top, {}).get("files", [])}
        for name in sorted(files_a.keys() | files_b.keys()):
            if name not in files_b:
                data_lines.append(f"- {top}/{name}")
            elif name not in files_a:
                data_lines.append(f"+ {top}/{name}")
            elif files_a[name] != files_b[name]:
                data_lines.append(f"~ {top}/{name} (size, time or content changed)")
    section("data", data_lines)
    section(
        "nodes",
        []
        if a["nodes"] == b["nodes"]
        else [f"- {', '.join(a['nodes'])}", f"+ {', '.join(b['nodes'])}"],
    )
    return out

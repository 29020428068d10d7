"""The operations behind the CLI, over N nodes: freeze, submit (two phases), logs, status,
ls, cancel, nodes, cat. Each returns data; launcher/render.py shows it, launcher/cli.py maps
its errors to exit codes.

Submit keeps invariant 2: every node prepares (objects present, code directory built,
revision 0 recorded) before any node starts; if any node fails to prepare, the job is aborted
on every node that did, and nothing runs anywhere.
"""

from __future__ import annotations

import asyncio
import getpass
import random
import secrets
import socket
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.protocol.errors import Busy, LaunchError, NodeUnreachable
from agent.protocol.objects import Manifest, Source, object_kind
from launcher import home
from launcher.fleet import (
    NodeConn,
    all_or_raise,
    on_each,
    on_each_settled,
    open_fleet,
    open_fleet_settled,
)
from launcher.nodes import Node, ensure_local_agents
from launcher.pending import PendingStore
from launcher.placement import Candidate, busy_report, choose
from launcher.records import JobRecord, Records
from launcher.scope import background_tasks
from launcher.upload import BlobFeed, UploadProgress, stream_blobs, upload_bundle

if TYPE_CHECKING:
    from launcher.freeze import Frozen  # imported where a freeze runs

ALPHABET = string.digits + string.ascii_lowercase


def new_job_id() -> str:
    """`j-` + milliseconds in base 36 (sortable) + 4 random characters."""
    ms = int(time.time() * 1000)
    digits = ""
    while ms:
        ms, r = divmod(ms, 36)
        digits = ALPHABET[r] + digits
    return f"j-{digits}-{''.join(secrets.choice(ALPHABET) for _ in range(4))}"


def local_store() -> Any:
    from agent.store import Store

    return Store(home.store_dir())


# -------------------------------------------------------------------------------- freeze


def freeze_dir(directory: Path, max_file_size: int | None = None, store: Any = None) -> Any:
    """Freeze a directory into the launcher's local store (stat cache on), or into `store`
    (a PendingStore of it)."""
    from agent.protocol.errors import InvalidManifest
    from launcher.freeze import freeze

    directory = directory.expanduser()
    if not directory.is_dir():
        raise InvalidManifest(f"{directory} is not a directory: give the source tree to freeze")
    kwargs: dict[str, Any] = {"cache_path": home.stat_cache_path(directory)}
    if max_file_size is not None:
        kwargs["max_file_size"] = max_file_size
    return freeze(directory.resolve(), store or local_store(), **kwargs)


def cat(object_id: str) -> tuple[str, str, bytes]:
    """(full id, kind, bytes) of an object in the local store, by id or unique prefix."""
    store = local_store()
    full = store.resolve(object_id)
    data = store.get(full)
    return full, object_kind(data), data


# -------------------------------------------------------------------------------- submit


@dataclass
class SubmitOptions:
    argv: list[str]
    nodes: list[Node]
    directory: Path
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    message: str = ""
    max_file_size: int | None = None
    login: bool = True
    count: int | None = None  # --nodes N of a larger cluster: chosen by what is free
    gpus_per_node: int = -1  # -1: every GPU of each node
    wait: float | None = None  # seconds to wait for capacity (0: forever); None: fail at once
    # A rerun ships exactly this manifest instead of freezing `directory`.
    manifest: Manifest | None = None
    reason: str = "submit"
    env_from: str = ""  # rerun: secret values come from this job, on each node
    data: list[str] = field(default_factory=list)  # inputs to fingerprint on each node
    data_hash: bool = False
    init_from: dict[str, Any] = field(default_factory=dict)  # the parent artifact


@dataclass
class Progress(UploadProgress):
    """What submit reports while it works; the CLI renders it (or not, when piped)."""

    on_frozen: Callable[[Any], None] = lambda frozen: None
    on_wait: Callable[[list[str]], None] = lambda reasons: None


@dataclass
class Submitted:
    job: str
    bundle: str
    nodes: list[Node]
    addresses: list[str]
    sent_blobs: list[int]  # per node
    sent_bytes: list[int]
    frozen: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "bundle": self.bundle,
            "revision": 0,
            "nodes": [n.name for n in self.nodes],
            "sent_blobs": self.sent_blobs,
        }


def author() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


async def submit(opts: SubmitOptions, progress: Progress | None = None) -> Submitted:
    """Freeze, choose nodes, upload, prepare everywhere, then start everywhere.

    With `opts.wait` set (seconds; 0 = forever), a job that cannot get its nodes or GPUs now
    waits for them, retrying after a randomised backoff, so two launchers racing for the same
    nodes never deadlock; otherwise it fails with Busy (exit 6) naming what holds them.
    """
    progress = progress or Progress()
    # The freeze's local writes wait until the job has started (launcher/pending.py), and
    # what it reads goes to the nodes while it reads on (upload.stream_blobs).
    store = PendingStore(local_store())
    feed = BlobFeed(asyncio.get_running_loop())
    store.on_blobs = feed.push
    try:
        return await _submit(opts, progress, store, feed)
    finally:
        store.on_blobs = None  # a freeze interrupted with its submit may still be storing
        await asyncio.to_thread(store.settle)


async def _submit(
    opts: SubmitOptions, progress: Progress, store: PendingStore, feed: BlobFeed
) -> Submitted:
    # The freeze runs while the nodes are placed and opened (on a real cluster, round trips
    # that cost more than the freeze): _run_on awaits it once its connections are up.
    tree = asyncio.ensure_future(_tree(opts, progress, store, feed))
    try:
        if any(node.kind == "local" for node in opts.nodes):
            await tree  # a bad source tree must not bring up local agents as a side effect
        await asyncio.to_thread(ensure_local_agents, opts.nodes)
        deadline = None if not opts.wait else time.monotonic() + opts.wait
        while True:
            try:
                nodes = await _place(opts)
                job, conns_info, missing = await _run_on(opts, nodes, tree, progress, store, feed)
                break
            except* Busy as group:
                if opts.wait is None or (deadline is not None and time.monotonic() > deadline):
                    raise
                progress.on_wait([str(e) for e in group.exceptions])
                await asyncio.sleep(random.uniform(0.5, 2.0))
    except BaseException:
        # The freeze's thread is never left running, and a problem with the tree is told
        # before a problem with the nodes: it is the one to fix first.
        await asyncio.wait([tree])
        if not tree.cancelled() and (problem := tree.exception()) is not None:
            raise problem from None
        raise
    manifest, _, frozen = tree.result()
    records = Records(home.records_path())
    try:
        records.add(
            job,
            opts.name,
            [n.to_dict() for n in nodes],
            opts.directory.resolve(),
            opts.argv,
            manifest.bundle_id,
        )
    finally:
        records.close()
    sizes = {e.blob: e.size for e in manifest.entries}
    return Submitted(
        job,
        manifest.bundle_id,
        nodes,
        conns_info,
        [len(m) for m in missing],
        [sum(sizes[b] for b in m) for m in missing],
        frozen,
    )


async def _place(opts: SubmitOptions) -> list[Node]:
    """The nodes to run on: all given, or --nodes N of a larger cluster that can take the job
    now (fewest busy GPUs first); Busy, naming what holds the others, when too few can."""
    count = opts.count or len(opts.nodes)
    if len(opts.nodes) <= count:
        return opts.nodes
    infos = await node_infos(opts.nodes)
    candidates = [
        Candidate(i, row["node"], row if row["reachable"] else None, row.get("error", ""))
        for i, row in enumerate(infos)
    ]
    chosen = choose(candidates, count, opts.gpus_per_node)
    if chosen is None:
        report = busy_report(candidates, opts.gpus_per_node)
        raise Busy(
            f"{count} nodes needed, fewer can take the job now: " + "; ".join(report), report
        )
    return [opts.nodes[c.index] for c in chosen]


async def _tree(
    opts: SubmitOptions, progress: Progress, store: PendingStore, feed: BlobFeed
) -> tuple[Manifest, Source, Frozen | None]:
    """What to run: the frozen source tree, or the manifest given."""
    if opts.manifest is not None:
        feed.close()
        return opts.manifest, Source(), None
    try:
        frozen = await asyncio.to_thread(freeze_dir, opts.directory, opts.max_file_size, store)
    finally:
        feed.close()
    progress.on_frozen(frozen)
    return frozen.manifest, frozen.source, frozen


async def _run_on(
    opts: SubmitOptions,
    nodes: list[Node],
    tree: Awaitable[tuple[Manifest, Source, Frozen | None]],
    progress: Progress,
    store: PendingStore,
    feed: BlobFeed,
) -> tuple[str, list[str], list[list[str]]]:
    """Two phases on exactly these nodes; nothing starts unless every node prepared."""
    job = new_job_id()
    near = _last_bundle(opts)
    async with open_fleet(nodes) as conns, background_tasks() as scope:
        streaming = scope.spawn(stream_blobs(conns, store, feed, progress))
        try:
            manifest, source, frozen = await tree
            streamed = all_or_raise(await streaming, "upload")
        except BaseException:
            progress.on_upload_end()  # a bar the stream began; upload_bundle ends its own
            raise
        # The freeze may know what changed since that bundle (it froze it last).
        changes = frozen.changes if frozen is not None and frozen.base == near else None
        params = {
            "job": job,
            "bundle": manifest.bundle_id,
            "argv": opts.argv,
            "env": opts.env,
            "nnodes": len(conns),
            "peers": [c.address for c in conns],
            "name": opts.name,
            "author": author(),
            "message": opts.message,
            "source": source.to_wire(),
            "reason": opts.reason,
            "login": opts.login,
            "env_from": opts.env_from,
            "data": [str(p) for p in opts.data],
            "data_hash": opts.data_hash,
            "init_from": opts.init_from,
            "gpus": opts.gpus_per_node,
            "near": near or "",
        }
        prepared: dict[int, Any] = {}

        async def prepare(conn: NodeConn) -> None:
            prepared[conn.rank] = await conn.client.call("prepare", {**params, "rank": conn.rank})

        try:
            if opts.gpus_per_node != 0:
                # GPUs of node 0 first, by a quick reservation: of two launchers after the
                # same nodes, one gets node 0 and the other stops there, holding nothing.
                await conns[0].client.call("reserve", {"job": job, "gpus": opts.gpus_per_node})
            # Each node prepares as soon as it holds the bundle, not after the slowest.
            missing = await upload_bundle(
                conns, manifest, store, progress, near, changes, then=prepare
            )
            missing = [[*early, *late] for early, late in zip(streamed, missing, strict=True)]
        except BaseException:
            await on_each_settled(conns, lambda c: c.client.call("abort", {"job": job}))
            raise
        start = {
            "job": job,
            "master_addr": conns[0].address,
            "master_port": int(prepared[conns[0].rank]["port"]),
        }
        try:
            await on_each(conns, lambda c: c.client.call("start", start), "start")
        except BaseException:
            # Rare (a node died between the phases): stop what did start; say so.
            await on_each_settled(conns, lambda c: c.client.call("cancel", {"job": job}))
            raise
        return job, [c.address for c in conns], missing


def _last_bundle(opts: SubmitOptions) -> str | None:
    """The bundle of the last job submitted from this tree: the nodes probably hold it."""
    records = Records(home.records_path())
    try:
        return records.last_from(opts.directory).bundle
    except LaunchError:
        return None
    finally:
        records.close()


# ------------------------------------------------------------------------- status and ls


def job_record(ref: str) -> JobRecord:
    records = Records(home.records_path())
    try:
        return records.resolve(ref)
    finally:
        records.close()


async def status(ref: str) -> dict[str, Any]:
    """Per node: state, revision, bundle, pid, exit code; `diverged` when revisions differ."""
    record = job_record(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    rows: list[dict[str, Any]] = []
    async with open_fleet_settled(nodes) as items:
        conns = [x for x in items if isinstance(x, NodeConn)]
        answers = await on_each_settled(
            conns, lambda c: c.client.call("status", {"job": record.id})
        )
        by_rank = {c.rank: a for c, a in zip(conns, answers, strict=True)}
        for rank, node in enumerate(nodes):
            item = items[rank]
            answer = by_rank.get(rank, item)
            if isinstance(answer, LaunchError):
                rows.append(
                    {
                        "rank": rank,
                        "node": node.name,
                        "state": "unreachable" if isinstance(answer, NodeUnreachable) else "error",
                        "error": str(answer),
                    }
                )
            else:
                rows.append({**answer, "rank": rank, "node": node.name, "host": answer["node"]})
    revisions = {r.get("revision") for r in rows if "revision" in r}
    # A patch staged but not committed everywhere (its launcher died between the phases)
    # is a divergence too: `launch repair` finishes it.
    staged = any(r.get("staged") is not None for r in rows)
    return {
        "job": record.id,
        "name": record.name,
        "argv": record.argv,
        "bundle": record.bundle,
        "nodes": rows,
        "diverged": len(revisions) > 1 or staged,
        "state": overall_state(rows),
    }


def overall_state(rows: list[dict[str, Any]]) -> str:
    states = {r.get("state") for r in rows}
    for state in ("unreachable", "error", "running", "prepared", "failed", "lost", "cancelled"):
        if state in states:
            return state
    return "succeeded" if states == {"succeeded"} else "/".join(sorted(map(str, states)))


async def ls(limit: int = 20) -> list[dict[str, Any]]:
    """Recent jobs from the records, each with its state as its nodes report it."""
    records = Records(home.records_path())
    try:
        recent = records.all(limit)
    finally:
        records.close()
    distinct: dict[str, Node] = {}
    for record in recent:
        for n in record.nodes:
            node = Node.from_dict(n)
            distinct.setdefault(_node_key(node), node)
    states: dict[tuple[str, str], str] = {}
    if distinct:
        async with open_fleet_settled(list(distinct.values())) as items:
            conns = [x for x in items if isinstance(x, NodeConn)]
            answers = await on_each_settled(conns, lambda c: c.client.call("jobs", {}))
            for conn, answer in zip(conns, answers, strict=True):
                if isinstance(answer, dict):
                    for job in answer["jobs"]:
                        states[(_node_key(conn.node), job["job"])] = job["state"]
    out = []
    for record in recent:
        rows = [
            {"state": states.get((_node_key(Node.from_dict(n)), record.id), "unreachable")}
            for n in record.nodes
        ]
        out.append(
            {
                "job": record.id,
                "name": record.name,
                "state": overall_state(rows),
                "nodes": len(record.nodes),
                "argv": record.argv,
                "bundle": record.bundle,
                "created": record.created,
            }
        )
    return out


def _node_key(node: Node) -> str:
    return f"{node.kind}:{node.user}@{node.host}:{node.port}:{node.socket}"


async def cancel(ref: str, grace_s: int = 10) -> list[dict[str, Any] | LaunchError]:
    record = job_record(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet(nodes) as conns:
        return await on_each_settled(
            conns, lambda c: c.client.call("cancel", {"job": record.id, "grace_s": grace_s})
        )


async def node_infos(nodes: list[Node]) -> list[dict[str, Any]]:
    """Each node's info from its agent, or why it is unreachable."""
    rows: list[dict[str, Any]] = []
    async with open_fleet_settled(nodes) as items:
        conns = [x for x in items if isinstance(x, NodeConn)]
        answers = await on_each_settled(conns, lambda c: c.client.call("node_info", {}))
        by_name = {c.name: a for c, a in zip(conns, answers, strict=True)}
        for node, item in zip(nodes, items, strict=True):
            answer = by_name.get(node.name, item)
            if isinstance(answer, LaunchError):
                rows.append({"node": node.name, "reachable": False, "error": str(answer)})
            else:
                rows.append({**answer, "node": node.name, "reachable": True})
    return rows


def local_agent_nodes() -> list[Node]:
    """Local agents that have state on this machine (for `launch nodes` with no cluster)."""
    from launcher.nodes import local_nodes

    count = len(list(home.local_dir().glob("node*.pid"))) if home.local_dir().exists() else 0
    return local_nodes(count) if count else []


def environ_pairs(values: tuple[str, ...]) -> dict[str, str]:
    from agent.protocol.errors import InvalidParams

    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if (
            not sep
            or not key
            or not (key[0].isalpha() or key[0] == "_")
            or not all(c.isalnum() or c == "_" for c in key)
        ):
            raise InvalidParams(f"--env {item!r}: expected NAME=VALUE with a shell-safe NAME")
        env[key] = value
    return env

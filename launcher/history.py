"""Every change to a job's code is a revision: patch, resume and repair (which make them),
revisions, checkout and diff (which read them back).

A patch runs in two phases over all the job's nodes (invariant 2): prepare on node 0 first,
which admits one patch per base revision and so settles races between launchers, then on the
others; only when all have staged it, commit everywhere. If any node fails to prepare, the
patch is aborted on every node and nothing changes. If the launcher dies between the phases,
`status` shows the job diverged and `repair` rolls every node forward.
"""

from __future__ import annotations

import asyncio
import datetime
import difflib
import os
import signal as signal_mod
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol.errors import (
    ChecksumMismatch,
    InvalidManifest,
    InvalidParams,
    JobNotFound,
    JobStateError,
    LaunchError,
    StaleRevision,
)
from agent.protocol.objects import (
    Change,
    Entry,
    Kind,
    Manifest,
    Revision,
    apply_changes,
    blob_id,
    changes,
    check_path,
)
from agent.protocol.objects import diff as tree_diff
from launcher import home
from launcher.fleet import (
    NodeConn,
    failed,
    on_each,
    on_each_settled,
    open_fleet,
    open_fleet_settled,
)
from launcher.nodes import Node
from launcher.ops import author, freeze_dir, local_store
from launcher.records import JobRecord, Records
from launcher.upload import INLINE_BYTES, upload_bundle

FETCH_BATCH = 16 * 2**20
WATCH_SETTLE_S = 0.01  # quiet after a completed save before `watch` patches
WATCH_DEBOUNCE_S = 0.1  # ... while a file is still open for writing, or saves keep coming


def find_job(ref: str | None) -> JobRecord:
    """JOB by id, prefix or name; with no ref, the last job submitted from this directory."""
    records = Records(home.records_path())
    try:
        return records.resolve(ref) if ref else records.last_from(Path.cwd())
    finally:
        records.close()


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`JOB` (its head) or `JOB@rN`."""
    job, sep, rev = ref.partition("@")
    if not sep:
        return job, None
    if not (rev.startswith("r") and rev[1:].isdigit()):
        raise InvalidParams(f"{ref!r}: a revision is written JOB@rN, e.g. {job}@r2")
    return job, int(rev[1:])


# ----------------------------------------------------------------------- objects


async def manifest_of(conn: NodeConn, bundle: str) -> Manifest:
    """A bundle's manifest, from the local store or else from the node (verified)."""
    store = local_store()
    if not store.has(bundle):
        result = await conn.client.call("cat", {"id": bundle})
        store.put(bundle, result["data"])
    return store.get_manifest(bundle)  # type: ignore[no-any-return]


async def fetch_blobs(conn: NodeConn, manifest: Manifest) -> None:
    """Bring the blobs of `manifest` that the local store lacks from the node; each one is
    verified against its id as the store takes it."""
    store = local_store()
    wanted = store.missing(manifest.blobs())
    while wanted:
        result = await conn.client.call("get_blobs", {"blobs": wanted[:4096]})
        got = [(i, d) for i, d in result["blobs"]]
        if not got:
            raise JobStateError(f"{conn.name} could not supply blob {wanted[0][:12]}")
        await asyncio.to_thread(store.put_many, got)
        wanted = store.missing(wanted)


def entry_for(root: Path, path: Path) -> tuple[str, Entry | None, bytes]:
    """The manifest path of a local file, its new entry (None: it was deleted) and its
    bytes (b"" for a symlink or a deleted file)."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        rel = absolute.parent.resolve().joinpath(absolute.name).relative_to(root.resolve())
    except ValueError:
        raise InvalidParams(f"{path} is outside the job's source tree {root}") from None
    name = check_path(rel.as_posix())
    try:
        st = absolute.lstat()
    except FileNotFoundError:
        return name, None, b""
    if stat.S_ISLNK(st.st_mode):
        return name, Entry.symlink(name, os.readlink(absolute)).check(), b""
    if not stat.S_ISREG(st.st_mode):
        raise InvalidParams(f"{path} is not a regular file or symlink")
    data = absolute.read_bytes()
    kind: Kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
    return name, Entry(name, kind, len(data), blob_id(data)), data


def keep_locally(store: Any, manifest: Manifest, blobs: dict[str, bytes]) -> None:
    """Put a tree the launcher made (and the bytes it read for it) in its local store, for
    `launch diff` and `checkout` here. Validated already (apply_changes built it)."""
    store.put_many(blobs.items())
    store.put_manifest(manifest, encoded=manifest.encode())


# ------------------------------------------------------------------------- patch


async def patch(ref: str | None, files: list[Path], **options: Any) -> dict[str, Any]:
    """Make the next revision of a job from local files and commit it on every node;
    `options` are patch_on's."""
    record = find_job(ref)
    async with open_fleet([Node.from_dict(n) for n in record.nodes]) as conns:
        result = await patch_on(conns, record, files, **options)
    del result["head"]
    return result


@dataclass
class Head:
    """A job's head as this launcher last committed or read it: `launch watch` keeps it
    between patches, so a patch need not ask node 0 first (a stale one is refused by the
    nodes, and read again)."""

    number: int
    manifest: Manifest


async def head_of(conn: NodeConn, job: str) -> Head:
    status = await conn.client.call("status", {"job": job})
    return Head(status["revision"], await manifest_of(conn, status["bundle"]))


async def patch_on(
    conns: list[NodeConn],
    record: JobRecord,
    files: list[Path],
    *,
    all_files: bool,
    message: str = "",
    signal: str = "",
    restart: bool = False,
    reason: str = "patch",
    code: Path | None = None,
    head: Head | None = None,
) -> dict[str, Any]:
    """A patch over connections that are already open (`launch watch` keeps them). The
    result's "head" is the new Head (left out of what the CLI prints)."""
    root = Path(record.directory)
    store = local_store()
    if head is None:
        head = await head_of(conns[0], record.id)
    base = head.number
    changed: list[Change] | None = None
    read: dict[str, bytes] = {}
    if reason == "resume":
        states = await on_each(conns, lambda c: c.client.call("status", {"job": record.id}))
        if any(s["state"] in ("running", "prepared") for s in states):
            raise JobStateError(
                f"job {record.id} is still running; to change its code "
                "use `launch patch --restart`",
                record.id,
            )
        new = (await asyncio.to_thread(freeze_dir, code)).manifest if code else head.manifest
    elif all_files:
        new = (await asyncio.to_thread(freeze_dir, code or root)).manifest
    else:
        if not files:
            raise InvalidParams("name the files to patch, or give --all")
        puts, deletes, read = [], [], {}
        for path in files:
            name, entry, data = entry_for(code or root, path)
            if entry is None:
                deletes.append(name)
            else:
                puts.append(entry)
                if entry.kind != "symlink":
                    read[entry.blob] = data
        new = apply_changes(head.manifest, puts, deletes)  # validated as it is built
        changed = changes(head.manifest, puts, deletes)
    if changed is None:
        changed = tree_diff(head.manifest, new)
    if not changed and reason != "resume":
        return {"job": record.id, "revision": base, "paths": [], "unchanged": True, "head": head}
    params: dict[str, Any] = {
        "job": record.id,
        "base": base,
        "bundle": new.bundle_id,
        "author": author(),
        "message": message,
        "reason": reason,
    }
    added = [c.new for c in changed if c.new is not None]
    blobs = sorted({e.blob: e.size for e in added if e.kind != "symlink"}.items())
    if sum(size for _, size in blobs) <= INLINE_BYTES:
        # The changes and their bytes travel with the prepare: one round trip per node. The
        # local store takes them after the commit, off the path to the nodes.
        params["puts"] = [e.to_wire() for e in added]
        params["deletes"] = [c.path for c in changed if c.new is None]
        params["blobs"] = [[b, read[b] if b in read else store.get(b)] for b, _ in blobs]
    else:
        await asyncio.to_thread(keep_locally, store, new, read)
        await upload_bundle(conns, new, store, base=head.manifest.bundle_id)
    # Node 0 first: it admits one patch per base, so racing launchers are settled there
    # before any other node stages anything.
    first = await conns[0].client.call("patch_prepare", params)
    number = first["revision"]
    others = await on_each_settled(conns[1:], lambda c: c.client.call("patch_prepare", params))
    failures = [r for r in others if isinstance(r, LaunchError)]
    if failures:
        staged = [conns[0]] + [
            c for c, r in zip(conns[1:], others, strict=True) if not isinstance(r, LaunchError)
        ]
        abort = {"job": record.id, "revision": number, "bundle": new.bundle_id}
        await on_each_settled(staged, lambda c: c.client.call("patch_abort", abort))
        raise ExceptionGroup(
            f"prepare failed on {len(failures)} of {len(conns)} nodes; nothing changed", failures
        )
    commit = {"job": record.id, "revision": number, "signal": signal, "restart": restart}
    results = await on_each(conns, lambda c: c.client.call("patch_commit", commit), "commit")
    if read:
        await asyncio.to_thread(keep_locally, store, new, read)
    return {
        "job": record.id,
        "revision": number,
        "paths": [c.path for c in changed],
        "at_ns": [r["at_ns"] for r in results],
        "nodes": [c.name for c in conns],
        "head": Head(number, new),
    }


async def repair(ref: str) -> dict[str, Any]:
    """Roll every node forward to the highest revision any node prepared or committed."""
    record = find_job(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet(nodes) as conns:
        states = await on_each(conns, lambda c: c.client.call("status", {"job": record.id}))
        target = max(max(s["revision"], s.get("staged") or -1) for s in states)
        actions: list[str] = []
        source = next(
            c
            for c, s in zip(conns, states, strict=True)
            if s["revision"] == target or s.get("staged") == target
        )
        bundle = await _bundle_of(source, record.id, target, states[conns.index(source)])
        # A node that committed the target holds its record: the nodes rolled forward get the
        # same reason, author and message (a cut resume resumes them too), not a new patch.
        committed = next(
            (c for c, s in zip(conns, states, strict=True) if s["revision"] == target), None
        )
        origin = (
            next(r for r in await revisions_on(committed, record.id) if r.number == target)
            if committed is not None
            else None
        )
        for conn, st in zip(conns, states, strict=True):
            if st["revision"] == target:
                continue
            if st.get("staged") != target:
                if st["revision"] != target - 1:
                    raise JobStateError(
                        f"{conn.name} is at r{st['revision']}, more than one "
                        f"revision behind r{target}: repair it by hand",
                        record.id,
                    )
                manifest = await manifest_of(source, bundle)
                await fetch_blobs(source, manifest)
                await upload_bundle([conn], manifest, local_store())
                await conn.client.call(
                    "patch_prepare",
                    {
                        "job": record.id,
                        "base": target - 1,
                        "bundle": bundle,
                        "author": origin.author if origin else author(),
                        "message": origin.message if origin else "repair",
                        "reason": origin.reason if origin else "patch",
                    },
                )
            await conn.client.call("patch_commit", {"job": record.id, "revision": target})
            actions.append(f"{conn.name}: r{st['revision']} -> r{target}")
    return {"job": record.id, "revision": target, "actions": actions}


async def _bundle_of(conn: NodeConn, job: str, number: int, status: dict[str, Any]) -> str:
    if status.get("staged") == number:
        return str(status["staged_bundle"])
    revs = await revisions_on(conn, job)
    return next(r.bundle for r in revs if r.number == number)


# ----------------------------------------------------------------------- reading


async def revisions_on(conn: NodeConn, job: str) -> list[Revision]:
    result = await conn.client.call("revisions", {"job": job})
    return [Revision.decode(r) for r in result["revisions"]]


async def revisions(ref: str) -> list[dict[str, Any]]:
    """One row per revision, with the nodes that acknowledged it. A node that cannot be
    reached is left out of every row (the history is still shown); none reachable is an error."""
    record = find_job(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet_settled(nodes) as items:
        conns = [x for x in items if isinstance(x, NodeConn)]
        per_node = await on_each_settled(conns, lambda c: revisions_on(c, record.id))
    errors = [x for x in [*items, *per_node] if isinstance(x, LaunchError)]
    if len(errors) >= len(nodes):
        raise failed(f"no node of {record.id} answered", errors)
    rows: dict[int, dict[str, Any]] = {}
    for conn, revs in zip(conns, per_node, strict=True):
        if isinstance(revs, LaunchError):
            continue
        for rev in revs:
            row = rows.setdefault(rev.number, _revision_row(rev))
            row["nodes"].append(conn.name)
    return [rows[n] for n in sorted(rows)]


def _revision_row(rev: Revision) -> dict[str, Any]:
    at = datetime.datetime.fromtimestamp(rev.at_ns / 1e9, tz=datetime.UTC)
    return {
        "revision": rev.number,
        "parent": rev.parent,
        "bundle": rev.bundle,
        "reason": rev.reason,
        "author": rev.author,
        "at": at.isoformat(),
        "at_ns": rev.at_ns,
        "step": rev.step,
        "paths": list(rev.paths),
        "message": rev.message,
        "nodes": [],
    }


async def _with_tree(ref: str, use: Any) -> Any:
    """Find the revision REF names on the job's node 0, bring its tree into the local store,
    and call `use(revision, manifest)` while the connection is open."""
    job_ref, number = parse_ref(ref)
    record = find_job(job_ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet(nodes[:1]) as conns:
        conn = conns[0]
        revs = await revisions_on(conn, record.id)
        chosen = revs[-1] if number is None else next((r for r in revs if r.number == number), None)
        if chosen is None:
            raise JobNotFound(f"{record.id}@r{number}")
        manifest = await manifest_of(conn, chosen.bundle)
        await fetch_blobs(conn, manifest)
        return await use(chosen, manifest)


async def checkout(ref: str, dest: Path) -> dict[str, Any]:
    """Write exactly the tree of REF into DEST (absent or empty), verified file by file."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidParams(f"{dest} exists and is not an empty directory: choose a new one")

    async def write(rev: Revision, manifest: Manifest) -> dict[str, Any]:
        if manifest.bundle_id != rev.bundle:
            raise ChecksumMismatch(rev.bundle, manifest.bundle_id)
        await asyncio.to_thread(local_store().materialize, manifest, dest)
        await asyncio.to_thread(_verify_tree, manifest, dest)
        return {"ref": rev.ref, "bundle": rev.bundle, "files": len(manifest), "dir": str(dest)}

    return await _with_tree(ref, write)  # type: ignore[no-any-return]


def _verify_tree(manifest: Manifest, dest: Path) -> None:
    """Re-read what was written and compare with the manifest; then make files writable,
    as a checkout a person will edit should be."""
    for e in manifest.entries:
        path = dest / e.path
        if e.kind == "symlink":
            if os.readlink(path) != e.target:
                raise InvalidManifest(f"{e.path}: symlink differs after checkout", e.path)
            continue
        actual = blob_id(path.read_bytes())
        if actual != e.blob:
            raise ChecksumMismatch(e.blob, actual)
        os.chmod(path, 0o755 if e.kind == "exec" else 0o644)


async def diff(ref_a: str, ref_b: str) -> str:
    """A unified diff between the trees of two revisions (of any jobs)."""
    trees: list[tuple[Revision, Manifest]] = []
    for ref in (ref_a, ref_b):

        async def keep(rev: Revision, manifest: Manifest) -> None:
            trees.append((rev, manifest))

        await _with_tree(ref, keep)
    (rev_a, a), (rev_b, b) = trees
    store = local_store()
    out: list[str] = []
    for change in tree_diff(a, b):
        old_text = _text(store, change.old)
        new_text = _text(store, change.new)
        label_a = f"{rev_a.ref}/{change.path}" if change.old else "/dev/null"
        label_b = f"{rev_b.ref}/{change.path}" if change.new else "/dev/null"
        if old_text is None or new_text is None:
            out.append(f"Binary files {label_a} and {label_b} differ\n")
            continue
        out.extend(difflib.unified_diff(old_text, new_text, label_a, label_b))
        if change.old and change.new and change.old.kind != change.new.kind:
            out.append(f"mode: {change.old.kind} -> {change.new.kind}\n")
    return "".join(out)


def _text(store: Any, entry: Entry | None) -> list[str] | None:
    if entry is None:
        return []
    if entry.kind == "symlink":
        return [f"-> {entry.target}\n"]
    data: bytes = store.get(entry.blob)
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------- rerun, metrics


async def rerun(ref: str, nodes: list[Node] | None, name: str = "") -> Any:
    """Submit a new job with exactly the code, command and environment of REF."""
    from launcher.ops import SubmitOptions, submit

    job_ref, number = parse_ref(ref)
    record = find_job(job_ref)
    old_nodes = [Node.from_dict(n) for n in record.nodes]
    async with open_fleet(old_nodes[:1]) as conns:
        conn = conns[0]
        status = await conn.client.call("status", {"job": record.id})
        revs = await revisions_on(conn, record.id)
        chosen = revs[-1] if number is None else next((r for r in revs if r.number == number), None)
        if chosen is None:
            raise JobNotFound(f"{record.id}@r{number}")
        manifest = await manifest_of(conn, chosen.bundle)
        await fetch_blobs(conn, manifest)
        # Its inputs too: the artifact it started from (LAUNCH_INIT_FROM) and its --data.
        facts = (await conn.client.call("facts", {"job": record.id}))["facts"]
    init_from = [f["data"] for f in facts if f["kind"] == "init_from"]
    data = [f["data"] for f in facts if f["kind"] == "data_request"]
    targets = nodes or old_nodes
    opts = SubmitOptions(
        argv=list(status["argv"]),
        nodes=targets,
        directory=Path(record.directory),
        name=name or record.name,
        env=dict(status.get("env", {})),
        message=f"rerun of {chosen.ref}",
        login=bool(status.get("login", True)),
        manifest=manifest,
        reason="rerun",
        env_from=record.id,
        data=list(data[-1]["dirs"]) if data else [],
        data_hash=bool(data[-1]["hash"]) if data else False,
        init_from=init_from[-1] if init_from else {},
    )
    return await submit(opts)


async def metrics(ref: str, rank: int = 0, buckets: int = 0) -> dict[str, Any]:
    """The metrics rank `rank` of JOB reported, each point with its revision and restart."""
    record = find_job(ref)
    nodes = [Node.from_dict(n) for n in record.nodes]
    if not 0 <= rank < len(nodes):
        raise InvalidParams(f"job {record.id} has no node of rank {rank}")
    async with open_fleet([nodes[rank]]) as conns:
        result: dict[str, Any] = await conns[0].client.call(
            "metrics", {"job": record.id, "buckets": buckets}
        )
    return {"job": record.id, "rank": rank, **result}


# -------------------------------------------------------------------------- watch


async def watch(
    ref: str | None, paths: list[Path], out: Any, debounce_s: float = WATCH_DEBOUNCE_S
) -> None:
    """Patch the job each time the local tree changes, until interrupted; one line per
    revision. Connections stay open and the head is remembered between patches, so a small
    patch costs three round trips per node (prepare on node 0, on the others, commit)."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    # The agent's list of the events that mean a tree changed (standard library and
    # watchdog only): the kernel then does not report every file and directory opened for
    # reading (a freeze of the tree opens thousands).
    from agent.watcher import CHANGES

    record = find_job(ref)
    root = Path(record.directory)
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        changed.set()

    for signum in (signal_mod.SIGINT, signal_mod.SIGTERM):
        loop.add_signal_handler(signum, stop)

    writing: set[str] = set()  # files written and not yet closed (the observer's thread)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            path = os.fsdecode(event.src_path)
            kind = event.event_type
            if kind in ("opened", "closed_no_write") or "/.git/" in path + "/":
                return
            if not event.is_directory:
                if kind in ("created", "modified"):
                    writing.add(path)
                else:  # closed after writing, moved into place, deleted: that file is done
                    writing.discard(path)
            loop.call_soon_threadsafe(changed.set)

    observer = Observer()
    observer.schedule(Handler(), str(root), recursive=True, event_filter=CHANGES)
    observer.start()
    try:
        async with open_fleet([Node.from_dict(n) for n in record.nodes]) as conns:
            out.write(f"watching {root} for {record.id} (Ctrl-C to stop)\n")
            out.flush()
            head: Head | None = None
            bursting = False
            while True:
                await changed.wait()
                # A save is over once every file it wrote is closed (or renamed into place):
                # then a short settle catches the rest of the burst, and the patch goes out at
                # once. A file still open for writing, or saves that kept coming while the
                # last patch went out (a formatter, a script), wait for `debounce_s` of quiet
                # instead: one revision for the burst, not one per save.
                # The events of one save come a moment apart (modified, then closed): the
                # settle lets them all arrive before a file is judged still open.
                while not stopping:
                    changed.clear()
                    await asyncio.sleep(WATCH_SETTLE_S)
                    if not changed.is_set() and (writing or bursting):
                        await asyncio.sleep(debounce_s - WATCH_SETTLE_S)
                    if not changed.is_set():
                        break
                writing.clear()  # a writer that never closes must not slow every later save
                if stopping:
                    out.write("stopped watching; the job goes on\n")
                    return
                result = await _patch_or_report(conns, record, paths, out, head)
                bursting = changed.is_set()
                head = result["head"] if result else None  # after a refusal: read it again
                if result and not result.get("unchanged"):
                    out.write(f"{record.id}@r{result['revision']}: {', '.join(result['paths'])}\n")
                    out.flush()
    finally:
        observer.stop()
        observer.join()


async def _patch_or_report(
    conns: list[NodeConn], record: JobRecord, paths: list[Path], out: Any, head: Head | None
) -> dict[str, Any] | None:
    """One patch for `watch`: a refusal (stale head, a node away) is reported, not fatal."""
    try:
        try:
            return await patch_on(conns, record, paths, all_files=not paths, head=head)
        except StaleRevision:
            if head is None:
                raise
        # The head moved since our last patch (another launcher, a drift): read it again.
        return await patch_on(conns, record, paths, all_files=not paths)
    except* LaunchError as group:
        for exc in group.exceptions:
            out.write(f"patch refused: {exc}\n")
        out.flush()
    return None

"""`launch`: parse, call the operation, render. Exit codes are decided here and only here.

Exit codes:
  0  ok
  1  the job failed (a rank exited non-zero, was cancelled or lost)
  2  usage: bad arguments, bad input (a path, a file, a config), unknown job
  3  stale revision: someone changed the job first; see `launch revisions`
  4  a node is unreachable
  5  refused by an agent
  6  not enough free nodes

Imports are lazy: `launch --help` and every command start without loading asyncio, rich or
the protocol until they need them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_STALE, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_BUSY = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
)


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from our errors to exit codes."""
    from agent.protocol import errors as e

    if isinstance(exc, BaseExceptionGroup):
        codes = [exit_code_for(x) for x in exc.exceptions]
        return max(codes, key=lambda c: (c != EXIT_USAGE, c))
    if isinstance(exc, e.StaleRevision):
        return EXIT_STALE
    if isinstance(exc, e.NodeUnreachable):
        return EXIT_UNREACHABLE
    if isinstance(exc, e.Busy):
        return EXIT_BUSY
    if isinstance(exc, e.LaunchError) and exc.node is not None:
        return EXIT_REFUSED  # an agent said no
    return EXIT_USAGE


def fail(exc: BaseException) -> NoReturn:
    from agent.protocol.errors import LaunchError

    leaves = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else [exc]
    for leaf in leaves:
        if isinstance(leaf, BaseExceptionGroup):
            fail(leaf)
        node = getattr(leaf, "node", None) if isinstance(leaf, LaunchError) else None
        prefix = f"{node}: " if node and not str(leaf).startswith(f"{node}:") else ""
        click.echo(f"launch: {prefix}{leaf}", err=True)
    sys.exit(exit_code_for(exc))


def run(coro: Any) -> Any:
    """Run an operation; turn our errors into a message and an exit code, never a traceback."""
    import asyncio

    from agent.protocol.errors import LaunchError

    try:
        return asyncio.run(coro)
    except* LaunchError as group:
        fail(group)
    except* KeyboardInterrupt:
        click.echo("launch: interrupted", err=True)
        sys.exit(130)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a synchronous operation with the same error handling as run()."""
    from agent.protocol.errors import LaunchError

    try:
        return fn(*args, **kwargs)
    except LaunchError as exc:
        fail(exc)


EPILOG = """\b
Exit codes: 0 ok, 1 job failed, 2 usage, 3 stale revision, 4 node unreachable,
5 refused by the agent, 6 not enough free nodes.
Refs: JOB is a job id, a unique prefix of one, or a job name."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(package_name="launch", prog_name="launch")
def main() -> None:
    """Run a job on N nodes from a frozen copy of your code, and keep every change to it.

    \b
    Quick start (agents on this machine, no cluster needed):
      launch submit --nodes 2 -- python train.py
      launch ls
      launch logs JOB -f
    """


# ------------------------------------------------------------------------------- freeze


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    try:
        if text[-1].lower() in units:
            return int(float(text[:-1]) * units[text[-1].lower()])
        return int(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a size (e.g. 50M, 2G, 1048576)") from None


_max_size = click.option(
    "--max-file-size",
    "max_file_size",
    metavar="SIZE",
    help="Refuse files larger than this (default 50M).",
)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_max_size
def freeze(directory: Path, as_json: bool, max_file_size: str | None) -> None:
    """Freeze DIRECTORY (default: here) into a bundle and print its id.

    In a git work tree the files are git's view (tracked and untracked, minus ignored);
    elsewhere .gitignore files apply. .launchignore applies on top in both cases.
    """
    from launcher import ops, render

    frozen = call(ops.freeze_dir, directory, _size(max_file_size))
    if as_json:
        render.print_json(render.frozen_json(frozen))
    else:
        render.frozen_summary(frozen)


@main.command()
@click.argument("object_id", metavar="ID")
def cat(object_id: str) -> None:
    """Show a stored object: a manifest or revision as text, a blob as its bytes."""
    from agent.protocol.objects import Manifest, Revision
    from launcher import ops, render

    full, kind, data = call(ops.cat, object_id)
    if kind == "manifest":
        click.echo(f"manifest {full}")
        click.echo(render.manifest_text(Manifest.decode(data)))
    elif kind == "revision":
        click.echo(render.revision_text(Revision.decode(data)))
    else:
        sys.stdout.buffer.write(data)


# ------------------------------------------------------------------------------- submit


def _nodes_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--nodes",
                "-n",
                "nnodes",
                type=click.IntRange(min=1),
                help="How many nodes (with no cluster: agents on this machine).",
            ),
            click.option("--hosts", help="Comma-separated SSH hosts: alias, host:port, user@host."),
            click.option(
                "--hostfile",
                type=click.Path(path_type=Path),
                help="DeepSpeed/MPI hostfile (`host slots=N` lines).",
            ),
            click.option("--cluster", "-c", help="A cluster from launch.toml."),
        ]
    ):
        fn = option(fn)
    return fn


@main.command(context_settings={"ignore_unknown_options": True})
@_nodes_options
@click.option("--name", default="", help="A name to find the job by.")
@click.option(
    "--env",
    "-e",
    "env",
    multiple=True,
    metavar="K=V",
    help="Environment for every rank (repeatable).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=".",
    help="Source tree to freeze (default: here).",
)
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return.")
@click.option("--json", "as_json", is_flag=True, help="Print {job, bundle, revision, nodes}.")
@click.option("-m", "--message", default="", help="A note kept with revision 0.")
@click.option(
    "--login-shell/--no-login-shell",
    "login",
    default=True,
    show_default=True,
    help="Run COMMAND in your login environment (shell profile: PATH, conda, modules), as "
    "over SSH; --no-login-shell starts it with the system PATH and --env only.",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    metavar="PATH",
    help="An input directory on the nodes to fingerprint (repeatable).",
)
@click.option("--data-hash", is_flag=True, help="Fingerprint --data with content hashes too.")
@click.option(
    "--init-from",
    "init_from",
    metavar="JOB:PATH",
    help="Start from an artifact of another job: recorded as this job's parent, "
    "its path given in LAUNCH_INIT_FROM.",
)
@click.option(
    "--gpus-per-node",
    "gpus",
    type=click.IntRange(min=0),
    default=None,
    help="GPUs to reserve on each node (default: all of them; 0 allowed).",
)
@click.option(
    "--wait",
    "wait",
    type=click.FloatRange(min=0),
    is_flag=False,
    flag_value=0.0,
    default=None,
    metavar="[SECONDS]",
    help="If the nodes or GPUs are busy, wait for them (for SECONDS, or for ever) "
    "instead of failing with exit code 6.",
)
@_max_size
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(
    nnodes: int | None,
    hosts: str | None,
    hostfile: Path | None,
    cluster: str | None,
    name: str,
    env: tuple[str, ...],
    directory: Path,
    detach: bool,
    as_json: bool,
    message: str,
    login: bool,
    data: tuple[str, ...],
    data_hash: bool,
    init_from: str | None,
    gpus: int | None,
    wait: float | None,
    max_file_size: str | None,
    command: tuple[str, ...],
) -> None:
    """Freeze the code and run COMMAND on every node from it.

    \b
    Every node receives only the files it lacks, prepares the job, and only when all
    have prepared does any start: a failure anywhere starts nothing. Then the logs of all
    nodes are followed (prefixed by rank) and the exit code is the job's.
    \b
    Examples:
      launch submit --nodes 2 -- python train.py --lr 3e-4
      launch submit --hosts gpu1,gpu2 --env WANDB_MODE=offline -- torchrun train.py
    """
    from launcher import nodes as nodes_mod
    from launcher import ops, render

    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give the command to run after --, e.g. -- python train.py")
    targets = call(
        nodes_mod.resolve_nodes,
        nodes=nnodes,
        hosts=hosts,
        hostfile=hostfile,
        cluster=cluster,
        start=directory,
        candidates=True,
    )
    opts = ops.SubmitOptions(
        argv=argv,
        nodes=targets,
        directory=directory,
        name=name,
        env=call(ops.environ_pairs, env),
        message=message,
        max_file_size=_size(max_file_size),
        login=login,
        count=nnodes,
        gpus_per_node=-1 if gpus is None else gpus,
        wait=wait,
        # A relative --data is relative to where `launch` runs, not to the agent's own cwd.
        data=[str(Path(d).absolute()) for d in data],
        data_hash=data_hash,
        init_from=run(_parent_artifact(init_from)) if init_from else {},
    )
    bar = render.UploadBar(enabled=not as_json)
    waiting: list[list[str]] = []

    def on_wait(reasons: list[str]) -> None:
        if not waiting or waiting[-1] != reasons:  # say it when what we wait for changes
            render.err.print("waiting for capacity: " + "; ".join(reasons))
        waiting.append(reasons)

    progress = ops.Progress(
        on_wait=on_wait, on_upload_add=bar.add, on_upload=bar.advance, on_upload_end=bar.stop
    )
    submitted = run(ops.submit(opts, progress))
    if as_json:
        render.print_json(submitted.to_json())
    else:
        sent = sum(submitted.sent_bytes)
        click.echo(
            f"job {submitted.job} on {len(targets)} node(s), bundle {submitted.bundle[:12]}, "
            f"sent {sum(submitted.sent_blobs)} blob(s) / {render.human_bytes(sent)}",
            err=True,
        )
    if detach or as_json:
        if detach and not as_json:
            click.echo(submitted.job)
        return
    from launcher import logs as logs_mod

    sys.exit(run(logs_mod.follow_submitted(submitted, sys.stdout, sys.stdout.isatty())))


async def _parent_artifact(spec: str) -> dict[str, Any]:
    from launcher import provenance

    found = await provenance.resolve_artifact(spec)
    return {k: found[k] for k in ("job", "path", "sha256", "revision", "node_name")}


# ------------------------------------------------------------------------- job commands


@main.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep following until the job ends.")
@click.option("--node", "rank", type=int, help="Only this node rank.")
def logs(job: str, follow: bool, rank: int | None) -> None:
    """Show the logs of all nodes of JOB, merged, each line prefixed with its rank."""
    from launcher import logs as logs_mod

    run(logs_mod.logs(job, follow=follow, rank=rank, out=sys.stdout, colour=sys.stdout.isatty()))


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
def status(job: str, as_json: bool) -> None:
    """Per node: state, revision, bundle, pid, exit code (and whether nodes diverged)."""
    from launcher import ops, render

    st = run(ops.status(job))
    render.show(st, as_json, render.status_table)


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=20, show_default=True)
def ls_cmd(as_json: bool, limit: int) -> None:
    """Recent jobs submitted from this machine, with their state."""
    from launcher import ops, render

    rows = run(ops.ls(limit))
    render.show(rows, as_json, render.ls_table)


@main.command()
@click.argument("job")
@click.option("--grace", default=10, show_default=True, help="Seconds between SIGTERM and SIGKILL.")
def cancel(job: str, grace: int) -> None:
    """Stop JOB on every node: SIGTERM to its whole process tree, SIGKILL after --grace."""
    from agent.protocol.errors import LaunchError
    from launcher import ops, render

    results = run(ops.cancel(job, grace))
    errors = [r for r in results if isinstance(r, LaunchError)]
    for r in results:
        if not isinstance(r, LaunchError):
            render.out.print(f"rank {r['rank']}: {r['state']}")
    if errors:
        fail(ExceptionGroup("cancel failed on some nodes", errors))


@main.command()
@_nodes_options
@click.option("--json", "as_json", is_flag=True)
def nodes(
    nnodes: int | None, hosts: str | None, hostfile: Path | None, cluster: str | None, as_json: bool
) -> None:
    """Each node's agent, resources and jobs, or why it is unreachable."""
    from launcher import nodes as nodes_mod
    from launcher import ops, render

    if (
        nnodes is None
        and not (hosts or hostfile or cluster)
        and not call(nodes_mod.load_clusters, Path("."))
    ):
        targets = ops.local_agent_nodes()
    else:
        targets = call(
            nodes_mod.resolve_nodes,
            nodes=nnodes,
            hosts=hosts,
            hostfile=hostfile,
            cluster=cluster,
            start=Path("."),
        )
    rows = run(ops.node_infos(targets)) if targets else []
    render.show(rows, as_json, render.nodes_table)


# ----------------------------------------------------------------------------- revisions


@main.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--all",
    "all_files",
    is_flag=True,
    help="Every difference between the local tree and the job's head.",
)
@click.option("--job", "-j", "job", help="The job (default: the last one submitted from here).")
@click.option("-m", "--message", default="", help="Why: kept with the revision.")
@click.option(
    "--restart",
    is_flag=True,
    help="Stop the job gracefully and start it again from the new revision, on all nodes together.",
)
@click.option(
    "--signal",
    "signal_name",
    default="",
    metavar="SIG",
    help="Send SIG (e.g. SIGUSR1) to the job once the new files are live.",
)
@click.option("--json", "as_json", is_flag=True)
def patch(
    files: tuple[Path, ...],
    all_files: bool,
    job: str | None,
    message: str,
    restart: bool,
    signal_name: str,
    as_json: bool,
) -> None:
    """Change the code of a running job: FILES as they are now become revision N+1 on every
    node at once (a file that no longer exists is deleted).

    \b
    Two phases: every node stages the change, then every node makes it live by atomic
    rename. A patch based on a head that moved meanwhile is refused (exit 3): see
    `launch revisions`. Modules the job already imported keep running until it reloads
    them or restarts (--restart).
    """
    from launcher import history, render

    if restart and signal_name:
        raise click.UsageError("give --restart or --signal, not both")
    result = run(
        history.patch(
            job,
            list(files),
            all_files=all_files,
            message=message,
            signal=signal_name,
            restart=restart,
        )
    )
    if as_json:
        render.print_json(result)
    elif result.get("unchanged"):
        click.echo(f"{result['job']}: nothing changed; still r{result['revision']}")
    else:
        click.echo(f"{result['job']}@r{result['revision']}: {', '.join(result['paths'])}")


@main.command()
@click.argument("job")
@click.option(
    "--code",
    type=click.Path(path_type=Path),
    help="Resume from this tree instead of the job's head.",
)
@click.option("-m", "--message", default="")
def resume(job: str, code: Path | None, message: str) -> None:
    """Start a stopped, failed, cancelled or lost JOB again on its nodes, as a new revision."""
    from launcher import history

    result = run(
        history.patch(job, [], all_files=False, message=message, reason="resume", code=code)
    )
    click.echo(f"{result['job']}@r{result['revision']}: resumed")


@main.command()
@click.argument("job")
def repair(job: str) -> None:
    """Roll every node of JOB forward to the highest revision any node prepared."""
    from launcher import history

    result = run(history.repair(job))
    for line in result["actions"] or ["all nodes agree"]:
        click.echo(line)
    click.echo(f"{result['job']} at r{result['revision']} on every node")


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
def revisions(job: str, as_json: bool) -> None:
    """JOB's history: one row per revision (reason, author, time, step, paths, nodes)."""
    from launcher import history, render

    rows = run(history.revisions(job))
    render.show(rows, as_json, render.revisions_table)


@main.command()
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=Path))
def checkout(ref: str, directory: Path) -> None:
    """Write exactly the tree of REF (JOB or JOB@rN) into DIRECTORY, verified byte for byte."""
    from launcher import history

    result = run(history.checkout(ref, directory))
    click.echo(
        f"{result['ref']}: {result['files']} files in {result['dir']} "
        f"(bundle {result['bundle'][:12]})"
    )


@main.command(name="diff")
@click.argument("ref_a")
@click.argument("ref_b")
def diff_cmd(ref_a: str, ref_b: str) -> None:
    """A unified diff between two revisions, of one job or two (JOB@rN, or JOB for its head).

    Given two jobs (no @rN), also compares their command, environment, packages, input data
    and nodes; a section without differences is one line.
    """
    from launcher import history, provenance

    sys.stdout.write(run(history.diff(ref_a, ref_b)))
    if "@" not in ref_a and "@" not in ref_b:  # two jobs: everything recorded, not just code
        facts = [run(provenance.job_facts(ref)) for ref in (ref_a, ref_b)]
        sys.stdout.write("".join(provenance.compare(*facts)))


@main.command()
@click.argument("ref")
@_nodes_options
@click.option("--name", default="", help="A name for the new job (default: REF's).")
@click.option("--detach", "-d", is_flag=True, help="Print the job id and return.")
def rerun(
    ref: str,
    nnodes: int | None,
    hosts: str | None,
    hostfile: Path | None,
    cluster: str | None,
    name: str,
    detach: bool,
) -> None:
    """Submit a new job with exactly the code, command and environment of REF (JOB or
    JOB@rN); by default on REF's nodes."""
    from launcher import history, render
    from launcher import logs as logs_mod
    from launcher import nodes as nodes_mod

    targets = None
    if nnodes is not None or hosts or hostfile or cluster:
        targets = call(
            nodes_mod.resolve_nodes,
            nodes=nnodes,
            hosts=hosts,
            hostfile=hostfile,
            cluster=cluster,
            start=Path("."),
        )
    submitted = run(history.rerun(ref, targets, name))
    render.err.print(f"job {submitted.job}: rerun of {ref} on {len(submitted.nodes)} node(s)")
    if detach:
        click.echo(submitted.job)
        return
    sys.exit(run(logs_mod.follow_submitted(submitted, sys.stdout, sys.stdout.isatty())))


@main.command()
@click.argument("job")
@click.option("--node", "rank", default=0, show_default=True, help="Whose metrics (rank).")
@click.option(
    "--buckets",
    default=0,
    help="Summarise into this many step ranges (min, max, last of each metric).",
)
@click.option("--json", "as_json", is_flag=True)
def metrics(job: str, rank: int, buckets: int, as_json: bool) -> None:
    """The metrics JOB reported (launch_runtime.report or lines in $LAUNCH_METRICS_FILE),
    each point with the revision live and the restart count when it was written."""
    from launcher import history, render

    result = run(history.metrics(job, rank, buckets))
    render.show(result, as_json, render.metrics_table)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--job", "-j", "job", help="The job (default: the last one submitted from here).")
def watch(paths: tuple[Path, ...], job: str | None) -> None:
    """Patch the job each time you save: watches the job's source tree (or only PATHS) and
    prints one line per revision. Ctrl-C stops watching; the job goes on."""
    from launcher import history

    run(history.watch(job, list(paths), sys.stdout))


@main.command(name="provenance")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True)
def provenance_cmd(target: str, as_json: bool) -> None:
    """Which job, node and revisions produced TARGET: a local file (found by its SHA-256, or
    its NAME.launch.json sidecar) or JOB:PATH under a job's outputs."""
    from launcher import provenance, render

    result = run(provenance.provenance(target))
    render.show(result, as_json, render.provenance_text)


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
def lineage(job: str, as_json: bool) -> None:
    """The jobs and artifacts that led to JOB (through submit --init-from)."""
    from launcher import provenance, render

    result = run(provenance.lineage(job))
    render.show(result, as_json, render.lineage_text)


# ---------------------------------------------------------------------------- local agents


@main.group()
def local() -> None:
    """The agents on this machine that `--nodes N` uses when no cluster is configured."""


@local.command()
@click.argument("count", type=click.IntRange(min=1), default=2)
def up(count: int) -> None:
    """Start COUNT local agents (those already running are kept)."""
    from launcher import nodes as nodes_mod

    started = call(nodes_mod.ensure_local_agents, nodes_mod.local_nodes(count))
    click.echo(f"started {', '.join(started)}" if started else "all already running")


@local.command()
def down() -> None:
    """Stop the local agents (their jobs keep running; a new agent re-adopts them)."""
    from launcher import holder, home
    from launcher import nodes as nodes_mod

    stopped = nodes_mod.stop_local_agents()
    holder.stop_holder(home.holder_socket())
    click.echo(f"stopped {len(stopped)} local agent(s)")


if __name__ == "__main__":
    main()

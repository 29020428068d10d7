"""How results look: rich tables on a terminal, plain text when piped, JSON on request, and
the upload progress bar. Nothing here talks to a node."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any


class _LazyConsole:
    """A rich Console made when first used: importing rich is a good part of a `launch`
    command's start, and a detached submit or a patch prints one plain line."""

    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr
        self.console: Any = None

    def get(self) -> Any:
        if self.console is None:
            from rich.console import Console

            self.console = Console(stderr=self.stderr, highlight=False, soft_wrap=True)
        return self.console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


out: Any = _LazyConsole(stderr=False)
err: Any = _LazyConsole(stderr=True)


def _table(**options: Any) -> Any:
    from rich.table import Table

    return Table(**options)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def show(value: Any, as_json: bool, as_text: Callable[[Any], None]) -> None:
    """Every view command: JSON on request, else its text rendering."""
    if as_json:
        print_json(value)
    else:
        as_text(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def frozen_summary(frozen: Any) -> None:
    git = frozen.source
    where = f" (git {git.commit[:12]}{' dirty' if git.dirty else ''})" if git.commit else ""
    out.print(
        f"bundle {frozen.bundle_id[:12]}: {len(frozen.manifest)} files, "
        f"{human_bytes(frozen.manifest.total_size)}{where}"
    )
    for item in frozen.excluded[:20]:
        out.print(f"  excluded {item.path}: {item.reason}")
    if len(frozen.excluded) > 20:
        out.print(f"  ... and {len(frozen.excluded) - 20} more excluded")


def frozen_json(frozen: Any) -> dict[str, Any]:
    src = frozen.source
    return {
        "bundle": frozen.bundle_id,
        "files": len(frozen.manifest),
        "bytes": frozen.manifest.total_size,
        "excluded": [{"path": e.path, "reason": e.reason} for e in frozen.excluded],
        "git": {"commit": src.commit, "branch": src.branch, "dirty": src.dirty},
    }


def manifest_text(manifest: Any) -> str:
    lines = []
    for e in manifest.entries:
        target = f" -> {e.target}" if e.kind == "symlink" else ""
        lines.append(f"{e.kind:<7} {e.size:>10} {e.blob[:12]}  {e.path}{target}")
    return "\n".join(lines)


def revision_text(rev: Any) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rev.at_ns / 1e9))
    return "\n".join(
        [
            f"revision {rev.ref}",
            f"parent   {rev.parent}",
            f"bundle   {rev.bundle}",
            f"reason   {rev.reason}",
            f"author   {rev.author}",
            f"time     {when}",
            f"step     {rev.step}",
            f"paths    {', '.join(rev.paths)}",
            f"message  {rev.message}",
        ]
    )


STATE_STYLE = {
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "lost": "red",
    "unreachable": "red",
    "error": "red",
    "cancelled": "yellow",
    "prepared": "blue",
}


def _state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def status_table(st: dict[str, Any]) -> None:
    title = f"{st['job']}  {' '.join(st['argv'])}"
    if st["diverged"]:
        title += "  [red]DIVERGED[/]: nodes disagree on the revision (see `launch repair`)"
    table = _table(title=title, title_justify="left")
    for col in ("rank", "node", "state", "rev", "bundle", "pid", "exit"):
        table.add_column(col)
    for row in st["nodes"]:
        if "error" in row:
            table.add_row(
                str(row["rank"]), row["node"], _state(row["state"]), "", "", "", row["error"]
            )
            continue
        exit_text = "" if row.get("exit_code") is None else str(row["exit_code"])
        if row.get("signal"):
            exit_text += f" (signal {row['signal']})"
        table.add_row(
            str(row["rank"]),
            row["node"],
            _state(row["state"]),
            f"r{row['revision']}",
            row["bundle"][:12],
            str(row.get("pid") or ""),
            exit_text,
        )
    out.print(table)


def ls_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        out.print("no jobs yet: `launch submit -- CMD` starts one")
        return
    table = _table()
    for col in ("job", "name", "state", "nodes", "bundle", "command"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["job"],
            r["name"],
            _state(r["state"]),
            str(r["nodes"]),
            r["bundle"][:12],
            " ".join(r["argv"]),
        )
    out.print(table)


def nodes_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        out.print(
            "no nodes: configure a cluster in launch.toml, or `launch submit --nodes N` "
            "starts local agents"
        )
        return
    table = _table()
    for col in ("node", "agent", "cpus", "load", "memory free", "disk free", "gpus", "jobs"):
        table.add_column(col)
    for r in rows:
        if not r["reachable"]:
            table.add_row(r["node"], f"[red]unreachable[/]: {r['error']}", "", "", "", "", "", "")
            continue
        table.add_row(
            r["node"],
            f"{r['agent']} ({r['hostname']})",
            str(r["cpus"]),
            f"{r['load'][0]:.2f}",
            human_bytes(r["memory_available"]),
            human_bytes(r["disk_free"]),
            str(len(r["gpus"])),
            str(r["jobs_running"]),
        )
    out.print(table)


class UploadBar:
    """A progress bar for uploads that take more than a moment, on a terminal only.

    What there is to send grows while it is sent (`add`): a cold submit sends what its freeze
    has read while the freeze reads on. The bar shows once that passes THRESHOLD bytes."""

    THRESHOLD = 8 * 2**20

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = 0
        self.blobs = 0
        self.done = 0
        self.progress: Any = None
        self.task: Any = None

    def add(self, nbytes: int, nblobs: int) -> None:
        self.total += nbytes
        self.blobs += nblobs
        if self.progress is not None:
            self.progress.update(self.task, total=self.total, blobs=self.blobs)
        elif self.enabled and self.total >= self.THRESHOLD:
            self._show()

    def _show(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("uploading {task.fields[blobs]} blobs"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err.get(),
            transient=True,
        )
        self.task = self.progress.add_task(
            "upload", total=self.total, completed=self.done, blobs=self.blobs
        )
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def revisions_table(rows: list[dict[str, Any]]) -> None:
    table = _table()
    for col in ("rev", "reason", "author", "time", "step", "paths", "message", "nodes"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"r{r['revision']}",
            r["reason"],
            r["author"],
            r["at"][:19].replace("T", " "),
            "" if r["step"] is None else str(r["step"]),
            ", ".join(r["paths"][:4]) + (" ..." if len(r["paths"]) > 4 else ""),
            r["message"],
            str(len(r["nodes"])),
        )
    out.print(table)


def metrics_table(result: dict[str, Any]) -> None:
    if "buckets" in result:
        table = _table(title=f"{result['job']} rank {result['rank']}", title_justify="left")
        for col in ("steps", "count", "metric", "min", "max", "last"):
            table.add_column(col)
        for b in result["buckets"]:
            for key, (lo, hi, last) in sorted(b["metrics"].items()):
                table.add_row(
                    f"{b['from']}-{b['to']}",
                    str(b["count"]),
                    key,
                    f"{lo:.6g}",
                    f"{hi:.6g}",
                    f"{last:.6g}",
                )
        out.print(table)
        return
    points = result["points"]
    if not points:
        out.print(f"{result['job']}: no metrics reported yet")
        return
    keys = sorted({k for p in points for k in p["values"]})
    table = _table(title=f"{result['job']} rank {result['rank']}", title_justify="left")
    for col in ("step", "time", "rev", "restart", *keys):
        table.add_column(col)
    for p in points:
        when = time.strftime("%H:%M:%S", time.localtime(p["at_ns"] / 1e9))
        table.add_row(
            str(p["step"]),
            when,
            f"r{p['revision']}",
            str(p["restart"]),
            *(f"{p['values'][k]:.6g}" if k in p["values"] else "" for k in keys),
        )
    out.print(table)


def _chain_lines(chain: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    lines = []
    for r in chain:
        step = "" if r["step"] is None else f" at step {r['step']}"
        paths = f": {', '.join(r['paths'])}" if r["paths"] else ""
        lines.append(
            f"{indent}r{r['revision']} {r['reason']} by {r['author']}, "
            f"{r['at'][:19].replace('T', ' ')}{step}{paths}"
        )
    return lines


def provenance_text(p: dict[str, Any]) -> None:
    step = "" if p["step"] is None else f" at step {p['step']}"
    print(f"{p['path']} (sha256 {p['sha256'][:12]}, {human_bytes(p['size'])})")
    print(f"written by {p['job']} on {p['node']} (rank {p['rank']}){step}, under r{p['revision']}")
    print("code history:")
    print("\n".join(_chain_lines(p["chain"])))
    for parent in p["lineage"]:
        print(
            f"initialised from {parent['job']}:{parent['path']} "
            f"(sha256 {str(parent['sha256'])[:12]}, r{parent['revision']})"
        )
        print("\n".join(_chain_lines(parent.get("chain", []), "    ")))


def lineage_text(node: dict[str, Any], depth: int = 0) -> None:
    pad = "  " * depth
    print(f"{pad}{node['job']} {node.get('name') or ''} {' '.join(node.get('argv', []))}".rstrip())
    for parent in node["parents"]:
        print(
            f"{pad}  <- {parent['path']} (sha256 {str(parent['sha256'])[:12]}, "
            f"r{parent['revision']}) of"
        )
        if "parent" in parent:
            lineage_text(parent["parent"], depth + 2)
        else:
            print(f"{pad}    {parent['job']} ({parent.get('error', 'unknown')})")

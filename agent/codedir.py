"""A job's live code directory and how a patch changes it, in two steps.

`stage`: the files a patch adds or replaces are materialised from the store into staged/,
beside code/ on the same filesystem; staged.json, published last, is the prepare's commit
point, so a staged patch survives an agent restart and `launch repair` can finish it.
`swap`: each deleted path is unlinked from code/ and each staged file renamed over its path.
A rename is atomic per file: whatever the job opens after the swap is the new code, and no
reader ever sees a half-written file. Every directory is walked by descriptor without
following symlinks, as in the store, so a swap never writes outside code/.
`update` does the same to a spare tree (agent/spares.py) to make a new job's code directory.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.paths import JobPaths, publish_json, read_json
from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import Change, Entry, Kind, Manifest, apply_changes, blob_id
from agent.store import DIR_FLAGS, Store, make_dir, open_dir, safe_component


@dataclass(frozen=True)
class Staged:
    """A prepared patch: revision `number` on top of `base`, not yet live."""

    number: int
    base: int
    bundle: str
    puts: list[str]
    deletes: list[str]
    author: str
    message: str
    staged_ns: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return sorted(self.puts + self.deletes)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Staged:
        return cls(**value)


def read_staged(paths: JobPaths) -> Staged | None:
    value = read_json(paths.staged_record)
    return None if value is None else Staged.from_json(value)


def stage(store: Store, paths: JobPaths, staged: Staged, puts: list[Entry]) -> None:
    """Materialise `puts` (the entries of `staged.puts`) into staged/, then publish the
    record."""
    drop(paths)
    store.materialize(Manifest.of(puts), paths.staged)
    publish_json(paths.staged_record, asdict(staged), mode=0o600)


def drop(paths: JobPaths) -> None:
    """Forget a staged patch (abort, or after its commit)."""
    paths.staged_record.unlink(missing_ok=True)
    shutil.rmtree(paths.staged, ignore_errors=True)


def swap(paths: JobPaths, staged: Staged) -> None:
    """Make the staged files live. Safe to repeat after a crash: a file already moved is
    skipped, a path already deleted is fine."""
    _apply(paths.code, paths.staged, staged.puts, staged.deletes)
    drop(paths)


def update(store: Store, tree: Path, changes: list[Change], new: Manifest, scratch: Path) -> None:
    """Turn `tree`, a pristine materialisation of a manifest that nothing else uses, into
    one of `new`, given the `changes` between the two (objects.diff): the files that differ
    are materialised in `scratch` (a new directory beside it) and renamed into place, the
    paths `new` lacks removed. The result is the tree materialising `new` would write."""
    puts = [c.path for c in changes if c.new is not None]
    deletes = [c.path for c in changes if c.new is None]
    wanted = set(puts)
    store.materialize(Manifest.of(e for e in new.entries if e.path in wanted), scratch)
    try:
        _apply(tree, scratch, puts, deletes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _apply(code: Path, staged: Path, puts: list[str], deletes: list[str]) -> None:
    """Unlink `deletes` from code/, then rename each of `puts` from staged/ into it.
    Deletes go first: a path that was a file and is now a directory, or the reverse, is
    then free when its new entry arrives."""
    code_fd = os.open(code, DIR_FLAGS)
    try:
        for path in deletes:
            _delete(code_fd, path.split("/"))
        staged_fd = os.open(staged, DIR_FLAGS) if staged.exists() else None
        if staged_fd is None:
            return
        try:
            for path in puts:
                _move(staged_fd, code_fd, path.split("/"))
        finally:
            os.close(staged_fd)
    finally:
        os.close(code_fd)


def _ensure_dir(root_fd: int, parts: list[str]) -> int:
    for n in range(1, len(parts) + 1):
        try:
            os.close(open_dir(root_fd, parts[:n]))
        except FileNotFoundError:
            make_dir(root_fd, parts[:n])
    return open_dir(root_fd, parts)


def _move(staged_fd: int, code_fd: int, parts: list[str]) -> None:
    name = safe_component(parts[-1])
    try:
        src = open_dir(staged_fd, parts[:-1])
    except FileNotFoundError:
        return  # moved by an earlier, interrupted swap
    try:
        dst = _ensure_dir(code_fd, parts[:-1])
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _delete(code_fd: int, parts: list[str]) -> None:
    name = safe_component(parts[-1])
    try:
        parent = open_dir(code_fd, parts[:-1])
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent)
    finally:
        os.close(parent)
    # Directories left empty by the delete go too: a tree materialised from the new manifest
    # would not have them.
    for n in range(len(parts) - 1, 0, -1):
        try:
            parent = open_dir(code_fd, parts[: n - 1])
        except FileNotFoundError:
            return
        try:
            os.rmdir(safe_component(parts[n - 1]), dir_fd=parent)
        except OSError:
            return
        finally:
            os.close(parent)


log = logging.getLogger("launch-agent")


def scan(
    code: Path,
    known: Callable[[str], bool] = lambda blob: False,
    head: Manifest | None = None,
    changed: set[str] | None = None,
) -> tuple[Manifest, list[tuple[str, bytes]]]:
    """The tree now in `code` as a manifest, and the bytes of each blob `known` says the store
    lacks. Used to freeze a hand edit (drift). With `head` and `changed` (paths the watcher
    saw change), only those paths, and what lies under them, are read again; the rest is
    taken from `head`. Symlinks are not followed; an entry that breaks the path grammar (a
    symlink leaving the tree) is left out and logged."""
    blobs: list[tuple[str, bytes]] = []
    if head is None or not changed or "." in changed:
        return Manifest.of(_walk(code, "", known, blobs).values()), blobs
    found: dict[str, Entry] = {}
    for rel in sorted(changed):
        found.update(_walk(code, rel, known, blobs))
    # Whatever is there now replaces what the head had under each changed path; only those
    # paths are checked against the rest of the tree (apply_changes).
    gone = [path for rel in changed for path in _under(head, rel) if path not in found]
    return apply_changes(head, found.values(), sorted(set(gone))), blobs


def changed_since(code: Path, since_ns: int) -> set[str]:
    """Paths under `code` (relative; "." for code itself) whose mtime or ctime is later than
    `since_ns`: what may have changed since then, cheaply (a stat each, no file read).
    Symlinks are not followed. File times come from the kernel's coarse clock, a tick (at
    most 10 ms) behind time.time_ns(): a change made that soon after `since_ns` can pass
    unseen, so `since_ns` should be a moment well before anyone could edit by hand (a job's
    revision is recorded before the job starts)."""
    after = since_ns
    found: set[str] = set()

    def look(path: str, rel: str) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if max(st.st_mtime_ns, st.st_ctime_ns) > after:
                found.add(sub)
            if stat.S_ISDIR(st.st_mode):
                look(entry.path, sub)

    try:
        top = os.lstat(code)
    except OSError:
        return found
    if max(top.st_mtime_ns, top.st_ctime_ns) > after:
        found.add(".")
    look(str(code), "")
    return found


def _under(manifest: Manifest, rel: str) -> list[str]:
    """Paths of `manifest` equal to `rel` or below it, found by bisection."""
    prefix = rel + "/"
    paths = manifest.paths
    out = [rel] if manifest.get(rel) is not None else []
    for path in paths[bisect.bisect_left(paths, prefix) :]:
        if not path.startswith(prefix):
            break
        out.append(path)
    return out


def _walk(
    code: Path, rel: str, known: Callable[[str], bool], blobs: list[tuple[str, bytes]]
) -> dict[str, Entry]:
    """Entries for the file or tree at code/rel ("" for all of it)."""
    top = os.path.join(code, rel) if rel else str(code)
    if os.path.islink(top) or os.path.isfile(top):
        items = [(os.path.dirname(top), os.path.basename(top))]
    elif os.path.isdir(top):
        items = []
        for dirpath, dirnames, filenames in os.walk(top):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            items.extend((dirpath, name) for name in sorted(filenames + links))
    else:
        return {}  # gone
    out: dict[str, Entry] = {}
    for dirpath, name in items:
        full = os.path.join(dirpath, name)
        path = os.path.relpath(full, code).replace(os.sep, "/")
        try:
            entry = _entry(full, path, known, blobs)
        except (OSError, InvalidManifest) as exc:
            log.warning("drift scan of %s: left out %s: %s", code, path, exc)
            continue
        if entry is not None:
            out[path] = entry
    return out


def _entry(
    full: str, path: str, known: Callable[[str], bool], blobs: list[tuple[str, bytes]]
) -> Entry | None:
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        return Entry.symlink(path, os.readlink(full)).check()
    if not stat.S_ISREG(st.st_mode):
        return None
    with open(full, "rb") as f:
        data = f.read()
    object_id = blob_id(data)
    kind: Kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
    if not known(object_id):
        blobs.append((object_id, data))
    return Entry(path, kind, len(data), object_id).check()

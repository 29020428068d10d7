"""Spare trees, pristine copies of recently built code trees: this module owns `state/spares`.

Building a job's code directory from the store writes every file of the tree (thousands for
a real project), and a resubmit after a one-line change would pay that again. So after a job
starts, the agent builds a spare copy of its bundle from the store (never from the job's live
directory, which a person or the job may change), in a process of its own at idle priority
(SCHED_IDLE): it runs only on CPU time nothing else wants, and, unlike a thread, never holds
the agent's GIL while it waits for that time.
The next prepare takes the spare closest to its bundle (the same bundle, else the one the
launcher names as the tree it changed, else the newest), moves it into place by one rename
and changes only the files that differ (codedir.update).

A spare leaves `spares/` by rename, so it serves one job at most; a spare being built lives
under a temporary name and is never taken. Spares belong to the user whose job made them
(`spares/<uid>-<bundle>`) and serve only that user's jobs: a tree is changed into another in
the new job's directory, and for that moment it holds the old tree's files. At most `keep`
spares are kept per user, the oldest go. Nothing here is needed for correctness: with no
spare, the tree is materialised in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from agent import codedir
from agent.paths import die_with_agent, helper_env
from agent.protocol.errors import LaunchError
from agent.protocol.objects import Manifest, diff
from agent.store import Store

log = logging.getLogger("launch-agent")
IDLE = ["chrt", "--idle", "0"] if shutil.which("chrt") else []  # util-linux; main() sets it too
TEMP = ".tmp-"  # prefix of spares being built or dropped
# A spare is used when at most this share of the new tree's entries differ from it;
# beyond that, changing it costs about as much as writing the tree afresh.
MAX_CHANGED_SHARE = 0.5
MIN_ENTRIES = 200  # smaller trees are written in full about as fast as a spare is changed


class Spares:
    def __init__(self, root: Path, store: Store, keep: int) -> None:
        self.root = root
        self.store = store
        self.keep = keep
        self.root.mkdir(mode=0o700, exist_ok=True)

    def clean(self) -> None:
        """Remove what an interrupted build or drop left (at start-up, before any build)."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(TEMP):
                shutil.rmtree(entry.path, ignore_errors=True)

    # ------------------------------------------------------------------------- take

    def fill(self, dest: Path, manifest: Manifest, owner: int, near: str = "") -> bool:
        """Make `dest` (which must not exist) the tree of `manifest` from one of `owner`'s
        spares, if one is close enough; False if none is (dest is then left absent)."""
        if self.keep == 0:
            return False
        for bundle in self._candidates(owner, manifest.bundle_id, near):
            try:
                old = self.store.get_manifest(bundle)
            except LaunchError:
                continue
            changes = diff(old, manifest)
            if len(changes) > MAX_CHANGED_SHARE * len(manifest.entries):
                continue
            try:
                os.rename(self.root / f"{owner}-{bundle}", dest)  # ours: no other job takes it
            except FileNotFoundError:
                continue  # taken or dropped meanwhile
            scratch = dest.with_name(dest.name + ".change")
            try:
                if changes:
                    codedir.update(self.store, dest, changes, manifest, scratch)
            except (OSError, LaunchError) as exc:
                log.warning("spare %s could not become %s: %s", bundle[:12], dest, exc)
                shutil.rmtree(dest, ignore_errors=True)
                return False
            return True
        return False

    def _candidates(self, owner: int, bundle: str, near: str) -> list[str]:
        """Bundles of spares to try, best first: the same bundle, the named one, then the
        newest."""
        spares = self._spares(owner)
        ordered = [b for b in (bundle, near) if b in spares]
        return ordered + [b for b in spares if b not in ordered][:1]

    def _spares(self, owner: int) -> list[str]:
        """Bundles of `owner`'s finished spares, newest first."""
        prefix = f"{owner}-"
        found = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        return [name.removeprefix(prefix) for _, name in sorted(found, reverse=True)]

    # ------------------------------------------------------------------------ build

    async def build(self, owner: int, bundle: str) -> None:
        """make(), in a helper process at idle priority; stopped (by pid) if cancelled.
        What a stopped build leaves is a temporary tree, removed at the next start-up."""
        if self.keep == 0 or (self.root / f"{owner}-{bundle}").exists():
            return
        with contextlib.suppress(LaunchError):
            if len(self.store.get_manifest(bundle)) < MIN_ENTRIES:
                return  # written in full in a moment anyway: not worth a process
        args = [str(self.root), str(self.store.root), str(owner), bundle, str(self.keep)]
        proc = await asyncio.create_subprocess_exec(
            *IDLE,  # from its first instruction: its interpreter's start-up too
            sys.executable,
            "-S",
            "-m",
            "agent.spares",
            *args,
            str(os.getpid()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=helper_env(),
        )
        try:
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())

    def make(self, owner: int, bundle: str) -> None:
        """Build a spare of `bundle` for `owner` from the store unless there is one; drop
        that owner's oldest beyond `keep`."""
        final = self.root / f"{owner}-{bundle}"
        if self.keep == 0 or final.exists():
            return
        temp = self.root / f"{TEMP}{owner}-{bundle[:16]}-{secrets.token_hex(4)}"
        try:
            self.store.materialize(self.store.get_manifest(bundle), temp)
            os.utime(temp)  # its age as a spare starts now
            os.rename(temp, final)
        except (OSError, LaunchError) as exc:
            log.warning("spare of %s not built: %s", bundle[:12], exc)
            shutil.rmtree(temp, ignore_errors=True)
            return
        for old in self._spares(owner)[self.keep :]:
            self._drop(f"{owner}-{old}")

    def _drop(self, name: str) -> None:
        doomed = self.root / f"{TEMP}drop-{secrets.token_hex(4)}"
        try:
            os.rename(self.root / name, doomed)  # out of reach of fill() first
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)


def main() -> None:
    """`python -m agent.spares SPARES STORE OWNER BUNDLE KEEP AGENT_PID` (Spares.build)."""
    root, store, owner, bundle, keep, agent_pid = sys.argv[1:]
    with contextlib.suppress(OSError):  # threads started from here inherit it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if not die_with_agent(int(agent_pid)):
        return
    logging.basicConfig(level=logging.WARNING, format="launch-agent spares: %(message)s")
    Spares(Path(root), Store(Path(store)), int(keep)).make(int(owner), bundle)


if __name__ == "__main__":
    main()

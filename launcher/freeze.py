"""Freezing a directory into a bundle: this module owns one freeze from start to end (list the
tree, scan it against the stat cache, read what changed, store the manifest) and the API the
rest of the launcher uses. The steps have their own modules: launcher/gitview.py (which
files), launcher/scan.py (the stat cache scan), launcher/readfiles.py (reading and hashing).

Which files: git's view when the directory is in a git work tree, else a walk that honours
every `.gitignore` below the root as git would. Then `.launchignore` (gitignore syntax, at the
root) removes more, in both cases. `.git` is never shipped.

How: a file whose stat matches the stat cache (launcher/statcache.py) is not read. The others
are read once each and those same bytes are hashed (SHA-256: the blob id; SHA-1 of git's
blob header and the bytes: git's id for them) and given to `Store.put_many` in batches.

Where the tree came from (commit, branch, dirty) is recorded beside the bundle as a Source,
never inside the manifest: the bundle id depends on the files alone.

Speed matters most when nothing changed since the last freeze: the target is the time
`git status` takes. Three git processes start first and run on the other core: the tracked
files with `-m` (git checks each against its index, in C, as git status does), the untracked
files, and HEAD. git vouches for a tracked file it found unmodified when its index holds the
blob the cache has for that file and the very stat the cache read it with: the file still
holds the cached bytes, and it is not even stat-ed. Meanwhile this process stats the rest
(untracked and modified files) and builds the manifest of last time's listing; when git's
output is byte for byte what it was last time, that is the answer. No file, blob or manifest
is read or validated twice. (Why the stat as well as the blob: see launcher/gitview.py.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.protocol.errors import InvalidManifest
from agent.protocol.objects import Entry, Manifest, Source
from launcher import statcache
from launcher.gitview import (  # FreezeError, Excluded, LAUNCHIGNORE: this module's API too
    LAUNCHIGNORE,
    Excluded,
    FreezeError,
    Git,
    LaunchIgnore,
    Listing,
    parse_git,
    recall_walk,
    walk,
)
from launcher.pending import PendingStore, run_later
from launcher.readfiles import read_all
from launcher.scan import Scan, path_of

if TYPE_CHECKING:
    from agent.store import Store

DEFAULT_MAX_FILE_SIZE = 50 * 2**20


@dataclass(frozen=True)
class Frozen:
    """The result of a freeze: the manifest (its blobs are in the store), where it came from,
    what was left out, and how much had to be read this time (0 on a warm re-freeze)."""

    root: Path
    manifest: Manifest
    source: Source
    excluded: tuple[Excluded, ...]
    bytes_read: int
    files_read: int = 0
    # When the tree has the paths of the last freeze of this directory (bundle `base`): the
    # entries that differ from it, found without comparing the trees (see upload_bundle).
    base: str | None = None
    changes: tuple[Entry, ...] | None = None

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id


def freeze(
    root: Path,
    store: Store | PendingStore,
    *,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    cache_path: Path | None = None,
) -> Frozen:
    """Freeze the tree at `root` into `store`: every blob, then the manifest.

    `cache_path` is the stat cache to use and update (None: no cache, every file is read); it
    should lie outside the tree. Raises FreezeError (an InvalidManifest) when root is not a
    directory, and otherwise names every file over `max_file_size`, every symlink that leaves
    the tree, every file that cannot be read or every name a bundle cannot hold, with what to
    do about it. Blobs already stored when that happens stay: the store only ever holds
    verified objects, and the next freeze will not store them again.
    """
    root = _check_root(root)
    top = str(root)
    with Git(root) as git:  # first, so that git works while the rest happens
        cache = statcache.load(cache_path, top)
        last = Listing.load(cache)
        ignore = LaunchIgnore.load(root)
        scan = None
        if last is not None:
            # While git lists the tree, scan what it listed last time: usually it is the same.
            guess = not _has_content(last.attributes)
            scan = Scan(top, cache, last.listing, max_file_size, guess).run()
            if not scan.misses:  # the manifest and its id too: if nothing changed, it is all
                scan.manifest()
        head = git.head()
        vouch = head is not None and not _has_content(head.attributes)
        if head is not None:
            git.recall(last.memo if last is not None else None, head)
        outputs = git.listings()
        digest: bytes | None = None
        if outputs is None:
            listing = recall_walk(cache, top, ignore) or walk(top, ignore)
        else:
            digest = hashlib.sha256(b"\0\0".join((*outputs, ignore.raw))).digest()
            if last is not None and last.digest == digest:
                listing = last.listing
            else:
                listing = parse_git(*outputs, ignore)
        if scan is None or scan.listing is not listing or scan.vouch_asked != vouch:
            known = scan.known() if scan is not None else None
            scan = Scan(top, cache, listing, max_file_size, vouch).run(known)
        scan.raise_problems()
        scan.check_present(store)
        read = read_all(top, scan.misses, store, max_file_size, git_ids=listing.git)
        scan.add_read(read)
        manifest = _store_manifest(store, scan.manifest(read.entries), cache, read.entries)
        changes = scan.changes_since_cache(manifest, read)
        source = git.source(head, listing, scan) if head is not None and listing.git else Source()
    # The memo holds for as long as the index and HEAD do: kept unless git was asked again.
    memo = git.memo or (last.memo if last is not None else None)
    attributes = head.attributes if head is not None else ""
    if cache_path is not None and (
        scan.changed(read)
        or manifest.bundle_id != cache.bundle_id
        or digest != (last.digest if last is not None else None)
        or memo != (last.memo if last is not None else None)
        or attributes != (last.attributes if last is not None else "")
        or (digest is None and listing.memo is not cache.extra)  # a walk, not recalled
    ):
        extra = listing.to_extra(digest, memo, attributes) if digest is not None else listing.memo
        table = scan.table(read)
        run_later(
            store,
            lambda: statcache.save(cache_path, top, table, manifest.bundle_id, extra),
        )
    excluded = tuple(sorted(listing.excluded + scan.excluded, key=path_of))
    base = cache.bundle_id if changes is not None else None
    return Frozen(root, manifest, source, excluded, read.bytes, read.files, base, changes)


def _check_root(root: Path) -> Path:
    path = Path(root).absolute()
    if not path.exists():
        raise FreezeError(f"{root} does not exist: give the directory to freeze", str(root))
    if not path.is_dir():
        raise FreezeError(f"{root} is not a directory: give the directory to freeze", str(root))
    return path


def _has_content(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


# --------------------------------------------------------------------------- manifest


def _store_manifest(
    store: Store | PendingStore,
    manifest: Manifest,
    cache: statcache.StatCache,
    read: list[Entry],
) -> Manifest:
    """Store the manifest unless the store has it already.

    Not validated here (see Scan.manifest in launcher/scan.py): `put_manifest` decodes what
    it stores, which validates every entry and the tree's shape (duplicates, case clashes),
    and a manifest already in the store was validated when it was put. Validating here as
    well would double the cost of a warm freeze. When the tree has the same paths as the last
    freeze's (whose manifest the store holds, so it was valid), its shape is known good: only
    the entries read again (`read`) are checked, which makes a one-file change cheap to freeze.
    """
    if store.has(manifest.bundle_id):
        return manifest
    try:
        if (
            cache.bundle_id is not None
            and store.has(cache.bundle_id)
            and manifest.paths == cache.table.present()
        ):
            for entry in read:
                entry.check()
            store.put_manifest(manifest, encoded=manifest.encode())
        else:
            store.put_manifest(manifest)
    except InvalidManifest as exc:
        raise FreezeError(
            f"{exc.message}: rename one or exclude it in {LAUNCHIGNORE}", exc.path
        ) from None
    return manifest

"""The benchmark corpus: the source distribution of a big Python project, from PyPI.

A real tree, not a generated one: Django's sdist has about 6,800 files in about 3,200
directories (locale trees), 44 MB in all, most files small, as in a training repository with
its vendored code. The version is pinned so that figures compare across runs. It is
downloaded once with pip (the ordinary client; pip prepares the sdist's metadata, which needs
setuptools from PyPI the first time) and unpacked once; callers copy it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench import BASE

PROJECT, VERSION = "Django", "5.1.4"
MIN_FILES = 2500
CORPUS = BASE / "corpus"


def corpus() -> Path:
    """The unpacked tree (downloaded and unpacked on first use); never modify it."""
    tree = CORPUS / f"{PROJECT}-{VERSION}"
    done = CORPUS / f"{PROJECT}-{VERSION}.complete"  # beside the tree: not part of it
    if done.exists():
        return tree
    archive = _download()
    staging = CORPUS / f".{PROJECT}-{VERSION}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")  # no absolute paths, links or devices
    (top,) = staging.iterdir()  # an sdist holds one directory, NAME-VERSION
    count = sum(1 for p in top.rglob("*") if p.is_file())
    if count < MIN_FILES:
        raise SystemExit(f"{archive.name} has {count} files, fewer than {MIN_FILES}")
    shutil.rmtree(tree, ignore_errors=True)
    top.rename(tree)
    staging.rmdir()
    done.touch()
    return tree


def _download() -> Path:
    downloads = CORPUS / "downloads"
    found = _sdist(downloads)
    if found is not None:
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"downloading the {PROJECT} {VERSION} sdist from PyPI (once)...", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{PROJECT}=={VERSION}",
            "--dest",
            str(downloads),
        ],
        check=True,
    )
    found = _sdist(downloads)
    if found is None:
        raise SystemExit(f"pip left no sdist of {PROJECT} {VERSION} in {downloads}")
    return found


def _sdist(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    for path in directory.iterdir():
        if path.name.lower() == f"{PROJECT}-{VERSION}.tar.gz".lower():
            return path
    return None


def file_count(tree: Path) -> tuple[int, int]:
    """Files and bytes in a tree."""
    files = [p for p in tree.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)

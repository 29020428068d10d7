"""Environment values that look secret (API_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD...)
never enter a record or an answer: the job row and every snapshot keep the name with the value
redacted, the real values live in one file only the agent reads, and the agent puts them back
only into the environment of the job itself."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSW|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION", re.I)
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact(env: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if is_secret(k) else v) for k, v in env.items()}


def split(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(what may be recorded, the secret values)."""
    return redact(env), {k: v for k, v in env.items() if is_secret(k)}


def save(path: Path, values: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)


def load(path: Path) -> dict[str, str]:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

#!/usr/bin/env bash
# Install or upgrade the launch node agent as a systemd service. Idempotent: run it again after
# a `git pull` or with a new wheel; each step says what it did, or that there was nothing to do.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
DEFAULT_PREFIX=/opt/launch-agent
DEFAULT_UNIT_DIR=/etc/systemd/system
UNIT_NAME=launch-agent.service

usage() {
    cat <<EOF
Usage: deploy/install.sh [options] [SOURCE]

Install or upgrade launch-agent on this node, as root:
  1. create the virtual environment PREFIX/venv, if it is missing;
  2. pip-install launch into it from SOURCE: a wheel, a source directory or any pip
     requirement (default: this repository, $REPO);
  3. write the systemd unit to UNIT_DIR/$UNIT_NAME (only if it changed), with
     ExecStart pointing into PREFIX/venv;
  4. systemctl daemon-reload and systemctl enable --now launch-agent, and restart it if
     its code or unit changed (running jobs are not affected: KillMode=process).
     Skipped, saying so, when systemd is not running (no /run/systemd/system, as in most
     containers), with --no-start, or when UNIT_DIR is not $DEFAULT_UNIT_DIR.

Options:
  --prefix DIR     install under DIR (default: \$LAUNCH_PREFIX or $DEFAULT_PREFIX)
  --unit-dir DIR   write the unit there (default: \$LAUNCH_UNIT_DIR or $DEFAULT_UNIT_DIR)
  --python PY      Python 3.11+ to create the venv with (default: \$LAUNCH_PYTHON or python3)
  --no-start       do not run systemctl
  -h, --help       show this help and exit

Extra pip arguments may be given in \$LAUNCH_PIP_ARGS (split on spaces).
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

PREFIX="${LAUNCH_PREFIX:-$DEFAULT_PREFIX}"
UNIT_DIR="${LAUNCH_UNIT_DIR:-$DEFAULT_UNIT_DIR}"
PYTHON="${LAUNCH_PYTHON:-python3}"
START=1
SOURCE=""

while (($#)); do
    case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    --prefix)
        [[ $# -ge 2 ]] || die "--prefix needs a directory"
        PREFIX="$2"
        shift 2
        ;;
    --unit-dir)
        [[ $# -ge 2 ]] || die "--unit-dir needs a directory"
        UNIT_DIR="$2"
        shift 2
        ;;
    --python)
        [[ $# -ge 2 ]] || die "--python needs an interpreter"
        PYTHON="$2"
        shift 2
        ;;
    --no-start)
        START=0
        shift
        ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
        [[ -z "$SOURCE" ]] || die "only one SOURCE may be given"
        SOURCE="$1"
        shift
        ;;
    esac
done
SOURCE="${SOURCE:-$REPO}"

# systemd splits ExecStart on whitespace and needs an absolute path.
PREFIX="$(realpath -m -- "$PREFIX")"
[[ "$PREFIX" != *[[:space:]]* ]] || die "the prefix may not contain whitespace: $PREFIX"
VENV="$PREFIX/venv"
AGENT="$VENV/bin/launch-agent"
read -r -a PIP_ARGS <<<"${LAUNCH_PIP_ARGS:-}"

# A digest of the installed distribution's files (pip's RECORD lists each file's hash), to
# tell whether pip changed anything. -I: never a launch.egg-info from the current directory.
installed_digest() {
    "$VENV/bin/python" -I - <<'PY' 2>/dev/null || true
import hashlib, importlib.metadata as md
try:
    print(hashlib.sha256((md.distribution("launch").read_text("RECORD") or "").encode()).hexdigest())
except md.PackageNotFoundError:
    print("none")
PY
}

# 1. The virtual environment.
if [[ -x "$VENV/bin/python" ]]; then
    say "venv: $VENV exists, kept"
else
    command -v "$PYTHON" >/dev/null || die "no $PYTHON to create the venv with (use --python)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than Python 3.11 (use --python)"
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv "$VENV"
    say "venv: created $VENV with $("$VENV/bin/python" --version 2>&1)"
fi

# 2. The package.
before="$(installed_digest)"
say "pip: installing launch and its dependencies from $SOURCE ..."
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$SOURCE"
# pip keeps an installed version it considers the same; the code must be SOURCE's all the same
# (a source tree changes without a new version number). Identical files leave RECORD as it was.
"${pip[@]}" --no-deps --force-reinstall ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$SOURCE"
after="$(installed_digest)"
[[ -x "$AGENT" ]] || die "pip installed no $AGENT"
version="$("$AGENT" --version)"
code_changed=0
if [[ "$before" == "$after" ]]; then
    say "pip: $version already installed, unchanged"
else
    code_changed=1
    say "pip: installed $version into $VENV"
fi

# 3. The unit, with ExecStart pointing into this venv.
unit_src="$HERE/$UNIT_NAME"
[[ -f "$unit_src" ]] || die "no unit file at $unit_src"
unit_dst="$UNIT_DIR/$UNIT_NAME"
mkdir -p "$UNIT_DIR"
tmp="$(mktemp "$UNIT_DIR/.$UNIT_NAME.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" == ExecStart=* ]]; then
        printf 'ExecStart=%s serve\n' "$AGENT"
    else
        printf '%s\n' "$line"
    fi
done <"$unit_src" >"$tmp"
chmod 0644 "$tmp"
unit_changed=0
if [[ -f "$unit_dst" ]] && cmp -s "$tmp" "$unit_dst"; then
    rm -f "$tmp"
    say "unit: $unit_dst is up to date"
else
    mv -f "$tmp" "$unit_dst"
    unit_changed=1
    say "unit: wrote $unit_dst (ExecStart=$AGENT serve)"
fi
trap - EXIT

# 4. systemd.
if ((!START)); then
    say "systemd: skipped (--no-start)"
elif [[ ! -d /run/systemd/system ]]; then
    say "systemd: not running here (no /run/systemd/system, a container?): skipped"
    say "systemd: start the agent by hand with: $AGENT serve"
elif [[ "$(realpath -m -- "$UNIT_DIR")" != "$DEFAULT_UNIT_DIR" ]]; then
    say "systemd: the unit is in $UNIT_DIR, not $DEFAULT_UNIT_DIR: not enabling it"
else
    was_active=0
    systemctl is-active --quiet launch-agent && was_active=1
    systemctl daemon-reload
    say "systemd: daemon-reload done"
    systemctl enable --now launch-agent
    say "systemd: launch-agent enabled and started"
    if ((was_active && (code_changed || unit_changed))); then
        # Jobs outlive the agent (KillMode=process): the new agent re-adopts them.
        systemctl restart launch-agent
        say "systemd: restarted launch-agent for the new code or unit (jobs keep running)"
    fi
    systemctl --no-pager --lines=0 status launch-agent || true
fi
say "done"

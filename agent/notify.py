"""systemd's notify protocol, by hand (a datagram to $NOTIFY_SOCKET): READY=1 once serving,
WATCHDOG=1 pings at half of $WATCHDOG_USEC. Outside systemd both are silent no-ops."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    """Send one notification; False when not run under a notify-aware supervisor."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    # Like libsystemd's sd_notify, a vanished or refusing supervisor socket is a failed
    # notification, never an exception: the watchdog task or shutdown must not bring the
    # agent down with it.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked for (or it is
    meant for another process, per $WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000

"""systemd's notify protocol in pure Python: READY=1, WATCHDOG=1, STOPPING=1, STATUS=….

The unit is Type=notify (deploy/systemd/edge-runtime.service): systemd counts the daemon as
started only once it says READY=1, which it does after the model is warm and the port
listens, so units ordered after it and `systemctl start` see a daemon that answers. The
watchdog pings come from the serving event loop itself, so a wedged loop stops them and
systemd restarts the daemon. Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False if not under a notify-aware supervisor.
    An abstract socket is spelled with a leading '@' (sd_notify(3))."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.sendall(state.encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC (systemd's advice), None
    when no watchdog is set or it is meant for another process ($WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None

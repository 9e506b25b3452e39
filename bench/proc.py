"""What /proc says about a child process (Linux; None elsewhere or once it is gone)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_seconds", "peak_rss_mb", "rss_mb"]


def _status_mb(pid: int, field: str) -> float | None:
    """A ``kB`` field of ``/proc/PID/status`` in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """VmRSS (the resident set now) of ``pid`` in MB."""
    return _status_mb(pid, "VmRSS")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the peak resident set) of ``pid`` in MB."""
    return _status_mb(pid, "VmHWM")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

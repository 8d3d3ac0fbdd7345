"""Resident-memory readings for the benchmarks, each of which measures a point in a fresh interpreter.

`python bench/<script>.py` puts bench/ first on sys.path, so the scripts and their worker subprocesses import this
module by its plain name.
"""

from __future__ import annotations


def read_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later peak excludes imports and set-up."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")

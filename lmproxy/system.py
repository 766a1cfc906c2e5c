"""Process-level settings a server needs before it takes load."""

from __future__ import annotations

import resource
from pathlib import Path


def raise_open_file_limit() -> int:
    """Raise the open-file limit as far as this process may; return the soft limit.

    Distributions often start processes with a soft limit of 1024, far below what
    thousands of concurrent streams need (each holds a client and a backend
    socket). The soft limit goes up to the hard limit; a privileged process also
    raises the hard limit, up to the kernel's ``fs.nr_open``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = hard
    for target in (max(hard, nr_open), hard):
        if target == resource.RLIM_INFINITY:
            target = 1 << 20
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
        except (ValueError, OSError):
            continue
        return target
    return soft

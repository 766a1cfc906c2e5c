"""Process-level settings a server needs before it takes load."""

from __future__ import annotations

import resource


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit as far as the hard limit allows; return it.

    Distributions often start processes with a soft limit of 1024, far below what
    thousands of concurrent streams need (each holds a client and a backend socket).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft

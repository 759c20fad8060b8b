"""What this process costs: its peak resident memory, measured one way everywhere (device report,
per-block profiler, benches)."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: ``VmHWM`` from ``/proc/self/status`` where there is one.
    Not ``ru_maxrss`` on Linux: it keeps the high-water mark of the process before ``exec``, i.e. of
    the (possibly large) parent that started us. Elsewhere (macOS) ``ru_maxrss``, which is in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024

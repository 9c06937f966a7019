"""The peak-memory probe of the tests, the benchmarks and the trainer (Linux, CPU): the bytes by
which a step raises the resident set's peak (``VmHWM``) over the resident set just before it,
after the kernel's peak counter is reset through ``/proc/self/clear_refs``; where that reset is
refused, ``ru_maxrss`` stands in. Run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``
so that glibc returns every freed block above 64 KiB at once and the peak follows the live tensors."""

from __future__ import annotations

import os
import resource

__all__ = ["CAN_RESET", "status_kib", "maxrss_kib", "reset_peak_rss", "peak_extra_bytes"]

CAN_RESET = os.path.exists("/proc/self/clear_refs")


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(step) -> int:
    """Run ``step()``; return by how many bytes it raised the peak resident set over the resident
    set before it (``ru_maxrss`` as the baseline where the peak counter cannot be reset)."""
    if reset_peak_rss():
        base = status_kib("VmRSS")
        step()
        return (status_kib("VmHWM") - base) * 1024
    base = maxrss_kib()
    step()
    return (maxrss_kib() - base) * 1024

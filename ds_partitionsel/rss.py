"""The process's resident memory on Linux, for the memory benchmarks: the current set and its
peak (``VmRSS``, ``VmHWM`` of ``/proc/self/status``), and a reset of the peak."""


def rss_kib(field: str = "VmRSS") -> int:
    """``field`` of ``/proc/self/status`` in KiB (``VmRSS``: now, ``VmHWM``: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Set ``VmHWM`` to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

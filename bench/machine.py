"""What a benchmark worker reports about its process and machine (Linux /proc; None or []
elsewhere).  Imports nothing of pycnn, so a PyTorch worker stays free of it."""
from __future__ import annotations

import os

RUNTIME_PREFIXES = ("libgomp", "libomp", "libiomp", "libopenblas", "libscipy_openblas", "libmkl")


def loadavg() -> float | None:
    """The one-minute load average."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def mapped_libraries(prefixes=RUNTIME_PREFIXES, basenames: bool = False) -> list[str]:
    """The shared libraries mapped into this process whose file name starts with one of
    ``prefixes`` (OpenMP and BLAS runtimes by default): their paths, or file names."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted((os.path.basename(p) if basenames else p) for p in paths if os.path.basename(p).startswith(prefixes))

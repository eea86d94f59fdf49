"""How many DataLoader worker processes this machine can run: at most the CPUs this process may use.

``--num_workers`` (:data:`models.options.catalog.NUM_WORKERS`) defaults to ``min(4, CPUs)``; a larger value
given by hand is lowered to the CPU count (:func:`capped_workers`), so PyTorch's "suggested max number of
worker" warning is never printed (it would be, once per epoch) and no worker waits for a core.
"""
from __future__ import annotations

import os

PREFERRED_WORKERS = 4  # decoding, cropping and CLIP preprocessing keep up with a GPU at about this many


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    return min(PREFERRED_WORKERS, available_cpus())


def capped_workers(requested: int) -> tuple[int, str | None]:
    """``(workers, warning or None)``: ``requested`` lowered to the CPU count, with the one line saying so."""
    cpus = available_cpus()
    if requested <= cpus:
        return requested, None
    return cpus, (f"--num_workers {requested}: this process may use {cpus} CPU(s); using {cpus} DataLoader "
                  f"worker(s)")

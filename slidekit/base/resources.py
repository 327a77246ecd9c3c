"""What this process may use: CPUs (affinity and cgroup quota, as Slurm and containers set them),
and resident memory."""
from __future__ import annotations

import math
import os
import resource
from pathlib import Path

from slidekit.base.errors import ConfigError


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota/period``), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB: Linux's VmHWM, else ``ru_maxrss``
    (which on Linux carries over the parent's RSS at fork through exec, so a worker spawned by
    a large driver would report the driver's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The CPU budget an earlier configure_threads call gave this process (a cohort worker's share).
_BUDGET: int | None = None


def configure_threads(threads: int | None = None, workers: int = 0, environ: bool = False) -> int:
    """Fit this process's compute threads to the CPUs it may use; returns the main process's count.

    ``threads`` CPUs in all (default: the last explicit budget, else ``available_cpus()``): each of
    ``workers`` DataLoader workers gets one (``worker_threads``), the main process the rest (at
    least one) for torch's intra-op pool and OpenCV. Without ``threads``, a user's
    ``OMP_NUM_THREADS`` caps the main process's count (it is never raised past it). ``environ`` also sets
    OMP/MKL/OpenBLAS variables for processes started later. torch's default (every core, whatever the affinity or
    quota) plus busy workers oversubscribes a shared or Slurm-limited machine.
    """
    global _BUDGET
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"threads must be at least 1, not {threads}")
    total = int(threads) if threads is not None else cpu_budget()
    if threads is not None:
        _BUDGET = total
    main = max(1, total - max(0, int(workers)))
    user = _env_threads()
    if threads is None and user is not None:  # the user's OMP_NUM_THREADS caps the default, never raised
        main = min(main, user)
    _set_threads(main)
    if environ:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(main)
    return main


def cpu_budget() -> int:
    """CPUs this process's own thread pools may use: the explicit ``--threads``/``configure_threads``
    budget when one was given, else its share of ``available_cpus()`` (never the machine's core count)."""
    # ranks of one torchrun job on this machine share its CPUs (LOCAL_WORLD_SIZE; srun gives each task its own)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return _BUDGET or max(1, available_cpus() // ranks)


def _env_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is a positive integer (the user's own thread count), else None."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n >= 1 else None


def prefer_passive_waits() -> bool:
    """Let idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``) unless the user
    set a policy; True when it takes effect. OpenMP reads it once, when torch loads it: call this
    before importing torch (the CLI does). Spinning threads burn the cores that other processes on
    a shared machine need: a scribble training with two threads on a busy 2-core machine spent
    66 s of CPU (139 s wall) spinning, 19 s (53 s wall) sleeping (benchmarks/threads.py)."""
    import sys

    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def worker_threads(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: one torch thread per worker. OpenCV's and OpenMP's pools
    are left alone here: resizing them in a forked child of a parent that used them can hang."""
    import torch

    torch.set_num_threads(1)


def _set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass

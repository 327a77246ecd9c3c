"""Engines that run ``cohort.process_slide`` over slides: a local process pool (serial when one job)
and Ray. Each yields one table row per slide as slides finish. Neither is a scheduler of its own:
the pool is ``concurrent.futures.ProcessPoolExecutor`` fed slide by slide, and Ray's own
scheduler places Ray tasks with their CPU/GPU requests and retries those whose worker died."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator, Sequence

from slidekit.base.errors import ConfigError
from slidekit.base.locks import pid_alive
from slidekit.base.resources import available_cpus, configure_threads
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide
from slidekit.cohort.process import MAX_WORKER_DEATHS, process_slide


class _Progress:
    """A bar over slides: done / failed / running, slides per hour, ETA (tqdm)."""

    def __init__(self, total: int, settled: list[dict], enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        for r in settled:
            self.counts[r["status"]] = self.counts.get(r["status"], 0) + 1
        self.t0 = time.time()
        self.new = 0
        self.bar = tqdm(total=total + len(settled), initial=len(settled), unit="slide", desc="cohort",
                        disable=not enabled, dynamic_ncols=True)
        self.running = 0

    def update(self, row: dict | None = None, running: int | None = None) -> None:
        if running is not None:
            self.running = running
        if row is not None:
            self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
            self.new += 1
            self.bar.update(1)
        rate = self.new / max(time.time() - self.t0, 1e-9) * 3600
        self.bar.set_postfix_str(f"done {self.counts['done']} · failed {self.counts['failed']} · "
                                 f"running {self.running} · {rate:.0f} slides/h", refresh=True)

    def close(self) -> None:
        self.bar.close()


def _configure_threads(threads: int) -> None:
    """One share of the CPUs per worker: torch intra-op threads and the BLAS/OpenMP pools (the
    share is this process's budget: the slide jobs it runs split it with their DataLoader workers)."""
    configure_threads(threads, environ=True)


def _fix_malloc_threshold() -> None:
    """Pin glibc's mmap threshold: left dynamic, it rises after the first large free and a worker's
    peak RSS steps up once during its second slide (measured: ~100 MiB per worker)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _die_with_parent() -> None:
    """End this worker when its driver dies, even by ``kill -9`` (which runs no cleanup): on Linux
    the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG); everywhere, a daemon
    thread notices the parent is gone (``getppid`` changes once a process is reparented)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="slidekit-parent-watchdog", daemon=True).start()


def _init_worker(gpu_queue: Any, threads: int) -> None:
    _die_with_parent()
    if gpu_queue is not None:  # each worker sees only its GPU (before CUDA is first touched)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    _fix_malloc_threshold()
    _configure_threads(threads)


def physical_gpus(gpus: list[int]) -> list[str]:
    """``--gpus`` indices as device ids: the i-th of CUDA_VISIBLE_DEVICES when it is set (Slurm
    and containers restrict it), so a worker never lands on a GPU this job was not given."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return [str(g) for g in gpus]
    bad = [g for g in gpus if g >= len(visible)]
    if bad:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: this job sees only {len(visible)} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={','.join(visible)}); indices count from 0 among them")
    return [visible[g] for g in gpus]


def _threads_per_job(jobs: int) -> int:
    return max(1, available_cpus() // max(1, jobs))


def run_local(task: str, options: dict, todo: Sequence[CohortSlide], out: str, key: str, jobs: int = 1,
              gpus: list[int] | None = None, retry_failed: bool = False, progress: bool = True,
              debug: bool = False, settled: list[dict] | None = None, **_: Any) -> Iterator[dict]:
    """``jobs`` worker processes (one per GPU when ``gpus``), fed one slide at a time; in this
    process when there is one job and no GPU list (the serial run)."""
    bar = _Progress(len(todo), settled or [], progress)
    n = len(gpus) if gpus else jobs
    try:
        if n == 1 and not gpus:
            for s in todo:
                bar.update(running=1)
                row = process_slide(task, options, s, out, key, retry_failed, debug)
                bar.update(row, running=0)
                yield row
            return
        deaths: dict[str, int] = {}
        pending = list(todo)
        while pending:
            yield from _pool_round(task, options, pending, out, key, n, gpus, retry_failed, debug, bar, deaths)
    finally:
        bar.close()


def _pool_round(task: str, options: dict, pending: list[CohortSlide], out: str, key: str, n: int,
                gpus: list[int] | None, retry_failed: bool, debug: bool, bar: _Progress,
                deaths: dict[str, int]) -> Iterator[dict]:
    """One process pool over ``pending`` (emptied as slides finish). When a worker process dies
    (killed, out of memory), the pool breaks: the slide it held is counted against that slide,
    and the slides not finished go to a fresh pool; a slide that took down ``MAX_WORKER_DEATHS``
    workers is marked failed."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no forked torch/OpenSlide state in workers
    gpu_queue = None
    if gpus:
        gpu_queue = ctx.Queue()
        for g in physical_gpus(gpus):
            gpu_queue.put(g)
    threads = _threads_per_job(n)
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                             initargs=(gpu_queue, threads)) as pool:
        futures = {pool.submit(process_slide, task, options, s, out, key, retry_failed, debug): s for s in pending}
        broken: list[CohortSlide] = []
        remaining = set(futures)
        while remaining:
            bar.update(running=min(n, len(remaining)))
            done, remaining = wait(remaining, timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                s = futures[f]
                try:
                    row = f.result()
                except BrokenProcessPool:
                    broken.append(s)
                    continue
                pending.remove(s)
                bar.update(row)
                yield row
    if not broken:
        return
    state = Ledger(out).state()
    for s in broken:  # the victim's last record is a `running` one whose process is gone
        rec = state.get(s.id, {})
        if rec.get("status") == "running" and rec.get("config") == key and not pid_alive(rec.get("pid")):
            deaths[s.id] = deaths.get(s.id, 0) + 1
            if deaths[s.id] >= MAX_WORKER_DEATHS:
                error = f"worker process died {deaths[s.id]} times on this slide (killed or out of memory)"
                Ledger(out).append(id=s.id, slide=str(s.slide), status="failed", attempt=rec.get("attempt"),
                                   config=key, worker=rec.get("worker"), error=error)
                pending.remove(s)
                row = {"id": s.id, "slide": str(s.slide), "status": "failed", "error": error,
                       "attempts": rec.get("attempt"), "worker": rec.get("worker")}
                bar.update(row)
                yield row


def _ray_process_slide(threads: int, *args: Any) -> dict:
    """process_slide inside a Ray worker, with this worker's CPU share."""
    _fix_malloc_threshold()
    _configure_threads(threads)
    return process_slide(*args)


def run_ray(task: str, options: dict, todo: Sequence[CohortSlide], out: str, key: str, jobs: int = 1,
            gpus: list[int] | None = None, ray_address: str | None = None, retry_failed: bool = False,
            progress: bool = True, debug: bool = False, settled: list[dict] | None = None,
            **_: Any) -> Iterator[dict]:
    """Ray tasks, one per slide, each asking for one CPU plus one per DataLoader reader (``workers``)
    and one GPU when ``gpus``; Ray retries a task whose worker process or node died, and the slide's
    stale lock lets the retry take over. ``ray_address``: "auto" or "HOST:PORT" joins a running
    cluster (where ``jobs`` > 1 caps the slides in flight); None starts a local runtime sized for
    ``jobs`` slides at once. At most twice the task slots are in flight, so the driver stays small."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray: pip install 'slidekit[ray]' (or pip install ray)") from None

    # A slide task asks for one CPU for its compute plus one per DataLoader reader process it starts.
    cpus = 1 + int(options.get("workers") or 0)
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": debug, "configure_logging": debug}
        if ray_address is None:  # a local runtime sized for `jobs` slides at once
            kw["num_cpus"] = jobs * cpus
            kw["num_gpus"] = len(gpus) if gpus else 0
        ray.init(address=ray_address, **kw)
    bar = _Progress(len(todo), settled or [], progress)
    try:
        res = ray.cluster_resources()
        slots = max(1, int(res.get("GPU", 0)) if gpus else int(res.get("CPU", cpus)) // cpus)
        # Submitted beyond what runs at once (2 x slots) so that Ray starts the next slide without a
        # round trip; but on a cluster with --jobs, Ray would run every task submitted: the cap is then
        # what is submitted.
        depth = 2 * slots
        if ray_address is not None and jobs > 1:
            slots = depth = min(slots, jobs)  # on a cluster, --jobs caps the slides in flight
        remote = ray.remote(_ray_process_slide).options(num_cpus=cpus, num_gpus=1 if gpus else 0,
                                                        max_retries=MAX_WORKER_DEATHS, retry_exceptions=False)
        queue = list(todo)
        inflight: dict[Any, CohortSlide] = {}
        while queue or inflight:
            while queue and len(inflight) < depth:
                s = queue.pop(0)
                ref = remote.remote(cpus, task, options, s, out, key, retry_failed, debug)
                inflight[ref] = s
            bar.update(running=min(slots, len(inflight)))
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                s = inflight.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:  # retries exhausted: the worker or node kept dying
                    error = f"Ray task failed after {MAX_WORKER_DEATHS} retries ({type(e).__name__})"
                    Ledger(out).append(id=s.id, slide=str(s.slide), status="failed", config=key, error=error)
                    row = {"id": s.id, "slide": str(s.slide), "status": "failed", "error": error}
                bar.update(row)
                yield row
    finally:
        bar.close()
        if started:
            ray.shutdown()

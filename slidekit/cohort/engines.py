"""Engines that run ``cohort.process_slide`` over slides: a local process pool (serial when one job)
and Ray. Each yields one table row per slide as slides finish. Neither is a scheduler of its own:
the pool is ``concurrent.futures.ProcessPoolExecutor`` fed slide by slide, and Ray's own
scheduler places Ray tasks with their CPU/GPU requests and retries those whose worker died."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Sequence

from slidekit.base.errors import ConfigError
from slidekit.base.locks import pid_alive
from slidekit.base.resources import available_cpus, configure_threads
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide
from slidekit.cohort.process import MAX_WORKER_DEATHS, process_slide
from slidekit.cohort.table import row_from_ledger

# -- stopping: Ctrl-C / SIGTERM ------------------------------------------------------------------

INTERRUPTED_NOTE = "interrupted (the run was stopped); a rerun resumes it"
NOT_STARTED_NOTE = "not started (the run was stopped)"
# How long a stopping driver waits for running slides to reach a safe point before it kills their workers.
STOP_GRACE_SECONDS = 8.0


class SlideInterrupt(KeyboardInterrupt):
    """Raised inside a running slide (in a worker, or in the driver for a serial run) when the run is
    told to stop: the slide's work ends where it is, its atomic outputs and resumable ``.part`` stores
    stay as they are, and its attempt is recorded ``interrupted``."""


class CohortInterrupted(KeyboardInterrupt):
    """A cohort run stopped by SIGINT/SIGTERM after it recorded its running slides as interrupted and
    wrote ``cohort.csv``; ``table`` is this run's table (the CLI exits 130)."""

    def __init__(self, table: Any, signame: str = "SIGINT") -> None:
        super().__init__(f"{signame}: stopped; {table.summary()}")
        self.table, self.signame = table, signame


class StopSignal:
    """What a cohort driver does on SIGINT (Ctrl-C) and SIGTERM (Slurm's scancel, a time limit): the
    first signal stops the run — no new slide starts, running slides stop at their next safe point —
    and the second ends the process at once (KeyboardInterrupt). Handlers are installed only while
    ``installed()`` is active and only in the main thread (elsewhere a run is never told to stop)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self.signame = ""
        self.in_process = False  # a slide is running in this process (the serial run): stop raises in it

    def is_set(self) -> bool:
        return self.event.is_set()

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name
        self.event.set()
        print(f"slidekit: {self.signame}: stopping: no new slide starts; running slides stop at their next safe "
              "point and are recorded as interrupted (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        if self.in_process:
            self.in_process = False
            raise SlideInterrupt

    @contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def interrupted_row(out: str, s: CohortSlide, key: str, pid: int | str | None = None) -> dict:
    """Record ``s`` as interrupted when its last ledger record is a ``running`` one of ``pid`` (this
    process by default; ``"any"``: any process of this host, for a driver whose worker is gone) and
    return its row; a slide that had not started gets a "not started" row, one that had just finished
    its row from the ledger."""
    ledger = Ledger(out)
    rec = ledger.state(only=s.id).get(s.id, {})
    ours = rec.get("host") == socket.gethostname() and (
        pid == "any" or rec.get("pid") == (os.getpid() if pid is None else pid))
    if ours and rec.get("status") == "running":
        seconds = round(max(0.0, time.time() - float(rec.get("time") or time.time())), 3)
        ledger.append(id=s.id, slide=str(s.slide), status="interrupted", attempt=rec.get("attempt"),
                      config=key, worker=rec.get("worker"), seconds=seconds)
        return {"id": s.id, "slide": str(s.slide), "status": "skipped", "error": "", "seconds": seconds,
                "attempts": rec.get("attempts"), "worker": rec.get("worker"), "note": INTERRUPTED_NOTE}
    if ours and pid != "any" and rec.get("status") in ("done", "failed"):
        return row_from_ledger(s, rec, key)
    return {"id": s.id, "slide": str(s.slide), "status": "skipped", "error": "", "note": NOT_STARTED_NOTE}


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


_WORKER = {"stop": False, "busy": False}  # in a pool worker: told to stop; a slide is running


def _on_stop(signum: int, frame: Any) -> None:
    """A pool worker's SIGTERM (from its stopping driver, or from Slurm to the whole job): start no
    new slide, and end the running one here (its next bytecode: a safe point for atomic outputs)."""
    _WORKER["stop"] = True
    if _WORKER["busy"]:
        _WORKER["busy"] = False
        raise SlideInterrupt


def _worker_slide(task: str, options: dict, s: CohortSlide, out: str, key: str, retry_failed: bool,
                  debug: bool) -> dict:
    """process_slide in a pool worker, ended by ``_on_stop``: the attempt is then recorded interrupted."""
    if _WORKER["stop"]:
        return {"id": s.id, "slide": str(s.slide), "status": "skipped", "error": "", "note": NOT_STARTED_NOTE}
    _WORKER["busy"] = True
    try:
        return process_slide(task, options, s, out, key, retry_failed, debug)
    except KeyboardInterrupt:
        _WORKER["busy"] = False
        return interrupted_row(out, s, key)
    finally:
        _WORKER["busy"] = False


def _init_worker(gpu_queue: Any, threads: int) -> None:
    # Ctrl-C reaches the whole process group: the driver alone decides (it stops workers by SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _on_stop)
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


@dataclass(frozen=True)
class CohortRun:
    """How a cohort runs (never what a slide's outputs are).

    Parameters
    ----------
    engine
        ``"local"`` (a process pool) or ``"ray"``.
    jobs
        Slides at once (local worker processes; Ray: slides in flight).
    gpus
        GPU indices, one worker per GPU (a list or ``"0,1"``; None: CPU).
    shard
        ``"i/N"``: this run's share of the cohort (Slurm arrays).
    ray_address
        ``"auto"`` or ``"HOST:PORT"`` joins a Ray cluster; None starts a local runtime.
    retry_failed
        Try again slides that failed before.
    skip_missing
        A manifest row whose slide file does not exist fails as that slide (its row in ``cohort.csv``)
        instead of refusing the manifest; off by default, so a typo in a manifest stops at once.
    progress
        Show a progress bar.
    debug
        Print a failing slide's traceback.
    """

    engine: str = "local"
    jobs: int = 1
    gpus: Sequence[int] | str | None = None
    shard: str | None = None
    ray_address: str | None = None
    retry_failed: bool = False
    skip_missing: bool = False
    progress: bool = True
    debug: bool = False


@dataclass(frozen=True)
class CohortWork:
    """What each slide of a run does: ``task`` with ``options`` into ``out/<id>/``, under configuration ``key``."""

    task: str
    options: dict
    out: str
    key: str


def run_local(work: CohortWork, todo: Sequence[CohortSlide], run: CohortRun, *, gpus: list[int] | None = None,
              settled: list[dict] | None = None, stop: StopSignal | None = None) -> Generator[dict, None, None]:
    """``jobs`` worker processes (one per GPU when ``gpus``), fed one slide at a time; in this
    process when there is one job and no GPU list (the serial run). ``stop`` (set by SIGINT/SIGTERM):
    no new slide starts, running slides are interrupted and recorded so."""
    task, options, out, key = work.task, work.options, work.out, work.key
    jobs, retry_failed, progress, debug = int(run.jobs), run.retry_failed, run.progress, run.debug
    stop = stop or StopSignal()
    bar = _Progress(len(todo), settled or [], progress)
    n = len(gpus) if gpus else jobs
    try:
        if n == 1 and not gpus:
            for s in todo:
                if stop.is_set():
                    return
                bar.update(running=1)
                try:
                    stop.in_process = True
                    try:
                        row = process_slide(task, options, s, out, key, retry_failed, debug)
                    finally:
                        stop.in_process = False
                except SlideInterrupt:
                    row = interrupted_row(out, s, key)
                bar.update(row, running=0)
                yield row
            return
        deaths: dict[str, int] = {}
        pending = list(todo)
        while pending and not stop.is_set():
            yield from _pool_round(work, pending, n, gpus, run, bar, deaths,
                                   stop)
    finally:
        bar.close()


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold Ctrl-C back while a worker is spawned (it is delivered here right after): the child
    inherits the blocked mask, so it cannot die of Ctrl-C before its initializer ignores SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _workers(pool: ProcessPoolExecutor) -> list[Any]:
    return list((getattr(pool, "_processes", None) or {}).values())


def _pool_round(work: CohortWork, pending: list[CohortSlide], n: int, gpus: list[int] | None, run: CohortRun,
                bar: _Progress,
                deaths: dict[str, int], stop: StopSignal) -> Iterator[dict]:
    """One process pool over ``pending`` (emptied as slides finish), fed one slide per idle worker.
    When a worker process dies (killed, out of memory), the pool breaks: the slide it held is counted
    against that slide, and the slides not finished go to a fresh pool; a slide that took down
    ``MAX_WORKER_DEATHS`` workers is marked failed. When ``stop`` is set, nothing more is fed, the
    workers get SIGTERM (their running slides end and are recorded interrupted) and, past
    ``STOP_GRACE_SECONDS``, are killed."""
    task, options, out, key = work.task, work.options, work.out, work.key
    retry_failed, debug = run.retry_failed, run.debug
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no forked torch/OpenSlide state in workers
    gpu_queue = None
    if gpus:
        gpu_queue = ctx.Queue()
        for g in physical_gpus(gpus):
            gpu_queue.put(g)
    threads = _threads_per_job(n)
    pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                               initargs=(gpu_queue, threads))
    futures: dict[Any, CohortSlide] = {}
    broken: list[CohortSlide] = []
    queue = list(pending)
    stopping_since: float | None = None
    clean = False
    try:
        while queue or futures:
            while queue and len(futures) < n and not stop.is_set() and not broken:
                s = queue.pop(0)
                try:
                    with _sigint_blocked():
                        futures[pool.submit(_worker_slide, task, options, s, out, key, retry_failed, debug)] = s
                except BrokenProcessPool:
                    broken.append(s)
            if stop.is_set() and stopping_since is None:
                stopping_since = time.time()
                for p in _workers(pool):
                    _signal(p, signal.SIGTERM)
            if not futures:
                break
            bar.update(running=len(futures))
            done, _ = wait(list(futures), timeout=0.2, return_when=FIRST_COMPLETED)
            for f in done:
                s = futures.pop(f)
                try:
                    row = f.result()
                except BrokenProcessPool:
                    broken.append(s)
                    continue
                except KeyboardInterrupt:  # the stop arrived as the slide was finishing
                    row = interrupted_row(out, s, key, pid="any")
                pending.remove(s)
                bar.update(row)
                yield row
            if stopping_since is not None and futures and time.time() - stopping_since > STOP_GRACE_SECONDS:
                for p in _workers(pool):  # a slide stuck past the grace (a long C call): its worker goes
                    p.kill()
                for p in _workers(pool):
                    p.join(2.0)
                for f, s in list(futures.items()):
                    futures.pop(f)
                    pending.remove(s)
                    row = interrupted_row(out, s, key, pid="any")
                    bar.update(row)
                    yield row
            if broken and not futures:
                break
        clean = not stop.is_set()
    finally:
        if not clean:  # stopped, or a second Ctrl-C: nothing waits for a worker (idle ones hold no slide;
            for p in _workers(pool):  # a running one's lock is stale to a rerun, its .part resumable)
                p.kill()
            pool.shutdown(wait=True, cancel_futures=True)  # quick: its workers are gone
        else:
            pool.shutdown(wait=True)
    if stop.is_set():
        return
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


def _signal(p: Any, sig: int) -> None:
    try:
        os.kill(p.pid, sig)
    except (ProcessLookupError, TypeError):
        pass


def _ray_process_slide(threads: int, *args: Any) -> dict:
    """process_slide inside a Ray worker, with this worker's CPU share."""
    _fix_malloc_threshold()
    _configure_threads(threads)
    try:
        return process_slide(*args)
    except KeyboardInterrupt:  # ray.cancel of a running task: record the attempt interrupted
        task, options, s, out, key = args[:5]
        return interrupted_row(out, s, key)


def run_ray(work: CohortWork, todo: Sequence[CohortSlide], run: CohortRun, *, gpus: list[int] | None = None,
            settled: list[dict] | None = None, stop: StopSignal | None = None) -> Generator[dict, None, None]:
    """Ray tasks, one per slide, each asking for one CPU plus one per DataLoader reader (``workers``)
    and one GPU when ``gpus``; Ray retries a task whose worker process or node died, and the slide's
    stale lock lets the retry take over. ``ray_address``: "auto" or "HOST:PORT" joins a running
    cluster (where ``jobs`` > 1 caps the slides in flight); None starts a local runtime sized for
    ``jobs`` slides at once. At most twice the task slots are in flight, so the driver stays small.
    ``stop``: nothing more is submitted and the tasks in flight are cancelled (a running one is
    interrupted in its worker and recorded so)."""
    task, options, out, key = work.task, work.options, work.out, work.key
    jobs, ray_address, retry_failed, progress, debug = int(run.jobs), run.ray_address, run.retry_failed, \
        run.progress, run.debug
    stop = stop or StopSignal()
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
        stopping_since: float | None = None
        while queue or inflight:
            while queue and len(inflight) < depth and not stop.is_set():
                s = queue.pop(0)
                ref = remote.remote(cpus, task, options, s, out, key, retry_failed, debug)
                inflight[ref] = s
            if stop.is_set() and stopping_since is None:
                stopping_since = time.time()
                for ref in inflight:
                    ray.cancel(ref, force=False)  # a running task gets KeyboardInterrupt; a queued one never starts
            if not inflight:
                break
            bar.update(running=min(slots, len(inflight)))
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
            for ref in ready:
                s = inflight.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:
                    if stopping_since is not None:  # cancelled: its worker recorded it, or it never started
                        row = interrupted_row(out, s, key, pid="any")
                    else:  # retries exhausted: the worker or node kept dying
                        error = f"Ray task failed after {MAX_WORKER_DEATHS} retries ({type(e).__name__})"
                        Ledger(out).append(id=s.id, slide=str(s.slide), status="failed", config=key, error=error)
                        row = {"id": s.id, "slide": str(s.slide), "status": "failed", "error": error}
                bar.update(row)
                yield row
            if stopping_since is not None and inflight and time.time() - stopping_since > STOP_GRACE_SECONDS:
                for ref, s in list(inflight.items()):
                    ray.cancel(ref, force=True)
                    inflight.pop(ref)
                    row = interrupted_row(out, s, key, pid="any")
                    bar.update(row)
                    yield row
    finally:
        bar.close()
        if started:
            ray.shutdown()

"""Run a per-slide command over a cohort: serially, on local worker processes (one per CPU share
or per GPU), as Slurm array shards, or on a Ray cluster — with one ledger, per-slide locks and
resumable reruns.

``run_cohort("heatmap", slides, out="OUT", engine="local", jobs=2, model="hematoxylin")`` writes
each slide's outputs to ``OUT/<slide id>/`` as the single-slide command does, appends attempt
records to ``OUT/cohort.jsonl`` (see ``ledger``), and writes ``OUT/cohort.csv``: one row per slide of
the whole manifest (status done|failed|skipped, error, seconds, attempts, worker, the task's figures
and the manifest's extra columns). A rerun skips slides done with the same configuration, re-runs
failed ones only with ``retry_failed=True``, and takes over slides whose worker died (stale lock).
Each slide is processed under its folder's lock, so shards and concurrent runners never process a
slide twice. The local engine is a process pool fed one slide at a time (slides differ 100x in
size); Ray, when asked for, schedules the same per-slide function as Ray tasks.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Sequence

from slidekit.cohort_table import CohortTable
from slidekit.cohort_tasks import TASKS, CohortTask
from slidekit.errors import ConfigError, LockedError, SlidekitError
from slidekit.io import config_digest
from slidekit.ledger import Ledger
from slidekit.manifest import CohortSlide, read_slides, shard as take_shard

ENGINES = ("local", "ray")
# Options that change how fast a slide is done, not what is written: not part of the config key.
_RUNTIME_OPTIONS = frozenset({"workers", "batch_size", "device", "progress"})
# How many times one slide may take a local worker process down before it is marked failed.
MAX_WORKER_DEATHS = 2


def config_key(task: str, options: dict) -> str:
    """Identity of what a task writes: the task and its result-affecting options. An option left
    unset (None) is left out, so an option added in a later version does not invalidate the
    ledgers of earlier runs that never set it."""
    cfg = {k: _file_identity(v) for k, v in options.items() if k not in _RUNTIME_OPTIONS and v is not None}
    return config_digest([task, cfg])


def _file_identity(value: Any) -> Any:
    """A file option (a checkpoint) stands for its contents: path, size and mtime, so a model
    retrained in place is a new configuration."""
    if isinstance(value, (str, os.PathLike)) and len(str(value)) < 4096:
        p = Path(value)
        if p.is_file():
            st = p.stat()
            return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return value


# -- the per-slide unit of work (runs in a worker process: local pool or Ray) ----------------------

_CONTEXTS: dict[str, Any] = {}  # per worker process: task setup results (e.g. a loaded model)


def _context(task: CohortTask, options: dict) -> Any:
    key = config_key(task.name, {k: v for k, v in options.items() if k in ("model",)})
    if key not in _CONTEXTS:
        _CONTEXTS.clear()  # one model per worker at a time
        _CONTEXTS[key] = task.setup(options)
    return _CONTEXTS[key]


def _one_line(e: BaseException) -> str:
    if isinstance(e, SlidekitError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def process_slide(task_name: str, options: dict, slide: CohortSlide, out: str, key: str,
                  retry_failed: bool = False, debug: bool = False) -> dict:
    """Do one slide under its folder's lock and record it in the ledger; returns its table row.

    Runs in a worker process. Never raises for a slide's own failure: the row says ``failed``.
    """
    from slidekit.locks import OutputLock, describe, read_lock
    from slidekit.resources import peak_rss_mb, rss_mb

    task = TASKS[task_name]
    ledger = Ledger(out)
    folder = Path(out) / slide.id
    worker = worker_name()
    row = {"id": slide.id, "slide": str(slide.slide), "worker": worker}
    try:
        lock = OutputLock(folder).acquire()
    except LockedError:
        rec = read_lock(folder / ".slidekit.lock") or {}
        return {**row, "status": "skipped", "error": f"being processed by {describe(rec)}"}
    try:
        # Decided again under the lock: another runner may have finished the slide meanwhile.
        prev = ledger.state(only=slide.id).get(slide.id, {})
        settled = settled_row(slide, prev, key, folder, retry_failed)
        if settled is not None:
            return {**settled, "worker": worker}
        attempt = int(prev.get("attempts", 0)) + 1
        ledger.append(id=slide.id, slide=str(slide.slide), status="running", attempt=attempt, config=key,
                      worker=worker, took_over=bool(lock.took_over), gpu=os.environ.get("CUDA_VISIBLE_DEVICES"))
        t0 = time.time()
        try:
            figures = task.run(_context(task, options), slide, folder, options, False)
        except Exception as e:  # a slide's failure is recorded, never the whole run's
            if debug:
                traceback.print_exc()
            error = _one_line(e)
            ledger.append(id=slide.id, slide=str(slide.slide), status="failed", attempt=attempt, config=key,
                          worker=worker, error=error, seconds=round(time.time() - t0, 3))
            return {**row, "status": "failed", "error": error, "seconds": round(time.time() - t0, 3),
                    "attempts": attempt}
        seconds = round(time.time() - t0, 3)
        rec = ledger.append(id=slide.id, slide=str(slide.slide), status="done", attempt=attempt, config=key,
                            worker=worker, seconds=seconds, figures=figures, rss_mb=round(rss_mb(), 1),
                            peak_rss_mb=round(peak_rss_mb(), 1))
        return {**row, **figures, "status": "done", "error": "", "seconds": seconds, "attempts": attempt,
                "rss_mb": rec["rss_mb"], "peak_rss_mb": rec["peak_rss_mb"]}
    finally:
        lock.release()
        _drop_if_empty(folder)


def _drop_if_empty(folder: Path) -> None:
    """A slide that failed before writing anything leaves no empty folder behind."""
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def settled_row(slide: CohortSlide, prev: dict, key: str, folder: Path, retry_failed: bool) -> dict | None:
    """The row of a slide the ledger already answers (done, or failed and not to be retried, with
    this configuration); None when it is to be processed."""
    if prev.get("config") != key:
        return None
    row = {"id": slide.id, "slide": str(slide.slide), "attempts": prev.get("attempts", 0),
           "worker": prev.get("worker")}
    if prev.get("status") == "done" and folder.is_dir():
        return {**row, **(prev.get("figures") or {}), "status": "skipped", "error": "", "note": "done earlier"}
    if prev.get("status") == "failed" and not retry_failed:
        return {**row, "status": "failed", "error": prev.get("error", ""),
                "note": "failed earlier (rerun with --retry-failed)"}
    return None


# -- the driver ---------------------------------------------------------------------------------

def run_cohort(task: str, slides: str | os.PathLike | Iterable[str | os.PathLike] | Sequence[CohortSlide],
               out: str | os.PathLike, engine: str = "local", jobs: int = 1, gpus: Sequence[int] | str | None = None,
               shard: str | None = None, ray_address: str | None = None, retry_failed: bool = False,
               progress: bool = True, debug: bool = False, **options: Any) -> CohortTable:
    """Run ``task`` (heatmap, embed, tissue, tile, features) over ``slides`` into ``out``.

    ``slides``: paths, folders, globs or manifest CSVs (see ``slidekit.manifest``), or CohortSlides.
    ``engine``: "local" (``jobs`` worker processes, or one per GPU in ``gpus``) or "ray"
    (``ray_address``: "auto", "HOST:PORT", or None to start a local Ray runtime). ``shard``: "i/N".
    ``options``: the task's own keyword arguments (e.g. ``model=``, ``mpp=`` for heatmap).
    Returns this run's rows (the slides of this shard); ``OUT/cohort.csv`` covers the whole manifest.
    """
    from slidekit.cohort_engines import run_local, run_ray
    from slidekit.cohort_table import finish_table

    if task not in TASKS:
        raise ConfigError(f"unknown cohort task {task!r}; choose one of {', '.join(TASKS)}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if int(jobs) < 1:
        raise ConfigError(f"jobs must be at least 1 (got {jobs})")
    if ray_address is not None and engine != "ray":
        raise ConfigError("--ray-address is for --engine ray; the local engine would ignore it")
    gpu_ids = _parse_gpus(gpus)
    out = Path(out)
    everyone = list(slides) if _are_cohort_slides(slides) else read_slides(slides, kind=TASKS[task].inputs)
    mine = take_shard(everyone, shard)
    key = config_key(task, TASKS[task].effective_options(options))
    ledger = Ledger(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state = ledger.state()
    todo, rows = [], {}
    for s in mine:  # settle what the ledger already answers, without a worker
        settled = settled_row(s, state.get(s.id, {}), key, out / s.id, retry_failed)
        if settled is None:
            todo.append(s)
        else:
            rows[s.id] = settled
    run = run_ray if engine == "ray" else run_local
    for row in run(task, options, todo, str(out), key, jobs=int(jobs), gpus=gpu_ids, ray_address=ray_address,
                   retry_failed=retry_failed, progress=progress, debug=debug, settled=list(rows.values())):
        rows[row["id"]] = row
    ordered = [rows[s.id] for s in mine if s.id in rows]
    return finish_table(out, everyone, ordered, key, wall=time.time() - t0)


def _are_cohort_slides(slides: Any) -> bool:
    return isinstance(slides, (list, tuple)) and bool(slides) and all(isinstance(s, CohortSlide) for s in slides)


def _parse_gpus(gpus: Sequence[int] | str | None) -> list[int] | None:
    if gpus is None or gpus == "" or gpus == []:
        return None
    try:
        ids = [int(g) for g in (gpus.split(",") if isinstance(gpus, str) else gpus)]
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r}: expected GPU indices such as 0,1,2") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise ConfigError(f"--gpus {gpus!r}: expected distinct, non-negative GPU indices")
    return ids


def worker_name() -> str:
    """host:pid of this process, as the table's ``worker`` column shows it."""
    return f"{socket.gethostname()}:{os.getpid()}"

"""The per-slide unit of work of a cohort run (in a worker process: the local pool or a Ray task): take
the slide's folder lock, run the task, record the attempt in the ledger; and what a rerun settles
from the ledger without a worker."""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from slidekit.base.errors import LockedError, SlidekitError
from slidekit.base.io import config_digest
from slidekit.base.locks import OutputLock, describe, read_lock
from slidekit.base.resources import peak_rss_mb, rss_mb
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide
from slidekit.cohort.tasks import TASKS, CohortTask

# Options that change how fast a slide is done, not what is written: not part of the config key.
_RUNTIME_OPTIONS = frozenset({"workers", "batch_size", "device", "progress"})


# How many times one slide may take a local worker process down before it is marked failed.
MAX_WORKER_DEATHS = 2


_CONTEXTS: dict[str, Any] = {}  # per worker process: task setup results (e.g. a loaded model)

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


def worker_name() -> str:
    """host:pid of this process, as the table's ``worker`` column shows it."""
    return f"{socket.gethostname()}:{os.getpid()}"


"""The per-slide unit of work of a cohort run (in a worker process: the local pool or a Ray task): take
the slide's folder lock, run the task, record the attempt in the ledger; and what a rerun settles
from the ledger without a worker."""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from slidekit.base.errors import LockedError, SlidekitError
from slidekit.base.io import config_digest, file_identity, write_text_atomic
from slidekit.base.locks import LOCK_NAME, OutputLock, describe, read_lock
from slidekit.base.outputs import MARKER
from slidekit.base.resources import peak_rss_mb, rss_mb
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide
from slidekit.cohort.tasks import TASKS, CohortTask
from slidekit.regions.job import SUMMARY, verify_folder

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
    except LockedError as e:
        try:
            rec = read_lock(folder / LOCK_NAME) or {}
        except LockedError:  # the lock path is a directory: this slide fails, the run goes on
            return {**row, "status": "failed", "error": f"{folder / LOCK_NAME}: {str(e).splitlines()[0]}"}
        return {**row, "status": "skipped", "note": f"being processed by {describe(rec)}"}
    try:
        # Decided again under the lock: another runner may have finished the slide meanwhile.
        prev = ledger.state(only=slide.id).get(slide.id, {})
        settled = settled_row(slide, prev, key, folder, retry_failed, task.required)
        if settled is not None:
            return {**settled, "worker": worker}
        why = redo_reason(slide, prev, key, folder, task.required)
        if why:
            row["note"] = why
            if why.startswith(_REPLACED):
                _release_to_new_scan(folder, slide)
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
                            peak_rss_mb=round(peak_rss_mb(), 1), outputs=output_listing(folder),
                            input=slide_identity(slide))
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


def settled_row(slide: CohortSlide, prev: dict, key: str, folder: Path, retry_failed: bool,
                required: Sequence[str] = ()) -> dict | None:
    """The row of a slide the ledger already answers (done, or failed and not to be retried, with
    this configuration); None when it is to be processed. ``required``: the outputs a done slide
    must have in its folder (the task's ``required``)."""
    if prev.get("config") != key:
        return None
    row = {"id": slide.id, "slide": str(slide.slide), "attempts": prev.get("attempts", 0),
           "worker": prev.get("worker")}
    if prev.get("status") == "done" and redo_reason(slide, prev, key, folder, required) is None:
        return {**row, **prev["figures"], "status": "skipped", "error": "", "note": "done earlier"}
    if prev.get("status") == "failed" and not retry_failed:
        return {**row, "status": "failed", "error": prev.get("error", ""),
                "note": "failed earlier (rerun with --retry-failed)"}
    return None


def output_listing(folder: Path) -> dict[str, int]:
    """The files slidekit wrote in a slide's folder (relative path -> size): everything under the
    names its ``.slidekit.json`` marker lists, and the marker (a folder without a marker: every
    file but the lock). What a rerun compares to know that the outputs are still the ones the run
    wrote; names and sizes catch deleted, emptied and truncated files without rereading chunks."""
    try:
        names = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        names = None
    if isinstance(names, list):
        roots = [folder / MARKER] + [folder / str(n) for n in names]
    else:
        roots = [p for p in folder.iterdir() if not p.name.startswith(LOCK_NAME)] if folder.is_dir() else []
    listing = {}
    for root in roots:
        for p in ([root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []):
            if p.is_file():
                listing[p.relative_to(folder).as_posix()] = p.stat().st_size
    return listing


def slide_identity(slide: CohortSlide) -> str | None:
    """The slide file's size and mtime (``file_identity``), or None when it cannot be read."""
    try:
        return file_identity(slide.slide)
    except OSError:
        return None


def redo_reason(slide: CohortSlide, prev: dict, key: str, folder: Path, required: Sequence[str] = ()) -> str | None:
    """Why a slide the ledger calls done with this configuration must be done again (one line for
    the table's note), or None when its outputs and its slide file are the ones that run saw and
    every ``required`` output is there (a slide done by a version that did not write one yet, e.g.
    an embed before the feature store, gets it now)."""
    if prev.get("status") != "done" or prev.get("config") != key:
        return None
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        return f"redone: {missing[0]} missing (done earlier without it, or deleted since)"
    if not isinstance(prev.get("figures"), dict) or not isinstance(prev.get("outputs"), dict) \
            or not prev["outputs"]:
        return "redone: its done record lists no outputs (written by hand or by an older version)"
    if prev.get("input") != slide_identity(slide):
        return _REPLACED + " since it was done (size or modification time)"
    now = output_listing(folder)
    if now != prev["outputs"]:
        gone = sorted(set(prev["outputs"]) - set(now))
        changed = sorted(k for k in prev["outputs"] if k in now and now[k] != prev["outputs"][k])
        added = sorted(set(now) - set(prev["outputs"]))
        what = (f"{gone[0]} missing" if gone else f"{changed[0]} changed size" if changed
                else f"{added[0]} appeared")
        return f"redone: its outputs are not the ones that run wrote ({what})"
    if (folder / SUMMARY).exists():  # a job of the shared runner: every output it recorded verifies
        problem = verify_folder(folder)
        if problem:
            return f"redone: its outputs are not the ones that run wrote ({problem})"
    return None


_REPLACED = "redone: the slide file changed"


def _release_to_new_scan(folder: Path, slide: CohortSlide) -> None:
    """The ledger says this cohort wrote ``folder`` for the file now replaced at the same path: let
    the new scan's job replace those outputs (the marker keeps listing them as slidekit's, without
    the old fingerprint that would otherwise refuse the new file as another slide)."""
    marker = folder / MARKER
    try:
        state = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if isinstance(state, dict) and Path(str(state.get("slide", ""))).resolve() == Path(slide.slide).resolve():
        state["slide_id"] = None
        write_text_atomic(marker, json.dumps(state, indent=1))


def worker_name() -> str:
    """host:pid of this process, as the table's ``worker`` column shows it."""
    return f"{socket.gethostname()}:{os.getpid()}"


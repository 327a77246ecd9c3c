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
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from slidekit.base.errors import ConfigError
from slidekit.cohort.engines import CohortInterrupted, CohortRun, CohortWork, StopSignal, run_local, run_ray
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide, read_slides, shard as take_shard
from slidekit.cohort.process import config_key, settled_row
from slidekit.cohort.table import CohortTable, finish_table
from slidekit.cohort.tasks import TASKS

ENGINES = ("local", "ray")
TABLE_EVERY_S = 2.0  # a task's own table (qc.csv) is rewritten at most this often while slides finish


# -- the per-slide unit of work (runs in a worker process: local pool or Ray) ----------------------


# -- the driver ---------------------------------------------------------------------------------

def run_cohort(task: str, slides: str | os.PathLike | Iterable[str | os.PathLike] | Sequence[CohortSlide],
               out: str | os.PathLike, *, run: CohortRun | None = None, **options: Any) -> CohortTable:
    """Run ``task`` (heatmap, cells, embed, tissue, tile, features) over ``slides`` into ``out``.

    ``run``: how (:class:`CohortRun`: engine, jobs, gpus, shard, ray_address, retry_failed,
    progress, debug); its fields may also be given by name among ``options``.

    ``slides``: paths, folders, globs or manifest CSVs (see ``slidekit.cohort.manifest``), or CohortSlides.
    ``engine``: "local" (``jobs`` worker processes, or one per GPU in ``gpus``) or "ray"
    (``ray_address``: "auto", "HOST:PORT", or None to start a local Ray runtime). ``shard``: "i/N".
    ``options``: the task's own keyword arguments (e.g. ``model=``, ``mpp=`` for heatmap).
    Returns this run's rows (the slides of this shard); ``OUT/cohort.csv`` covers the whole manifest.

    SIGINT (Ctrl-C) or SIGTERM while it runs: no new slide starts, running slides stop at their next
    safe point and are recorded ``interrupted`` (resumed by a rerun), ``cohort.csv`` is written, and
    ``CohortInterrupted`` (a KeyboardInterrupt carrying ``.table``) is raised; a second signal raises
    KeyboardInterrupt at once.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown cohort task {task!r}; choose one of {', '.join(TASKS)}")
    run_fields = {f.name for f in fields(CohortRun)}
    run = replace(run or CohortRun(), **{k: options.pop(k) for k in list(options) if k in run_fields})
    engine, jobs, gpus, shard, ray_address = run.engine, run.jobs, run.gpus, run.shard, run.ray_address
    retry_failed = run.retry_failed
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if int(jobs) < 1:
        raise ConfigError(f"jobs must be at least 1 (got {jobs})")
    if ray_address is not None and engine != "ray":
        raise ConfigError("--ray-address is for --engine ray; the local engine would ignore it")
    gpu_ids = _parse_gpus(gpus)
    if gpu_ids and engine == "local":
        _check_local_gpus(gpu_ids)
    out = Path(out)
    everyone: list[CohortSlide] = (list(slides) if _are_cohort_slides(slides)  # type: ignore[arg-type]
                                   else read_slides(slides, kind=TASKS[task].inputs,  # type: ignore[arg-type]
                                                 skip_missing=run.skip_missing))
    mine = take_shard(everyone, shard)
    key = config_key(task, TASKS[task].effective_options(options))
    ledger = Ledger(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state = ledger.state()
    todo, rows = [], {}
    for s in mine:  # settle what the ledger already answers, without a worker
        settled = settled_row(s, state.get(s.id, {}), key, out / s.id, retry_failed, TASKS[task].required)
        if settled is None:
            todo.append(s)
        else:
            rows[s.id] = settled
    engine_run = run_ray if engine == "ray" else run_local
    stop = StopSignal()
    with stop.installed():  # SIGINT/SIGTERM: no new slide, running ones interrupted; a second one ends at once
        rows_in = engine_run(CohortWork(task, options, str(out), key), todo, run, gpus=gpu_ids,
                             settled=list(rows.values()), stop=stop)
        extra = TASKS[task].table  # a task's own cohort table (qc.csv), rewritten as slides finish
        last = 0.0

        def refresh(force: bool = False) -> None:
            nonlocal last  # at most every TABLE_EVERY_S while slides finish, and always at the start and end
            if extra is not None and (force or time.time() - last >= TABLE_EVERY_S):
                extra(out, everyone, key)
                last = time.time()

        try:
            refresh(force=True)
            for row in rows_in:
                rows[row["id"]] = row
                refresh()
        finally:
            rows_in.close()
            refresh(force=True)
        ordered = [rows[s.id] for s in mine if s.id in rows]
        table = finish_table(out, everyone, ordered, key, wall=time.time() - t0, started=t0)
    if stop.is_set():  # the table is written; the caller (a script, the CLI: exit 130) is interrupted
        raise CohortInterrupted(table, stop.signame)
    return table


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


def _check_local_gpus(ids: list[int]) -> None:
    """The listed GPUs exist here (a Ray cluster's GPUs are the cluster's to place)."""
    count = cuda_device_count()
    if count == 0:  # the workers would run on the CPU while the ledger records a GPU
        raise ConfigError(f"--gpus {','.join(map(str, ids))}: no CUDA GPU is available here; leave out --gpus "
                          "to run on the CPU (with --jobs N for N worker processes)")
    if max(ids) >= count:
        raise ConfigError(f"--gpus {','.join(map(str, ids))}: this machine (or job) sees only {count} GPU(s)")


def cuda_device_count() -> int:
    """How many CUDA GPUs this process sees (torch is loaded only when ``--gpus`` is given)."""
    import torch  # heavy: a cohort run without --gpus never loads it in the driver

    return torch.cuda.device_count() if torch.cuda.is_available() else 0

"""Training run folders: what a rerun of ``slidekit train`` into an existing ``--out`` does.

A run folder records its trainer and resolved config in ``config.json``. A rerun

* with the same trainer and options resumes from ``state.pt``, or returns the checkpoint when
  ``done.json`` says the run finished;
* with a larger length (``epochs``; ``mixed-em``: ``rounds``) continues the run from its last
  state to the new length, with a ``TrainingWarning``. Every learning-rate schedule in slidekit
  is a function of (position, configured length), so the remaining epochs follow the schedule a
  fresh run of the new length has from the epoch reached (a cosine schedule rises again: a warm
  restart). The warning says so; ``restart=True`` gives a fresh run of the new length instead;
* with fewer epochs than already trained, another trainer, or any other option changed
  (``num_workers`` aside) is refused with one line (``TrainingError``) naming the differences.
  ``restart=True`` (``slidekit train --restart``) deletes the old run's files and trains afresh.

A folder holds a run only once it holds the run's progress (``state.pt``, a checkpoint, metrics,
``done.json`` or one of the trainer's ``outputs``): a run that failed before its first epoch (a
missing feature file, a bad label) leaves ``config.json`` behind but owns nothing, so the corrected
rerun, whatever its options, starts afresh there.

A trainer that reads inputs which may change in place (a slide table, feature files) records their
identity with ``check_inputs``: a rerun over changed inputs is refused with one line naming them,
as for changed options (``restart=True`` starts over).

Only files slidekit's trainers write are ever deleted (``RUN_FILES`` and a trainer's
``outputs``, which may be glob patterns such as ``fold_*.pt``); anything else in the folder is left
alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

from slidekit.base.errors import TrainingError, TrainingWarning
from slidekit.base.io import write_text_atomic
from slidekit.base.verify import check_output, output_record

RUN_FILES = ("config.json", "checkpoint.pt", "state.pt", "metrics.csv", "metrics.json", "done.json", "inputs.json")
RECORD_FILES = ("config.json", "inputs.json")  # what a run writes before its first epoch: no progress
FREE_OPTIONS = frozenset({"num_workers"})  # options that may change between a run and its rerun
RESTART_HINT = "rerun with --restart (API: restart=True) to discard it and train afresh, or use another --out"


def config_record(trainer: Any) -> dict:
    """``{"trainer": name, **config}`` as it reads back from ``config.json`` (JSON types)."""
    return json.loads(json.dumps({"trainer": trainer.name, **dataclasses.asdict(trainer.config)}, default=str))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"unreadable run record ({type(e).__name__}); {RESTART_HINT}", path) from None


def _differences(old: dict, new: dict, skip: Iterable[str], defaults: dict | None = None) -> list[str]:
    skip = set(skip)
    defaults = defaults or {}
    # an option added to slidekit after the run was recorded, at its default, changes nothing
    skip |= {k for k in new if k not in old and k in defaults and new[k] == defaults[k]}
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in skip and old.get(k) != new.get(k)]
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys]


def _defaults(trainer: Any) -> dict:
    """The config's field defaults as they read back from JSON."""
    out = {}
    for f in dataclasses.fields(trainer.config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def begin_run(trainer: Any, out_dir: str | os.PathLike, length: int) -> str:
    """Check ``out_dir`` against ``trainer`` before training and record its config.

    ``length`` is the number of epochs (loop iterations) asked for. Returns ``"finished"``
    (nothing to do), ``"resume"`` (``state.pt`` is there to continue from) or ``"fresh"``.
    Raises TrainingError for a folder holding a different run. Idempotent.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = config_record(trainer)
    length_key = getattr(trainer, "length_option", "epochs")
    config_path, done_path, state_path = out / "config.json", out / "done.json", out / "state.pt"
    recorded = _read_json(config_path) if config_path.exists() else None
    if recorded is not None and not has_progress(out, getattr(trainer, "outputs", ())):
        recorded = None  # a run that failed before its first epoch: its config.json claims nothing
    if recorded is None:
        if has_progress(out, getattr(trainer, "outputs", ())):
            raise TrainingError(f"holds training files but no config.json to check them against; {RESTART_HINT}", out)
    else:
        if not isinstance(recorded, dict):
            raise TrainingError(f"config.json is not a run record; {RESTART_HINT}", out)
        if recorded.get("trainer") != trainer.name:
            raise TrainingError(f"holds a {recorded.get('trainer')!r} run, not {trainer.name!r}; {RESTART_HINT}", out)
        skip = FREE_OPTIONS | set(getattr(trainer, "rerun_free_options", ())) | {length_key}
        diffs = _differences(recorded, record, skip, _defaults(trainer))
        if diffs:
            raise TrainingError(f"holds a {trainer.name!r} run with other options ({'; '.join(diffs[:4])}"
                                f"{'; ...' if len(diffs) > 4 else ''}); {RESTART_HINT}", out)
    done = _read_json(done_path) if done_path.exists() else None
    if done is not None and (out / str(done.get("checkpoint", "checkpoint.pt") if isinstance(done, dict)
                                       else "checkpoint.pt")).exists():
        trained = int(done.get("epochs", -1)) if isinstance(done, dict) else -1
        if trained == length:
            return "finished"
        if trained > length:
            raise TrainingError(f"holds a finished run of {trained} epochs; cannot shorten it to {length}; "
                                f"{RESTART_HINT}", out)
        if not state_path.exists():
            raise TrainingError(f"holds a finished run of {trained} epochs without state.pt, so it cannot be "
                                f"continued to {length}; {RESTART_HINT}", out)
        warnings.warn(TrainingWarning(
            f"{out}: continuing a finished {trained}-epoch {trainer.name} run to {length} epochs; the "
            f"remaining epochs follow the learning-rate schedule of a {length}-epoch run from epoch {trained} "
            f"(use --restart for a fresh {length}-epoch run)"), stacklevel=2)
        done_path.unlink()  # the folder no longer holds a finished run until the new length is reached
    elif recorded is not None and recorded.get(length_key) != record.get(length_key) and state_path.exists():
        warnings.warn(TrainingWarning(
            f"{out}: resuming with {length_key} changed from {recorded.get(length_key)} to "
            f"{record.get(length_key)}; the remaining epochs follow the new length's learning-rate schedule"),
            stacklevel=2)
    write_text_atomic(config_path, json.dumps(record, indent=2))
    return "resume" if state_path.exists() else "fresh"


def _run_paths(out: Path, names: Iterable[str]) -> list[Path]:
    """The paths of ``names`` in ``out``; a name with ``*``/``?``/``[`` is a glob pattern."""
    paths: list[Path] = []
    for name in dict.fromkeys(names):
        paths += sorted(out.glob(name)) if any(c in name for c in "*?[") else [out / name]
    return paths


def has_progress(out_dir: str | os.PathLike, outputs: Iterable[str] = ()) -> bool:
    """Whether ``out_dir`` holds a run's progress: any run file but the records written before the
    first epoch (``RECORD_FILES``), or any of the trainer's ``outputs``."""
    names = [n for n in RUN_FILES if n not in RECORD_FILES] + list(outputs)
    return any(p.exists() or p.is_symlink() for p in _run_paths(Path(out_dir), names))


def check_inputs(trainer: Any, out_dir: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> None:
    """Record, or compare with the record, the identity of a run's inputs (``{what: path}``, e.g.
    ``{"slide table": ..., "feature file s1.h5": ...}``) in ``out_dir/inputs.json``: size, stat stamp
    and content digest (``slidekit.base.verify.output_record``; an untouched file costs one ``stat``).
    A run with progress whose inputs differ (another set, or a file changed in place: an edited
    labels CSV, a replaced feature file) is refused with one line naming them (``TrainingError``,
    as for changed options); ``restart=True`` starts over. Without progress the record is rewritten."""
    out = Path(out_dir)
    path = out / "inputs.json"
    names = {k: str(Path(v).resolve()) for k, v in inputs.items()}
    old = _read_json(path) if path.exists() else None
    if isinstance(old, dict) and has_progress(out, getattr(trainer, "outputs", ())):
        changed = []
        for what, p in names.items():
            rec = old.get(what)
            if not isinstance(rec, dict) or rec.get("path") != p:
                changed.append(f"{what} is new" if rec is None else f"{what} is now {p}")
            elif check_output(p, rec.get("record") or {}) is not None:
                changed.append(f"{what} ({Path(p).name}) changed")
        changed += [f"{what} is gone" for what in old if what not in names]
        if changed:
            raise TrainingError(f"holds a {trainer.name!r} run on other inputs ({'; '.join(changed[:4])}"
                                f"{f'; and {len(changed) - 4} more' if len(changed) > 4 else ''}); {RESTART_HINT}",
                                out)
        return
    record = {what: {"path": p, "record": output_record(p)} for what, p in names.items()}
    write_text_atomic(path, json.dumps(record, indent=1))


def clear_run(out_dir: str | os.PathLike, extra: Iterable[str] = ()) -> list[Path]:
    """Delete the files a training run wrote into ``out_dir`` (``RUN_FILES`` + ``extra`` names or glob
    patterns); return what was removed. Nothing else in the folder is touched."""
    out = Path(out_dir)
    removed = []
    for p in _run_paths(out, [*RUN_FILES, *extra]):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed


def recorded_trainer(out_dir: str | os.PathLike) -> str | None:
    """The trainer name recorded in ``out_dir/config.json`` (None when there is none)."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("trainer") if isinstance(rec, dict) else None

"""What every trainer shares: the epoch loop, resumable state, metrics, seeding and ``train(name, ...)``.

The plug-in protocol (``Trainer``, ``@register``, ``get``) lives in ``trainers.registry`` and is
re-exported here, so a plug-in writes ``from trainers.base import Trainer, register``.

Every trainer writes into its output directory:
``config.json`` (the resolved config), ``checkpoint.pt`` (slidekit checkpoint, refreshed every
epoch), ``state.pt`` (optimiser/epoch/RNG state for resuming), ``metrics.csv`` and
``metrics.json`` (one row per epoch, with where its time went: ``read``/``transfer``/``model``/
``write``/``wall`` seconds and ``samples_per_s``, see ``trainers.batches``) and, last,
``done.json``; a rerun resumes from
``state.pt``, returns the finished checkpoint, continues to a larger ``epochs`` or refuses a
different config (``trainers/runs.py``).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from slidekit.base import distributed as dist
from slidekit.base.errors import CheckpointError, ConfigError, TrainingError
from slidekit.base.io import atomic_path, write_text_atomic
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.spec import ModelSpec  # noqa: F401 (re-exported)
from slidekit.models.weights import init_from, reestimate_batchnorm
from slidekit.regions.options import OptionGroups
from trainers.batches import TIMING_KEYS, RunTiming, check_same_stain
from trainers.config import load_config
from trainers.registry import LABEL_KINDS, Trainer, available, get, register  # noqa: F401 (the plug-in API)
from trainers.runs import RESTART_HINT, begin_run, clear_run, recorded_trainer

# -- typed configs -------------------------------------------------------------------------------


# -- reproducibility and devices -----------------------------------------------------------------

def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_rank(seed: int, epoch: int, rank: int) -> None:
    """Seed this rank's Python/NumPy/torch streams for ``epoch`` (several ranks: each rank its own
    augmentation draws, the same ones again when the epoch is rerun after a resume)."""
    s = int(np.random.default_rng([seed, epoch, rank, 7919]).integers(2**62))
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def init_encoder(model: nn.Module, init: str | None) -> None:
    """Initialise ``model.encoder`` from ``init``, when one is given: a slidekit checkpoint (e.g.
    SimCLR), a torchvision ResNet state dict, or a timm weights file for a ``timm:NAME`` backbone."""
    if init:
        init_from(model, init)


INIT_BN_SAMPLES = 512  # training samples the BatchNorm statistics are re-estimated on (init_bn=reestimate)


def reestimate_init_bn(model: nn.Module, config: Any, batches: Callable[[], Iterable[torch.Tensor]]) -> int:
    """``init_bn=reestimate``: replace the BatchNorm statistics ``init`` copied from the source
    with those of ``batches()`` (prepared training inputs; ``slidekit.models.weights.reestimate_batchnorm``).

    Parameters
    ----------
    model : nn.Module
        The network, its encoder already initialised from ``config.init``.
    config : TrainerConfig
        Its ``init`` and ``init_bn`` decide; ``keep`` (the default) or no ``init`` does nothing.
    batches : callable
        Gives the input batches (called only when re-estimating).

    Returns
    -------
    int
        The number of samples re-estimated on (0: statistics kept).
    """
    if not getattr(config, "init", None) or getattr(config, "init_bn", "keep") != "reestimate":
        return 0
    return reestimate_batchnorm(model, batches())


# -- logging, state and the epoch loop -----------------------------------------------------------

class MetricsLog:
    """Per-epoch metrics, kept as ``metrics.csv`` and ``metrics.json`` (rewritten atomically)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.json_path = self.out_dir / "metrics.json"
        self.rows: list[dict[str, Any]] = []
        if self.json_path.exists():
            self.rows = json.loads(self.json_path.read_text())

    def log(self, **metrics: Any) -> None:
        """Append one row and rewrite both files."""
        row = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in metrics.items()}
        self.rows.append(row)
        write_text_atomic(self.json_path, json.dumps(self.rows, indent=1))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.out_dir / "metrics.csv", buf.getvalue())

    def update_last(self, **metrics: Any) -> None:
        """Add ``metrics`` to the last row and rewrite both files."""
        row = self.rows.pop()
        self.log(**{**row, **metrics})

    def truncate(self, epochs_done: int) -> None:
        """Forget rows of epochs that were not completed (resume after an interruption)."""
        self.rows = [r for r in self.rows if r.get("epoch", -1) < epochs_done]


@dataclass
class TrainState:
    """What a rerun needs to continue: epoch count, weights, optimiser, scheduler, RNG, extras.

    Saved and loaded as plain data only (tensors, numbers, strings, lists, dicts):
    ``torch.load(weights_only=True)`` never runs code from a planted or tampered ``state.pt``.
    """

    epoch: int
    model: dict
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None
    extra: dict | None = None

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            torch.save(dataclasses.asdict(self), tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainState | None":
        path = Path(path)
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for anything but plain data, zip errors, ...
            why = ("it holds objects other than tensors and plain data, so it was not loaded"
                   if "weights_only" in str(e) or "Unsupported global" in str(e) else
                   f"{type(e).__name__}: {' '.join(str(e).split())[:150]}")
            raise CheckpointError(f"cannot resume: training state is unreadable ({why}); "
                                  "delete it or rerun with --restart", path) from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("epoch"), int) or not set(data) <= names:
            raise CheckpointError("cannot resume: not a slidekit training state; delete it or rerun with "
                                  "--restart", path)
        return cls(**data)


def _rng_state() -> dict:
    """RNG states as plain data (NumPy's key array as a tensor) so ``weights_only`` loading works."""
    state = np.random.get_state()  # legacy=True: always the tuple form
    assert isinstance(state, tuple)
    name, key, pos, has_gauss, gauss = state
    return {"python": random.getstate(),
            "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def _reevaluate_schedule(scheduler: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Set the learning rate to the schedule's value at the position reached.

    slidekit's schedules are functions of (position, configured length). The optimiser state
    holds the rate of the run that was saved; a run continued to more epochs must train its next
    epoch at the new length's rate (for an unchanged config both are the same).
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if optimizer is None or lambdas is None or not all(callable(f) for f in lambdas):
        return
    for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _divergence(model: nn.Module, metrics: dict[str, Any]) -> str | None:
    """Why this epoch's result must not be kept (a NaN/inf loss or weight), or None."""
    for k, v in metrics.items():
        if (k == "loss" or k.startswith("loss_")) and isinstance(v, (int, float)) and not math.isfinite(v):
            return f"{k} is {v}"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"weight {name} is not finite"
    return None


@dataclass(frozen=True)
class ResumeParts:
    """What ``state.pt`` saves after each epoch and a resumed run restores, besides the model.

    Parameters
    ----------
    optimizer
        The optimiser (None: none is saved).
    scheduler
        The learning-rate schedule (None: none is saved).
    get_extra
        Returns the trainer's own state to save (a dict; called on every rank).
    set_extra
        Restores what ``get_extra`` returned.
    """

    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    get_extra: Callable[[], dict] | None = None
    set_extra: Callable[[dict], None] | None = None


@dataclass(frozen=True)
class EpochLoop:
    """How the epoch loop runs.

    Parameters
    ----------
    epochs
        Epochs the run ends at (None: the trainer config's ``epochs``).
    progress
        Show a progress bar and print where the time went.
    inputs
        The trainer's ``trainers.batches.BatchInputs`` when it times its steps (None: no stage split).
    """

    epochs: int | None = None
    progress: bool = True
    inputs: Any = None


@dataclass(frozen=True)
class EpochOptions(OptionGroups):
    """Every option of ``run_epochs``, in groups; flat field names work too (``optimizer=opt``,
    ``epochs=5``; ``OptionGroups``)."""

    resume: ResumeParts = ResumeParts()
    loop: EpochLoop = EpochLoop()


def run_epochs(trainer: Trainer, out_dir: str | os.PathLike, model: nn.Module, spec: ModelSpec,
               train_epoch: Callable[[int], dict[str, Any]], *, options: EpochOptions | None = None,
               **flat: Any) -> Path:
    """The shared loop: resume, run ``train_epoch(epoch) -> metrics`` per epoch, log, checkpoint.

    After each epoch the slidekit checkpoint and the training state are saved atomically, so an
    interrupted run loses at most the epoch in progress. ``done.json`` marks a finished run.
    With several ranks (``slidekit.base.distributed``) rank 0 decides the rerun rule and alone writes
    files and shows progress; every rank loads the same ``state.pt``; float metrics are averaged
    over ranks; each rank's random streams are reseeded from (seed, epoch, rank) every epoch.
    What a rerun into the same folder does (resume, continue to more epochs, refuse a different
    config) is ``trainers.runs.begin_run``'s rule. An epoch whose loss or weights are NaN/inf
    stops the run with a TrainingError; the previous epoch's checkpoint and state are kept.

    Each epoch's row also says where its time went: ``write`` (checkpoint + state) and ``wall``
    seconds, and, when ``inputs`` (the trainer's ``trainers.batches.BatchInputs``) timed the steps,
    ``read``/``transfer``/``model`` seconds and ``samples_per_s``; the split of the whole run is
    printed at the end (``progress``). A resume whose stain normalisation differs from the one the
    run was trained with (same options, another reference file content) is refused.

    ``options`` is an :class:`EpochOptions` (resume: ``optimizer``, ``scheduler``, ``get_extra``,
    ``set_extra``; loop: ``epochs``, ``progress``, ``inputs``); flat keywords set single fields.
    """
    o: EpochOptions = EpochOptions.of(options, **flat)
    optimizer, scheduler = o.resume.optimizer, o.resume.scheduler
    get_extra, set_extra = o.resume.get_extra, o.resume.set_extra
    epochs, progress, inputs = o.loop.epochs, o.loop.progress, o.loop.inputs
    out = Path(out_dir)
    ckpt_path, state_path, done_path = out / "checkpoint.pt", out / "state.pt", out / "done.json"
    epochs = trainer.config.epochs if epochs is None else epochs
    if dist.on_main(lambda: begin_run(trainer, out, epochs)) == "finished":
        return ckpt_path
    spec.trainer = trainer.name
    spec.trainer_config = dataclasses.asdict(trainer.config)
    main = dist.is_main()
    log = MetricsLog(out) if main else None
    start = 0
    state = TrainState.load(state_path)
    if state is not None:
        if state.epoch > epochs:
            raise TrainingError(f"holds {state.epoch} trained epochs; cannot shorten the run to {epochs}; "
                                f"{RESTART_HINT}", out)
        try:
            model.load_state_dict(state.model)
            if optimizer is not None and state.optimizer:
                optimizer.load_state_dict(state.optimizer)
            if scheduler is not None and state.scheduler:
                scheduler.load_state_dict(state.scheduler)
                _reevaluate_schedule(scheduler, optimizer)
            if state.rng:
                _set_rng_state(state.rng)
            if set_extra is not None and state.extra:
                set_extra(state.extra)
        except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"cannot resume: training state does not fit this run "
                                  f"({' '.join(str(e).split())[:150]}); {RESTART_HINT}", state_path) from None
        start = state.epoch

        check_same_stain(ckpt_path, spec)
    if log is not None:
        log.truncate(start)
    from tqdm.auto import tqdm

    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=trainer.name, unit="epoch",
               disable=not (progress and main))

    total = RunTiming()  # the whole run's split, printed at the end
    for epoch in bar:
        model.train()
        if dist.is_distributed():
            seed_rank(getattr(trainer.config, "seed", 0), epoch, dist.rank())
        t0 = time.perf_counter()
        timer = inputs.begin_epoch() if inputs is not None else None
        with inputs.sampling_gpu() if inputs is not None else contextlib.nullcontext():
            metrics = train_epoch(epoch)
        if timer is not None:
            wall = time.perf_counter() - t0
            metrics.update(inputs.epoch_metrics(wall))
            total.add_epoch(timer, wall)
        metrics = dist.all_reduce_mean(metrics)
        if "samples_per_s" in metrics:  # each rank counted its own samples: the job's rate is their sum
            metrics["samples_per_s"] *= dist.world_size()
        why = _divergence(model, metrics)
        if why is not None:
            kept = f"epoch {epoch}'s checkpoint is kept" if epoch else "no checkpoint was written"
            raise TrainingError(f"training diverged in epoch {epoch + 1}: {why} (lr {trainer.config.lr} too "
                                f"high?); {kept}", out)
        extra = get_extra() if get_extra else None  # on every rank: it may hold a collective
        if log is not None:
            log.log(epoch=epoch, **metrics)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                             if isinstance(v, float) and k not in TIMING_KEYS})
            t_write = time.perf_counter()
            save_checkpoint(ckpt_path, model, spec, extra={"epoch": epoch + 1})
            TrainState(epoch=epoch + 1, model=model.state_dict(),
                       optimizer=optimizer.state_dict() if optimizer is not None else None,
                       scheduler=scheduler.state_dict() if scheduler is not None else None,
                       rng=_rng_state(), extra=extra).save(state_path)
            now = time.perf_counter()
            total.timer.add("write", now - t_write)
            written = now - t_write + (timer.seconds["write"] if timer is not None else 0.0)  # + the epoch's own
            log.update_last(write=round(written, 4), wall=round(now - t0, 4))
        dist.barrier()  # no rank starts the next epoch before the state it would resume from exists
    line = total.line(dist.world_size())
    if main and progress and line:
        print(f"time: {line}", file=sys.stderr)  # where the time went: reading or the model?
    if main:
        write_text_atomic(done_path, json.dumps({"trainer": trainer.name, "epochs": epochs,
                                                 "checkpoint": ckpt_path.name}, indent=2))
    dist.barrier()
    return ckpt_path


def restart_run(out_dir: str | os.PathLike, trainer: type[Trainer] | None = None) -> list[Path]:
    """Delete the training outputs in ``out_dir`` (those of ``trainer`` and of the run recorded
    there) so the next fit starts from scratch; other files are left alone."""
    extra: list[str] = list(getattr(trainer, "outputs", ()))
    recorded = recorded_trainer(out_dir)
    if recorded is not None:
        try:
            extra += list(getattr(get(recorded), "outputs", ()))
        except ConfigError:
            pass  # a plug-in no longer installed: its own extra files stay
    return clear_run(out_dir, extra)


def train(name: str, config: str | os.PathLike | None, out_dir: str | os.PathLike,
          overrides: list[str] | dict | None = None, device: str = "auto", progress: bool = True,
          restart: bool = False) -> Path:
    """Look up trainer ``name``, build its config from file + overrides, and fit into ``out_dir``.

    A rerun into the same ``out_dir`` resumes, returns the finished checkpoint or continues to
    more epochs; a different config is refused (``trainers.runs``). ``restart=True`` deletes the
    previous run's outputs first and trains from scratch.
    """
    cls = get(name)
    cfg = load_config(cls.Config, config, overrides)
    if restart and dist.env_ranks()[0] == 0:  # several ranks: rank 0 clears; the others wait for it in fit
        restart_run(out_dir, cls)
    return cls(cfg).fit(out_dir, device=device, progress=progress)

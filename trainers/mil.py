"""``mil``: attention-MIL slide models on feature stores, with patient-level cross-validation.

What the head predicts is the config's ``task`` (``slidekit.slidelevel.mil_tasks``): its targets,
head size, fold stratification, loss (over ``bags_per_step`` bags at a time), metrics, output
columns and checkpoint fields. This module never looks at what they mean; the description below is
the default task, ``classification``.

The slide table is a CSV ``slide,label[,patient][,features]``; ``features`` names the slide's
feature file (else ``features_dir/<slide stem>.h5``). Slides of one patient stay in one fold
(``StratifiedGroupKFold``). In each of ``folds`` folds the held-out fold is the test set; one
patient-grouped inner split of the rest is the validation set for early stopping (best
validation loss, ``patience`` epochs); an ``ensemble`` with ``ensemble_validation: rotate`` gives
each member its own inner split (trained on the others). Class weights balance the loss. Per fold and over
all out-of-fold predictions: AUC (one-vs-rest macro for more than two classes), balanced accuracy
and quadratic weighted kappa over ``classes`` in their order, with bootstrap 95% intervals.

Outputs: ``fold_K.pt`` per fold, ``checkpoint.pt`` (the fold with the lowest validation loss),
``oof.csv`` (each slide's out-of-fold probabilities), ``metrics.json``, ``done.json``. A rerun
skips finished folds. Training runs on one device, one bag per step: bags differ in length and
the networks are small, so DDP would mostly add communication (not used; say so if asked). Bags
are held in memory up to ``bag_cache_mb`` (default: a quarter of the free memory); the others are
read from their feature files each time they are used, so the cohort need not fit in memory (one
bag must: a bag larger than the free memory is refused before training).
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from slidekit.base.devices import resolve_device
from slidekit.base.errors import ConfigError, FeatureError, LabelError, TrainingError
from slidekit.base.io import write_text_atomic
from slidekit.models.mil import (
    ABMIL_POOLINGS,
    MIL_ARCHS,
    MILEnsemble,
    build_mil,
    load_mil_checkpoint,
    save_mil_checkpoint,
    shift_head_bias,
)
from slidekit.slidelevel.feature_store import FeatureInfo, compare_provenance, feature_info, read_features
from slidekit.slidelevel.mil_tasks import DEFAULT_TASK, Classification, MILTask, get_mil_task
from trainers.base import Trainer, register, seed_everything
from trainers.config import TrainerConfig, check_option
from trainers.runs import RESTART_HINT, begin_run, check_inputs, has_progress

# how an ensemble's members stop early: all on the fold's one validation split, or each on its own
# patient-grouped inner split of the fold's training patients (trained on the rest of them)
ENSEMBLE_VALIDATIONS = ("shared", "rotate")


@dataclass
class MILConfig(TrainerConfig):
    """mil: a slide table + feature files."""

    slides: str = ""  # CSV of slide,label[,patient][,features]; features default to features_dir/<slide stem>.h5
    cohort: str | None = None  # instead of slides: an `embed` cohort's --out (cohort.csv + <id>/features.h5)
    task: str = DEFAULT_TASK  # what the head predicts: classification or a registered task (docs/mil.md)
    features_dir: str | None = None  # folder of per-slide feature files (slidekit, TRIDENT, CLAM or STAMP HDF5)
    arch: str = "abmil"  # MIL model: abmil, clam, transmil, meanpool, maxpool or topk_mean
    classes: list[str] | None = None  # class order (kappa); default: sorted labels
    hidden: int = 128  # width of the attention / projection layers
    pooling: str = "attention"  # abmil/clam: what the head sees, attention or attention+mean (docs/mil.md)
    dropout: float = 0.1  # dropout on the projected instance features
    instance_k: int = 8  # clam: top/bottom-k attended instances of the clustering loss; topk_mean: k
    instance_weight: float = 0.3  # clam: weight of the instance loss
    folds: int = 5  # cross-validation folds, split by patient
    epochs: int = 40  # maximum epochs per fold
    patience: int = 8  # stop a fold after this many epochs without a better validation loss
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    class_weights: bool = True  # weight the loss by inverse class frequency
    bags_per_step: int = 1  # bags whose outputs one loss (and optimiser step) sees together
    bootstrap: int = 1000  # bootstrap resamples of the out-of-fold AUC/kappa confidence intervals (0: none)
    bag_cache_mb: int | None = None  # MB of bags held in memory, others read per use (default: 1/4 of free memory)
    baseline: bool = True  # survival/regression: also the mean-pooled CoxNet / ridge on the same folds (metrics.json)
    centre_outputs: bool = True  # survival (Cox): each fold's risk centred on its training fold (docs/outcomes.md)
    ensemble: int = 1  # networks trained per fold from different initialisations, their outputs averaged
    ensemble_validation: str = "shared"  # ensemble > 1: "shared" validation split, or "rotate" (each member its own)

    def validate(self) -> None:
        super().validate()
        check_option(not (self.slides and self.cohort), "cohort", self.cohort,
                     "given without 'slides' (the cohort's cohort.csv is the slide table)")
        check_option(self.arch in MIL_ARCHS, "arch", self.arch, f"one of {', '.join(MIL_ARCHS)}")
        task = get_mil_task(self.task)  # ConfigError naming the known tasks
        check_option(self.arch != "clam" or task.instance_label is not MILTask.instance_label, "arch", self.arch,
                     f"not clam for task {self.task!r} (its instance loss needs slide classes)")
        check_option(self.pooling in ABMIL_POOLINGS, "pooling", self.pooling, f"one of {', '.join(ABMIL_POOLINGS)}")
        check_option(self.pooling == "attention" or self.arch in ("abmil", "clam"), "pooling", self.pooling,
                     f"'attention' for arch {self.arch!r} (the other poolings are abmil's and clam's)")
        check_option(self.ensemble >= 1, "ensemble", self.ensemble, "an integer >= 1")
        check_option(self.ensemble_validation in ENSEMBLE_VALIDATIONS, "ensemble_validation", self.ensemble_validation,
                     f"one of {', '.join(ENSEMBLE_VALIDATIONS)}")
        check_option(self.ensemble_validation != "rotate" or self.ensemble >= 2, "ensemble_validation",
                     self.ensemble_validation, "'shared' with ensemble 1 (rotating needs at least 2 members)")
        check_option(self.folds >= 2, "folds", self.folds, "an integer >= 2")
        check_option(self.patience >= 1, "patience", self.patience, "an integer >= 1")
        check_option(self.hidden >= 1, "hidden", self.hidden, "an integer >= 1")
        check_option(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        check_option(self.bags_per_step >= 1, "bags_per_step", self.bags_per_step, "an integer >= 1")
        check_option(self.bootstrap >= 0, "bootstrap", self.bootstrap, "an integer >= 0")
        check_option(self.bag_cache_mb is None or self.bag_cache_mb >= 0, "bag_cache_mb", self.bag_cache_mb,
                     "an integer >= 0, or null for a quarter of the free memory")


@dataclass
class Slide:
    slide: str
    label: str
    patient: str
    features: Path
    values: dict[str, str] = field(default_factory=dict)  # the task's target columns as written


def _names(cols) -> str:
    cols = [repr(c) for c in cols]
    return cols[0] if len(cols) == 1 else f"{', '.join(cols[:-1])} and {cols[-1]}"


def read_mil_table(path: str | os.PathLike, features_dir: str | None = None,
                   target_columns: tuple[str, ...] = ("label",)) -> list[Slide]:
    """Rows of a MIL slide table; LabelError naming the file and line for a bad one.
    ``target_columns``: the columns the task reads its targets from (classification: ``label``)."""
    path = Path(path)
    if not path.exists():
        raise LabelError("slide table not found", path)
    if not path.is_file():  # a folder, or a link to a device (/dev/zero would be read for ever)
        raise LabelError("slide table is not a regular file", path)
    try:
        return _read_mil_rows(path, features_dir, target_columns)
    except (UnicodeDecodeError, csv.Error) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise LabelError(f"is not a text CSV table ({why}; write it as CSV from a spreadsheet, "
                         "not as .xlsx or another binary file)", path) from None


def _read_mil_rows(path: Path, features_dir: str | None, target_columns: tuple[str, ...]) -> list[Slide]:
    out, seen = [], set()
    files: dict[Path, tuple[int, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        if any(c not in cols for c in ("slide", *target_columns)):
            raise LabelError(f"slide table needs columns {_names(('slide', *target_columns))}, has {cols}", path)
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row["slide"] or not all(row[c] for c in target_columns):
                raise LabelError(f"line {line}: empty slide or {' or '.join(target_columns)}", path)
            if row["slide"] in seen:
                raise LabelError(f"line {line}: slide {row['slide']!r} is listed twice", path)
            seen.add(row["slide"])
            if row.get("features"):
                feat = Path(row["features"])
                feat = feat if feat.is_absolute() else path.parent / feat
            elif features_dir:
                feat = Path(features_dir) / f"{Path(row['slide']).stem}.h5"
            else:
                raise LabelError(f"line {line}: no 'features' column value and no features_dir", path)
            if not feat.exists():
                raise LabelError(f"line {line}: feature file {feat} not found", path)
            other = files.setdefault(feat.resolve(), (line, row["slide"]))
            if other[0] != line:
                raise LabelError(f"line {line}: feature file {feat} is also slide {other[1]!r}'s (line {other[0]}): "
                                 "one bag under two slides could sit in a training and a test fold", path)
            out.append(Slide(row["slide"], row.get("label", ""), row.get("patient") or row["slide"], feat,
                             {c: row[c] for c in target_columns}))
    if not out:
        raise LabelError("slide table has no rows", path)
    return out


def cohort_table(cohort: str | os.PathLike, out: Path, target_columns: tuple[str, ...],
                 trainer: Trainer | None = None) -> Path:
    """The slide table of an ``embed`` cohort folder, written to ``out/cohort_slides.csv``: one row per
    slide whose embed row is done (``slide``: its id, the task's target columns and ``patient`` from
    the manifest's columns in ``cohort.csv``, ``features``: ``<id>/features.h5``); each other slide is
    left out with one warning line. The same table is not rewritten. ``trainer``: when ``out`` holds
    its run with progress, a table that would change (slides embedded or failed since) is refused
    before it is written (TrainingError, as ``check_inputs`` refuses changed inputs): the run's record
    of what it trained on stays."""
    import warnings

    from slidekit.base.errors import TrainingWarning
    from slidekit.slidelevel.feature_store import cohort_feature_files

    found, not_done = cohort_feature_files(cohort)
    for line in not_done:
        warnings.warn(TrainingWarning(f"{Path(cohort)}: left out of training: {line}"), stacklevel=3)
    cols = ["slide", *[t for t in target_columns if t != "slide"], "patient", "features"]
    if found and any(t not in found[0] for t in target_columns):
        raise LabelError(f"needs the manifest's columns {_names(target_columns)} (the embed manifest's extra "
                         f"columns flow into it), has {sorted(found[0])}", Path(cohort) / "cohort.csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows({**r, "slide": r["id"], "patient": r.get("patient") or r["id"]} for r in found)
    path, text = out / "cohort_slides.csv", buf.getvalue()
    old = path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else None  # \r\n kept
    if old == text:
        return path
    if old is not None and trainer is not None and has_progress(out, getattr(trainer, "outputs", ())):
        raise TrainingError(f"holds a {trainer.name!r} run on another slide table ({path.name}: the cohort "
                            f"{Path(cohort)} has other done slides now); {RESTART_HINT}", out)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)


def _free_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, capped by the cgroup's memory.max (None where neither is readable)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free or 1 << 62, max(int(cap) - used, 0))
    except (OSError, ValueError):
        pass
    return free


class Bags:
    """The cohort's bags as float32 tensors: the first ones held in memory up to ``cache_bytes``, the
    others read from their feature files at each use (one at a time), so training never needs the
    whole cohort in memory. A bag is one training step and cannot be split: a bag larger than the
    free memory is refused with one line before training starts."""

    def __init__(self, paths: list[Path], cache_bytes: int | None, device: torch.device) -> None:
        self.paths, self.device = list(paths), device
        self.info = [feature_info(p) for p in self.paths]
        empty = [i.path for i in self.info if i.rows == 0]
        if empty:
            raise FeatureError(f"the feature file holds no tiles (an empty bag){_and_more(len(empty))}", empty[0])
        free = _free_memory_bytes()
        if cache_bytes is None:
            cache_bytes = (free // 4) if free is not None else 1 << 30
        biggest = max(self.info, key=lambda i: i.nbytes)
        if free is not None and biggest.nbytes > free:
            raise ConfigError(f"{biggest.path}: its bag ({biggest.rows} tiles x {biggest.dim}, "
                              f"{biggest.nbytes / 2**20:.0f} MB) is larger than the free memory "
                              f"({free / 2**20:.0f} MB); MIL training holds one whole bag per step")
        self.resident: dict[int, torch.Tensor] = {}
        budget = int(cache_bytes)
        for i, inf in enumerate(self.info):
            if inf.nbytes <= budget:
                self.resident[i] = self._read(i)
                budget -= inf.nbytes
        self.file_reads = 0  # bags read from their files after the start (not held)

    @property
    def dims(self) -> set[int]:
        return {i.dim for i in self.info}

    @property
    def encoders(self) -> set[str]:
        return {json.dumps(i.encoder or {}, sort_keys=True) for i in self.info}

    def _read(self, i: int) -> torch.Tensor:
        return torch.as_tensor(read_features(self.paths[i]).features, device=self.device)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if i in self.resident:
            return self.resident[i]
        self.file_reads += 1
        return self._read(i)

    def select(self, idx) -> Iterator[torch.Tensor]:
        """The bags of ``idx`` one after another (a bag not held is read when reached)."""
        return (self[i] for i in idx)


def slide_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    """AUC, balanced accuracy and quadratic weighted kappa of integer labels ``y`` against ``probs``."""
    return Classification(classes).metrics(y, probs)


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, classes: list[str], n: int, seed: int) -> dict[str, list[float]]:
    """Percentile 95% intervals of ``slide_metrics`` over ``n`` resamples of the slides."""
    return Classification(classes).bootstrap_ci(y, probs, n, seed)


def _batch_loss(model, bags, idx, targets: np.ndarray, task: MILTask, loss, c: MILConfig,
                device: torch.device) -> torch.Tensor:
    """The task's loss over the outputs of the bags ``idx`` together (+ CLAM's instance loss, averaged)."""
    outs = [model(bags[i], label=task.instance_label(targets[i])) for i in idx]
    value = loss(torch.stack([o.logits for o in outs]), task.targets_tensor(targets[idx], device))
    inst = [o.instance_loss for o in outs if o.instance_loss is not None]
    if inst:
        value = (1 - c.instance_weight) * value + c.instance_weight * torch.stack(inst).mean()
    return value


def evaluate(model, bags, targets: np.ndarray, task: MILTask, loss) -> tuple[float, np.ndarray]:
    """The task's evaluation loss and ``task.predict`` rows of ``bags`` (any iterable of bag tensors)."""
    model.eval()
    outs = []
    with torch.no_grad():
        for x in bags:
            outs.append(model(x).logits)
        if not outs:
            return float("nan"), np.zeros((0, len(task.output_columns)))
        outputs = torch.stack(outs)
        value = task.evaluation_loss(loss, outputs, task.targets_tensor(targets, outputs.device))
        return value, task.predict(outputs)


def train_fold(c: MILConfig, bags: Bags, targets: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
               task: MILTask, seed: int, device: torch.device, loss_fn: Any) -> tuple[torch.nn.Module, dict]:
    """Train on ``train`` with early stopping on ``val`` (``splits``: ``[(train, val)]``); the
    best-validation weights are returned. ``loss_fn``: the fold's loss (``task.make_loss`` of the
    patients the fold's model learns from: ``train``, or with rotating members all of them).

    ``ensemble`` > 1: that many networks trained so, one after the other from different seeds, as one
    ``MILEnsemble`` (outputs averaged); its ``val_loss`` is the averaged network's.
    ``ensemble_validation: rotate``: ``splits`` holds one ``(train, val)`` pair per member instead,
    patient-grouped inner splits of the fold's training patients (:func:`_inner_splits`). Member j
    learns from its pair's train and stops early on its val, so every training patient teaches all
    members but one; all of them use the loss of the fold's training patients together (a regression's
    standardisation, the class weights). The ``val_loss`` is then the members' mean, each on the split
    it did not learn from."""
    if c.ensemble <= 1:
        return _train_member(c, bags, targets, splits[0], task, seed, device, loss_fn)
    rotate = len(splits) > 1
    members, infos = [], []
    for j in range(c.ensemble):
        split = splits[j] if rotate else splits[0]
        model, info = _train_member(c, bags, targets, split, task, seed + 7919 * j, device, loss_fn)
        members.append(model)
        infos.append({**info, "validation": len(split[1])})
    ensemble = MILEnsemble(members)
    if not rotate:
        val = splits[0][1]
        val_loss, _ = evaluate(ensemble, bags.select(val), targets[val], task, loss_fn)
    else:  # no patient is held out from every member: each member's own held-out loss
        val_loss = float(np.mean([i["val_loss"] for i in infos]))
    return ensemble, {"best_epoch": max(i["best_epoch"] for i in infos), "val_loss": val_loss,
                      "epochs_run": sum(i["epochs_run"] for i in infos), "history": infos[0]["history"],
                      "members": [{k: i[k] for k in ("best_epoch", "val_loss", "epochs_run", "validation")}
                                  for i in infos]}


def _train_member(c: MILConfig, bags: Bags, targets: np.ndarray, split: tuple[np.ndarray, np.ndarray],
                  task: MILTask, seed: int, device: torch.device, loss_fn: Any) -> tuple[torch.nn.Module, dict]:
    """One network trained on ``train`` with early stopping on ``val`` (``split``: ``(train, val)``; its
    best-validation weights), with the fold's loss ``loss_fn`` (:func:`train_fold`)."""
    train, val = split
    seed_everything(seed)
    model = build_mil(c.arch, bags.info[0].dim, task.out_dim, c.hidden, c.dropout, c.instance_k,
                      c.pooling).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    rng = np.random.default_rng(seed)
    best, best_state, best_epoch, history = float("inf"), None, 0, []
    step = int(c.bags_per_step)
    for epoch in range(c.epochs):
        model.train()
        total = 0.0
        order = rng.permutation(train)
        for idx in task.batches(order, step, targets):
            loss = _batch_loss(model, bags, idx, targets, task, loss_fn, c, device)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx) if step > 1 else float(loss.detach())
        val_loss, _ = evaluate(model, bags.select(val), targets[val], task, loss_fn)
        history.append({"epoch": epoch, "loss": total / len(train), "val_loss": val_loss})
        if val_loss < best - 1e-6:
            best, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= c.patience:
            break
    if best_state is None:
        raise TrainingError(f"the validation loss was never finite ({history[-1]['val_loss'] if history else 'none'}): "
                            "training diverged (lower lr?); no checkpoint was written")
    model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "val_loss": best, "epochs_run": len(history), "history": history}


def _and_more(n: int) -> str:
    return f" (and {n - 1} more file(s))" if n > 1 else ""


def _one_encoder(bags: Bags, table) -> tuple[dict, int]:
    """The cohort's one feature width and encoder record; FeatureError naming a file of each
    when the feature files differ (one model takes the features of one encoder)."""
    dims: dict[int, list[Path]] = {}
    for i in bags.info:
        dims.setdefault(i.dim, []).append(i.path)
    if len(dims) > 1:
        (d1, f1), (d2, f2) = sorted(dims.items(), key=lambda kv: -len(kv[1]))[:2]
        raise FeatureError(f"the cohort's feature files have {len(dims)} widths: {len(f1)} file(s) {d1} wide (e.g. "
                           f"{f1[0]}), {len(f2)} {d2} wide (e.g. {f2[0]}); one model takes one encoder's features",
                           table)
    groups: dict[str, list[FeatureInfo]] = {}
    for i in bags.info:
        groups.setdefault(json.dumps(i.encoder or {}, sort_keys=True), []).append(i)
    if len(groups) > 1:
        (_, g1), (_, g2) = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:2]
        diff, unknown = compare_provenance(g2[0].encoder, g1[0].encoder, against=f"{g1[0].path.name}'s")
        what = "; ".join(diff) if diff else f"their encoder records differ ({', '.join(unknown) or 'other fields'})"
        raise FeatureError(f"the cohort's feature files come from {len(groups)} different encoders: {g2[0].path} "
                           f"({len(g2)} file(s) like it) against {g1[0].path} ({len(g1)} file(s)): {what}; "
                           "one model takes one encoder's features", table)
    return json.loads(next(iter(groups))), next(iter(dims))


def _splits(y: np.ndarray, groups: np.ndarray, folds: int, seed: int):
    """(train, val, test) index arrays per fold, stratified by ``y`` (the task's key); val: one
    patient-grouped inner split of train."""
    if len(set(groups.tolist())) < folds:
        raise ConfigError(f"{folds} folds need at least {folds} patients, have {len(set(groups.tolist()))}")
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for rest, test in outer.split(np.zeros(len(y)), y, groups):
        tr, va = _inner_splits(y, groups, rest, max(2, min(folds - 1, len(set(groups[rest].tolist())))), seed)[0]
        yield tr, va, test


def _inner_splits(y: np.ndarray, groups: np.ndarray, rest: np.ndarray, n: int,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``n`` patient-grouped, ``y``-stratified ``(train, val)`` splits of the rows ``rest`` (row
    indices, as ``rest`` holds them). The first is the fold's validation split (:func:`_splits`);
    ``ensemble_validation: rotate`` gives member j the j-th."""
    inner = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed + 1)
    return [(rest[tr], rest[va]) for tr, va in inner.split(np.zeros(len(rest)), y[rest], groups[rest])]


@register
class MILTrainer(Trainer):
    """Attention-MIL (or pooling) slide classifier with patient-level k-fold cross-validation."""

    name = "mil"
    consumes = frozenset({"slide_labels"})
    Config = MILConfig
    rerun_free_options = frozenset({"batch_size", "num_workers", "bootstrap", "bag_cache_mb", "baseline"})
    outputs = ("oof.csv", "baseline_oof.csv", "fold_*.pt", "fold_*.json")  # what --restart deletes (trainers/runs.py)

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        c = self.config
        if not (c.slides or c.cohort):
            raise ConfigError("mil needs 'slides' (a CSV with slide,label[,patient][,features] columns) or "
                              "'cohort' (an `embed` cohort's --out folder)")
        out = Path(out_dir)
        run_state = begin_run(self, out, c.epochs)
        task = get_mil_task(c.task)()
        table = c.slides or cohort_table(c.cohort, out, task.target_columns, self)
        rows = read_mil_table(table, c.features_dir, task.target_columns)
        # an edited table or a replaced feature file is another run: refused like changed options
        check_inputs(self, out, {"slide table": table, **{f"feature file of {r.slide}": r.features for r in rows}})
        if run_state == "finished" and (out / "checkpoint.pt").exists():
            return out / "checkpoint.pt"
        dev = resolve_device(device)
        targets = task.setup([r.values for r in rows], c)
        strata = task.stratify(targets)
        groups = np.array([r.patient for r in rows])
        cache = None if c.bag_cache_mb is None else int(c.bag_cache_mb) * 2**20
        bags = Bags([r.features for r in rows], cache, dev)
        encoder, in_dim = _one_encoder(bags, c.slides)
        columns = task.output_columns
        preds = np.full((len(rows), len(columns)), np.nan)
        fold_of = np.full(len(rows), -1)
        folds: list[dict] = []
        from tqdm.auto import tqdm

        task_fields = task.checkpoint_fields()
        mil_desc = {"arch": c.arch, "in_dim": int(in_dim), **task_fields, "hidden": c.hidden, "pooling": c.pooling,
                    "members": int(c.ensemble),
                    "dropout": c.dropout, "instance_k": c.instance_k, "encoder": encoder,
                    "trainer_config": {k: getattr(c, k) for k in c.__dataclass_fields__},
                    "task": task.name, "out_dim": int(task.out_dim)}
        splits = list(_splits(strata, groups, c.folds, c.seed))
        rotate = c.ensemble > 1 and c.ensemble_validation == "rotate"
        member_splits: list[list[tuple[np.ndarray, np.ndarray]] | None] = [None] * len(splits)
        for k, (tr, va, te) in enumerate(splits):  # a fold the task cannot score is refused before any training
            task.check_fold(targets, va, "validation")
            task.check_fold(targets, te, "test")
            if rotate:
                rest = np.sort(np.concatenate([tr, va]))
                patients = len(set(groups[rest].tolist()))
                if patients < c.ensemble:
                    raise ConfigError(f"ensemble_validation 'rotate' with ensemble {c.ensemble} needs at least "
                                      f"{c.ensemble} patients in each fold's training part; fold {k} has {patients}")
                members = _inner_splits(strata, groups, rest, c.ensemble, c.seed)
                for _mtr, mva in members:
                    task.check_fold(targets, mva, "validation")
                member_splits[k] = members
        bar = tqdm(list(enumerate(splits)), desc="mil folds", unit="fold", disable=not progress)
        for k, (tr, va, te) in bar:
            path = out / f"fold_{k}.pt"
            record_path = out / f"fold_{k}.json"
            # the patients the fold's model learnt from: with rotating members, the validation split's too
            fit = tr if member_splits[k] is None else np.sort(np.concatenate([tr, va]))
            # the fold's loss, whose targets also set a regression's mean and sd (what predict restores)
            loss_fn = task.make_loss(targets[fit], dev, c)
            if path.exists() and record_path.exists():  # a rerun skips finished folds
                model, _ = load_mil_checkpoint(path)
                model.to(dev)
                info = json.loads(record_path.read_text())
            else:
                model, info = train_fold(c, bags, targets, member_splits[k] or [(tr, va)], task,
                                         c.seed * 1000 + k, dev, loss_fn)
                fitted = (evaluate(model, bags.select(fit), targets[fit], task, loss_fn)[1]
                          if task.needs_train_predictions else None)  # e.g. a Cox model's baseline hazard
                offset = task.output_offset(fitted) if (fitted is not None and c.centre_outputs) else None
                if offset is not None:  # a level the loss cannot see (Cox): fixed on the training fold
                    shift_head_bias(model, offset)
                    info["output_offset"] = [float(v) for v in np.ravel(offset)]  # what was taken out
                    fitted = evaluate(model, bags.select(fit), targets[fit], task, loss_fn)[1]
                state = task.fold_state(targets[fit], fitted)
                save_mil_checkpoint(path, model, {**mil_desc, **({"fold_state": state} if state else {}), "fold": k})
                write_text_atomic(record_path, json.dumps(info))
            _, p = evaluate(model, bags.select(te), targets[te], task, loss_fn)
            preds[te], fold_of[te] = p, k
            folds.append({"fold": k, "test_slides": len(te), **{kk: info[kk] for kk in ("best_epoch", "val_loss",
                                                                                          "epochs_run")},
                          **task.metrics(targets[te], p)})
        overall = task.metrics(targets, preds)
        ci = task.bootstrap_ci(targets, preds, c.bootstrap, c.seed)
        metrics = {"arch": c.arch, **({} if task.name == DEFAULT_TASK else {"task": task.name}), **task_fields,
                   "slides": len(rows), "patients": len(set(groups.tolist())),
                   "folds": folds, "overall": overall, "ci95": ci,
                   "mean_over_folds": {m: float(np.nanmean([f[m] for f in folds])) for m in overall}}
        baseline = None
        if c.baseline and task.has_linear_baseline:  # the linear model on the same folds, in the same report
            mean_features = np.stack([bags[i].mean(0).double().cpu().numpy() for i in range(len(bags))])
            baseline = task.linear_baseline(mean_features, targets, fold_of, preds, c.seed)
        if baseline is not None:
            base_pred = baseline.pop("predictions")
            metrics["baseline"] = baseline
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["slide", "patient", "fold", *columns[:1]])
            w.writerows([r.slide, r.patient, int(f), round(float(v), 6)] for r, f, v in zip(rows, fold_of, base_pred))
            write_text_atomic(out / "baseline_oof.csv", buf.getvalue())
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["slide", "patient", *task.target_columns, "fold", *columns])
        for r, f, p in zip(rows, fold_of, preds):
            w.writerow([r.slide, r.patient, *[r.values[col] for col in task.target_columns], int(f),
                        *[round(float(v), 6) for v in p]])
        write_text_atomic(out / "oof.csv", buf.getvalue())
        best = min(folds, key=lambda f: f["val_loss"])["fold"]
        ckpt = out / "checkpoint.pt"
        best_model, best_mil = load_mil_checkpoint(out / f"fold_{best}.pt")
        state = {"fold_state": best_mil["fold_state"]} if "fold_state" in best_mil else {}
        save_mil_checkpoint(ckpt, best_model, {**mil_desc, **state, "fold": best})
        write_text_atomic(out / "done.json", json.dumps({"trainer": self.name, "epochs": c.epochs,
                                                         "checkpoint": ckpt.name, "best_fold": best}, indent=2))
        if progress:
            line = f"mil {c.arch}: {task.summary(overall, ci)}"
            if baseline is not None:
                (head, d), = baseline["diff"].items()
                line += (f"; {baseline['model']} {head} {baseline['overall'][head]:.3f} on the same folds "
                         f"(MIL - baseline {d:+.3f})")
            print(line, flush=True)
        return ckpt

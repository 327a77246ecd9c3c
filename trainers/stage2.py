"""Stage-2 slide classifiers on top of a patch segmenter's heatmaps.

- ``topk-mean``: the K tiles of a slide with the highest maximum pixel probability (K = 16) go
  through a patch CNN; the slide probability is the mean of the K patch probabilities, trained
  with binary cross-entropy on slide labels (negative vs any tumour).
- ``morph-lgbm``: LightGBM on the heatmap's morphology features (``slidekit.slidelevel.features``),
  predicting the CAMELYON17 node label negative / itc / micro / macro.

Both read a slide table: a CSV with columns ``slide,label`` and optionally ``heatmap`` (a heatmap
directory or ``heatmap.zarr`` store) and ``mask``; relative paths are relative to the CSV.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slidekit.base import distributed as dist
from slidekit.base.devices import resolve_device
from slidekit.base.distributed import env_ranks
from slidekit.base.errors import CheckpointError, ConfigError, LabelError, TrainingWarning
from slidekit.base.io import write_text_atomic
from slidekit.infer.predictor import checkpoint_stain
from slidekit.models.networks import build_model
from slidekit.models.spec import BACKBONES, MAX_PATCH_SIZE, ModelSpec
from slidekit.regions.masks import Tissue, build_region
from slidekit.regions.options import TissueOptions
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.slidelevel.features import (
    DEFAULT_THRESHOLDS,
    SIZE_CLASSES,
    feature_names,
    features_from_view,
    open_heatmap_view,
)
from slidekit.slidelevel.topk import topk_from_heatmap
from slidekit.slides.slide import open_slide
from trainers.base import Trainer, init_encoder, register, run_epochs, seed_everything
from trainers.batches import BatchInputs, StainOptions, check_stain_reference, model_input, sample_images
from trainers.config import TrainerConfig, check_option
from trainers.runs import begin_run

POSITIVE_WORDS = {"positive", "tumor", "tumour", "1", "true"}
NEGATIVE_WORDS = {"negative", "normal", "0", "false"}


# ------------------------------------------------------------------------------- slide tables

@dataclass
class SlideRecord:
    """One row of a slide table."""

    slide: Path
    label: str                      # negative | itc | micro | macro | positive
    mask: Path | None = None
    heatmap: Path | None = None

    @property
    def positive(self) -> bool:
        return self.label != "negative"


def normalise_slide_label(label: str) -> str:
    """negative/itc/micro/macro as they are; positive/tumour/1 -> positive; normal/0 -> negative."""
    key = str(label).strip().lower()
    if key in SIZE_CLASSES:
        return key
    if key in POSITIVE_WORDS:
        return "positive"
    if key in NEGATIVE_WORDS:
        return "negative"
    raise LabelError(f"unknown slide label {label!r}; expected negative, itc, micro, macro or positive")


def _relative_to(table: Path, v: str) -> Path:
    """A path of the slide table: absolute as written, else relative to the table's folder."""
    return Path(v) if Path(v).is_absolute() else table.parent / v


def read_slide_table(path: str | os.PathLike) -> list[SlideRecord]:
    """Read a slide table CSV (``slide,label[,mask][,heatmap]``); LabelError for a bad file."""
    path = Path(path)
    if not path.exists():
        raise LabelError("slide table not found", path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "slide" not in cols or "label" not in cols:
            raise LabelError(f"slide table needs columns 'slide' and 'label', has {cols}", path)
        out: list[SlideRecord] = []
        seen: dict[str, tuple[int, SlideRecord]] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("slide"):
                raise LabelError(f"line {line}: empty slide path", path)
            try:
                label = normalise_slide_label(row.get("label", ""))
            except LabelError as e:
                raise LabelError(f"line {line}: {e}", path) from None
            mask, heatmap = row.get("mask"), row.get("heatmap")
            record = SlideRecord(_relative_to(path, row["slide"]), label, _relative_to(path, mask) if mask else None,
                                 _relative_to(path, heatmap) if heatmap else None)
            key = slide_identity(record.slide)
            if key in seen:
                first_line, first = seen[key]
                what = (f"under two labels ({first.label!r} on line {first_line}, {label!r} here)"
                        if first.label != label else f"twice (also on line {first_line})")
                raise LabelError(f"line {line}: slide {row['slide']!r} is listed {what}; one row per slide", path)
            seen[key] = (line, record)
            out.append(record)
    if not out:
        raise LabelError("slide table has no rows", path)
    return out


def slide_identity(path: Path) -> str:
    """One key per slide however its path is spelt: ``./a.tif``, ``x/../a.tif`` and a symlink are one
    file, and ``a.tif`` next to ``a.svs`` is taken as one slide in two formats."""
    p = Path(path).resolve()
    return os.path.normcase(str(p.parent / p.stem))


# ------------------------------------------------------------------------------------ morph-lgbm

def _lgbm(seed: int, n_estimators: int, num_leaves: int, learning_rate: float, min_child_samples: int):
    import lightgbm as lgb

    return lgb.LGBMClassifier(n_estimators=n_estimators, num_leaves=num_leaves, learning_rate=learning_rate,
                              min_child_samples=min_child_samples, subsample=1.0, colsample_bytree=1.0,
                              reg_lambda=1.0, random_state=seed, n_jobs=1, verbose=-1, deterministic=True)


class MorphClassifier:
    """LightGBM over morphology features -> probabilities of ``classes`` (missing training
    classes get probability 0)."""

    def __init__(self, booster_model: Any, columns: list[str], classes: Sequence[str] = SIZE_CLASSES,
                 fitted_classes: Sequence[int] | None = None) -> None:
        self.model, self.columns, self.classes = booster_model, list(columns), list(classes)
        self.fitted_classes = list(fitted_classes) if fitted_classes is not None else list(range(len(classes)))

    def _matrix(self, rows: Sequence[dict] | np.ndarray) -> np.ndarray:
        if isinstance(rows, np.ndarray):
            return rows.astype(np.float64)
        return np.array([[float(r.get(c, 0.0)) for c in self.columns] for r in rows], dtype=np.float64)

    def predict_proba(self, rows: Sequence[dict] | np.ndarray) -> np.ndarray:
        X = self._matrix(rows)
        out = np.zeros((len(X), len(self.classes)))
        if len(self.fitted_classes) == 1:
            out[:, self.fitted_classes[0]] = 1.0
            return out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = self.model.predict_proba(X)
        out[:, self.fitted_classes] = p
        return out

    def predict(self, rows: Sequence[dict] | np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(rows).argmax(axis=1)]

    def save(self, path: str | os.PathLike) -> Path:
        """Save as JSON (LightGBM text model inside), atomically."""
        model_str = self.model.booster_.model_to_string() if len(self.fitted_classes) > 1 else ""
        return write_text_atomic(path, json.dumps({"format": "slidekit.morph-lgbm/1", "columns": self.columns,
                                                   "classes": self.classes, "fitted_classes": self.fitted_classes,
                                                   "model": model_str}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MorphClassifier":
        import lightgbm as lgb


        path = Path(path)
        try:
            d = json.loads(Path(path).read_text())
            assert d["format"] == "slidekit.morph-lgbm/1"
        except Exception:
            raise CheckpointError("not a slidekit morph-lgbm model", path) from None
        booster = lgb.Booster(model_str=d["model"]) if d["model"] else None
        return cls(_BoosterWrapper(booster), d["columns"], d["classes"], d["fitted_classes"])


class _BoosterWrapper:
    """A loaded LightGBM booster behind the predict_proba interface."""

    def __init__(self, booster: Any) -> None:
        self.booster = booster

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = np.asarray(self.booster.predict(X))
        return p if p.ndim == 2 else np.column_stack([1 - p, p])


@dataclass(frozen=True)
class LGBMParams:
    """LightGBM hyper-parameters of the stage-2 classifier (``fit_morph_lgbm``).

    Parameters
    ----------
    n_estimators
        Boosting rounds.
    num_leaves
        Leaves per tree.
    learning_rate
        Shrinkage per round.
    min_child_samples
        Fewest rows in a leaf.
    """

    n_estimators: int = 150
    num_leaves: int = 7
    learning_rate: float = 0.05
    min_child_samples: int = 3


def fit_morph_lgbm(rows: Sequence[dict] | np.ndarray, labels: Sequence[str], columns: list[str] | None = None, *,
                   params: LGBMParams | None = None, seed: int = 0, cv_folds: int = 4,
                   classes: Sequence[str] = SIZE_CLASSES) -> tuple[MorphClassifier, dict[str, float]]:
    """Fit LightGBM on feature rows and node labels (``classes``: negative/itc/micro/macro by
    default; ``("negative", "positive")`` for slide labels without a size).

    Returns the classifier fitted on every row and ``{"train_loss", "cv_loss", "cv_accuracy"}``:
    the multi-class log loss on the training rows, and out-of-fold log loss / accuracy from
    stratified ``cv_folds``-fold cross-validation (the stage-2 loss used to select EM rounds;
    NaN when a fold cannot be made). ``params``: the LightGBM hyper-parameters (None: :class:`LGBMParams`'
    defaults); ``seed`` seeds LightGBM and the folds.
    """
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    if columns is None:
        columns = feature_names(DEFAULT_THRESHOLDS) if not isinstance(rows, np.ndarray) else \
            [f"f{i}" for i in range(rows.shape[1])]
    classes = list(classes)
    clf = MorphClassifier(None, columns, classes)
    X = clf._matrix(rows)
    norm = [normalise_slide_label(v) for v in labels]
    if classes == ["negative", "positive"]:
        norm = ["negative" if v == "negative" else "positive" for v in norm]
    bad = sorted(set(norm) - set(classes))
    if bad:
        raise LabelError(f"labels {bad} are not among the stage-2 classes {classes}")
    y = np.array([classes.index(v) for v in norm])
    hp = params or LGBMParams()
    lgbm_kw: dict[str, Any] = dict(seed=seed, n_estimators=hp.n_estimators, num_leaves=hp.num_leaves,
                                   learning_rate=hp.learning_rate, min_child_samples=hp.min_child_samples)

    def fit(Xf: np.ndarray, yf: np.ndarray) -> MorphClassifier:
        present = sorted(set(yf.tolist()))
        if len(present) == 1:
            return MorphClassifier(None, columns, classes, fitted_classes=present)
        m = _lgbm(**lgbm_kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.fit(Xf, yf)
        return MorphClassifier(m, columns, classes, fitted_classes=[int(c) for c in m.classes_])

    final = fit(X, y)
    eps = 1e-6
    clip = lambda P: np.clip(P, eps, 1) / np.clip(P, eps, 1).sum(1, keepdims=True)  # noqa: E731
    metrics = {"train_loss": float(log_loss(y, clip(final.predict_proba(X)), labels=range(len(classes))))}
    freq = np.bincount(y, minlength=len(classes)) / max(len(y), 1)
    # the loss of always answering the class frequencies: a stage-2 loss at or above it has learnt nothing
    metrics["chance_loss"] = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
    counts = np.bincount(y, minlength=len(classes))
    k = min(cv_folds, int(counts[counts > 0].max()) if counts.any() else 0)
    if k >= 2 and len(y) >= 2 * k:
        oof = np.zeros((len(y), len(classes)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y):
                oof[te] = fit(X[tr], y[tr]).predict_proba(X[te])
        metrics["cv_loss"] = float(log_loss(y, clip(oof), labels=range(len(classes))))
        metrics["cv_accuracy"] = float((oof.argmax(1) == y).mean())
    else:
        metrics["cv_loss"] = metrics["cv_accuracy"] = float("nan")
    return final, metrics


@dataclass
class MorphLGBMConfig(TrainerConfig):
    """morph-lgbm: a slide table whose rows have a ``heatmap`` and a node ``label``."""

    slides: str = ""
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    work_mpp: float = 8.0
    n_estimators: int = 150
    num_leaves: int = 7
    learning_rate: float = 0.05
    min_child_samples: int = 3
    cv_folds: int = 4

    def validate(self) -> None:
        super().validate()
        check_option(self.work_mpp > 0, "work_mpp", self.work_mpp, "a number > 0")
        check_option(bool(self.thresholds) and all(0 < t < 1 for t in self.thresholds), "thresholds",
                     self.thresholds, "probabilities in (0, 1)")
        for key in ("n_estimators", "num_leaves", "min_child_samples"):
            check_option(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        check_option(self.num_leaves >= 2, "num_leaves", self.num_leaves, "an integer >= 2")
        check_option(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        check_option(self.cv_folds >= 2, "cv_folds", self.cv_folds, "an integer >= 2")


@register
class MorphLGBMTrainer(Trainer):
    """LightGBM on heatmap morphology features -> negative / itc / micro / macro."""

    name = "morph-lgbm"
    consumes = frozenset({"slide_labels"})
    Config = MorphLGBMConfig
    rerun_free_options = frozenset({"epochs", "batch_size", "lr"})  # not used by LightGBM
    outputs = ("morph_lgbm.json",)

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        c = self.config
        if not c.slides:
            raise ConfigError("morph-lgbm needs 'slides' (a CSV with slide,label,heatmap columns)")
        out = Path(out_dir)
        # the run-folder rules of every trainer (trainers/runs.py); one fit counts as one epoch
        if begin_run(self, out, 1) == "finished" and (out / "morph_lgbm.json").exists():
            return out / "morph_lgbm.json"
        records = read_slide_table(c.slides)
        missing = [str(r.slide) for r in records if r.heatmap is None]
        if missing:
            raise LabelError(f"{len(missing)} row(s) have no heatmap (first: {missing[0]})", c.slides)
        heatmaps = [r.heatmap for r in records if r.heatmap is not None]  # every one, checked above
        rows = [features_from_view(open_heatmap_view(h), c.thresholds, c.work_mpp) for h in heatmaps]
        params = LGBMParams(n_estimators=c.n_estimators, num_leaves=c.num_leaves, learning_rate=c.learning_rate,
                            min_child_samples=c.min_child_samples)
        clf, metrics = fit_morph_lgbm(rows, [r.label for r in records], feature_names(c.thresholds), params=params,
                                      seed=c.seed, cv_folds=c.cv_folds)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
        path = clf.save(out / "morph_lgbm.json")
        write_text_atomic(out / "done.json", json.dumps({"trainer": self.name, "epochs": 1,
                                                         "checkpoint": path.name}, indent=2))
        return path


# -------------------------------------------------------------------------------------- topk-mean

def bag_logits(model: torch.nn.Module, spec: Any, bags: torch.Tensor, inputs: BatchInputs | None = None,
               normalizer: Any = None) -> torch.Tensor:
    """(S, K, H, W, 3) uint8 bags -> (S, K) patch logits of the positive class. ``inputs`` prepares
    training batches (stain normalisation + augmentation); without it the patches get the stain
    normalisation of ``normalizer`` or ``spec.stain``, and ``spec.normalize`` (evaluation)."""
    S, K = bags.shape[:2]
    patches = bags.reshape(S * K, *bags.shape[2:])
    logits = model(inputs(patches) if inputs is not None else model_input(spec, patches, normalizer=normalizer))
    return logits[:, -1].reshape(S, K)


def topk_mean_probs(model: torch.nn.Module, spec: Any, bags: np.ndarray | torch.Tensor,
                    batch_slides: int = 4) -> np.ndarray:
    """Slide probabilities: the mean of the sigmoid patch probabilities of each bag's K patches."""
    model.eval()
    out = []
    bags = torch.as_tensor(bags)
    normalizer = checkpoint_stain(spec)  # once for all the batches
    with torch.inference_mode():
        for i in range(0, len(bags), batch_slides):
            out.append(torch.sigmoid(bag_logits(model, spec, bags[i:i + batch_slides], normalizer=normalizer)).mean(1))
    return torch.cat(out).numpy() if out else np.zeros(0)


def topk_mean_epoch(model: torch.nn.Module, spec: Any, optimizer: torch.optim.Optimizer, bags: torch.Tensor,
                    labels: torch.Tensor, batch_slides: int, generator: torch.Generator,
                    inputs: BatchInputs | None = None) -> dict[str, float]:
    """One epoch of BCE on slide labels with the slide probability = mean of K patch probabilities.

    Several ranks (``model`` in DDP): ``batch_slides`` is the global batch; every rank draws the same
    order and flips and takes every world-th slide of each batch; the loss is the sum over the
    rank's slides divided by the global batch (times the ranks, which DDP averages), i.e. one
    process's gradient. A last batch that does not split evenly over the ranks loses its remainder
    (fewer than ``world`` slides an epoch; the trainer warns once).
    """
    world, me = dist.world_size(), dist.rank()
    model.train()
    order = torch.randperm(len(bags), generator=generator)
    total, n = 0.0, 0
    starts = range(0, len(order), batch_slides)
    for i in (inputs.batches(starts) if inputs is not None else starts):  # timed steps (read: ~0, bags in memory)
        idx = order[i:i + batch_slides]
        idx = idx[: len(idx) - len(idx) % world]
        if not len(idx):
            break
        global_n = len(idx)
        idx = idx[me::world]
        b = bags[idx]
        if torch.rand(1, generator=generator) < 0.5:  # flips: orientation carries no label
            b = b.flip(2)
        if torch.rand(1, generator=generator) < 0.5:
            b = b.flip(3)
        p = torch.sigmoid(bag_logits(model, spec, b, inputs)).mean(1).clamp(1e-6, 1 - 1e-6)
        loss = F.binary_cross_entropy(p, labels[idx].to(p.dtype), reduction="sum") * (world / global_n)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * global_n / world
        n += global_n
    return {"loss": total / max(n, 1) * world}


def read_bags(records: Sequence[SlideRecord], k: int, mpp: float, patch_size: int,
              slide_mpp: float | None = None, tissue_mpp: float = 8.0, min_tissue: float = 0.25,
              progress: bool = False) -> np.ndarray:
    """(S, K, P, P, 3) uint8: each slide's K tissue tiles (``patch_size`` px at ``mpp``) with the
    highest maximum pixel probability in its heatmap. Slides with fewer than K tiles repeat their
    best ones."""
    from tqdm.auto import tqdm

    bags = np.zeros((len(records), k, patch_size, patch_size, 3), np.uint8)
    for s, r in enumerate(tqdm(records, desc=f"top-{k} tiles", unit="slide", leave=False, disable=not progress)):
        if r.heatmap is None:
            raise LabelError(f"slide {r.slide} has no heatmap to pick its top-{k} tiles from")
        with open_slide(r.slide, mpp=slide_mpp) as slide:
            grid = TileGrid.from_slide(slide, mpp=mpp, size=patch_size, overlap=0,
                                       mask=build_region(Tissue(TissueOptions({"mpp": tissue_mpp})), slide),
                                       min_tissue=min_tissue)
            if not len(grid):
                raise LabelError(f"no tissue tiles of {patch_size} px at {mpp} µm/px", r.slide)
            top = topk_from_heatmap(r.heatmap, k=k, coords=grid.coords, tile_size0=grid.extent)
            _, tiles = TileReader(slide, grid).read_batch(top.indices)
            for j in range(k):
                bags[s, j] = tiles[j % len(tiles)]
    return bags


@dataclass
class TopKMeanConfig(StainOptions):
    """topk-mean: a slide table with ``heatmap`` and ``label`` (negative vs any tumour)."""

    slides: str = ""
    k: int = 16
    mpp: float = 0.5
    patch_size: int = 224
    backbone: str = "resnet18"
    batch_slides: int = 4
    slide_mpp: float | None = None
    weight_decay: float = 1e-4

    def validate(self) -> None:
        super().validate()

        check_option(self.k >= 1, "k", self.k, "an integer >= 1")
        check_option(32 <= self.patch_size <= MAX_PATCH_SIZE, "patch_size", self.patch_size,
                     f"an integer 32..{MAX_PATCH_SIZE} (px)")
        check_option(self.mpp > 0, "mpp", self.mpp, "a number > 0")
        check_option(self.slide_mpp is None or self.slide_mpp > 0, "slide_mpp", self.slide_mpp, "> 0 (or unset)")
        check_option(self.batch_slides >= 1, "batch_slides", self.batch_slides, "an integer >= 1")
        check_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check_option(self.backbone in BACKBONES, "backbone", self.backbone, f"one of {', '.join(BACKBONES)}")


@register
class TopKMeanTrainer(Trainer):
    """Patch CNN whose slide probability is the mean over the slide's top-K tiles."""

    name = "topk-mean"
    consumes = frozenset({"slide_labels"})
    Config = TopKMeanConfig

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        c = self.config
        if not c.slides:
            raise ConfigError("topk-mean needs 'slides' (a CSV with slide,label,heatmap columns)")
        records = read_slide_table(c.slides)
        normalizer = check_stain_reference(c)  # before the slides' top-K tiles are read

        bags = torch.from_numpy(read_bags(records, c.k, c.mpp, c.patch_size, c.slide_mpp,
                                          progress=progress and env_ranks()[0] == 0))
        labels = torch.tensor([r.positive for r in records], dtype=torch.float32)
        return fit_topk_mean(self, out_dir, bags, labels, device=device, progress=progress, normalizer=normalizer)


def topk_mean_spec(c: TopKMeanConfig):
    return ModelSpec(arch="resnet-classifier", backbone=c.backbone, task="classification", classes=["tumour"],
                     patch_size=c.patch_size, mpp=c.mpp, activation="sigmoid",
                     extra={"stage2": "topk-mean", "k": c.k})


def fit_topk_mean(trainer: Trainer, out_dir: str | os.PathLike, bags: torch.Tensor, labels: torch.Tensor,
                  device: str = "auto", progress: bool = True, normalizer: Any = None) -> Path:
    """Train the top-K mean classifier on prepared bags (S, K, P, P, 3) and slide labels (S,).
    ``normalizer``: the stain normaliser ``check_stain_reference`` already loaded (else loaded here)."""
    c = trainer.config
    gen = seed_everything(c.seed)
    dev = dist.init_from_env(resolve_device(device))
    spec = topk_mean_spec(c)
    model = build_model(spec).to(dev)
    init_encoder(model, c.init)
    net = dist.wrap(model, dev, c.sync_batchnorm)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    dist.local_batch_size(c.batch_slides, "batch_slides")  # the global batch splits evenly over the ranks
    left = len(bags) % c.batch_slides % dist.world_size()
    if left and dist.is_main():
        warnings.warn(TrainingWarning(f"topk-mean: the last batch of each epoch ({len(bags) % c.batch_slides} "
                                      f"slides) does not split over {dist.world_size()} ranks; {left} slide(s) "
                                      "of it are left out each epoch"), stacklevel=2)
    flat = bags.reshape(-1, *bags.shape[2:])  # RandStainNA: fitted on a sample of the bags' patches
    inputs = BatchInputs(spec, dev, c, normalizer=normalizer,
                         fit_images=lambda: sample_images(flat.__getitem__, len(flat), seed=c.seed))
    bags, labels = bags.to(dev), labels.to(dev)
    return run_epochs(trainer, out_dir, model, spec,
                      lambda epoch: topk_mean_epoch(net, spec, opt, bags, labels, c.batch_slides, gen, inputs),
                      optimizer=opt, progress=progress, inputs=inputs)


def slide_accuracy(pred: Sequence[str], ref: Sequence[str]) -> float:
    """Fraction of slides whose predicted label equals the reference."""
    if not len(ref):
        return math.nan
    return float(np.mean([p == r for p, r in zip(pred, ref)]))

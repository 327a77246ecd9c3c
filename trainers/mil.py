"""``mil``: attention-MIL slide classifiers on feature stores, with patient-level cross-validation.

The slide table is a CSV ``slide,label[,patient][,features]``; ``features`` names the slide's
feature file (else ``features_dir/<slide stem>.h5``). Slides of one patient stay in one fold
(``StratifiedGroupKFold``). In each of ``folds`` folds the held-out fold is the test set; one
patient-grouped inner split of the rest is the validation set for early stopping (best
validation loss, ``patience`` epochs). Class weights balance the loss. Per fold and over
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from slidekit.base.devices import resolve_device
from slidekit.base.errors import ConfigError, LabelError
from slidekit.base.io import write_text_atomic
from slidekit.models.mil import MIL_ARCHS, build_mil, load_mil_checkpoint, save_mil_checkpoint
from slidekit.slidelevel.feature_store import feature_info, read_features
from slidekit.slidelevel.staging import weighted_kappa
from trainers.base import Trainer, register, seed_everything
from trainers.config import TrainerConfig, check_option
from trainers.runs import begin_run


@dataclass
class MILConfig(TrainerConfig):
    """mil: a slide table + feature files."""

    slides: str = ""  # CSV of slide,label[,patient][,features]; features default to features_dir/<slide stem>.h5
    features_dir: str | None = None  # folder of per-slide feature files (slidekit, TRIDENT, CLAM or STAMP HDF5)
    arch: str = "abmil"  # MIL model: abmil, clam, transmil, meanpool, maxpool or topk_mean
    classes: list[str] | None = None  # class order (kappa); default: sorted labels
    hidden: int = 128  # width of the attention / projection layers
    dropout: float = 0.1  # dropout on the projected instance features
    instance_k: int = 8  # clam: top/bottom-k attended instances of the clustering loss; topk_mean: k
    instance_weight: float = 0.3  # clam: weight of the instance loss
    folds: int = 5  # cross-validation folds, split by patient
    epochs: int = 40  # maximum epochs per fold
    patience: int = 8  # stop a fold after this many epochs without a better validation loss
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    class_weights: bool = True  # weight the loss by inverse class frequency
    bootstrap: int = 1000  # bootstrap resamples of the out-of-fold AUC/kappa confidence intervals (0: none)
    bag_cache_mb: int | None = None  # MB of bags held in memory; the rest are read from their files at each use (default: a quarter of the free memory)

    def validate(self) -> None:
        super().validate()
        check_option(self.arch in MIL_ARCHS, "arch", self.arch, f"one of {', '.join(MIL_ARCHS)}")
        check_option(self.folds >= 2, "folds", self.folds, "an integer >= 2")
        check_option(self.patience >= 1, "patience", self.patience, "an integer >= 1")
        check_option(self.hidden >= 1, "hidden", self.hidden, "an integer >= 1")
        check_option(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        check_option(self.bootstrap >= 0, "bootstrap", self.bootstrap, "an integer >= 0")
        check_option(self.bag_cache_mb is None or self.bag_cache_mb >= 0, "bag_cache_mb", self.bag_cache_mb,
                     "an integer >= 0, or null for a quarter of the free memory")


@dataclass
class Slide:
    slide: str
    label: str
    patient: str
    features: Path


def read_mil_table(path: str | os.PathLike, features_dir: str | None = None) -> list[Slide]:
    """Rows of a MIL slide table; LabelError naming the file and line for a bad one."""
    path = Path(path)
    if not path.exists():
        raise LabelError("slide table not found", path)
    out, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        if "slide" not in cols or "label" not in cols:
            raise LabelError(f"slide table needs columns 'slide' and 'label', has {cols}", path)
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row["slide"] or not row["label"]:
                raise LabelError(f"line {line}: empty slide or label", path)
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
            out.append(Slide(row["slide"], row["label"], row.get("patient") or row["slide"], feat))
    if not out:
        raise LabelError("slide table has no rows", path)
    return out


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
    pred = probs.argmax(1)
    out = {"balanced_accuracy": float(balanced_accuracy_score(y, pred)),
           "kappa": float(weighted_kappa([classes[i] for i in y], [classes[i] for i in pred], classes))}
    if len(set(y.tolist())) < 2:
        out["auc"] = float("nan")
    elif len(classes) == 2:
        out["auc"] = float(roc_auc_score(y, probs[:, 1]))
    else:
        out["auc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(len(classes))))
    return out


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, classes: list[str], n: int, seed: int) -> dict[str, list[float]]:
    """Percentile 95% intervals of ``slide_metrics`` over ``n`` resamples of the slides."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx].tolist())) < 2:
            continue
        for k, v in slide_metrics(y[idx], probs[idx], classes).items():
            draws.setdefault(k, []).append(v)
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}


def _bag_loss(model, x, y: int, weights: torch.Tensor | None, c: MILConfig) -> torch.Tensor:
    out = model(x, label=y)
    loss = F.cross_entropy(out.logits[None], torch.tensor([y], device=x.device), weight=weights)
    if out.instance_loss is not None:
        loss = (1 - c.instance_weight) * loss + c.instance_weight * out.instance_loss
    return loss


def evaluate(model, bags, y: np.ndarray, weights=None) -> tuple[float, np.ndarray]:
    """Mean loss and (n, C) probabilities of ``bags`` (any iterable of bag tensors)."""
    model.eval()
    losses, probs = [], []
    with torch.no_grad():
        for x, t in zip(bags, y):
            logits = model(x).logits
            losses.append(float(F.cross_entropy(logits[None], torch.tensor([int(t)], device=x.device), weight=weights)))
            probs.append(torch.softmax(logits, -1).cpu().numpy())
    return float(np.mean(losses)) if losses else float("nan"), np.stack(probs)


def train_fold(c: MILConfig, bags: Bags, y: np.ndarray, train: np.ndarray, val: np.ndarray,
               n_classes: int, seed: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Train on ``train`` with early stopping on ``val``; the best-validation weights are returned."""
    seed_everything(seed)
    model = build_mil(c.arch, bags.info[0].dim, n_classes, c.hidden, c.dropout, c.instance_k).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    counts = np.bincount(y[train], minlength=n_classes).astype(np.float64)
    weights = (torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
               if c.class_weights else None)
    rng = np.random.default_rng(seed)
    best, best_state, best_epoch, history = float("inf"), None, 0, []
    for epoch in range(c.epochs):
        model.train()
        total = 0.0
        for i in rng.permutation(train):
            loss = _bag_loss(model, bags[i], int(y[i]), weights, c)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        val_loss, _ = evaluate(model, bags.select(val), y[val], weights)
        history.append({"epoch": epoch, "loss": total / len(train), "val_loss": val_loss})
        if val_loss < best - 1e-6:
            best, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= c.patience:
            break
    model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "val_loss": best, "epochs_run": len(history), "history": history}


def _splits(y: np.ndarray, groups: np.ndarray, folds: int, seed: int):
    """(train, val, test) index arrays per fold; val: one patient-grouped inner split of train."""
    if len(set(groups.tolist())) < folds:
        raise ConfigError(f"{folds} folds need at least {folds} patients, have {len(set(groups.tolist()))}")
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for rest, test in outer.split(np.zeros(len(y)), y, groups):
        inner = StratifiedGroupKFold(n_splits=max(2, min(folds - 1, len(set(groups[rest].tolist())))),
                                     shuffle=True, random_state=seed + 1)
        tr, va = next(inner.split(np.zeros(len(rest)), y[rest], groups[rest]))
        yield rest[tr], rest[va], test


@register
class MILTrainer(Trainer):
    """Attention-MIL (or pooling) slide classifier with patient-level k-fold cross-validation."""

    name = "mil"
    consumes = frozenset({"slide_labels"})
    Config = MILConfig
    rerun_free_options = frozenset({"batch_size", "num_workers", "bootstrap", "bag_cache_mb"})
    outputs = ("oof.csv",)

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        c = self.config
        if not c.slides:
            raise ConfigError("mil needs 'slides' (a CSV with slide,label[,patient][,features] columns)")
        out = Path(out_dir)
        if begin_run(self, out, c.epochs) == "finished" and (out / "checkpoint.pt").exists():
            return out / "checkpoint.pt"
        dev = resolve_device(device)
        rows = read_mil_table(c.slides, c.features_dir)
        classes = list(c.classes) if c.classes else sorted({r.label for r in rows})
        unknown = sorted({r.label for r in rows} - set(classes))
        if unknown:
            raise LabelError(f"labels {unknown} are not in classes {classes}", c.slides)
        y = np.array([classes.index(r.label) for r in rows])
        groups = np.array([r.patient for r in rows])
        cache = None if c.bag_cache_mb is None else int(c.bag_cache_mb) * 2**20
        bags = Bags([r.features for r in rows], cache, dev)
        encoders = bags.encoders
        if len(encoders) > 1:
            raise LabelError(f"feature files come from {len(encoders)} different encoders; one model needs one",
                             c.slides)
        encoder = json.loads(encoders.pop())
        if len(bags.dims) > 1:
            raise LabelError("feature files have different feature widths", c.slides)
        in_dim = bags.dims.pop()
        probs = np.full((len(rows), len(classes)), np.nan)
        fold_of = np.full(len(rows), -1)
        folds: list[dict] = []
        from tqdm.auto import tqdm

        bar = tqdm(list(enumerate(_splits(y, groups, c.folds, c.seed))), desc="mil folds", unit="fold",
                   disable=not progress)
        mil_desc = {"arch": c.arch, "in_dim": int(in_dim), "classes": classes, "hidden": c.hidden,
                    "dropout": c.dropout, "instance_k": c.instance_k, "encoder": encoder,
                    "trainer_config": {k: getattr(c, k) for k in c.__dataclass_fields__}}
        for k, (tr, va, te) in bar:
            path = out / f"fold_{k}.pt"
            record_path = out / f"fold_{k}.json"
            if path.exists() and record_path.exists():  # a rerun skips finished folds
                model, _ = load_mil_checkpoint(path)
                model.to(dev)
                info = json.loads(record_path.read_text())
            else:
                model, info = train_fold(c, bags, y, tr, va, len(classes), c.seed * 1000 + k, dev)
                save_mil_checkpoint(path, model, {**mil_desc, "fold": k})
                write_text_atomic(record_path, json.dumps(info))
            _, p = evaluate(model, bags.select(te), y[te])
            probs[te], fold_of[te] = p, k
            folds.append({"fold": k, "test_slides": len(te), **{kk: info[kk] for kk in ("best_epoch", "val_loss",
                                                                                          "epochs_run")},
                          **slide_metrics(y[te], p, classes)})
        overall = slide_metrics(y, probs, classes)
        ci = bootstrap_ci(y, probs, classes, c.bootstrap, c.seed)
        metrics = {"arch": c.arch, "classes": classes, "slides": len(rows), "patients": len(set(groups.tolist())),
                   "folds": folds, "overall": overall, "ci95": ci,
                   "mean_over_folds": {m: float(np.nanmean([f[m] for f in folds])) for m in overall}}
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["slide", "patient", "label", "fold", *[f"p_{cl}" for cl in classes]])
        for r, f, p in zip(rows, fold_of, probs):
            w.writerow([r.slide, r.patient, r.label, int(f), *[round(float(v), 6) for v in p]])
        write_text_atomic(out / "oof.csv", buf.getvalue())
        best = min(folds, key=lambda f: f["val_loss"])["fold"]
        ckpt = out / "checkpoint.pt"
        best_model, _ = load_mil_checkpoint(out / f"fold_{best}.pt")
        save_mil_checkpoint(ckpt, best_model, {**mil_desc, "fold": best})
        write_text_atomic(out / "done.json", json.dumps({"trainer": self.name, "epochs": c.epochs,
                                                         "checkpoint": ckpt.name, "best_fold": best}, indent=2))
        if progress:
            print(f"mil {c.arch}: AUC {overall['auc']:.3f} (95% CI {ci.get('auc', [float('nan')] * 2)[0]:.3f}-"
                  f"{ci.get('auc', [float('nan')] * 2)[1]:.3f}), balanced accuracy "
                  f"{overall['balanced_accuracy']:.3f}, kappa {overall['kappa']:.3f}", flush=True)
        return ckpt

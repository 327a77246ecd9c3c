"""The scribble pre-training claim tested the papers' way (issue 34): ``scribble_transfer.py --protocol paper``.

    python benchmarks/scribble_transfer.py --protocol paper [--quick] [--seeds 0 1 ...] --json OUT.json

Pre-training (once per arm, on the same 15 MoNuSeg images, the same steps, crops and optimiser):

* ``random``: none (the downstream network starts from random weights);
* ``class``: ResNet-34 + pooled linear head, multi-label BCE on the images' organ labels (index.csv);
* ``scribble``: ResNet-34 + a DeepLab-v3+-style head (ASPP on the last stage, stride-4 low-level
  features), partial cross-entropy on scribbles made from the instance masks
  (``slidekit.annotations.scribbles.generate_scribbles``);
* ``full``: the same segmenter on the whole nuclei masks;
* ``simclr``: the encoder + SimCLR projection head, NT-Xent on two histology-augmented views
  (``trainers.simclr_core``) of a (crop/0.5)² window: crops of 50-100 % of it, light colour jitter,
  no blur, one forward over both views (the trainer's heavy recipe left batch 8 at its chance loss).

Every arm: SGD (momentum 0.9), polynomial decay (power 0.9), random crops with rescaling
0.5-1.5 and flips, as the papers (scaled down: ``--pretrain-steps``, ``--crop``). The loss
curve of each arm is recorded with its convergence check (``plateau``); pre-training saves its
state every ``CHECKPOINT_EVERY`` steps in ``--work`` and resumes from it.

Downstream, per seed: the LUAD/LUSC training tiles are split once (fixed seed) into a pool and a
validation set (stratified, ``--val-fraction``); the seed draws R % of the pool (stratified, at
least one tile per class) and orders the fine-tuning batches and the new head's init. The whole
network (encoder copied from the arm, as ``--init`` does, + new linear head) is fine-tuned with
Adam 1e-4, the learning rate decayed by 0.94 per epoch, flips and 90-degree rotations; the
epoch kept is the one with the best validation accuracy (ties: lower validation loss), so no
choice ever looks at the test tiles, which are scored once at the end (accuracy, macro-F1).

BatchNorm statistics: ``--init`` (``slidekit.models.weights.init_from`` -> ``transfer_encoder``)
copies the encoder's whole state dict, running means and variances included, so the source
statistics are **kept** (``--init-bn keep``, the default; fine-tuning in train mode then updates
them with momentum 0.1). The variant ``<arm>_bnre`` (R = 20 %, arms in ``BN_ARMS``) re-estimates
them on the fine-tuning tiles before fine-tuning, as ``--init-bn reestimate`` does.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.seeds import mean_sd, summarise  # noqa: E402
from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason  # noqa: E402
from slidekit.base.io import write_text_atomic  # noqa: E402
from slidekit.base.resources import available_cpus  # noqa: E402

ARMS = ("random", "class", "scribble", "full", "simclr")
PRETRAINED = ("class", "scribble", "full", "simclr")
SPATIAL = ("scribble", "full")
RATIOS = (5, 20, 100)
BN_ARMS = ("scribble", "class", "random")  # arms whose R = 20 % cell is also run with BN statistics re-estimated
BN_RATIO = 20
MONUSEG_MPP = 0.25
TILE_MPP = 0.5  # assumed pixel size of the LUAD/LUSC archive's 256 px tiles (as benchmarks/simclr_linear.py)
CHECKPOINT_EVERY = 100  # pre-training saves its whole state this often (a killed run resumes)
PLATEAU_WINDOW, PLATEAU_TOL = 0.1, 0.02  # converged: the last 10 % of steps gain < 2 % over the 10 % before
SPLIT_SEED = 34  # the pool/validation split of the training tiles never changes with --seed
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # slidekit's input normalisation (ModelSpec)


@dataclass(frozen=True)
class PaperSize:
    """The sizes of one run (``--quick`` shrinks them to a smoke test)."""

    backbone: str = "resnet34"
    source_mpp: float = 1.0      # MoNuSeg seen at this µm/px before the 0.5-1.5 rescaling
    crop: int = 64               # pre-training crop (px)
    pretrain_steps: int = 600    # 3x the first run; the curves flatten by then (PLATEAU_*; docs/trainers/scribble.md)
    pretrain_batch: int = 8
    pretrain_lr: float = 0.01
    scribble_fraction: float = 0.5
    # SimCLR's views (issue 34: with the trainer's heavy recipe - hue 0.4, blur, crops from 11 % of the
    # window - batch 8 never left the chance loss; these make the two views share enough to learn from)
    simclr_jitter: str = "light"
    simclr_min_crop: float = 0.5
    simclr_blur: float = 0.0
    tile_size: int = 64          # the tiles' side at the network (256 px at 0.5 µm/px -> 2 µm/px)
    ft_crop: int = 48            # fine-tuning crops of the tiles (validation and test: whole tiles)
    ft_epochs: int = 8
    ft_batch: int = 16
    ft_min_batches: int = 2      # an epoch of a tiny R % subset still takes this many batches
    ft_lr: float = 1e-4
    ft_decay: float = 0.94
    val_fraction: float = 0.2
    max_tiles_per_class: int = 0  # 0: all; --quick caps train pool, validation and test per class
    max_source_images: int = 0    # 0: all 15; --quick reads fewer MoNuSeg images


# a smoke run: ResNet-18, 3 pre-training steps, one fine-tuning batch per cell, few images and tiles
QUICK = dict(backbone="resnet18", pretrain_steps=3, pretrain_batch=2, ft_epochs=1, ft_batch=4, ft_min_batches=1,
             tile_size=64, max_tiles_per_class=6, max_source_images=4)


# ----------------------------------------------------------------------------------------- data

def load_source(monuseg: Path, size: PaperSize, seed: int = 0) -> dict:
    """MoNuSeg images at ``size.source_mpp`` with full masks, scribbles and organ labels."""
    import csv

    from slidekit.annotations.scribbles import generate_scribbles
    from slidekit.data.datasets import list_images, load_image_folder

    names = list_images(monuseg / "images")
    if size.max_source_images:
        names = names[:size.max_source_images]
    with open(monuseg / "index.csv", newline="") as f:
        organ_of = {r["name"]: r["organ"].split(" ")[0] for r in csv.DictReader(f)}
    missing = [n for n in names if n not in organ_of]
    if missing:
        raise SystemExit(f"scribble_transfer: {monuseg / 'index.csv'} has no organ for {missing[:3]}")
    _, imgs, insts = load_image_folder(monuseg, masks="masks_instance", names=names,
                                       scale=MONUSEG_MPP / size.source_mpp, mask_kind="instances")
    assert insts is not None
    organs = sorted(set(organ_of[n] for n in names))
    full = [(m > 0).astype(np.uint8) for m in insts]
    scrib = [generate_scribbles(m, size.scribble_fraction, seed=seed * 100003 + i) for i, m in enumerate(insts)]
    return {"names": names, "images": imgs, "full": full, "scribble": scrib,
            "organ": [organs.index(organ_of[n]) for n in names], "organs": organs,
            "labelled_fraction_scribble": float(np.mean([(s != 255).mean() for s in scrib]))}


def source_labels(monuseg: Path, size: PaperSize) -> tuple[int, list[str]]:
    """The number of source images and their organ classes (index.csv; no pixels read)."""
    import csv

    from slidekit.data.datasets import list_images

    names = list_images(monuseg / "images")
    names = names[:size.max_source_images] if size.max_source_images else names
    with open(monuseg / "index.csv", newline="") as f:
        organ_of = {r["name"]: r["organ"].split(" ")[0] for r in csv.DictReader(f)}
    return len(names), sorted({organ_of[n] for n in names})


def load_tiles(tiles: Path, size: PaperSize) -> dict:
    """LUAD/LUSC tiles resized to ``size.tile_size``; the fixed pool/validation split of the training tiles."""
    import cv2

    from benchmarks.simclr_linear import load_split, read_tiles

    zpath, rows = load_split(tiles)
    classes = sorted({r["label"] for r in rows})
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list] = {"pool": [], "val": [], "test": []}
    for c in classes:
        train = [r for r in rows if r["split"] == "train" and r["label"] == c]
        test = [r for r in rows if r["split"] == "test" and r["label"] == c]
        order = rng.permutation(len(train))
        n_val = max(1, round(size.val_fraction * len(train)))
        val, pool = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        if size.max_tiles_per_class:
            k = size.max_tiles_per_class
            val, pool, test = val[:max(1, k // 3)], pool[:k], test[:k]
        parts["pool"] += pool
        parts["val"] += val
        parts["test"] += test
    out: dict = {"classes": classes}
    for key, rs in parts.items():
        ims = read_tiles(zpath, [r["path_in_zip"] for r in rs])
        out[f"{key}_x"] = np.stack([cv2.resize(im, (size.tile_size, size.tile_size), interpolation=cv2.INTER_AREA)
                                    for im in ims])
        out[f"{key}_y"] = np.array([classes.index(r["label"]) for r in rs])
    return out


def subset(labels: np.ndarray, pct: int, seed: int) -> np.ndarray:
    """Indices of a stratified ``pct`` % draw of ``labels`` (at least one per class), seeded."""
    rng = np.random.default_rng([seed, pct, 3401])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(len(idx) * pct / 100))
        keep += rng.choice(idx, size=k, replace=False).tolist()
    return np.sort(np.array(keep))


def to_tensor(x: np.ndarray):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255)
    return (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------- networks

def _conv_bn(cin: int, cout: int, k: int = 1, dilation: int = 1):
    from torch import nn

    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def segmenter(backbone: str, n_out: int, width: int = 128):
    """ResNet encoder + a DeepLab-v3+-style head: ASPP (rates 1, 2, 3 + image pooling) on the last
    stage, fused with projected stride-4 features, logits upsampled to the input."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from slidekit.models.backbones import make_encoder

    class DeepLabLite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = make_encoder(backbone)
            high, low = self.encoder.channels[-1], self.encoder.channels[1]
            self.aspp = nn.ModuleList([_conv_bn(high, width, 1)] + [_conv_bn(high, width, 3, r) for r in (1, 2, 3)])
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high, width, 1), nn.ReLU(inplace=True))
            self.project = _conv_bn(5 * width, width, 1)
            self.low = _conv_bn(low, 48, 1)
            self.fuse = nn.Sequential(_conv_bn(width + 48, width, 3), nn.Conv2d(width, n_out, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = self.encoder(x)
            hi, lo = feats[-1], feats[1]
            branches = [b(hi) for b in self.aspp] + [self.pool(hi).expand(-1, -1, *hi.shape[-2:])]
            y = self.project(torch.cat(branches, 1))
            y = F.interpolate(y, size=lo.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse(torch.cat([y, self.low(lo)], 1))
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return DeepLabLite()


def contrastive(backbone: str):
    """Encoder + SimCLR projection head (``trainers.simclr_core.ProjectionHead``)."""
    from torch import nn

    from slidekit.models.networks import ResNetClassifier
    from trainers.simclr_core import ProjectionHead

    class SimCLRNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = ResNetClassifier(backbone, 0)
            self.encoder, self.pooled = base.encoder, base.features
            self.head = ProjectionHead(self.encoder.out_features)

        def forward(self, x):
            return self.head(self.pooled(x))

    return SimCLRNet()


# ---------------------------------------------------------------------------------------- pre-training

def sample_crops(src: dict, arm: str, size: PaperSize, rng: np.random.Generator):
    """A batch of rescaled (0.5-1.5), flipped crops and their labels for ``arm``."""
    import cv2
    import torch

    xs, ys = [], []
    for _ in range(size.pretrain_batch):
        i = int(rng.integers(len(src["images"])))
        img = src["images"][i]
        s = float(rng.uniform(0.5, 1.5))
        win = min(round(size.crop / s), *img.shape[:2])
        y0, x0 = int(rng.integers(img.shape[0] - win + 1)), int(rng.integers(img.shape[1] - win + 1))
        im = cv2.resize(img[y0:y0 + win, x0:x0 + win], (size.crop, size.crop), interpolation=cv2.INTER_LINEAR)
        lab = src[arm][i][y0:y0 + win, x0:x0 + win] if arm in SPATIAL else None
        if lab is not None:
            lab = cv2.resize(lab, (size.crop, size.crop), interpolation=cv2.INTER_NEAREST)
        for axis in (0, 1):
            if rng.random() < 0.5:
                im = np.flip(im, axis)
                lab = np.flip(lab, axis) if lab is not None else None
        xs.append(np.ascontiguousarray(im))
        ys.append(np.ascontiguousarray(lab) if lab is not None else src["organ"][i])
    x = to_tensor(np.stack(xs))
    if arm in SPATIAL:
        return x, torch.from_numpy(np.stack(ys)).long()
    return x, torch.tensor(ys)


def simclr_views(src: dict, size: PaperSize, rng: np.random.Generator, aug, gen):
    """Two augmented views of ``pretrain_batch`` crop windows of the largest pre-training size."""
    import torch

    win = round(size.crop / 0.5)
    crops = []
    for _ in range(size.pretrain_batch):
        img = src["images"][int(rng.integers(len(src["images"])))]
        w = min(win, *img.shape[:2])
        y0, x0 = int(rng.integers(img.shape[0] - w + 1)), int(rng.integers(img.shape[1] - w + 1))
        crops.append(torch.from_numpy(np.ascontiguousarray(img[y0:y0 + w, x0:x0 + w])).permute(2, 0, 1))
    return aug.views(crops, gen), aug.views(crops, gen)


def pretrain(arm: str, src: dict, size: PaperSize, seed: int = 0, log_every: int = 0,
             resume: Path | None = None) -> tuple[dict, dict]:
    """Pre-train ``arm``; its encoder state dict and a record (loss curve, plateau check, seconds).

    With ``resume``, the whole state (network, optimiser, schedule, random streams, losses) is saved
    there every ``CHECKPOINT_EVERY`` steps, and a run that finds a checkpoint of the same settings
    continues from it (the same steps as an uninterrupted run)."""
    import torch
    import torch.nn.functional as F

    from slidekit.models.networks import ResNetClassifier
    from trainers.scribble import partial_cross_entropy
    from trainers.simclr_core import AugmentConfig, histology_augment, nt_xent

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, ARMS.index(arm), 3402])
    gen = None
    if arm in SPATIAL:
        net = segmenter(size.backbone, 2)
    elif arm == "class":
        net = ResNetClassifier(size.backbone, len(src["organs"]))
    else:
        net = contrastive(size.backbone)
        # the views are crops of simclr_min_crop..100 % of a (crop/0.5)^2 window, resized to crop
        aug = histology_augment(AugmentConfig(size=size.crop, min_crop=size.simclr_min_crop, max_crop=1.0,
                                              jitter=size.simclr_jitter, blur_p=size.simclr_blur,
                                              mean=MEAN, std=STD))
        gen = torch.Generator().manual_seed(seed)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=size.pretrain_lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 - t / size.pretrain_steps) ** 0.9)
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    spent = {"seconds": 0.0, "cpu_seconds": 0.0}  # of the earlier runs a resumed pre-training continues
    start = 0
    if resume is not None and resume.is_file():
        ck = torch.load(resume, weights_only=False)
        if _same_settings(ck.get("settings"), size, PRETRAIN_FIELDS):
            net.load_state_dict(ck["net"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            rng.bit_generator.state = ck["rng"]
            torch.set_rng_state(ck["torch_rng"])
            if gen is not None:
                gen.set_state(ck["gen"])
            losses, start, spent = ck["losses"], ck["step"], ck["spent"]
            print(f"[pretrain {arm}] resumed at step {start}", flush=True)

    def save(step: int) -> None:
        if resume is None:
            return
        tmp = resume.with_suffix(".tmp")
        torch.save({"settings": _settings_key(size), "net": net.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "gen": gen.get_state() if gen is not None else None,
                    "losses": losses, "step": step,
                    "spent": {"seconds": spent["seconds"] + time.perf_counter() - t0,
                              "cpu_seconds": spent["cpu_seconds"] + time.process_time() - c0}}, tmp)
        os.replace(tmp, resume)

    for step in range(start, size.pretrain_steps):
        if arm == "simclr":
            v1, v2 = simclr_views(src, size, rng, aug, gen)
            z = net(torch.cat([v1, v2]))  # one forward, BatchNorm over both views (as trainers/simclr.py)
            loss = nt_xent(z[:len(v1)], z[len(v1):])
        else:
            x, y = sample_crops(src, arm, size, rng)
            if arm == "class":
                loss = F.binary_cross_entropy_with_logits(net(x), F.one_hot(y, len(src["organs"])).float())
            else:
                loss = partial_cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[pretrain {arm}] step {step + 1}/{size.pretrain_steps} loss "
                  f"{np.mean(losses[-log_every:]):.4f}", flush=True)
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < size.pretrain_steps:
            save(step + 1)
    n_pts = min(40, len(losses))
    chunks = np.array_split(np.array(losses), n_pts)
    curve = {"step": [int(sum(len(c) for c in chunks[:i + 1])) for i in range(n_pts)],
             "loss": [round(float(c.mean()), 5) for c in chunks]}
    record = {"curve": curve, "seconds": round(spent["seconds"] + time.perf_counter() - t0, 1),
              "cpu_seconds": round(spent["cpu_seconds"] + time.process_time() - c0, 1),
              "steps": size.pretrain_steps, "plateau": plateau(losses)}
    if arm == "simclr":
        record["chance_loss"] = round(math.log(2 * size.pretrain_batch - 1), 5)
    return copy.deepcopy(net.encoder.state_dict()), record


def plateau(losses: list[float], window: float = PLATEAU_WINDOW, tol: float = PLATEAU_TOL) -> dict:
    """The convergence check of a pre-training loss curve.

    The loss smoothed over windows of ``window`` of the steps: the relative fall of the last
    window's mean below the previous window's (``last_gain``) and below the mean of the window a
    quarter of the run earlier (``quarter_gain``). ``converged``: ``last_gain < tol``. ``first_step``:
    the first step from which every later window gained less than ``tol`` over the one before.
    """
    x = np.asarray(losses, dtype=float)
    w = max(1, int(round(window * len(x))))
    if len(x) < 2 * w:
        return {"window_steps": w, "last_gain": None, "quarter_gain": None, "converged": False, "first_step": None}
    means = np.array([x[i:i + w].mean() for i in range(0, len(x) - w + 1, w)])  # non-overlapping windows
    gains = (means[:-1] - means[1:]) / np.abs(means[:-1])
    q = max(1, int(round(0.25 * len(x) / w)))
    quarter = float((means[-1 - q] - means[-1]) / abs(means[-1 - q])) if len(means) > q else None
    ok = gains < tol
    first = None
    for i in range(len(ok)):
        if ok[i:].all():
            first = int((i + 2) * w)
            break
    return {"window_steps": w, "tol": tol, "smoothed": [round(float(m), 5) for m in means],
            "last_gain": round(float(gains[-1]), 4), "quarter_gain": None if quarter is None else round(quarter, 4),
            "converged": bool(gains[-1] < tol), "first_step": first}


# ---------------------------------------------------------------------------------------- fine-tuning

def reestimate_bn(model, x) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x`` (a plain average, no gradients)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            if len(x[i:i + 32]) > 1:
                model(x[i:i + 32])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def _evaluate(model, x, y) -> tuple[np.ndarray, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])
    model.train()
    return logits.argmax(1).numpy(), float(F.cross_entropy(logits, torch.from_numpy(y)))


def fine_tune(encoder_state: dict | None, tiles: dict, pct: int, seed: int, size: PaperSize,
              bn_reestimate: bool = False) -> dict:
    """Fine-tune the whole network on ``pct`` % of the pool; test scores at the best validation epoch."""
    import torch
    import torch.nn.functional as F

    from slidekit.models.checkpoint import transfer_encoder
    from slidekit.models.networks import ResNetClassifier
    from slidekit.slidelevel.linear_eval import scores

    idx = subset(tiles["pool_y"], pct, seed)
    x_tr, y_tr = tiles["pool_x"][idx], torch.from_numpy(tiles["pool_y"][idx])
    torch.manual_seed(seed)
    model = ResNetClassifier(size.backbone, len(tiles["classes"]))
    if encoder_state is not None:
        src = ResNetClassifier(size.backbone, 0)
        src.encoder.load_state_dict(encoder_state)
        transfer_encoder(src, model)  # what --init does: the whole encoder state, BN statistics included
    if bn_reestimate:
        reestimate_bn(model, to_tensor(x_tr))
    model.train()
    x_val, x_test = to_tensor(tiles["val_x"]), to_tensor(tiles["test_x"])
    opt = torch.optim.Adam(model.parameters(), lr=size.ft_lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=size.ft_decay)
    rng = np.random.default_rng([seed, pct, 3403])
    n = len(idx)
    per_epoch = max(n, size.ft_min_batches * size.ft_batch)
    best: tuple = (-1.0, math.inf)
    best_state, best_epoch, val_curve = None, 0, []
    for epoch in range(size.ft_epochs):
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(per_epoch / n))])[:per_epoch]
        for i in range(0, per_epoch, size.ft_batch):
            b = order[i:i + size.ft_batch]
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            ims = []
            for j in b:
                im = x_tr[j]
                y0, x0 = (int(rng.integers(s - size.ft_crop + 1)) for s in im.shape[:2])
                im = np.rot90(im[y0:y0 + size.ft_crop, x0:x0 + size.ft_crop], int(rng.integers(4)))
                ims.append(np.flip(im, 1) if rng.random() < 0.5 else im)
            loss = F.cross_entropy(model(to_tensor(np.stack(ims))), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        pred, val_loss = _evaluate(model, x_val, tiles["val_y"])
        val_acc = float((pred == tiles["val_y"]).mean())
        val_curve.append(round(val_acc, 4))
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch = (val_acc, val_loss), epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    pred, _ = _evaluate(model, x_test, tiles["test_y"])
    s = scores(tiles["test_y"].tolist(), pred.tolist())
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "epoch": best_epoch, "val_accuracy": best[0],
            "val_curve": val_curve, "n_train": n}


# ---------------------------------------------------------------------------------------- driver

def metric_names() -> list[str]:
    """The per-seed metrics summarised over seeds (the fixed key names outside checks read)."""
    cells = [f"{a}_r{p}" for a in ARMS for p in RATIOS] + [f"{a}_bnre_r{BN_RATIO}" for a in BN_ARMS]
    return [f"accuracy_{c}" for c in cells] + [f"macro_f1_{c}" for c in cells]


def pairs() -> dict[str, tuple[str, str]]:
    """Paired differences by seed: each spatial arm against class labels and random init, per R."""
    out = {}
    for p in RATIOS:
        for sp in SPATIAL:
            for other in ("class", "random"):
                out[f"{sp}_vs_{other}_r{p}"] = (f"accuracy_{sp}_r{p}", f"accuracy_{other}_r{p}")
        out[f"scribble_vs_full_r{p}"] = (f"accuracy_scribble_r{p}", f"accuracy_full_r{p}")
        out[f"simclr_vs_random_r{p}"] = (f"accuracy_simclr_r{p}", f"accuracy_random_r{p}")
    for a in BN_ARMS:
        out[f"{a}_bnre_vs_kept_r{BN_RATIO}"] = (f"accuracy_{a}_bnre_r{BN_RATIO}", f"accuracy_{a}_r{BN_RATIO}")
    return out


PRETRAIN_FIELDS = ("backbone", "source_mpp", "crop", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                   "scribble_fraction", "max_source_images", "simclr_jitter", "simclr_min_crop", "simclr_blur")


def markdown_table(result: dict) -> str:
    """The measured table: accuracy (macro-F1) mean ± sd per arm and R, and the paired differences."""
    def cell(key: str) -> str:
        m, sd = result.get(f"{key}_mean"), result.get(f"{key}_sd")
        return "n/a" if m is None else f"{m:.3f} ± {sd or 0.0:.3f}"

    lines = ["| R | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for p in RATIOS:
        lines.append(f"| {p} % | " + " | ".join(f"{cell(f'accuracy_{a}_r{p}')} ({cell(f'macro_f1_{a}_r{p}')})"
                                            for a in ARMS) + " |")
    lines += ["", "| paired difference (accuracy) | " + " | ".join(f"R = {p} %" for p in RATIOS) + " |",
              "|---" * (len(RATIOS) + 1) + "|"]
    n = len(result.get("seeds", []))
    for name in ("scribble_vs_class", "scribble_vs_random", "full_vs_class", "full_vs_random", "scribble_vs_full",
                 "simclr_vs_random"):
        row = []
        for p in RATIOS:
            k = f"diff_{name}_r{p}"
            m = result.get(f"{k}_mean")
            row.append("n/a" if m is None else
                       f"{m:+.3f} ± {result.get(f'{k}_sd') or 0.0:.3f} ({result[f'{k}_wins']}/{n} ≥ 0)")
        lines.append(f"| {name.replace('_vs_', ' − ')} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _settings_key(size: PaperSize) -> str:
    return json.dumps(asdict(size), sort_keys=True)


def _same_settings(stored: str | None, size: PaperSize, fields: tuple[str, ...] | None = None) -> bool:
    """Whether cached settings (a ``_settings_key``) match ``size`` on ``fields`` (default: all); a
    field the cache predates counts as its default."""
    if not stored:
        return False
    old, defaults = json.loads(stored), asdict(PaperSize())
    return all(old.get(k, defaults[k]) == getattr(size, k) for k in (fields or tuple(defaults)))


def get_encoders(arms: tuple[str, ...], source: Callable[[], dict], size: PaperSize, work: Path | None,
                 log_every: int) -> tuple:
    """Pre-trained encoders (cached in ``work`` when given: ``pretrain_<arm>.pt`` + ``.json``)."""
    import torch

    states, records = {}, {}
    for arm in arms:
        pt, js = (work / f"pretrain_{arm}.pt", work / f"pretrain_{arm}.json") if work else (None, None)
        if pt is not None and js is not None and pt.is_file() and js.is_file():
            rec = json.loads(js.read_text())
            if not _same_settings(rec.get("settings"), size, PRETRAIN_FIELDS):
                raise SystemExit(f"scribble_transfer: {js} was pre-trained with other settings; use another --work")
            states[arm], records[arm] = torch.load(pt, weights_only=True), rec
            continue
        print(f"[paper] pre-training {arm} ({size.pretrain_steps} steps)", flush=True)
        states[arm], records[arm] = pretrain(arm, source(), size, log_every=log_every,
                                             resume=work / f"pretrain_{arm}.ckpt" if work else None)
        records[arm]["settings"] = _settings_key(size)
        if pt is not None and js is not None:
            torch.save(states[arm], pt)
            write_text_atomic(js, json.dumps(records[arm]) + "\n")
            (work / f"pretrain_{arm}.ckpt").unlink(missing_ok=True)  # type: ignore[operator]
    return states, records


def run_arm(seed: int, arm: str, state: dict | None, tiles: dict, size: PaperSize, work: Path | None) -> dict:
    """Every R cell of one arm (and its BN variant) for one seed (cached as ``work/seed<S>_<arm>.json``)."""
    path = work / f"seed{seed}_{arm}.json" if work else None
    res: dict = {"settings": _settings_key(size)}
    # the random arm's fine-tuning does not depend on the pre-training: its cache ignores those settings
    fields = tuple(f for f in asdict(size) if f == "backbone" or f not in PRETRAIN_FIELDS) if arm == "random" else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if _same_settings(cached.get("settings"), size, fields):
            if arm not in BN_ARMS or f"accuracy_{arm}_bnre_r{BN_RATIO}" in cached:
                return cached
            res = cached  # a result from before the arm had a BN variant: add the variant only
    c0 = time.process_time()
    for p in RATIOS if f"accuracy_{arm}_r{RATIOS[0]}" not in res else ():
        r = fine_tune(state, tiles, p, seed, size)
        res[f"accuracy_{arm}_r{p}"], res[f"macro_f1_{arm}_r{p}"] = r["accuracy"], r["macro_f1"]
        res[f"epoch_{arm}_r{p}"], res[f"val_accuracy_{arm}_r{p}"] = r["epoch"], r["val_accuracy"]
        res[f"n_train_r{p}"] = r["n_train"]
        print(f"[paper] seed {seed} {arm} R={p}%: acc {r['accuracy']:.3f} f1 {r['macro_f1']:.3f} "
              f"(epoch {r['epoch']}, val {r['val_accuracy']:.3f})", flush=True)
    if arm in BN_ARMS:
        r = fine_tune(state, tiles, BN_RATIO, seed, size, bn_reestimate=True)
        res[f"accuracy_{arm}_bnre_r{BN_RATIO}"] = r["accuracy"]
        res[f"macro_f1_{arm}_bnre_r{BN_RATIO}"] = r["macro_f1"]
        res[f"epoch_{arm}_bnre_r{BN_RATIO}"] = r["epoch"]
    res[f"finetune_cpu_seconds_{arm}"] = round(res.get(f"finetune_cpu_seconds_{arm}", 0.0)
                                               + time.process_time() - c0, 1)
    if path is not None:
        write_text_atomic(path, json.dumps(res) + "\n")
    return res


def run_seed(seed: int, arms: tuple[str, ...], states: dict, tiles: dict, size: PaperSize,
             work: Path | None) -> dict:
    """The cells of ``arms`` for one seed, merged into one result."""
    res: dict = {"seed": seed}
    for arm in arms:
        res.update(run_arm(seed, arm, states.get(arm), tiles, size, work))
    res.pop("settings", None)
    res["finetune_cpu_seconds"] = round(sum(res.get(f"finetune_cpu_seconds_{a}", 0.0) for a in arms), 1)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="scribble_transfer --protocol paper: " + __doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=["paper"], default="paper")
    add_data_argument(ap)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: ResNet-18, 3 pre-training steps, 1 epoch, few tiles")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                    help="downstream seeds (R %% subset, batch order, head init); default 0..9 (--quick: 0)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None,
                    help="cache pre-trained encoders and per-seed results here (reruns and parallel runs reuse them)")
    ap.add_argument("--pretrain-only", nargs="+", choices=PRETRAINED, default=None, metavar="ARM",
                    help="pre-train (and cache in --work) only these arms, then stop")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=None, metavar="ARM",
                    help="fine-tune only these arms (cached in --work), then stop; the summary needs every arm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    for f in ("pretrain_steps", "pretrain_batch", "pretrain_lr", "crop", "tile_size", "ft_crop", "ft_epochs",
              "ft_batch"):
        ap.add_argument("--" + f.replace("_", "-"), type=type(getattr(PaperSize, f)), default=None)
    args = ap.parse_args(argv)
    reason = data_missing_reason(args.data)
    if reason is not None:
        ap.error(reason)
    shared = data_dir(args.data)
    monuseg, tiles_dir = shared / "nuclei_monuseg", shared / "patches_tcga_luadlusc_uni"
    for need in (monuseg / "images", monuseg / "index.csv", tiles_dir / "labels.csv"):
        if not need.exists():
            ap.error(f"scribble_transfer: {need} not found (the real-data folder needs nuclei_monuseg/ and "
                     "patches_tcga_luadlusc_uni/)")
    if (args.pretrain_only or args.arms) and args.work is None:
        ap.error("--pretrain-only and --arms need --work (where the encoders and results are kept)")
    import torch

    torch.set_num_threads(args.threads)
    over = {k: v for k, v in vars(args).items() if k in PaperSize.__dataclass_fields__ and v is not None}
    size = PaperSize(**{**(QUICK if args.quick else {}), **over})
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(range(10)))
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seeds: each seed once (got {seeds})")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    c0, t0 = time.process_time(), time.perf_counter()
    loaded: dict = {}

    def source() -> dict:  # read (and scribbled) once, and only when an arm must be pre-trained
        if not loaded:
            loaded.update(load_source(monuseg, size))
        return loaded

    arms = tuple(args.pretrain_only) if args.pretrain_only else PRETRAINED
    if args.arms:
        arms = tuple(a for a in args.arms if a in PRETRAINED)
    states, records = get_encoders(arms, source, size, args.work, args.log_every)
    if args.pretrain_only:
        return {"pretrained": list(arms)}
    tiles = load_tiles(tiles_dir, size)
    if args.arms:
        for s in seeds:
            run_seed(s, tuple(args.arms), states, tiles, size, args.work)
        return {"fine_tuned": list(args.arms), "seeds": seeds}
    runs = [run_seed(s, ARMS, states, tiles, size, args.work) for s in seeds]
    out = summarise(runs, seeds, metric_names(), pairs=pairs())
    n_source, organs = source_labels(monuseg, size)
    if loaded:
        out["scribble_labelled_pixel_fraction"] = round(loaded["labelled_fraction_scribble"], 4)
    out.pop("settings", None)
    for r in out["runs"]:
        r.pop("settings", None)
    for m in metric_names():  # one seed: an sd of 0.0 rather than None keeps every key a number
        if out.get(f"{m}_sd") is None:
            out[f"{m}_sd"] = 0.0
    pre_cpu = sum(r["cpu_seconds"] for r in records.values())
    ft_cpu = sum(r["finetune_cpu_seconds"] for r in runs)
    out.update({
        "protocol": "paper", "quick": bool(args.quick), "seeds": seeds, "n_seeds": len(seeds),
        "size": asdict(size), "pretrain_steps": size.pretrain_steps, "pretrain_crop_px": size.crop,
        "tile_px": size.tile_size, "finetune_crop_px": size.ft_crop,
        "pretrain_curves": {a: records[a]["curve"] for a in PRETRAINED},
        "pretrain_plateau": {a: records[a].get("plateau") for a in PRETRAINED},
        "pretrain_plateau_rule": (f"loss averaged over windows of {PLATEAU_WINDOW:.0%} of the steps; converged: "
                                  f"the last window is less than {PLATEAU_TOL:.0%} below the one before"),
        "simclr_chance_loss": round(math.log(2 * size.pretrain_batch - 1), 5),
        "pretrain_cpu_seconds": {a: records[a]["cpu_seconds"] for a in PRETRAINED},
        "pretrain_seconds": {a: records[a]["seconds"] for a in PRETRAINED},
        "cpu_seconds_pretrain": round(pre_cpu, 1), "cpu_seconds_finetune": round(ft_cpu, 1),
        "cpu_seconds_total": round(pre_cpu + ft_cpu, 1),
        "cpu_seconds_this_call": round(time.process_time() - c0, 1),
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
        "n_pool": int(len(tiles["pool_y"])), "n_val": int(len(tiles["val_y"])), "n_test": int(len(tiles["test_y"])),
        "n_source_images": n_source, "source_organs": organs,
        "source_mpp": size.source_mpp, "tile_mpp": TILE_MPP * 256 / size.tile_size,
        "bn_transfer": ("kept: --init copies the encoder's running BatchNorm statistics with its weights; "
                        f"<arm>_bnre_r{BN_RATIO} re-estimates them on the fine-tuning tiles first"),
        "selection": "epoch chosen per run by validation accuracy (ties: validation loss); test scored once",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": available_cpus(), "torch_threads": args.threads,
    })
    mean_epoch = mean_sd([r[f"epoch_{a}_r{p}"] for r in runs for a in ARMS for p in RATIOS])[0]
    out["mean_selected_epoch"] = round(mean_epoch or 0.0, 2)
    text = json.dumps(out, indent=1)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    print(markdown_table(out))
    return out


if __name__ == "__main__":
    main()

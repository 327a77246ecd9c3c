"""Mixed-supervision EM (Li et al.): a patch segmenter from a few pixel masks plus many slide labels.

Round 0 trains the segmenter on the pixel-labelled slides (optionally from an ``init`` encoder,
e.g. SimCLR). Every later round ``r``:

- **E-step**: the round ``r-1`` model's heatmap of every slide-labelled slide gives each tissue
  patch a probability map ``p``. Patches whose maximum ``p`` is below ``threshold`` (T = 0.4) are
  dropped. In positive slides a kept patch gets the soft pseudo-label ``min(scale * p, 1)``
  (V = 4), values below ``floor`` (0.01) set to 0; in negative slides a kept patch is a hard
  negative with an all-zero label. Pseudo-labels live on disk (zarr), never all in RAM.
  Options beyond the paper (off by default): ``pseudo_top_k`` keeps only each positive slide's
  k best patches as positive pseudo-labels, ``positive_negatives`` makes positive-slide patches
  far below T hard negatives too, ``min_hard_negatives`` tops the hard negatives up.
- **M-step**: the model keeps training from its previous weights with soft-label binary
  cross-entropy, every batch drawn at the fixed ratio ``ratio`` (2:1:7) between pixel labels,
  positive pseudo-labels and hard negatives (``slidekit.data.sampling.FixedRatioSampler``).

After every round (round 0 included) the model predicts a heatmap of every slide-labelled slide
and the stage-2 classifier (``morph-lgbm``: LightGBM on heatmap morphology) is fitted on them; its
loss is logged. The EM round (>= 1) with the lowest stage-2 loss is selected (the paper's
convergence criterion): ``checkpoint.pt`` and ``morph_lgbm.json`` are that round's, and
``selected.json`` names it (``select_from: 0`` lets round 0 compete). Per-round files are under
``rounds/r<N>/``.

Input: a slide table (``slide,label[,mask]``): rows with a ``mask`` (an image covering the whole
slide, any resolution, > 0 = tumour) are pixel-labelled; the others need a slide label
(negative / itc / micro / macro, or positive / negative).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from slidekit.base import distributed as dist
from slidekit.base.devices import resolve_device
from slidekit.base.errors import ConfigError, LabelError, TrainingWarning
from slidekit.base.io import atomic_path, write_text_atomic
from slidekit.data.sampling import FixedRatioSampler
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.infer.predictor import Predictor
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.networks import build_model
from slidekit.models.spec import MAX_PATCH_SIZE, ModelSpec
from slidekit.regions.masks import Tissue, build_region
from slidekit.regions.options import RunOptions, TissueOptions
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.slidelevel.features import (
    DEFAULT_THRESHOLDS,
    SIZE_CLASSES,
    feature_names,
    features_from_view,
    open_heatmap_view,
    write_table,
)
from slidekit.slides.slide import open_slide
from trainers.base import Trainer, init_encoder, register, run_epochs, seed_everything
from trainers.batches import BatchInputs, StainOptions, check_stain_reference, sample_images
from trainers.config import check_option
from trainers.runs import begin_run
from trainers.stage2 import fit_morph_lgbm, read_slide_table

SOURCES = ("pixel", "pseudo_positive", "hard_negative")


@dataclass
class MixedEMConfig(StainOptions):
    """Options of ``mixed-em`` (paper defaults for T, V, floor and the 2:1:7 ratio)."""

    slides: str = ""
    mpp: float = 0.5
    patch_size: int = 256
    backbone: str = "resnet18"
    min_tissue: float = 0.25
    tissue_mpp: float = 8.0
    slide_mpp: float | None = None
    rounds: int = 3
    init_steps: int = 500
    round_steps: int = 300
    batch_size: int = 20
    ratio: list[float] = field(default_factory=lambda: [2.0, 1.0, 7.0])
    threshold: float = 0.4
    scale: float = 4.0
    floor: float = 0.01
    min_hard_negatives: int = 0  # top up hard negatives with the highest-scoring negative patches (0: paper rule)
    pseudo_top_k: int = 0  # keep only each positive slide's k highest-scoring kept patches as pseudo-labels (0: all)
    positive_negatives: float = 0.0  # positive-slide patches with max prob below this: hard negatives (0: none)
    weight_decay: float = 1e-4
    predict_batch: int = 8
    predict_tile: int = 0       # heatmap tiles (px at ``mpp``); 0: 4 x patch_size (large tiles predict faster)
    predict_overlap: int = 0
    stage2_thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    stage2_work_mpp: float | None = None
    selection: str = "cv_loss"  # stage-2 loss that selects the round: "cv_loss" or "train_loss"
    select_from: int = 1        # first round the selection may keep (0: the pixel-labels-only round 0 may win)

    def validate(self) -> None:
        super().validate()
        check_option(self.rounds >= 0, "rounds", self.rounds, "an integer >= 0")
        check_option(32 <= self.patch_size <= MAX_PATCH_SIZE, "patch_size", self.patch_size,
                     f"an integer 32..{MAX_PATCH_SIZE} (px)")
        for key in ("mpp", "tissue_mpp", "scale"):
            check_option(getattr(self, key) > 0, key, getattr(self, key), "a number > 0")
        check_option(self.slide_mpp is None or self.slide_mpp > 0, "slide_mpp", self.slide_mpp, "> 0 (or unset)")
        for key in ("init_steps", "round_steps", "min_hard_negatives", "predict_tile", "predict_overlap"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        check_option(self.predict_batch >= 1, "predict_batch", self.predict_batch, "an integer >= 1")
        check_option(len(self.ratio) == 3 and min(self.ratio) >= 0 and sum(self.ratio) > 0, "ratio", self.ratio,
                     "three numbers >= 0 (pixel : pseudo-positive : hard-negative), not all 0")
        for key in ("threshold", "floor", "min_tissue"):
            check_option(0 <= getattr(self, key) <= 1, key, getattr(self, key), "in [0, 1]")
        check_option(self.pseudo_top_k >= 0, "pseudo_top_k", self.pseudo_top_k, "an integer >= 0")
        check_option(0 <= self.positive_negatives <= self.threshold, "positive_negatives", self.positive_negatives,
                     "in [0, threshold]")
        check_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check_option(self.selection in ("cv_loss", "train_loss"), "selection", self.selection,
                     "cv_loss or train_loss")
        check_option(self.select_from in (0, 1), "select_from", self.select_from, "0 or 1")


# --------------------------------------------------------------------------------- the E-step

def pseudo_label(prob: np.ndarray, positive: bool, threshold: float = 0.4, scale: float = 4.0,
                 floor: float = 0.01) -> np.ndarray | None:
    """The E-step rule for one patch probability map: None when the patch is dropped (max < T);
    otherwise ``min(V*p, 1)`` with values below ``floor`` set to 0 (positive slide) or all zeros
    (negative slide: a hard negative)."""
    prob = np.asarray(prob, dtype=np.float32)
    if not prob.size or float(np.nanmax(prob)) < threshold:
        return None
    if not positive:
        return np.zeros_like(prob)
    y = np.minimum(prob * scale, 1.0)
    y[y < floor] = 0.0
    return y


@dataclass(frozen=True)
class PseudoLabelRule:
    """The E-step rule of ``pseudo_label`` for one patch probability map.

    Parameters
    ----------
    threshold
        T: a patch whose maximum probability is below it is dropped.
    scale
        V: pseudo-labels are ``min(V*p, 1)``.
    floor
        Pseudo-label values below it are set to 0.
    """

    threshold: float = 0.4
    scale: float = 4.0
    floor: float = 0.01


def e_step(patch_probs: Any, positives: Sequence[bool], out: str | os.PathLike, *,
           rule: PseudoLabelRule | None = None, min_hard_negatives: int = 0, top_k: int = 0,
           positive_negatives: float = 0.0) -> dict[str, np.ndarray]:
    """Apply ``pseudo_label`` to an iterable of ``(key, prob map)`` per slide and store the result.

    ``patch_probs[s]`` yields ``(tile index, (P, P) prob)`` for slide ``s``. Writes the positive
    pseudo-labels to the zarr array ``out`` ((N, P, P) float16, one chunk per patch) and returns
    ``{"positive": (N, 2) [slide, tile], "hard_negative": (M, 2) [slide, tile]}``.

    ``min_hard_negatives`` (0 = the paper's rule only) tops the hard negatives up with the
    highest-scoring remaining patches of negative slides: once a model has learnt to stay below
    T on most negatives, a handful of hard negatives would otherwise fill 7/10 of every batch.

    ``top_k`` (0 = all) keeps only the ``top_k`` kept patches of each positive slide with the
    highest maximum probability as positive pseudo-labels: a small lesion covers a few patches,
    and the rest of what passes T in a positive slide is mostly look-alike tissue (follicles).
    ``positive_negatives`` (0 = off, the paper's rule: negatives from negative slides only) makes
    every patch of a positive slide whose maximum probability is below it a hard negative too.
    ``rule`` (a :class:`PseudoLabelRule`; None: the paper's T, V and floor) is ``pseudo_label``'s.
    """
    rule = rule or PseudoLabelRule()
    threshold, scale, floor = rule.threshold, rule.scale, rule.floor
    out = Path(out)
    pos_rows: list[tuple[int, int]] = []
    neg_rows: list[tuple[int, int]] = []
    spare: list[tuple[float, int, int]] = []  # (max prob, slide, tile) of dropped negative-slide patches
    with atomic_path(out) as tmp:
        arr: Any = None
        pending: list[np.ndarray] = []

        def flush() -> None:
            nonlocal arr
            if not pending:
                return
            if arr is None:
                P = pending[0].shape
                arr = zarr.open_array(str(tmp), mode="w", shape=(0, *P), chunks=(1, *P), dtype="float16")
            n0 = arr.shape[0]
            arr.resize((n0 + len(pending), *arr.shape[1:]))
            arr[n0:] = np.stack(pending).astype(np.float16)
            pending.clear()

        for s, (items, positive) in enumerate(zip(patch_probs, positives)):
            kept: list[tuple[float, int, np.ndarray]] = []  # (max prob, tile, label) of this positive slide
            for tile, prob in items:
                y = pseudo_label(prob, positive, threshold, scale, floor)
                if y is None:
                    top = float(np.max(prob)) if prob.size else 0.0
                    if not positive and min_hard_negatives:
                        spare.append((top, s, int(tile)))
                    elif positive and top < positive_negatives:
                        neg_rows.append((s, int(tile)))
                    continue
                if not positive:
                    neg_rows.append((s, int(tile)))
                    continue
                if top_k:  # ranked once the slide is done (one slide's patches at most in RAM)
                    kept.append((float(np.max(prob)), int(tile), y))
                    continue
                pending.append(y)
                pos_rows.append((s, int(tile)))
                if len(pending) >= 256:  # bounded memory: write in blocks
                    flush()
            if kept:
                kept.sort(key=lambda v: (-v[0], v[1]))
                for _, tile, y in sorted(kept[:top_k], key=lambda v: v[1]):
                    pending.append(y)
                    pos_rows.append((s, tile))
                flush()
        flush()
        if len(neg_rows) < min_hard_negatives and spare:
            spare.sort(key=lambda v: (-v[0], v[1], v[2]))
            neg_rows += [(sl, t) for _, sl, t in spare[:min_hard_negatives - len(neg_rows)]]
        if arr is None:
            zarr.open_array(str(tmp), mode="w", shape=(0, 1, 1), chunks=(1, 1, 1), dtype="float16")
    return {"positive": np.asarray(pos_rows, np.int64).reshape(-1, 2),
            "hard_negative": np.asarray(neg_rows, np.int64).reshape(-1, 2)}


def select_round(losses: Sequence[float], first: int = 1) -> int:
    """Index of the lowest loss among rounds ``first..`` (NaN losses never win); falls back to
    round 0 when there is no later round or no finite loss."""
    cand = [(loss, i) for i, loss in enumerate(losses) if i >= first and loss is not None and math.isfinite(loss)]
    if not cand:
        return 0 if len(losses) <= first else len(losses) - 1
    return min(cand)[1]


# -------------------------------------------------------------------------------- data access

def _read_mask(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        m = np.load(path, allow_pickle=False)
    else:
        import cv2

        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if m is None:
            raise LabelError("cannot read pixel mask image", path)
    if m.ndim == 3:
        m = m.max(axis=2)
    return (m > 0).astype(np.float32)


def mask_patch(mask: np.ndarray, slide_dims: tuple[int, int], xy: tuple[int, int], size0: tuple[float, float],
               out_size: int) -> np.ndarray:
    """The (out_size, out_size) soft label of a level-0 box from a whole-slide mask of any size."""
    import cv2

    mh, mw = mask.shape
    fx, fy = mw / slide_dims[0], mh / slide_dims[1]
    x0, y0 = xy[0] * fx, xy[1] * fy
    x1, y1 = (xy[0] + size0[0]) * fx, (xy[1] + size0[1]) * fy
    # warp the box onto the output grid (exact sub-pixel mapping, zeros outside the mask)
    M = np.array([[(x1 - x0) / out_size, 0, x0], [0, (y1 - y0) / out_size, y0]], np.float64)
    return cv2.warpAffine(mask, M, (out_size, out_size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class PatchTable(torch.utils.data.Dataset):
    """Training patches from several label sources laid end to end (source order = SOURCES).

    Each row is (slide, tile, source, row): tiles are read from the slide, labels come from the
    pixel-label zarr, the pseudo-label zarr, or are all zero (hard negatives). Flips and 90°
    rotations are applied to image and label together.
    """

    def __init__(self, readers: Sequence[Any], rows: np.ndarray, pixel_labels: Any, pseudo_labels: Any,
                 augment: bool = True) -> None:
        self.readers, self.rows = readers, np.asarray(rows, np.int64).reshape(-1, 4)
        self.pixel_labels, self.pseudo_labels, self.augment = pixel_labels, pseudo_labels, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, t, src, r = (int(v) for v in self.rows[i])
        img = self.readers[s].read(t)
        if src == 0:
            lab = np.asarray(self.pixel_labels[r], np.float32)
        elif src == 1:
            lab = np.asarray(self.pseudo_labels[r], np.float32)
        else:
            lab = np.zeros(img.shape[:2], np.float32)
        x, y = torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(lab)
        if self.augment:
            k = int(torch.randint(4, (1,)))
            x, y = torch.rot90(x, k, (0, 1)), torch.rot90(y, k, (0, 1))
            if torch.rand(1) < 0.5:
                x, y = x.flip(1), y.flip(1)
        return x.contiguous(), y.contiguous()


def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def soft_bce_steps(model: torch.nn.Module, inputs: BatchInputs, optimizer: torch.optim.Optimizer,
                   loader: Any) -> float:
    """Run one pass of ``loader`` with soft-label binary cross-entropy; mean loss. ``inputs``
    prepares each batch on the device (stain normalisation/augmentation, ``spec.normalize``)."""
    model.train()
    total, n = 0.0, 0
    for x, y in inputs.batches(loader):
        x, y = inputs(x, y)
        logits = model(x)[:, -1]
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


@dataclass(frozen=True)
class HeatmapTiling:
    """How an E-step heatmap's tiles are laid out (``predict_heatmap``).

    Parameters
    ----------
    tile
        Tile side in pixels at the model's MPP (large tiles: a fully convolutional network
        predicts a 256 px tile much faster than sixteen 64 px ones).
    overlap
        Overlap between neighbouring tiles in pixels (>0: gaussian blending).
    tissue_mpp
        µm/px at which the tissue mask is found.
    min_tissue
        Fraction of a tile that must be tissue for it to be predicted.
    """

    tile: int = 256
    overlap: int = 0
    tissue_mpp: float = 8.0
    min_tissue: float = 0.01


def predict_heatmap(model: torch.nn.Module, spec: Any, slide: Any, store: str | os.PathLike, *,
                    tiling: HeatmapTiling | None = None, run: RunOptions | None = None,
                    attrs: dict | None = None, timer: Any = None) -> Path:
    """Segmenter heatmap of ``slide`` at the model's MPP into the zarr ``store`` (skipped when a
    complete one exists, resumed when a partial one does), zero outside the tissue mask. Large
    tiles: a fully convolutional network predicts a 256 px tile much faster than sixteen 64 px ones.
    The Predictor applies the stain normalisation of ``spec.stain``; its stage seconds are added
    to ``timer`` (a StageTimer) when given. ``tiling``: a :class:`HeatmapTiling` (None: its
    defaults); ``run``: how the Predictor runs (None: batches of 8 on the CPU, no worker processes)."""
    t = tiling or HeatmapTiling()
    tile, overlap, tissue_mpp, min_tissue = t.tile, t.overlap, t.tissue_mpp, t.min_tissue
    run = run or RunOptions(batch_size=8, workers=0, device="cpu")
    store = Path(store)
    if store.exists():
        try:
            Heatmap(store)
            return store
        except Exception:
            pass
    tissue = build_region(Tissue(TissueOptions({"mpp": tissue_mpp})), slide)
    grid = TileGrid.from_slide(slide, mpp=spec.mpp, size=tile, overlap=overlap, mask=tissue, min_tissue=min_tissue)
    w = HeatmapWriter(store, grid, "segmentation", spec.classes, mpp=spec.mpp,
                      blend="gaussian" if overlap else "constant", attrs=attrs)
    todo = w.todo()
    if len(todo):
        was_training = model.training
        pred = Predictor(model, spec, run)
        t_arr = tissue.array.astype(np.float32)
        for idx, y in pred.predict(slide, grid, index=todo):
            # tumour probability is zero off tissue: glass and tile padding otherwise give
            # spurious maxima that swamp isolated tumour cells
            for k, i in enumerate(idx):
                y[k] *= mask_patch(t_arr, grid.slide_dimensions, tuple(grid.coords[i]), grid.extent, y.shape[-1])
            w.add(idx, y)
        model.train(was_training)
        if timer is not None:
            for stage, secs in pred.timer.seconds.items():
                timer.add(stage, secs)
    w.finish()
    return store


# ---------------------------------------------------------------------------------- the trainer

@register
class MixedEMTrainer(Trainer):
    """Mixed-supervision EM: pixel masks + slide labels -> patch segmenter (+ stage-2 model)."""

    name = "mixed-em"
    consumes = frozenset({"pixel_masks", "slide_labels"})
    Config = MixedEMConfig
    length_option = "rounds"  # a rerun with more rounds continues from the last finished round
    rerun_free_options = frozenset({"epochs"})  # not used by mixed-em
    outputs = ("rounds", "grids", "pixel_labels.zarr", "selected.json", "morph_lgbm.json")

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        c = self.config
        if not c.slides:
            raise ConfigError("mixed-em needs 'slides' (a CSV with slide,label[,mask] columns)")
        out = Path(out_dir)
        self.out = out
        # Several ranks (slidekit.base.distributed): rank 0 decides the rerun rule and writes every file; the
        # M-step is DDP over a sharded global batch; round heatmaps are split by slide across ranks.
        self.device = dist.init_from_env(resolve_device(device))
        dist.local_batch_size(c.batch_size)  # the global batch splits evenly over the ranks
        # Checked before anything is cached: grids, pixel labels and pseudo-labels belong to one config.
        if dist.on_main(lambda: begin_run(self, out, c.rounds + 1)) == "finished":
            return dist.on_main(lambda: out / "checkpoint.pt" if (out / "selected.json").exists() else self._select())
        if dist.is_main():
            (out / "selected.json").unlink(missing_ok=True)  # rewritten once the last round is done
        normalizer = check_stain_reference(c)  # before any slide is read
        records = read_slide_table(c.slides)
        self.pixel = [r for r in records if r.mask is not None]
        self.labelled = [r for r in records if r.mask is None]
        if not self.pixel:
            raise LabelError("mixed-em needs at least one slide with a pixel mask", c.slides)
        if c.rounds > 0 and not self.labelled:
            raise LabelError("mixed-em needs slides with slide labels (rows without a mask)", c.slides)
        self.out, self.progress = out, progress and dist.is_main()
        self.gen = seed_everything(c.seed)

        self.spec = ModelSpec(arch="resnet-unet", backbone=c.backbone, task="segmentation", classes=["tumour"],
                              patch_size=c.patch_size, mpp=c.mpp, activation="sigmoid",
                              extra={"trainer": "mixed-em"})
        self.model = build_model(self.spec).to(self.device)
        init_encoder(self.model, c.init)
        self.net = dist.wrap(self.model, self.device, c.sync_batchnorm)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        dist.on_main(self._prepare)  # rank 0 writes the cached grids and pixel labels ...
        if not dist.is_main():
            self._prepare()  # ... which the other ranks then read (each with its own slide handles)
        rows = self.pixel_rows  # RandStainNA: fitted on pixel-labelled patches
        self.inputs = BatchInputs(self.spec, self.device, c, normalizer=normalizer, fit_images=lambda: sample_images(
            lambda i: self.readers[rows[i, 0]].read(rows[i, 1]), len(rows), seed=c.seed))
        run_epochs(self, out, self.model, self.spec, self._round, optimizer=self.opt, epochs=c.rounds + 1,
                   progress=progress, inputs=self.inputs)
        return dist.on_main(self._select)

    # -- preparation: grids, readers, pixel labels (cached on disk) --------------------------
    def _prepare(self) -> None:
        from tqdm.auto import tqdm

        c = self.config
        gdir = self.out / "grids"
        gdir.mkdir(exist_ok=True)
        self.slides, self.grids, self.readers = [], [], []
        for i, r in enumerate(tqdm(self.pixel + self.labelled, desc="tissue grids", unit="slide", leave=False,
                                   disable=not self.progress)):
            slide = open_slide(r.slide, mpp=c.slide_mpp)
            gpath = gdir / f"{i:05d}.npz"
            if gpath.exists():
                grid = TileGrid.load(gpath)
                grid.check_slide(slide)
            else:
                grid = TileGrid.from_slide(slide, mpp=c.mpp, size=c.patch_size, overlap=0,
                                           mask=build_region(Tissue(TissueOptions({"mpp": c.tissue_mpp})), slide),
                                           min_tissue=c.min_tissue)
                grid.save(gpath)
            self.slides.append(slide)
            self.grids.append(grid)
            self.readers.append(TileReader(slide, grid))
        n_pix = len(self.pixel)
        ppath = self.out / "pixel_labels.zarr"
        rows: list[tuple[int, int, int, int]] = []
        for s in range(n_pix):
            rows += [(s, t, 0, len(rows) + k) for k, t in enumerate(range(len(self.grids[s])))]
        self.pixel_rows = np.asarray(rows, np.int64).reshape(-1, 4)
        if not ppath.exists():
            P = c.patch_size
            with atomic_path(ppath) as tmp:
                arr = zarr.open_array(str(tmp), mode="w", shape=(len(rows), P, P), chunks=(1, P, P), dtype="float16")
                j = 0
                for s, r in enumerate(tqdm(self.pixel, desc="pixel labels", unit="slide", leave=False,
                                           disable=not self.progress)):
                    mask, grid = _read_mask(r.mask), self.grids[s]
                    for t in range(len(grid)):
                        arr[j] = mask_patch(mask, grid.slide_dimensions, tuple(grid.coords[t]), grid.extent, P)
                        j += 1
        self.pixel_labels = zarr.open_array(str(ppath), mode="r")

    # -- one round = (E-step + M-step, or initial training) + heatmaps + stage 2 -------------
    def _round(self, r: int) -> dict[str, Any]:
        c = self.config
        t0 = time.time()
        rdir = self.out / "rounds" / f"r{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        sizes = [len(self.pixel_rows), 0, 0]
        if r == 0:
            rows, steps, ratio = self.pixel_rows, c.init_steps, [1.0, 0.0, 0.0]
            pseudo = None
        else:
            found = dist.on_main(lambda: self._e_step(r))  # written once, by rank 0
            pos, neg = found["positive"], found["hard_negative"]
            n_pix = len(self.pixel)
            pos_rows = np.column_stack([pos[:, 0] + n_pix, pos[:, 1], np.full(len(pos), 1), np.arange(len(pos))])
            neg_rows = np.column_stack([neg[:, 0] + n_pix, neg[:, 1], np.full(len(neg), 2), np.zeros(len(neg))])
            rows = np.concatenate([self.pixel_rows, pos_rows.reshape(-1, 4), neg_rows.reshape(-1, 4)]).astype(np.int64)
            sizes = [len(self.pixel_rows), len(pos), len(neg)]
            steps, ratio = c.round_steps, list(c.ratio)
            pseudo = zarr.open_array(str(rdir / "pseudo_labels.zarr"), mode="r")

        ds = PatchTable(self.readers, rows, self.pixel_labels, pseudo)
        sampler = FixedRatioSampler(sizes, ratio, c.batch_size, steps, seed=c.seed * 1000 + r)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=dist.shard(sampler, batches=True),
                                             num_workers=c.num_workers, collate_fn=_collate,
                                             pin_memory=self.device.type == "cuda")
        m_loss = soft_bce_steps(self.net, self.inputs, self.opt, loader) if steps > 0 else None

        dist.sync_buffers(self.model)  # every rank predicts with rank 0's batch-norm statistics
        if dist.is_main():
            with self.inputs.timer.stage("write"):
                save_checkpoint(rdir / "checkpoint.pt", self.model, self.spec, extra={"round": r})
        paths = self._predict_round(r)
        s2 = dist.on_main(lambda: self._stage2(r, rdir, paths))
        return {"round": r, "m_loss": m_loss, "n_pixel": sizes[0], "n_pseudo_positive": sizes[1],
                "n_hard_negative": sizes[2], "stage2_train_loss": s2["train_loss"],
                "stage2_cv_loss": s2["cv_loss"], "stage2_cv_accuracy": s2["cv_accuracy"],
                "stage2_chance_loss": s2.get("chance_loss", math.nan),
                "seconds": time.time() - t0}

    def heatmap_dir(self, r: int, i: int) -> Path:
        """Where round ``r``'s heatmap of slide-labelled slide ``i`` lives."""
        return self.out / "rounds" / f"r{r}" / "heatmaps" / f"{i:05d}"

    def _predict_round(self, r: int) -> list[Path]:
        from tqdm.auto import tqdm

        c = self.config
        paths = []
        n_pix = len(self.pixel)
        world, me = dist.world_size(), dist.rank()
        for i, _ in enumerate(tqdm(self.labelled, desc=f"round {r} heatmaps", unit="slide",
                                   disable=not self.progress, leave=False)):
            store = self.heatmap_dir(r, i) / "heatmap.zarr"
            paths.append(store.parent)
            if i % world != me:  # several ranks: slide i is predicted by rank i % world
                continue
            tiling = HeatmapTiling(tile=c.predict_tile or 4 * c.patch_size, overlap=c.predict_overlap,
                                   tissue_mpp=c.tissue_mpp)
            predict_heatmap(self.model, self.spec, self.slides[n_pix + i], store, tiling=tiling,
                            run=RunOptions(batch_size=c.predict_batch, workers=0, device=str(self.device)),
                            attrs={"round": r}, timer=self.inputs.timer)
        self.model.train()
        dist.barrier()  # every heatmap of the round is written
        return paths

    def _e_step(self, r: int) -> dict[str, np.ndarray]:
        """Pseudo-labels from round r-1's heatmaps (cached: rerunning a round reuses them)."""
        c = self.config
        rdir = self.out / "rounds" / f"r{r}"
        index_path = rdir / "pseudo_index.npz"
        if index_path.exists() and (rdir / "pseudo_labels.zarr").exists():
            with np.load(index_path, allow_pickle=False) as z:
                return {"positive": z["positive"], "hard_negative": z["hard_negative"]}

        def patches(i: int):
            hm = Heatmap(self.heatmap_dir(r - 1, i) / "heatmap.zarr")
            grid, P = self.grids[len(self.pixel) + i], c.patch_size
            (sx, sy), (ox, oy) = hm.scale, hm.origin
            H, W = hm.shape
            for t, (x, y) in enumerate(grid.coords):
                r0, c0 = int(round((y - oy) / sy)), int(round((x - ox) / sx))
                p = np.zeros((P, P), np.float32)
                rr0, cc0 = max(r0, 0), max(c0, 0)
                rr1, cc1 = min(r0 + P, H), min(c0 + P, W)
                if rr1 > rr0 and cc1 > cc0:
                    p[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = hm.prob[-1, rr0:rr1, cc0:cc1]
                yield t, p

        from tqdm.auto import tqdm

        slides = tqdm(range(len(self.labelled)), desc=f"round {r} pseudo-labels", unit="slide", leave=False,
                      disable=not self.progress)
        found = e_step((patches(i) for i in slides), [x.positive for x in self.labelled],
                       rdir / "pseudo_labels.zarr", rule=PseudoLabelRule(c.threshold, c.scale, c.floor),
                       min_hard_negatives=c.min_hard_negatives, top_k=c.pseudo_top_k,
                       positive_negatives=c.positive_negatives)
        with atomic_path(index_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **found)  # type: ignore[arg-type]  # numpy's stub: **kwds may not hold allow_pickle
        return found

    def _stage2(self, r: int, rdir: Path, paths: list[Path]) -> dict[str, float]:
        c = self.config
        rows = [features_from_view(open_heatmap_view(p), c.stage2_thresholds, c.stage2_work_mpp) for p in paths]
        labels = [x.label for x in self.labelled]
        classes = SIZE_CLASSES if all(lab in SIZE_CLASSES for lab in labels) else ("negative", "positive")

        clf, metrics = fit_morph_lgbm(rows, labels, feature_names(c.stage2_thresholds), seed=c.seed, classes=classes)
        clf.save(rdir / "morph_lgbm.json")

        write_table(rdir / "features.csv", [{"slide": str(x.slide), "label": x.label, **f}
                                             for x, f in zip(self.labelled, rows)])
        return metrics

    def _select(self) -> Path:
        rows = json.loads((self.out / "metrics.json").read_text())
        choice = choose_round(rows, self.config.selection, self.config.select_from)
        for message in choice["warnings"]:
            warnings.warn(TrainingWarning(f"{self.out}: {message}"), stacklevel=2)
        src = self.out / "rounds" / f"r{choice['selected_round']}"
        for name in ("checkpoint.pt", "morph_lgbm.json"):
            with atomic_path(self.out / name) as tmp:
                shutil.copyfile(src / name, tmp)
        write_text_atomic(self.out / "selected.json", json.dumps(choice, indent=2))
        return self.out / "checkpoint.pt"


def choose_round(rows: Sequence[dict], selection: str = "cv_loss", first: int = 1) -> dict[str, Any]:
    """The round to keep from the per-round metrics, with the warnings a user must see.

    ``selection`` names the stage-2 loss (``cv_loss``: out-of-fold; ``train_loss``: in-sample).
    When the out-of-fold loss is NaN in every EM round (too few slides per class for the folds)
    the in-sample loss decides, with a warning; when no loss is finite the last round is kept,
    with a warning; and a selected loss no better than chance (the log loss of always predicting
    the class frequencies, ``stage2_chance_loss``) is warned about: the round choice is then arbitrary.
    ``first`` is the first round that may be kept (1: an EM round, as in the paper; 0: round 0,
    pixel labels only, competes too). Returns the content of ``selected.json``.
    """
    rows = sorted(rows, key=lambda r: r["round"])
    key = "stage2_cv_loss" if selection == "cv_loss" else "stage2_train_loss"
    num = lambda v: math.nan if v is None else float(v)  # noqa: E731
    losses = [num(r.get(key)) for r in rows]
    notes = []
    if len(rows) > 1 and not any(math.isfinite(v) for v in losses[first:]):
        if key == "stage2_cv_loss":
            notes.append("the stage-2 out-of-fold loss is NaN in every EM round (too few slide-labelled slides "
                         "per class for cross-validation); the round was selected on the in-sample loss instead, "
                         "which hardly tells rounds apart")
            key = "stage2_train_loss"
            losses = [num(r.get(key)) for r in rows]
    sel = select_round(losses, first)
    if len(rows) > 1 and not any(math.isfinite(v) for v in losses[first:]):
        notes.append(f"no EM round has a finite stage-2 loss ({key}); round {sel} was kept without a criterion")
    chance = num(rows[sel].get("stage2_chance_loss")) if rows else math.nan
    if math.isfinite(losses[sel] if rows else math.nan) and math.isfinite(chance) and losses[sel] >= chance - 1e-6:
        notes.append(f"the selected round {sel}'s stage-2 loss {losses[sel]:.4g} ({key}) is no better than chance "
                     f"({chance:.4g}: always predicting the class frequencies); stage 2 does not tell the slides "
                     "apart, so the round choice is arbitrary")
    return {"selected_round": sel, "selection": key, "select_from": first, "losses": losses, "chance_loss": chance,
            "rounds": len(losses) - 1, "warnings": notes}

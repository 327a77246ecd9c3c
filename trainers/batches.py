"""Training batches on the device: stain options, input preparation and per-stage timing.

Every trainer prepares its uint8 batches the same way, here (``BatchInputs``):

1. copy to the device;
2. stain normalisation (``stain_norm`` to ``stain_ref``; ``slidekit.stain.normalize``), recorded in the
   checkpoint as ``ModelSpec.stain`` so that inference applies the same normalisation;
3. stain augmentation (``stain_aug``: HED jitter or RandStainNA; ``slidekit.stain.augment``),
   while training only;
4. the model's input normalisation (``spec.normalize``).

Predictions made inside trainers (s2l's averages, mixed-em's heatmaps, evaluation) go through
``model_input``, which applies ``spec.stain`` the same way: a model trained on normalised tiles
never sees raw ones.

``BatchInputs.batches`` times an epoch's steps into a ``slidekit.base.timing.StageTimer``: ``read``
(waiting for the DataLoader), ``transfer`` (step 1-4 above) and ``model`` (forward, backward,
optimiser step); ``trainers.base.run_epochs`` adds ``write`` (checkpoint and state) and logs them
per epoch with ``samples_per_s`` (and, on CUDA with nvidia-ml-py, ``gpu_util``: the GPU's mean
utilisation in %). On CUDA the device stages are timed with CUDA events, read once completed,
never with a per-step synchronisation.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from slidekit.base.errors import ConfigError, TrainingError
from slidekit.base.timing import GPUSampler, StageTimer
from slidekit.infer.predictor import checkpoint_stain
from slidekit.models.checkpoint import read_checkpoint
from slidekit.stain import augment as stain_augment
from slidekit.stain.augment import STAIN_AUGMENTS as STAIN_AUGS
from slidekit.stain.normalize import STAIN_METHODS, normalizer_from_options
from trainers.config import TrainerConfig, check_option
from trainers.runs import RESTART_HINT

STAIN_NORMS = ("none", *STAIN_METHODS)
RANDSTAIN_FIT_IMAGES = 32  # training images (or patches) RandStainNA's statistics are fitted on


def _check_stain_aug(cfg: Any) -> None:
    check_option(cfg.stain_aug in STAIN_AUGS, "stain_aug", cfg.stain_aug, f"one of {', '.join(STAIN_AUGS)}")
    s = cfg.stain_aug_strength
    check_option(isinstance(s, (int, float)) and math.isfinite(s) and 0 < s < 1, "stain_aug_strength", s,
                 "a number in (0, 1)")


@dataclass
class StainOptions(TrainerConfig):
    """The stain options of the trainers that train on stained patches (normalisation + augmentation)."""

    stain_norm: str = "none"  # stain normalisation of every input: none | macenko | reinhard (to stain_ref)
    stain_ref: str = ""  # stain reference: an image (PNG/JPEG/TIFF) or a JSON saved by StainNormalizer
    stain_aug: str = "none"  # stain augmentation while training: none | hed | randstainna
    stain_aug_strength: float = 0.05  # HED jitter per channel, in (0, 1) (randstainna: the images' spread)

    def validate(self) -> None:
        super().validate()
        check_option(self.stain_norm in STAIN_NORMS, "stain_norm", self.stain_norm,
                     f"one of {', '.join(STAIN_NORMS)}")
        if self.stain_norm != "none":
            check_option(bool(self.stain_ref), "stain_ref", self.stain_ref,
                         f"a reference image or JSON for stain_norm {self.stain_norm!r}")
        else:  # a reference without a method would be ignored without a word
            check_option(not self.stain_ref, "stain_ref", self.stain_ref,
                         "empty while stain_norm is 'none' (set stain_norm to use a reference)")
        _check_stain_aug(self)


@dataclass
class StainAugmentOptions(TrainerConfig):
    """Stain augmentation only (``simclr``: its views are not normalised)."""

    stain_aug: str = "none"  # stain augmentation of each view, before the colour jitter: none | hed | randstainna
    stain_aug_strength: float = 0.05  # HED jitter per channel, in (0, 1) (randstainna: the images' spread)

    def validate(self) -> None:
        super().validate()
        _check_stain_aug(self)


def check_stain_reference(config: Any) -> Any:
    """Load ``config``'s stain reference now (ConfigError naming the file when it is missing or
    unreadable), before a trainer spends minutes reading its data; the normaliser (or None), to
    hand to ``BatchInputs`` so that the reference is read once."""
    norm = getattr(config, "stain_norm", "none")
    if norm and norm != "none":
        return normalizer_from_options(norm, getattr(config, "stain_ref", "") or None)
    return None


def model_input(spec: Any, images: torch.Tensor, device: torch.device | str | None = None,
                normalizer: Any = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> the network's float input on ``device``: the stain
    normalisation of ``spec.stain`` (or ``normalizer``; callers looping over batches build it once
    with ``checkpoint_stain``), then ``spec.normalize``. No augmentation."""
    x = images if device is None else images.to(device, non_blocking=True)
    norm = normalizer if normalizer is not None else checkpoint_stain(spec)
    if norm is not None:
        x = norm(x)
    return spec.normalize(x)


def _as_hwc_uint8(img: Any) -> np.ndarray:
    a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8, copy=False)


def sample_images(get: Callable[[int], Any], n: int, count: int = RANDSTAIN_FIT_IMAGES, seed: int = 0) -> list:
    """Up to ``count`` of ``n`` items ``get(i)`` (images or patches), chosen with a seeded draw, as
    (H, W, 3) uint8 arrays: the sample RandStainNA's statistics are fitted on."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(n, count), replace=False) if n else np.empty(0, np.int64)
    return [_as_hwc_uint8(get(int(i))) for i in sorted(idx)]


class BatchInputs:
    """What every training step does to its uint8 batch on the device, and the epoch's stage timer.

    ``config``'s stain options (absent ones mean "none") build the normaliser and the augmenter;
    ``spec.stain`` is set to the normaliser's ``to_dict()`` (None without one). ``fit_images``
    (a callable giving a list of uint8 images) is called only when RandStainNA needs a sample to
    fit on. ``channels_last``: memory format of the prepared batch (faster convolutions on CPU).
    ``normalizer``: the one ``check_stain_reference(config)`` already loaded (else loaded here).
    """

    def __init__(self, spec: Any, device: torch.device | str, config: Any = None,
                 fit_images: Callable[[], Sequence[Any]] | None = None, channels_last: bool = False,
                 normalizer: Any = None) -> None:
        self.spec, self.device, self.channels_last = spec, torch.device(device), channels_last
        self.normalizer = normalizer if normalizer is not None else check_stain_reference(config)
        if spec is not None:
            spec.stain = self.normalizer.to_dict() if self.normalizer is not None else None
        self.augmenter = None
        kind = getattr(config, "stain_aug", "none")
        if kind and kind != "none":
            images = None
            if kind == "randstainna":
                if fit_images is None:
                    raise ConfigError("stain_aug 'randstainna' needs training images to fit on; this trainer "
                                      "gives none")
                images = [self.prepare_eval(img) for img in fit_images()]  # fitted after normalisation
            # looked up on the module at call time, so a test (or a plug-in) can wrap it
            self.augmenter = stain_augment.augmenter_from_options(kind, float(config.stain_aug_strength), images=images)
        self.timer = StageTimer(self.device)
        self._start: Any = None
        self._ready: Any = None
        self._unchanged = 0  # the normaliser's count when the epoch began

    def prepare_eval(self, image: Any) -> np.ndarray:
        """One (H, W, 3) uint8 image, stain-normalised when a normaliser is set (no augmentation)."""
        a = _as_hwc_uint8(image)
        if self.normalizer is None:
            return a
        return self.normalizer(torch.from_numpy(a)[None].to(self.device))[0].cpu().numpy()

    def begin_epoch(self) -> StageTimer:
        """A fresh timer for the epoch (``run_epochs`` calls it before each epoch)."""
        self.timer = StageTimer(self.device)
        self._unchanged = self.normalizer.unchanged_tiles if self.normalizer is not None else 0
        return self.timer

    def epoch_metrics(self, wall: float) -> dict[str, float]:
        """The epoch's stage seconds and samples/s (``stage_metrics``) and, with a normaliser,
        ``stain_unchanged``: the tiles it left as they were (too little stain to estimate: glass)."""
        out = stage_metrics(self.timer, wall)
        if self.normalizer is not None:
            out["stain_unchanged"] = self.normalizer.unchanged_tiles - self._unchanged
        return out

    @contextmanager
    def sampling_gpu(self) -> Iterator[None]:
        """On CUDA, sample the GPU's utilisation during the ``with`` body into ``timer.gpu``
        (nvidia-ml-py; ``slidekit.base.timing.GPUSampler``); elsewhere nothing."""
        if not self.timer.cuda:
            yield
            return
        with GPUSampler(self.device) as sampler:
            yield
        self.timer.gpu = sampler.result()

    def batches(self, loader: Iterable) -> Iterator:
        """Yield the loader's batches, timing the wait for each (``read``), then the step after it:
        up to the end of ``__call__`` is ``transfer``, the rest (forward, backward, step) ``model``."""
        for batch in self.timer.iterate(loader, "read"):
            self._start, self._ready = self.timer.mark(), None
            yield batch
            self._end_step()

    def _end_step(self) -> None:
        if self._start is None:
            return
        end = self.timer.mark()
        if self._ready is not None:
            self.timer.add_span("transfer", self._start, self._ready)
            self.timer.add_span("model", self._ready, end)
        else:
            self.timer.add_span("model", self._start, end)
        self._start = self._ready = None

    def stain(self, images: torch.Tensor, train: bool = True) -> torch.Tensor:
        """uint8 batch on the device -> stain-normalised, then (``train``) stain-augmented uint8."""
        x = images
        if self.normalizer is not None:
            x = self.normalizer(x)
        if train and self.augmenter is not None:
            x = self.augmenter(x)
        return x

    def __call__(self, images: torch.Tensor, *others: torch.Tensor, train: bool = True,
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
        """Copy ``images`` (uint8) and ``others`` (labels, maps) to the device; stain-normalise and
        (``train``) augment the images; then ``normalize`` (default ``spec.normalize``). Returns the
        model input, or ``(input, *others)`` when others are given. Counts the samples."""
        x = self.stain(images.to(self.device, non_blocking=True), train)
        x = (normalize or self.spec.normalize)(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        moved = [o.to(self.device, non_blocking=True) for o in others]
        self.timer.tiles += len(images)
        if self._start is not None:
            self._ready = self.timer.mark()
        return (x, *moved) if others else x


def stage_metrics(timer: StageTimer, wall: float) -> dict[str, float]:
    """An epoch's ``read``/``transfer``/``model`` seconds and ``samples_per_s`` (over ``wall`` s)."""
    timer.flush()
    out = {k: round(timer.seconds[k], 4) for k in ("read", "transfer", "model")}
    if timer.seconds.get("stitch"):
        out["stitch"] = round(timer.seconds["stitch"], 4)
    out["samples_per_s"] = round(timer.tiles / wall, 3) if wall > 0 and timer.tiles else 0.0
    gpu = timer.gpu or {}
    if gpu.get("mean_util") is not None:  # CUDA with nvidia-ml-py
        out["gpu_util"] = gpu["mean_util"]
    return out


TIMING_KEYS = frozenset({"read", "transfer", "model", "stitch", "write", "wall", "samples_per_s", "gpu_util",
                         "stain_unchanged"})


class RunTiming:
    """The stage seconds of a whole run (its epochs added up) and its one-line split."""

    def __init__(self) -> None:
        self.timer, self.train_seconds = StageTimer(), 0.0
        self.gpu_busy: list[tuple[float, float]] = []

    def add_epoch(self, timer: StageTimer, seconds: float) -> None:
        for k, v in timer.seconds.items():
            self.timer.add(k, v)
        self.timer.tiles += timer.tiles
        self.train_seconds += seconds
        gpu = timer.gpu or {}
        if gpu.get("mean_util") is not None:
            self.gpu_busy.append((gpu["mean_util"], seconds))

    def line(self, ranks: int = 1) -> str:
        """``read 3% · transfer 2% · model 90% · write 5% · 52.1 samples/s`` (empty: nothing timed);
        samples/s of the whole job when ``ranks`` ranks each timed their own share."""
        line = self.timer.split()
        if line and self.timer.tiles and self.train_seconds > 0:
            line += f" · {ranks * self.timer.tiles / self.train_seconds:.1f} samples/s"
        if line and self.gpu_busy:  # time-weighted over the epochs
            busy = sum(u * s for u, s in self.gpu_busy) / max(sum(s for _, s in self.gpu_busy), 1e-9)
            line += f" · GPU {busy:.0f}% busy"
        return line


def check_same_stain(ckpt_path: Any, spec: Any) -> None:
    """TrainingError when resuming with another stain normalisation than the run's checkpoint has
    (``begin_run`` compares the options; this catches a reference file whose content changed)."""
    from pathlib import Path

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        return

    recorded = (read_checkpoint(ckpt_path).get("spec") or {}).get("stain")
    current = getattr(spec, "stain", None)
    if json.dumps(recorded, sort_keys=True) != json.dumps(current, sort_keys=True):
        raise TrainingError("cannot resume: the stain normalisation differs from the one the run was trained "
                            f"with (stain_ref's content changed?); {RESTART_HINT}", ckpt_path.parent)

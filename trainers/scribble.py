"""Scribble segmentation: a U-Net trained with partial cross-entropy (Teh & Taylor seeds).

Unscribbled pixels carry the ignore label and contribute no loss; a batch with no labelled pixel
gives a zero loss (and zero gradient) instead of PyTorch's NaN. Labels come from

* an image folder: ``data/images/NAME.png`` + ``data/<labels>/NAME.png`` (class indices, 255 =
  not drawn),
* a PASCAL VOC + ScribbleSup folder (``layout: voc``): ``data/JPEGImages/`` with
  ``data/pascal_2012_scribble/`` (``voc_labels: scribbles``) or ``data/SegmentationClassAug/``
  (``voc_labels: masks``), optionally narrowed by a ``split`` list file
  (``slidekit.data.voc_source``), or
* slides with QuPath GeoJSON scribbles: ``slides`` + ``annotations`` (one file per slide); lines
  are rasterised ``line_width_um`` wide, patch by patch, at ``mpp``.

The encoder of the written checkpoint initialises downstream patch classifiers through
``slidekit.models.networks.transfer_encoder`` (or any trainer's ``init`` option).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidekit.annotations.formats import read_annotations
from slidekit.annotations.scribbles import IGNORE
from slidekit.base import distributed as dist
from slidekit.base.devices import resolve_device
from slidekit.base.errors import ConfigError, LabelError, TrainingWarning
from slidekit.data.datasets import ImageFolderDataset, JointAugment, SlidePatchDataset
from slidekit.data.voc import VOC_CLASSES, VOC_LABELS, voc_source
from slidekit.infer.predictor import checkpoint_stain
from slidekit.models.networks import build_model
from slidekit.models.spec import BACKBONES, MAX_PATCH_SIZE, ModelSpec
from trainers.base import (
    INIT_BN_SAMPLES,
    Trainer,
    init_encoder,
    reestimate_init_bn,
    register,
    run_epochs,
    seed_everything,
)
from trainers.batches import BatchInputs, StainOptions, check_stain_reference, model_input, sample_images
from trainers.config import check_option


def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over labelled pixels only; exactly 0 (with a graph) when there are none."""
    valid = target != ignore_index
    n = valid.sum()
    if n == 0:
        return logits.sum() * 0.0
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, weight=weight, reduction="sum")
    return total / n


def global_partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = IGNORE) -> torch.Tensor:
    """``partial_cross_entropy`` normalised by the labelled pixels of the **global** batch.

    With several ranks, DDP averages the ranks' gradients; dividing each rank's summed loss by the
    global labelled count (times the number of ranks) makes that average the gradient of one
    process on the whole batch, even when the ranks' crops hold different numbers of labelled
    pixels. One process: exactly ``partial_cross_entropy``.
    """
    if not dist.is_distributed():
        return partial_cross_entropy(logits, target, ignore_index)
    n_local = (target != ignore_index).sum()
    n_all = float(dist.all_reduce_sum(n_local.double()))
    if n_all == 0 or int(n_local) == 0:
        return logits.sum() * 0.0
    return partial_cross_entropy(logits, target, ignore_index) * (float(n_local) * dist.world_size() / n_all)


def check_class_names(classes: Sequence[str], annotation_files: Sequence[str | os.PathLike]) -> None:
    """LabelError when a class of the config names no annotation in any of the files (a typo or a
    QuPath class spelt differently would otherwise train a class the network never sees); a
    TrainingWarning for annotation classes the config leaves out (they are ignored)."""
    found: dict[str | None, int] = {}
    for path in annotation_files:
        for a in read_annotations(path):
            if not a.geometry.is_empty:
                found[a.label] = found.get(a.label, 0) + 1
    names = ", ".join(f"{k!r} ({v})" for k, v in sorted(found.items(), key=lambda kv: str(kv[0]))) or "none"
    missing = [c for c in classes if c not in found]
    if missing:
        files = ", ".join(str(f) for f in annotation_files[:3]) + (", ..." if len(annotation_files) > 3 else "")
        raise LabelError(f"class(es) {', '.join(map(repr, missing))} of the config match no annotation in "
                         f"{files}; annotation classes found: {names}")
    unused = sorted(str(k) for k in found if k not in classes)
    if unused:
        warnings.warn(TrainingWarning(f"annotation classes {', '.join(map(repr, unused))} are not among the "
                                      f"config's classes {list(classes)} and are ignored"), stacklevel=2)


def _as_chw_uint8(img: Any, i: int) -> torch.Tensor:
    """A (3, H, W) uint8 tensor from a (3, H, W) tensor or an (H, W, 3|4) array/PIL image, as
    ``Slide.read_region`` returns it (an alpha channel is dropped)."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.ndim == 3 and t.shape[0] not in (3, 4) and t.shape[-1] in (3, 4):
            t = t.permute(2, 0, 1)
    else:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ConfigError(f"predict_images: image {i} has shape {arr.shape}; expected (H, W, 3) RGB "
                              "(or a (3, H, W) tensor)")
        arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (3, 4):
        raise ConfigError(f"predict_images: image {i} has shape {tuple(t.shape)}; expected (3, H, W) or (H, W, 3)")
    if t.dtype != torch.uint8:  # a float image in 0..1 would be scaled by 1/255 again
        raise ConfigError(f"predict_images: image {i} has dtype {t.dtype}; expected uint8 RGB")
    return t[:3]


@torch.no_grad()
def predict_images(model: nn.Module, spec: ModelSpec, images: Sequence[Any] | np.ndarray | torch.Tensor,
                   device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Class probabilities (C, H, W) of whole uint8 RGB images, un-augmented, in eval mode.

    The stain normalisation the model was trained with (``spec.stain``) is applied first.

    ``images``: a list of (3, H, W) tensors or (H, W, 3) NumPy arrays / PIL images (as
    ``Slide.read_region`` returns them; an alpha channel is dropped), or one such image.
    Images are reflect-padded to a multiple of 32 (the encoder's stride) and cropped back.
    The model's train/eval mode is restored afterwards.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        images = [images]
    if not isinstance(images, (list, tuple, np.ndarray, torch.Tensor)):
        images = [images]  # one PIL image
    images = [_as_chw_uint8(img, i) for i, img in enumerate(images)]

    normalizer = checkpoint_stain(spec)  # once for all the images
    was_training = model.training
    model.eval()
    out = []
    for img in images:
        h, w = img.shape[-2:]
        x = model_input(spec, img[None], device, normalizer)
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        probs = spec.activate(model(x))[0, :, :h, :w].float().cpu()
        out.append(probs)
    model.train(was_training)
    return out


# More random crops of one image per epoch than this is a typo (an epoch of 1e8 crops per image).
MAX_SAMPLES_PER_IMAGE = 100_000


@dataclass
class ScribbleConfig(StainOptions):
    """Options of the ``scribble`` trainer (and the base of ``s2l``'s)."""

    INIT_BN_REESTIMATE: ClassVar[bool] = True  # init_bn=reestimate: on training crops (SegmentationTrainer)
    data: str = ""  # image folder root (images/ + labels/), or a VOC folder with layout "voc"
    layout: str = "folder"  # "folder" (data/<images> + data/<labels>) | "voc" (PASCAL VOC + ScribbleSup)
    voc_labels: str = "scribbles"  # layout voc: "scribbles" (pascal_2012_scribble/) | "masks" (SegmentationClassAug/)
    split: str = ""  # layout voc: optional list file of image names (relative to data)
    images: str = "images"
    labels: str = "scribbles"
    slides: list[str] = field(default_factory=list)  # or: slides + one GeoJSON per slide
    annotations: list[str] = field(default_factory=list)
    # None: the layout's own classes (folder: background, foreground; voc: VOC's 21). Given classes are
    # kept as given (a lab's own 2-class data in the VOC layout), and label values beyond them refused.
    classes: list[str] | None = None
    ignore_index: int = IGNORE
    backbone: str = "resnet18"
    crop: int = 256  # training patch size (px at the network's MPP)
    scale: float = 1.0  # image folders: resize factor applied on loading
    image_mpp: float = 0.5  # image folders: µm/px of the files on disk
    mpp: float = 0.5  # slides: µm/px the network sees
    line_width_um: float = 4.0  # slides: width of rasterised scribble lines
    samples_per_image: int = 8  # image folders: random crops per image per epoch
    patches_per_epoch: int = 256  # slides: patches per epoch
    augment: bool = True
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" | "constant"

    def validate(self) -> None:
        super().validate()

        check_option(self.layout in ("folder", "voc"), "layout", self.layout, "folder or voc")
        check_option(self.voc_labels in VOC_LABELS, "voc_labels", self.voc_labels, " or ".join(VOC_LABELS))
        if self.classes is None:
            self.classes = list(VOC_CLASSES) if self.layout == "voc" else ["background", "foreground"]
        check_option(len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes), "classes",
                     self.classes, "two or more distinct class names")
        check_option(not 0 <= self.ignore_index < len(self.classes), "ignore_index", self.ignore_index,
                     f"outside the class indices 0..{len(self.classes) - 1}")
        check_option(self.backbone in BACKBONES, "backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        # the encoder downsamples 32 times; a smaller crop leaves nothing for its last stage
        check_option(32 <= self.crop <= MAX_PATCH_SIZE, "crop", self.crop, f"an integer 32..{MAX_PATCH_SIZE} (px)")
        for key in ("scale", "image_mpp", "mpp", "line_width_um"):
            check_option(getattr(self, key) > 0, key, getattr(self, key), "a number > 0")
        check_option(1 <= self.samples_per_image <= MAX_SAMPLES_PER_IMAGE, "samples_per_image", self.samples_per_image,
                     f"an integer 1..{MAX_SAMPLES_PER_IMAGE}")
        check_option(self.patches_per_epoch >= 1, "patches_per_epoch", self.patches_per_epoch, "an integer >= 1")
        check_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check_option(self.lr_schedule in ("cosine", "constant"), "lr_schedule", self.lr_schedule,
                     "cosine or constant")


class SegmentationTrainer(Trainer):
    """Shared machinery of the scribble trainers: data, model, optimiser and the epoch loop.

    Subclasses hook in with ``extra_maps`` (per-image maps cropped with the image),
    ``extra_loss`` (added to the scribble loss) and ``after_epoch``.
    """

    Config = ScribbleConfig

    # -- data ------------------------------------------------------------------------------------
    def build_dataset(self) -> Any:
        cfg = self.config

        aug = JointAugment() if cfg.augment else None
        if cfg.slides:
            return self._slide_dataset(aug)
        if not cfg.data:
            raise ConfigError(f"trainer {self.name!r}: set `data` (an image folder) or `slides`")

        images, labels, names = self.image_source()
        ds = ImageFolderDataset.from_folder(cfg.data, images=images, masks=labels, names=names, scale=cfg.scale,
                                            crop=cfg.crop, samples_per_image=cfg.samples_per_image,
                                            transform=aug, ignore=cfg.ignore_index)
        label_dir = Path(cfg.data) / labels
        assert ds.masks is not None  # from_folder read the label images
        bad = [i for i, m in enumerate(ds.masks)
               if ((m != cfg.ignore_index) & ((m < 0) | (m >= len(cfg.classes)))).any()]
        if bad:
            raise ConfigError(f"label images {[ds.names[i] for i in bad[:3]]} hold values outside 0.."
                              f"{len(cfg.classes) - 1} and {cfg.ignore_index} (ignore)", label_dir)
        present: set[int] = set()
        for m in ds.masks:
            present.update(int(v) for v in torch.unique(m).tolist())
        missing = [f"{c!r} (index {i})" for i, c in enumerate(cfg.classes) if i not in present]
        if missing:  # the network would be trained to a class it never sees
            raise LabelError(f"class(es) {', '.join(missing)} of the config have no labelled pixel in any "
                             f"label image", label_dir)
        return ds

    def image_source(self) -> tuple[str, str, list[str] | None]:
        """The image and label sub-folders of ``data`` and the names to read (None: every image)."""
        cfg = self.config
        if cfg.layout == "voc":
            src = voc_source(cfg.data, labels=cfg.voc_labels, split=cfg.split or None)
            return src.images, src.labels, list(src.names)
        return cfg.images, cfg.labels, None

    def _slide_dataset(self, aug: Any) -> Any:
        cfg = self.config
        from torch.utils.data import ConcatDataset


        if len(cfg.annotations) != len(cfg.slides):
            raise ConfigError("give one annotation file per slide (`annotations` and `slides` differ in length)")
        labels = {c: i for i, c in enumerate(cfg.classes)}
        check_class_names(cfg.classes, cfg.annotations)
        parts = [SlidePatchDataset.from_annotations(s, a, labels=labels, mpp=cfg.mpp, size=cfg.crop,
                                                    line_width_um=cfg.line_width_um, transform=aug,
                                                    ignore=cfg.ignore_index)
                 for s, a in zip(cfg.slides, cfg.annotations)]
        return ConcatDataset(parts)

    def network_mpp(self) -> float:
        cfg = self.config
        return cfg.mpp if cfg.slides else cfg.image_mpp / cfg.scale

    def build_spec(self) -> ModelSpec:
        cfg = self.config
        return ModelSpec(arch="resnet-unet", backbone=cfg.backbone, task="segmentation",
                         classes=list(cfg.classes), patch_size=cfg.crop, mpp=self.network_mpp(),
                         activation="softmax", output_stride=1,
                         extra={"ignore_index": cfg.ignore_index})

    # -- hooks -----------------------------------------------------------------------------------
    def extra_maps(self, dataset: Any) -> None:
        """Attach per-image maps to the dataset before training (none here)."""

    def extra_loss(self, epoch: int, batch: dict, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms added to the scribble loss (none here)."""
        return {}

    def after_epoch(self, epoch: int) -> dict[str, Any]:
        """Work at the end of an epoch, returning metrics to log (none here)."""
        return {}

    def get_extra(self) -> dict:
        return {}

    def set_extra(self, extra: dict) -> None:
        pass

    def sampler(self, dataset: Any, epoch: int) -> Any:
        """Which samples an epoch visits: a seeded shuffle (slides: a uniform draw)."""
        g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        if self.config.slides:
            return torch.utils.data.RandomSampler(dataset, replacement=True,
                                                  num_samples=self.config.patches_per_epoch, generator=g)
        return torch.utils.data.RandomSampler(dataset, generator=g)

    # -- training --------------------------------------------------------------------------------
    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        cfg = self.config
        seed_everything(cfg.seed)
        dev = dist.init_from_env(resolve_device(device))
        local_batch = dist.local_batch_size(cfg.batch_size)  # batch_size is the global batch
        self.device = dev
        normalizer = check_stain_reference(cfg)  # a missing reference fails before the data is read
        self.dataset = self.build_dataset()
        self.spec = self.build_spec()
        model = build_model(self.spec)
        init_encoder(model, cfg.init)
        model.to(dev)
        if dev.type == "cpu":
            model = model.to(memory_format=torch.channels_last)  # several times faster convs on CPU
        self.model = model
        self.inputs = BatchInputs(self.spec, dev, cfg, channels_last=dev.type == "cpu",
                                  fit_images=self._fit_sample, normalizer=normalizer)
        reestimate_init_bn(model, cfg, lambda: self._bn_batches(local_batch))  # init_bn=reestimate only
        net = dist.wrap(model, dev, cfg.sync_batchnorm)  # DDP for several ranks, the model itself for one
        self.extra_maps(self.dataset)
        # Every parameter is optimised, the final 1x1 layer included.
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, cfg.epochs) / max(cfg.epochs, 1))))
        else:  # "constant" (validated with the config)
            sched = None

        def train_epoch(epoch: int) -> dict[str, Any]:
            from tqdm.auto import tqdm

            # every rank draws the epoch's global order and takes its share (slidekit.base.distributed)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=local_batch, sampler=dist.shard(self.sampler(self.dataset, epoch)),
                num_workers=cfg.num_workers, drop_last=len(self.dataset) > cfg.batch_size,
                generator=torch.Generator().manual_seed(cfg.seed + epoch),
                pin_memory=dev.type == "cuda")  # pinned batches: the copy to the GPU is asynchronous
            sums: dict[str, float] = {}
            n = 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                       disable=not (progress and dist.is_main()))
            for batch in self.inputs.batches(bar):
                x, target = self.inputs(batch["image"], batch["mask"])
                logits = net(x)
                terms = {"loss_sp": global_partial_cross_entropy(logits, target, cfg.ignore_index)}
                terms.update(self.extra_loss(epoch, batch, logits))
                values = list(terms.values())
                loss = values[0]
                for v in values[1:]:
                    loss = loss + v
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += 1
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.set_postfix(loss=f"{sums['loss'] / n:.4g}")
                with torch.no_grad():
                    valid = target != cfg.ignore_index
                    if valid.any():
                        acc = (logits.argmax(1)[valid] == target[valid]).float().mean()
                        sums["scribble_acc"] = sums.get("scribble_acc", 0.0) + float(acc)
            if sched is not None:
                sched.step()
            metrics: dict[str, Any] = {k: v / max(n, 1) for k, v in sums.items()}
            metrics["lr"] = opt.param_groups[0]["lr"]
            metrics.update(self.after_epoch(epoch))
            return metrics

        return run_epochs(self, out_dir, model, self.spec, train_epoch, optimizer=opt, scheduler=sched,
                          progress=progress, get_extra=self.get_extra, set_extra=self.set_extra, inputs=self.inputs)

    def _bn_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Up to ``INIT_BN_SAMPLES`` training samples (a seeded draw, through the training crops),
        prepared as model inputs without stain augmentation: what ``init_bn=reestimate`` sees."""
        n = min(len(self.dataset), INIT_BN_SAMPLES)
        sampler = torch.utils.data.RandomSampler(self.dataset, num_samples=n,
                                                 generator=torch.Generator().manual_seed(self.config.seed + 7))
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=sampler,
                                             num_workers=self.config.num_workers)
        tiles = self.inputs.timer.tiles
        for batch in loader:
            yield self.inputs(batch["image"], train=False)
        self.inputs.timer.tiles = tiles  # not samples trained on

    def _fit_sample(self) -> list:
        """The training images RandStainNA is fitted on: whole images of an image folder, else the
        slides' patches as read (not through the training transform, whose colour jitter would
        widen the fitted spread)."""
        images = getattr(self.dataset, "images", None)
        if images is not None:
            return sample_images(images.__getitem__, len(images), seed=self.config.seed)
        from bisect import bisect_right

        parts, ends = self.dataset.datasets, self.dataset.cumulative_sizes  # a ConcatDataset of slides

        def raw_patch(i: int) -> Any:
            k = bisect_right(ends, i)
            return parts[k].reader.read(i - (ends[k - 1] if k else 0))

        return sample_images(raw_patch, len(self.dataset), seed=self.config.seed)


@register
class ScribbleTrainer(SegmentationTrainer):
    """Partial cross-entropy on scribbles (a full mask works too: nothing is then ignored)."""

    name = "scribble"
    consumes = frozenset({"images", "scribbles"})
    Config = ScribbleConfig

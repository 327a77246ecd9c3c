"""SimCLR pre-training for histology (Chen et al. 2020; Ciga et al. 2022), registered as ``simclr``.

Unlabelled patches from many sources (slides through a capped TileGrid, image folders, zips of
tiles; see ``trainers/simclr_data.py``) are drawn source-balanced, augmented twice with the
histology recipe, encoded by a ResNet and a projection head, and pulled together with NT-Xent.
The projection head is discarded: the checkpoint is the encoder alone (``arch="resnet-encoder"``,
``task="embedding"``), which other trainers accept as ``--init`` (``slidekit.models.networks.transfer_encoder``)
and ``slidekit embed`` turns into per-tile features.

Example config (YAML)::

    sources:
      - {slides: ["slides/*.svs"], cap: 100, min_tissue: 0.5}
      - {folder: monuseg/images, image_mpp: 0.25, cap: 16}
    mpp: 1.0          # patches are tile_size px at this MPP
    tile_size: 128
    crop_size: 64     # encoder input after random resized crop
    epochs: 100
    batch_size: 128
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from slidekit.base import distributed as dist
from slidekit.base.devices import resolve_device
from slidekit.base.errors import ConfigError
from slidekit.data.sampling import FixedRatioSampler
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from trainers.base import Trainer, init_encoder, register, run_epochs, seed_everything
from trainers.batches import BatchInputs, StainAugmentOptions, sample_images
from trainers.config import check_option
from trainers.runs import begin_run
from trainers.simclr_core import (
    JITTER_PRESETS,
    LARS,
    AugmentConfig,
    AugmentOptions,
    HistologyAugment,
    ProjectionHead,
    nt_xent_distributed,
    scaled_lr,
    split_decay_groups,
    warmup_cosine,
)
from trainers.simclr_data import PatchPool, build_sources

DEFAULT_LR = {"lars": (0.3, "linear"), "adam": (1e-3, "none")}


@dataclass
class SimCLRConfig(StainAugmentOptions, AugmentOptions):
    """SimCLR options. ``lr``/``lr_scaling`` default by optimiser: LARS 0.3 x B/256, Adam 1e-3.

    ``stain_aug`` (HED jitter or RandStainNA) changes each view's stain on the device before the
    colour jitter of the histology recipe, with its own draw per view: the two views of a patch
    differ in stain as well, so the encoder learns to ignore stain differences between labs.
    """

    epochs: int = 100
    batch_size: int = 128                 # pairs per step (2 x batch_size images), over all ranks
    sync_batchnorm: bool = True           # several ranks: batch norm over the global batch (as the paper)
    lr: float | None = None  # type: ignore[assignment]  # None: the optimiser's own (DEFAULT_LR)
    lr_scaling: str | None = None         # linear (B/256) | sqrt (sqrt B) | none
    optimizer: str = "lars"               # lars | adam
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 0.001
    warmup_epochs: int = 10
    temperature: float = 0.1
    backbone: str = "resnet18"
    proj_dim: int = 128
    proj_hidden: int | None = None        # default: encoder width (512 for ResNet-18/34)
    # data
    sources: list[dict] = field(default_factory=list)
    slides: list[str] = field(default_factory=list)   # shortcut: one slide source
    folders: list[str] = field(default_factory=list)  # shortcut: one source per folder
    zips: list[str] = field(default_factory=list)     # shortcut: one source per archive
    mpp: float = 0.5
    tile_size: int = 224
    cap: int | None = 100                 # patches per slide (or per large image)
    steps_per_epoch: int | None = None    # default: one pass over the pooled patches
    time_budget_s: float | None = None    # stop after this much training time; the LR schedule
                                          # then follows elapsed time (whichever is further along)
    # augmentation: the paper's recipe (fields inherited from AugmentOptions) at this size
    crop_size: int = 224

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in DEFAULT_LR:
            raise ConfigError(f"optimizer must be one of {', '.join(DEFAULT_LR)}, got {self.optimizer!r}")
        if self.jitter not in JITTER_PRESETS:
            raise ConfigError(f"jitter must be one of {', '.join(JITTER_PRESETS)}, got {self.jitter!r}")
        if self.batch_size < 2:
            raise ConfigError("SimCLR needs batch_size >= 2 (the other samples are the negatives)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        base, rule = DEFAULT_LR[self.optimizer]
        self.lr = base if self.lr is None else self.lr
        self.lr_scaling = rule if self.lr_scaling is None else self.lr_scaling
        if self.lr_scaling not in ("linear", "sqrt", "none"):
            raise ConfigError(f"lr_scaling must be linear, sqrt or none, got {self.lr_scaling!r}")
        for key in ("mpp", "tile_size", "crop_size", "proj_dim"):
            check_option(getattr(self, key) > 0, key, getattr(self, key), "> 0")
        for key in ("warmup_epochs", "weight_decay"):
            check_option(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        for key in ("cap", "steps_per_epoch", "proj_hidden", "time_budget_s"):
            value = getattr(self, key)
            check_option(value is None or value > 0, key, value, "> 0 (or unset)")

    def source_specs(self) -> list[dict]:
        """``sources`` plus the ``slides``/``folders``/``zips`` shortcuts, as source dicts."""
        specs = [dict(s) for s in self.sources]
        if self.slides:
            specs.append({"slides": list(self.slides)})
        specs += [{"folder": f} for f in self.folders] + [{"zip": z} for z in self.zips]
        return specs

    def augment(self) -> AugmentConfig:
        """The augmentation part of the config."""
        try:
            options = {f.name: getattr(self, f.name) for f in fields(AugmentOptions)}
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
            return AugmentConfig(size=self.crop_size, **options)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def encoder_spec(cfg: SimCLRConfig) -> ModelSpec:
    """The checkpoint's self-description: an embedding network fed ``tile_size`` px at ``mpp``.

    That is the geometry of the training patches. The encoder saw them through random crops of
    ``min_crop``-``max_crop`` of their area resized to ``crop_size``, i.e. at scales around the
    native one; being fully convolutional, it embeds whole patches at native resolution (this
    gave better linear evaluation than whole patches shrunk to ``crop_size``).
    """
    return ModelSpec(arch="resnet-encoder", backbone=cfg.backbone, task="embedding", classes=[],
                     patch_size=cfg.tile_size, mpp=cfg.mpp, mean=cfg.mean, std=cfg.std,
                     activation="none")


def make_optimizer(params: nn.Module, cfg: SimCLRConfig) -> torch.optim.Optimizer:
    """LARS (weights adapted and decayed; biases and norm parameters neither) or AdamW."""
    assert cfg.lr is not None  # SimCLRConfig.__post_init__ set the optimiser's default
    lr = scaled_lr(float(cfg.lr), cfg.batch_size, str(cfg.lr_scaling))
    groups = split_decay_groups(params)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    for g in groups:
        g.pop("lars")
        g.setdefault("weight_decay", cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr)


class _Net(nn.Module):
    """Encoder + projection head as one module, so one DDP wrapper synchronises both."""

    def __init__(self, model: ResNetClassifier, head: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(x))


@register
class SimCLRTrainer(Trainer):
    """Contrastive pre-training on unlabelled patches; writes an encoder checkpoint."""

    name = "simclr"
    consumes = frozenset({"images"})
    Config = SimCLRConfig

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        cfg: SimCLRConfig = self.config
        out = Path(out_dir)
        dev = dist.init_from_env(resolve_device(device))
        dist.local_batch_size(cfg.batch_size)  # the global batch must split evenly over the ranks
        # before the (slow) patch sources are built; rank 0 decides, every rank follows
        if dist.on_main(lambda: begin_run(self, out, cfg.epochs)) == "finished":
            return out / "checkpoint.pt"
        seed_everything(cfg.seed)
        augment = HistologyAugment(cfg.augment())
        sources = build_sources(cfg.source_specs(), cfg.mpp, cfg.tile_size, cfg.cap, cfg.seed)
        pool = PatchPool(sources, transform=augment.geometric, views=2)
        steps = cfg.steps_per_epoch or max(1, math.ceil(len(pool) / cfg.batch_size))
        sampler = FixedRatioSampler(pool.sizes, pool.weights, cfg.batch_size, steps, seed=cfg.seed)
        # every rank draws the same global batches and takes every world-th item of each
        loader = DataLoader(pool, batch_sampler=dist.shard(sampler, batches=True), num_workers=cfg.num_workers,
                            persistent_workers=cfg.num_workers > 0, pin_memory=dev.type == "cuda")

        model = ResNetClassifier(cfg.backbone, 0)
        init_encoder(model, cfg.init)
        head = ProjectionHead(model.encoder.out_features, cfg.proj_hidden, cfg.proj_dim)
        model.to(dev)
        head.to(dev)
        net = dist.wrap(_Net(model, head), dev, cfg.sync_batchnorm)
        optimizer = make_optimizer(nn.ModuleList([model, head]), cfg)
        total, warmup = cfg.epochs * steps, cfg.warmup_epochs * steps
        clock = {"start": time.monotonic()}

        def lr_factor(step: int) -> float:
            if cfg.time_budget_s:  # progress = the further along of steps and time
                spent = (time.monotonic() - clock["start"]) / cfg.time_budget_s
                step = max(step, int(spent * total))
            return warmup_cosine(step, total, warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        spec = encoder_spec(cfg)
        # stain augmentation of the uint8 views, then the recipe's photometric part (jitter, grey, blur)
        inputs = BatchInputs(spec, dev, cfg, fit_images=lambda: sample_images(pool.patch, len(pool), seed=cfg.seed))
        views = lambda x: augment.photometric(x.float().div_(255))  # noqa: E731

        def train_epoch(epoch: int) -> dict:
            sampler.set_epoch(epoch)
            head.train()
            losses = []
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                       disable=not (progress and dist.is_main()))
            for v1, v2 in inputs.batches(bar):
                # every rank stops at the same step (a rank alone in a collective would wait for the timeout)
                if cfg.time_budget_s and dist.any_rank(time.monotonic() - clock["start"] > cfg.time_budget_s):
                    break
                x = inputs(torch.cat([v1, v2]), normalize=views)
                z = net(x)
                loss = nt_xent_distributed(z[: len(v1)], z[len(v1):], cfg.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            # no step (time budget spent): no loss to report, which is not a diverged NaN
            return {"loss": sum(losses) / len(losses) if losses else None, "steps": len(losses),
                    "lr": optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - clock["start"]}

        spec.extra = {"simclr": {
            "sources": [{"name": s.name, "weight": s.weight, "patches": len(s), "groups": len(s.per_group)}
                        for s in sources],
            "crop_size": cfg.crop_size, "steps_per_epoch": steps}}
        return run_epochs(self, out, model, spec, train_epoch, optimizer=optimizer, scheduler=scheduler,
                          progress=progress, get_extra=lambda: {"head": head.state_dict()},
                          set_extra=lambda extra: head.load_state_dict(extra["head"]), inputs=inputs)

"""Scribble2Label (Lee & Jeong, MICCAI 2020): scribbles plus EMA-ensembled, consistency-filtered
pseudo-labels.

* Warm-up: partial cross-entropy on scribbled pixels only for ``warmup_epochs`` (E_w).
* Every ``ema_every`` (γ) epochs the network predicts every whole training image, un-augmented
  and in eval mode, and the per-image average is updated:
  ``y_n = α·p + (1 − α)·y_{n−1}`` (the first prediction initialises it). ``ema_start`` (default
  0) skips the first epochs, whose near-random predictions would otherwise weigh on the
  average for a long time in short schedules.
* After warm-up, ``lambda_up`` (λ) × L_up is added: cross-entropy on unscribbled pixels whose
  averaged prediction is consistent (its largest class probability > τ, i.e. > τ or < 1 − τ
  for two classes), against the one-hot argmax. Each loss term is averaged over its own pixels.
* The averages are stored at image size (as shared-memory tensors) and cropped/flipped/rotated
  together with the image, so each crop sees its own pixels' averages.

Unlike the official code, every layer (the final 1x1 included) is trained, and the data split
and crops are seeded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slidekit.base import distributed as dist
from slidekit.base.errors import ConfigError
from trainers.base import register
from trainers.config import check_option
from trainers.scribble import ScribbleConfig, SegmentationTrainer, global_partial_cross_entropy, predict_images


def ema_update(previous: torch.Tensor | None, prediction: torch.Tensor, alpha: float) -> torch.Tensor:
    """One EMA step, y = α·p + (1 − α)·y_prev; the first prediction (``previous`` None) is kept as is."""
    if previous is None:
        return prediction.clone()
    return alpha * prediction + (1.0 - alpha) * previous


def consistent_pseudo_labels(ema: torch.Tensor, scribbles: torch.Tensor, threshold: float = 0.8,
                             ignore_index: int = 255) -> torch.Tensor:
    """Pseudo-label map from averaged probabilities (B, C, H, W) or (C, H, W).

    A pixel gets the argmax class when it is unscribbled and its largest averaged probability
    exceeds ``threshold``; every other pixel (scribbled, inconsistent, NaN padding) gets
    ``ignore_index``.
    """
    conf, cls = ema.max(dim=-3)
    keep = (conf > threshold) & (scribbles == ignore_index)  # NaN compares False
    return torch.where(keep, cls, torch.full_like(cls, ignore_index))


@dataclass
class S2LConfig(ScribbleConfig):
    """Options of the ``s2l`` trainer; defaults from the paper."""

    warmup_epochs: int = 5  # E_w
    ema_every: int = 1  # γ, in epochs
    ema_start: int = 0  # first epoch whose predictions enter the average
    ema_alpha: float = 0.2  # α
    threshold: float = 0.8  # τ
    lambda_up: float = 0.5  # λ

    def validate(self) -> None:
        super().validate()
        check_option(0 < self.ema_alpha <= 1, "ema_alpha", self.ema_alpha, "in (0, 1]")
        check_option(0.5 <= self.threshold < 1, "threshold", self.threshold, "in [0.5, 1)")
        check_option(self.ema_every >= 1, "ema_every", self.ema_every, "an integer >= 1")
        check_option(self.ema_start >= 0, "ema_start", self.ema_start, "an integer >= 0")
        check_option(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "an integer >= 0")
        check_option(self.lambda_up >= 0, "lambda_up", self.lambda_up, "a number >= 0")
        # S2L's pseudo-label loss starts after warm-up: with no epoch left it would be plain scribble
        # training under another name
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"s2l: warmup_epochs ({self.warmup_epochs}) >= epochs ({self.epochs}), so the "
                              "pseudo-label loss never starts; lower warmup_epochs or raise epochs (or train "
                              "`scribble` for scribbles only)")
        first_average = self.ema_start + self.ema_every - 1  # epoch whose end gives the first average
        if first_average >= self.epochs - 1:
            raise ConfigError(f"s2l: the first prediction average is taken at the end of epoch "
                              f"{first_average + 1} (ema_start {self.ema_start}, ema_every {self.ema_every}), "
                              f"too late for any of the {self.epochs} epochs to use it; lower them or raise epochs")


@register
class S2LTrainer(SegmentationTrainer):
    """Scribble2Label on image folders (the averages live at image size)."""

    name = "s2l"
    consumes = frozenset({"images", "scribbles"})
    Config = S2LConfig

    def build_dataset(self) -> Any:
        cfg = self.config
        if cfg.slides:
            raise ConfigError("s2l trains on image folders (`data`); per-slide averages are not supported")
        return super().build_dataset()

    def extra_maps(self, dataset: Any) -> None:
        c = len(self.config.classes)
        # Shared memory so DataLoader workers see the in-place updates.
        self.ema = [torch.full((c, *im.shape[1:]), float("nan")).share_memory_() for im in dataset.images]
        self.ema_ready = False
        dataset.maps = {"ema": _ListMaps(self.ema)}

    def extra_loss(self, epoch: int, batch: dict, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        if epoch < cfg.warmup_epochs or not self.ema_ready:
            return {}
        ema = batch["map:ema"].to(logits.device)
        pseudo = consistent_pseudo_labels(ema, batch["mask"].to(logits.device), cfg.threshold, cfg.ignore_index)
        self._pseudo_fraction = float((pseudo != cfg.ignore_index).float().mean())
        return {"loss_up": cfg.lambda_up * global_partial_cross_entropy(logits, pseudo, cfg.ignore_index)}

    def after_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {}
        if getattr(self, "_pseudo_fraction", None) is not None:
            out["pseudo_fraction"] = self._pseudo_fraction
        if epoch >= cfg.ema_start and (epoch + 1 - cfg.ema_start) % cfg.ema_every == 0:
            # several ranks: image i is predicted by rank i % world and its average sent to all, so
            # every rank holds the same averages (the weights are the same on every rank)
            world, me = dist.world_size(), dist.rank()
            dist.sync_buffers(self.model)  # every rank predicts with rank 0's batch-norm statistics
            mine = [i for i in range(len(self.ema)) if i % world == me]
            with self.inputs.timer.device_stage("model"):  # the averages' predictions: part of the epoch's model time
                preds = predict_images(self.model, self.spec, [self.dataset.images[i] for i in mine], self.device)
            for i, p in zip(mine, preds):
                self.ema[i].copy_(ema_update(self.ema[i] if self.ema_ready else None, p, cfg.ema_alpha))
            for i, store in enumerate(self.ema):
                dist.broadcast_tensor_(store, src=i % world)
            self.ema_ready = True
            conf = torch.cat([e.max(0).values.flatten() for e in self.ema])
            out["ema_consistent"] = float((conf > cfg.threshold).float().mean())
        return out

    def get_extra(self) -> dict:
        return {"ema": [e.clone() for e in self.ema], "ema_ready": self.ema_ready}

    def set_extra(self, extra: dict) -> None:
        for store, saved in zip(self.ema, extra["ema"]):
            store.copy_(saved)
        self.ema_ready = bool(extra["ema_ready"])


class _ListMaps:
    """Index ``[k, :, rows, cols]`` into a list of (C, H, W) maps of different image sizes."""

    def __init__(self, maps: list[torch.Tensor]) -> None:
        self.maps = maps

    def __getitem__(self, key: tuple) -> torch.Tensor:
        return self.maps[key[0]][key[1:]]

"""SimCLR building blocks: NT-Xent loss, projection head, histology augmentations, LARS, schedule.

Kept apart from the trainer (``trainers/simclr.py``) so tests, benchmarks and other trainers can
use them without the plug-in machinery. Defaults follow Ciga et al. (2022), "Self supervised
contrastive learning for digital histopathology": temperature 0.1, crops of 15-100 % of the area,
rotations by multiples of 90 degrees, flips, strong colour jitter, blur half of the time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from slidekit.base import distributed as dist
from slidekit.data.datasets import RandomRot90

# (brightness, contrast, saturation, hue) as in the paper's presets.
JITTER_PRESETS: dict[str, tuple[float, float, float, float] | None] = {
    "none": None,
    "light": (0.4, 0.4, 0.4, 0.2),
    "medium": (0.8, 0.8, 0.8, 0.2),
    "heavy": (0.8, 0.8, 0.8, 0.4),
}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Normalised-temperature cross-entropy of two views (N, D) each; mean over the 2N anchors.

    Each anchor's positive is its other view; the 2N - 2 other samples are its negatives.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"need two (N, D) projections of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is never its own negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)  # log-sum-exp inside: stable for small temperatures


def nt_xent_distributed(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent with negatives from every rank: this rank's 2n anchors against the 2·world·n
    projections gathered (with gradients) from all ranks.

    The mean of the ranks' values is ``nt_xent`` of the concatenated batch, and under DDP (which
    averages gradients over ranks) so is the gradient. One process: exactly ``nt_xent``.
    """
    if not dist.is_distributed():
        return nt_xent(z1, z2, temperature)
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"need two (N, D) projections of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n, r = z1.shape[0], dist.rank()
    big_n = n * dist.world_size()
    z = torch.cat([dist.all_gather_with_grad(F.normalize(z1.float(), dim=1)),
                   dist.all_gather_with_grad(F.normalize(z2.float(), dim=1))])
    mine = torch.arange(r * n, (r + 1) * n, device=z.device)
    anchors = torch.cat([mine, mine + big_n])
    logits = z[anchors] @ z.T / temperature
    logits[torch.arange(2 * n, device=z.device), anchors] = float("-inf")  # never its own negative
    target = torch.cat([mine + big_n, mine])
    return F.cross_entropy(logits, target)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: Linear -> BN -> ReLU -> Linear, hidden width = encoder width."""

    def __init__(self, in_features: int = 512, hidden: int | None = None, out_features: int = 128) -> None:
        super().__init__()
        hidden = hidden or in_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class AugmentOptions:
    """The paper's augmentation recipe, every part switchable; trainer configs inherit these
    fields so each can be set from a config file or ``--set``."""

    min_crop: float = 0.15        # smallest crop, as a fraction of the source area
    max_crop: float = 1.0
    rotate90: bool = True
    flip: bool = True             # horizontal and vertical, each with p = 0.5
    jitter: str = "heavy"         # none | light | medium | heavy
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class AugmentConfig(AugmentOptions):
    """The augmentation recipe plus the output size (the encoder's input side in pixels)."""

    size: int = 64

    def __post_init__(self) -> None:
        if self.jitter not in JITTER_PRESETS:
            raise ValueError(f"unknown colour-jitter preset {self.jitter!r}; "
                             f"choose from {', '.join(JITTER_PRESETS)}")
        if not 0 < self.min_crop <= self.max_crop <= 1:
            raise ValueError(f"need 0 < min_crop <= max_crop <= 1, got {self.min_crop}, {self.max_crop}")
        if self.size < 8:
            raise ValueError(f"augmentation size must be at least 8 px, got {self.size}")


class HistologyAugment:
    """Two-stage SimCLR views: per-image geometry, then per-sample photometry on whole batches.

    ``geometric(img)`` crops, rotates and flips one uint8 (3, H, W) image (torchvision v2; runs
    in DataLoader workers). ``photometric(batch)`` colour-jitters, greys and blurs a float
    (B, 3, s, s) batch in [0, 1] with independent random parameters per sample, vectorised
    so that it is cheap on CPU and runs on the GPU when the batch is there, then normalises.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        self.cfg = cfg = cfg or AugmentConfig()
        steps: list[nn.Module] = [v2.RandomResizedCrop(cfg.size, scale=(cfg.min_crop, cfg.max_crop),
                                                       antialias=True)]
        if cfg.rotate90:
            steps.append(RandomRot90())
        if cfg.flip:
            steps += [v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)]
        self.geometric = v2.Compose(steps)

    def photometric(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Float (B, 3, s, s) in [0, 1] -> augmented and normalised float (B, 3, s, s)."""
        cfg, b = self.cfg, x.shape[0]

        def draw(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator).to(x.device)

        preset = JITTER_PRESETS[cfg.jitter]
        if preset is not None and cfg.jitter_p > 0:
            apply = (draw(b) < cfg.jitter_p).view(b, 1, 1, 1)
            x = torch.where(apply, color_jitter(x, *preset, generator=generator), x)
        if cfg.grayscale_p > 0:
            apply = (draw(b) < cfg.grayscale_p).view(b, 1, 1, 1)
            x = torch.where(apply, _gray(x).expand_as(x), x)
        if cfg.blur_p > 0:
            lo, hi = cfg.blur_sigma
            sigma = lo + (hi - lo) * draw(b)
            apply = (draw(b) < cfg.blur_p).view(b, 1, 1, 1)
            x = torch.where(apply, gaussian_blur(x, sigma, max(3, int(0.1 * cfg.size) // 2 * 2 + 1)), x)
        mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def views(self, images: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented, normalised view of each uint8 (3, H, W) image, as a float batch."""
        batch = torch.stack([self.geometric(img) for img in images]).float().div_(255)
        return self.photometric(batch, generator)


def histology_augment(cfg: AugmentConfig | None = None) -> HistologyAugment:
    """The SimCLR histology augmentation for ``cfg`` (see ``HistologyAugment``)."""
    return HistologyAugment(cfg)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample colour jitter of a float (B, 3, H, W) batch in [0, 1].

    Factors are drawn per image as in torchvision's ``ColorJitter`` (brightness, contrast and
    saturation in [1 - v, 1 + v], hue shift in [-h, h] of a full turn) and applied in a random
    order per batch. The hue shift is a rotation of the chroma plane in YIQ space, a linear,
    vectorised stand-in for torchvision's HSV round trip.
    """
    b, dev = x.shape[0], x.device

    def factor(v: float) -> torch.Tensor:
        return (1 + v * (2 * torch.rand(b, generator=generator) - 1)).clamp_min(0).to(dev).view(b, 1, 1, 1)

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    theta = (hue * (2 * torch.rand(b, generator=generator) - 1) * 2 * math.pi).to(dev)

    def do_b(t: torch.Tensor) -> torch.Tensor:
        return (t * fb).clamp(0, 1)

    def do_c(t: torch.Tensor) -> torch.Tensor:
        m = _gray(t).mean(dim=(2, 3), keepdim=True)
        return (fc * t + (1 - fc) * m).clamp(0, 1)

    def do_s(t: torch.Tensor) -> torch.Tensor:
        return (fs * t + (1 - fs) * _gray(t)).clamp(0, 1)

    def do_h(t: torch.Tensor) -> torch.Tensor:
        if hue == 0:
            return t
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                              device=dev, dtype=t.dtype)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(b, 3, 3, device=dev, dtype=t.dtype)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (B, 3, 3)
        return torch.einsum("bij,bjhw->bihw", m, t).clamp(0, 1)

    ops = [do_b, do_c, do_s, do_h]
    for i in torch.randperm(4, generator=generator).tolist():
        x = ops[i](x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Blur each image of a (B, C, H, W) batch with its own sigma (separable, reflect padding)."""
    b, c, h, w = x.shape
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


def split_decay_groups(model: nn.Module) -> list[dict]:
    """Two parameter groups: weights (adapted, decayed) and biases/normalisation (neither)."""
    adapt: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim <= 1 else adapt).append(p)  # biases, BN/GN/LN scales and shifts are 1-D
    return [{"params": adapt, "lars": True}, {"params": plain, "lars": False, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) over SGD with momentum.

    For groups with ``lars=True`` the update of each tensor is scaled by the trust ratio
    ``eta * ||w|| / (||g|| + weight_decay * ||w||)``; groups with ``lars=False`` (biases and
    normalisation parameters, see ``split_decay_groups``) get plain momentum SGD without decay.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001) -> None:
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "eta": eta, "lars": True})

    @staticmethod
    def trust_ratio(w: torch.Tensor, g: torch.Tensor, weight_decay: float, eta: float) -> torch.Tensor:
        """``eta * ||w|| / (||g|| + wd * ||w||)``, or 1 where either norm is zero."""
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        ratio = eta * w_norm / (g_norm + weight_decay * w_norm)
        return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            wd, lars = group["weight_decay"], group["lars"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if lars:
                    q = self.trust_ratio(p, g, wd, group["eta"])
                    g = (g + wd * p) * q
                buf = self.state[p].get("momentum")
                if buf is None:
                    buf = self.state[p]["momentum"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """Learning rate for ``batch_size``: ``base * B / 256`` (linear) or ``base * sqrt(B)`` (sqrt)."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (linear, sqrt, none)")

"""Stain augmentation for training: HED-space shifts and jitter, and RandStainNA, batched in torch.

HED: colour deconvolution with scikit-image's ``hed_from_rgb`` / ``rgb_from_hed`` (Ruifrok & Johnston)
on optical densities ``OD = -ln(max(I / 255, 1e-6))``, per channel ``hed * alpha + beta``, back to RGB.
``beta`` is in OD units (natural log), the parameterisation of Tellez et al. 2018 (who used
skimage's ``rgb2hed`` before it began dividing by ``-ln(1e-6)``), so ``beta = 0.05`` is a mild shift.
Unlike ``rgb2hed`` the stain densities are not clipped at 0: clipping loses the colours that the
three-stain model does not reproduce, while without it ``alpha = 1, beta = 0`` is the identity
(up to rounding to uint8).

RandStainNA (Shen et al., MICCAI 2022), LAB variant: each image's LAB mean and std are moved to a
"virtual template" drawn per image from normal distributions fitted to the per-image LAB means
and stds of the training images (``RandStainNA.fit``). Without a fit the distributions are
``DEFAULT_LAB_STATS``, fitted on the 15 MoNuSeg 2018 images (TCGA H&E, 7 organs, many centres;
``tests/test_stain_augment.py`` refits them from the shared data).

Tiles with too few stained pixels (glass, background; the rule of ``slidekit.stain.normalize``) are left
unchanged by ``RandStainNA``: moving blank glass to a tissue template would only amplify noise.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from slidekit.base.errors import ConfigError, StainWarning
from slidekit.stain.normalize import (
    enough_stain,
    from_bhwc,
    lab_stats,
    no_autocast,
    reinhard_transfer,
    rgb_u8_to_lab,
    stained_mask,
    to_bhwc,
    to_uint8,
)

STAIN_AUGMENTS = ("none", "hed", "randstainna")
DEFAULT_STRENGTH = 0.05
_MIN_RGB = 1e-6   # skimage's floor before the log

#: Per-channel (L, a, b) normal distributions of per-image LAB means and stds, fitted on the 15
#: MoNuSeg images in shared/data/nuclei_monuseg (all pixels, skimage's LAB, unbiased std).
DEFAULT_LAB_STATS: dict[str, list[float]] = {
    "mean_mean": [54.487, 25.6, -16.493],
    "mean_std": [9.426, 5.229, 5.741],
    "std_mean": [20.393, 10.568, 9.046],
    "std_std": [2.929, 2.193, 1.349],
}


@lru_cache(maxsize=None)
def _hed_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """skimage's RGB <-> HED matrices on ``device`` (made once per device, not per batch)."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return (torch.tensor(np.asarray(hed_from_rgb), dtype=torch.float32, device=device),
            torch.tensor(np.asarray(rgb_from_hed), dtype=torch.float32, device=device))


def _per_image(value: Any, name: str, b: int, device: torch.device) -> torch.Tensor:
    """A length-3 sequence or a (3,) / (B, 3) tensor as a float32 (B, 3) tensor on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float32).to(device)
    if t.shape == (3,):
        t = t.expand(b, 3)
    if t.shape != (b, 3) or not bool(torch.isfinite(t).all()):
        raise ConfigError(f"hed_shift: {name} must be 3 finite numbers or a ({b}, 3) tensor, got shape "
                          f"{tuple(t.shape)}")
    return t


@torch.no_grad()
def hed_shift(batch: torch.Tensor, alpha: Sequence[float] | torch.Tensor,
              beta: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Deterministic HED perturbation ``hed * alpha + beta`` per channel (H, E, D) of a uint8 batch,
    (B, H, W, 3) or (B, 3, H, W); the same shape, layout, dtype and device back."""
    bhwc, channels_first = to_bhwc(batch)
    b, h, w, _ = bhwc.shape
    a = _per_image(alpha, "alpha", b, bhwc.device)
    c = _per_image(beta, "beta", b, bhwc.device)
    to_hed, to_rgb = _hed_matrices(bhwc.device)
    with no_autocast(bhwc.device):
        od = bhwc.reshape(b, h * w, 3).float().div_(255.0).clamp_(min=_MIN_RGB).log_().neg_()
        hed = (od @ to_hed).mul_(a.unsqueeze(1)).add_(c.unsqueeze(1))
        rgb = (hed @ to_rgb).neg_().exp_().mul_(255.0)
    return from_bhwc(to_uint8(rgb).reshape(b, h, w, 3), channels_first)


def _draw(sample: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: torch.Generator | None
          ) -> torch.Tensor:
    """``torch.rand``/``torch.randn`` drawn on the generator's device (a CPU generator serves any
    batch device)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return sample(shape, generator=generator, device=device)


def _check_strength(strength: float, what: str) -> float:
    s = float(strength)
    if not math.isfinite(s) or s < 0 or s >= 1:
        raise ConfigError(f"{what}: strength must be in [0, 1), got {strength!r}")
    return s


class HEDJitter:
    """Random HED jitter: per image and channel ``alpha ~ U(1-s, 1+s)``, ``beta ~ U(-s, s)`` (OD)."""

    def __init__(self, strength: float = DEFAULT_STRENGTH) -> None:
        self.strength = _check_strength(strength, "HEDJitter")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Jittered uint8 batch, same shape/layout/device; reproducible from ``generator``."""
        b = to_bhwc(batch)[0].shape[0]
        u = _draw(torch.rand, (2, b, 3), generator).to(batch.device) * 2.0 - 1.0
        return hed_shift(batch, 1.0 + self.strength * u[0], self.strength * u[1])

    def __repr__(self) -> str:
        return f"HEDJitter(strength={self.strength})"


class RandStainNA:
    """RandStainNA-style augmentation in LAB: each image Reinhard-moved to its own random template.

    ``stats``: normal distributions of per-image LAB means and stds (``mean_mean``, ``mean_std``,
    ``std_mean``, ``std_std``, three numbers each); ``DEFAULT_LAB_STATS`` when None. ``std_scale``
    widens (> 1) or narrows (< 1) the template distributions, as RandStainNA's ``1 + std_hyper``."""

    KEYS = ("mean_mean", "mean_std", "std_mean", "std_std")

    def __init__(self, stats: dict[str, Sequence[float]] | None = None, std_scale: float = 1.0) -> None:
        src = DEFAULT_LAB_STATS if stats is None else stats
        try:
            self.stats = {k: [float(v) for v in src[k]] for k in self.KEYS}
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"RandStainNA: stats need {', '.join(self.KEYS)} (3 numbers each), got "
                              f"{sorted(src) if isinstance(src, dict) else type(src).__name__}") from None
        bad = [k for k, v in self.stats.items() if len(v) != 3 or not all(map(math.isfinite, v))
               or (k != "mean_mean" and min(v) < 0)]
        if bad or not math.isfinite(std_scale) or std_scale < 0:
            raise ConfigError(f"RandStainNA: bad statistics {', '.join(bad) or 'std_scale'} "
                              f"(3 finite numbers, spreads and stds >= 0)")
        self.std_scale = float(std_scale)

    @classmethod
    def fit(cls, images: Iterable[np.ndarray] | torch.Tensor, std_scale: float = 1.0) -> "RandStainNA":
        """Fit the template distributions to training images: (H, W, 3) uint8 arrays or a uint8 batch.
        Images with too few stained pixels are left out; at least two must remain."""
        means, stds = [], []
        for img in (images if isinstance(images, torch.Tensor) and images.ndim == 4 else list(images)):
            t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))  # a writable copy
            rgb, _ = to_bhwc(t.unsqueeze(0).cpu())
            rgb = rgb.reshape(1, -1, 3)
            if not bool(enough_stain(stained_mask(rgb))[0]):
                continue
            m, s = lab_stats(rgb_u8_to_lab(rgb).double())
            means.append(m[0])
            stds.append(s[0])
        if len(means) < 2:
            raise ConfigError(f"RandStainNA.fit: needs at least 2 stained images to fit template "
                              f"distributions, got {len(means)}")
        m, s = torch.stack(means), torch.stack(stds)
        return cls({"mean_mean": m.mean(0).tolist(), "mean_std": m.std(0).tolist(),
                    "std_mean": s.mean(0).tolist(), "std_std": s.std(0).tolist()}, std_scale)

    def to_dict(self) -> dict[str, Any]:
        return {**self.stats, "std_scale": self.std_scale}

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented uint8 batch, same shape/layout/device; reproducible from ``generator``."""
        bhwc, channels_first = to_bhwc(batch)
        b, h, w, _ = bhwc.shape
        rgb = bhwc.reshape(b, h * w, 3)
        st = {k: torch.tensor(v, dtype=torch.float32, device=rgb.device) for k, v in self.stats.items()}
        z = _draw(torch.randn, (2, b, 3), generator).to(rgb.device) * self.std_scale
        mu_t = st["mean_mean"] + st["mean_std"] * z[0]
        # A template std can come out <= 0 in a wide distribution: floor it at a tenth of the mean std.
        sd_t = torch.maximum(st["std_mean"] + st["std_std"] * z[1], 0.1 * st["std_mean"])
        with no_autocast(rgb.device):
            out = reinhard_transfer(rgb, mu_t, sd_t)[0]
        keep = ~enough_stain(stained_mask(rgb))
        if bool(keep.any()):
            out = torch.where(keep[:, None, None], rgb, out)
        return from_bhwc(out.reshape(b, h, w, 3), channels_first)

    def __repr__(self) -> str:
        return f"RandStainNA(std_scale={self.std_scale})"


def augmenter_from_options(kind: str, strength: float = DEFAULT_STRENGTH, images: Any = None
                           ) -> Callable[..., torch.Tensor] | None:
    """The augmenter that ``stain_aug`` / ``stain_aug_strength`` ask for, or None for "none".

    ``strength`` is the HED jitter's; RandStainNA's spread comes from its fitted statistics (fitted on
    ``images`` when given), so a non-default strength with it draws a ``StainWarning``."""
    k = str(kind).lower()
    if k not in STAIN_AUGMENTS:
        raise ConfigError(f"unknown stain augmentation {kind!r}; choose one of {', '.join(STAIN_AUGMENTS)}")
    if k == "none":
        return None
    if k == "hed":
        return HEDJitter(strength)
    _check_strength(strength, "randstainna")
    if strength != DEFAULT_STRENGTH:
        warnings.warn(f"stain augmentation randstainna ignores strength {strength} (its spread comes from "
                      f"the training images' LAB statistics)", StainWarning, stacklevel=2)
    return RandStainNA() if images is None else RandStainNA.fit(images)

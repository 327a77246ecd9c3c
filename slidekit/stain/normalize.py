"""Stain normalisation: Macenko and Reinhard to a reference, batched in torch on the batch's device.

Both methods work on whole uint8 batches, (B, H, W, 3) or (B, 3, H, W), with no Python loop over
the images: every per-image statistic (optical-density covariance, its 2x2/3x3 eigenvectors, angle
and concentration percentiles, LAB mean/std) is computed for all images at once.

Macenko (Macenko et al., ISBI 2009) follows torchstain / HEnorm_python, so that results agree with
them: ``OD = -ln((I + 1) / Io)`` with ``Io = 240`` (the transmitted-light intensity those
implementations assume; pixels brighter than it have OD < 0 and are dropped as glass with the rest
of the pixels below ``beta``), pixels with any channel's OD below ``beta = 0.15`` ignored for the
stain estimate, stain vectors at the ``alpha = 1`` / 99 angle percentiles in the plane of the two
largest eigenvectors, H first (the vector with the larger red OD), concentrations by least squares
over all pixels, scaled so their 99th percentiles match the reference's, rebuilt with the
reference's stain matrix.

Reinhard (Reinhard et al. 2001, as torchstain/StainTools): per-image, per-channel mean and standard
deviation in CIE LAB (skimage's D65 sRGB conversion) over all pixels are moved to the reference's.

Tiles with too few stained pixels to estimate stains (fewer than ``max(100, 1 %)`` pixels with OD
above ``beta`` in every channel: glass, background, blank tiles) come back unchanged, with both
methods, and are counted in ``StainNormalizer.unchanged_tiles``.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidekit.base.errors import ConfigError, SlidekitError, StainWarning
from slidekit.base.io import write_text_atomic

STAIN_METHODS = ("macenko", "reinhard")
#: Version of the dict written by ``to_dict``; ``from_dict`` refuses newer ones.
STAIN_DICT_VERSION = 1

IO = 240.0      # transmitted light intensity (torchstain / HEnorm_python)
ALPHA = 1.0     # angle percentile (and 100 - ALPHA) for the extreme stain vectors
BETA = 0.15     # OD threshold below which a pixel counts as unstained
MIN_STAINED_PIXELS = 100
MIN_STAINED_FRACTION = 0.01
CPU_CHUNK_PIXELS = 4 * 224 * 224   # images per CPU chunk: about this many pixels (see __call__)
GPU_CHUNK_PIXELS = 64 * 512 * 512

# sRGB (D65) <-> XYZ, and the D65 2-degree white point: skimage.color's constants.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)


# ----------------------------------------------------------------------------- layout helpers
def to_bhwc(batch: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, H, W, 3) view of a uint8 RGB batch and whether it came channels-first."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
        raise ConfigError(f"stain: expected a 4-D uint8 tensor (B, H, W, 3) or (B, 3, H, W), got "
                          f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}")
    if batch.dtype != torch.uint8:
        raise ConfigError(f"stain: expected a uint8 batch, got {batch.dtype}")
    last, first = batch.shape[-1] == 3, batch.shape[1] == 3
    if last and first:  # (B, 3, H, 3): a 3-pixel-wide channels-first batch or 3-row channels-last
        raise ConfigError(f"stain: ambiguous layout {tuple(batch.shape)} (both dim 1 and dim 3 are 3)")
    if last:
        return batch, False
    if first:
        return batch.permute(0, 2, 3, 1), True
    raise ConfigError(f"stain: expected 3 colour channels in dim 1 or 3, got shape {tuple(batch.shape)}")


def from_bhwc(bhwc: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Back to the caller's layout (contiguous in it)."""
    return bhwc.permute(0, 3, 1, 2).contiguous() if channels_first else bhwc.contiguous()


def optical_density(rgb: torch.Tensor, io: float = IO) -> torch.Tensor:
    """OD ``-ln((I + 1) / io)`` (float32) of uint8 pixels."""
    return torch.log1p(rgb.float()).neg_().add_(math.log(io))   # in place: this runs on every pixel


def stained_mask(rgb: torch.Tensor, io: float = IO, beta: float = BETA) -> torch.Tensor:
    """Stained pixels (B, N) of uint8 pixels (B, N, 3): OD >= beta in every channel.

    Compared on the uint8 values (OD >= beta <=> I <= io * exp(-beta) - 1), which is exact for
    integers and spares a float pass."""
    return rgb.amax(dim=-1) <= math.floor(io * math.exp(-beta) - 1.0)


def enough_stain(mask: torch.Tensor) -> torch.Tensor:
    """Per image (B,): whether enough pixels are stained to estimate stains."""
    n = mask.shape[-1]
    need = max(MIN_STAINED_PIXELS, math.ceil(MIN_STAINED_FRACTION * n))
    return mask.sum(dim=-1) >= min(need, n)


def masked_percentile(values: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """Per-row ``q``-th percentile (nearest rank, as torchstain's ``percentile``) of ``values`` (B, N)
    over the entries where ``mask`` (B, N) is true; rows without any give NaN."""
    if mask is None:
        n = values.shape[-1]
        return values.kthvalue(1 + round(0.01 * q * (n - 1)), dim=-1).values
    count = mask.sum(dim=-1)
    rank = torch.round(0.01 * q * (count - 1).clamp(min=0).to(torch.float64)).long()  # 0-based, ascending
    # A partial sort from the nearer end (topk of ~1 % of the row) instead of sorting whole rows:
    # rows have different counts, so kthvalue (one k for all rows) does not fit.
    smallest = q <= 50.0
    if not smallest:
        rank = (count - 1).clamp(min=0) - rank                                        # rank from the top
    fill = math.inf if smallest else -math.inf
    k = min(int(rank.max()) + 1, values.shape[-1])
    part = torch.where(mask, values, torch.full_like(values, fill)).topk(k, dim=-1, largest=not smallest).values
    out = part.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


# ----------------------------------------------------------------------------- Macenko maths
def macenko_stains(od: torch.Tensor, mask: torch.Tensor, alpha: float = ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image stain matrices (B, 3, 2; columns H, E) and concentrations (B, 2, N) of OD (B, N, 3)."""
    b = od.shape[0]
    m = mask.unsqueeze(-1).to(od.dtype)
    n = m.sum(dim=1).clamp(min=2.0)                                   # (B, 1)
    mean = (od * m).sum(dim=1) / n                                    # (B, 3)
    centred = (od - mean.unsqueeze(1)) * m
    cov = centred.transpose(1, 2) @ centred / (n - 1.0).unsqueeze(-1)  # (B, 3, 3), unbiased as torchstain
    ok = torch.isfinite(cov).all(dim=(1, 2))
    cov = torch.where(ok[:, None, None], cov, torch.eye(3, dtype=od.dtype, device=od.device).expand(b, 3, 3))
    _, vecs = torch.linalg.eigh(cov)                                  # ascending eigenvalues
    plane = vecs[:, :, 1:3]                                           # (B, 3, 2): the two largest
    proj = od @ plane                                                 # (B, N, 2)
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    lo = masked_percentile(phi, mask, alpha)
    hi = masked_percentile(phi, mask, 100.0 - alpha)
    v_lo = (plane @ torch.stack((lo.cos(), lo.sin()), dim=-1).unsqueeze(-1)).squeeze(-1)  # (B, 3)
    v_hi = (plane @ torch.stack((hi.cos(), hi.sin()), dim=-1).unsqueeze(-1)).squeeze(-1)
    # H first: the vector with the larger red OD component (Macenko / torchstain heuristic).
    h_first = (v_lo[:, 0] > v_hi[:, 0]).unsqueeze(-1)
    he = torch.stack((torch.where(h_first, v_lo, v_hi), torch.where(h_first, v_hi, v_lo)), dim=-1)
    return he, concentrations(he, od)


def concentrations(he: torch.Tensor, od: torch.Tensor) -> torch.Tensor:
    """Least-squares concentrations (B, 2, N) of OD (B, N, 3) against stain matrices (B, 3, 2)."""
    # Normal equations of the 3x2 system: same solution as lstsq, one batched 2x2 solve.
    # The 2x2 inverse written out: a singular system (both stain vectors equal, e.g. a flat
    # black tile) gives inf/NaN for that image only, where torch.linalg.solve would raise for all.
    g = he.transpose(1, 2) @ he                                                   # (B, 2, 2)
    det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
    inv = torch.stack((torch.stack((g[:, 1, 1], -g[:, 0, 1]), -1),
                       torch.stack((-g[:, 1, 0], g[:, 0, 0]), -1)), 1) / det[:, None, None]
    return (inv @ he.transpose(1, 2)) @ od.transpose(1, 2)


# ----------------------------------------------------------------------------- LAB (skimage's)
def _lab_from_f(f: torch.Tensor) -> torch.Tensor:
    """LAB from the CIE f(X/Xn), f(Y/Yn), f(Z/Zn), channels last (written into one new tensor)."""
    fx, fy, fz = f.unbind(-1)
    lab = torch.empty_like(f)
    torch.mul(fy, 116.0, out=lab[..., 0]).sub_(16.0)
    torch.sub(fx, fy, out=lab[..., 1]).mul_(500.0)
    torch.sub(fy, fz, out=lab[..., 2]).mul_(200.0)
    return lab


@lru_cache(maxsize=None)
def _to_lab_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sRGB linearisation of the 256 uint8 values and the RGB -> XYZ/white matrix, on ``device``."""
    v = torch.arange(256, dtype=torch.float64) / 255.0
    lut = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    mat = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64) / torch.tensor(_WHITE, dtype=torch.float64)[:, None]
    return lut.float().unsqueeze(1).to(device), mat.T.float().contiguous().to(device)


@lru_cache(maxsize=None)
def _from_lab_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The XYZ*white -> linear RGB matrix (transposed for ``xyz @ m``), on ``device``."""
    mat = torch.linalg.inv(torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)).T
    return (mat * torch.tensor(_WHITE, dtype=torch.float64)[:, None]).to(dtype).to(device)


def rgb_u8_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE LAB (L in [0, 100]) of uint8 sRGB pixels (..., 3), float32: skimage.color.rgb2lab's
    formulas (within 1e-4), the sRGB linearisation as a 256-entry table, the white point folded
    into the matrix."""
    lut, mat = _to_lab_tables(rgb.device)
    xyz = torch.nn.functional.embedding(rgb.long(), lut).squeeze(-1) @ mat
    small = xyz <= 0.008856
    if bool(small.any()):   # dark pixels only: most tiles skip the second branch
        f = torch.where(small, 7.787 * xyz + 16.0 / 116.0, xyz.clamp(min=0.008856).pow_(1.0 / 3.0))
    else:
        f = xyz.pow_(1.0 / 3.0)
    return _lab_from_f(f)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] of CIE LAB, channels last; skimage.color.lab2rgb's formulas (clipped)."""
    L, a, b = lab.unbind(-1)
    f = torch.empty_like(lab)
    fy = torch.add(L, 16.0, out=f[..., 1]).div_(116.0)
    torch.add(fy, a, alpha=1.0 / 500.0, out=f[..., 0])
    torch.sub(fy, b, alpha=1.0 / 200.0, out=f[..., 2]).clamp_(min=0.0)
    small = f <= 0.2068966
    xyz = f * f * f
    if bool(small.any()):
        xyz = torch.where(small, (f - 16.0 / 116.0) / 7.787, xyz)
    lin = xyz @ _from_lab_matrix(lab.device, lab.dtype)
    small = lin <= 0.0031308
    rgb = lin.clamp(min=0.0031308).pow_(1.0 / 2.4).mul_(1.055).sub_(0.055)
    if bool(small.any()):
        rgb = torch.where(small, 12.92 * lin, rgb)
    return rgb.clamp_(0.0, 1.0)


def lab_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image LAB mean and (unbiased, as torchstain) std over all pixels: (B, 3) each."""
    return lab.mean(dim=1), lab.std(dim=1)


def reinhard_transfer(rgb: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (B, N, 3) moved in LAB so that each image's channel means and stds become the target's
    ((3,) for one reference, (B, 3) for one template per image); also the images' own mean and std."""
    lab = rgb_u8_to_lab(rgb)
    mean, std = lab_stats(lab)
    scale = target_std / std.clamp(min=1e-6)                                          # (B, 3)
    lab = lab.mul_(scale.unsqueeze(1)).add_((target_mean - mean * scale).unsqueeze(1))
    return to_uint8(lab_to_rgb(lab).mul_(255.0)), mean, std


def no_autocast(device: torch.device):
    """Full float32 inside a caller's autocast region (the Predictor's AMP on CUDA): in float16 the
    OD covariance, least squares and LAB maths would lose whole uint8 levels."""
    return torch.autocast(device_type=device.type, enabled=False)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round and clamp floats in [0, 255] to uint8."""
    return x.clamp(0.0, 255.0).add_(0.5).to(torch.uint8)   # truncating x + 0.5 rounds (x >= 0)


# ----------------------------------------------------------------------------- the normaliser
class StainNormalizer:
    """Macenko or Reinhard normalisation of uint8 batches to a fitted reference (see the module doc)."""

    def __init__(self, method: str, params: dict[str, Any], *, path: str | os.PathLike | None = None,
                 error: type[SlidekitError] = ConfigError) -> None:
        """From fitted values (as ``to_dict`` holds them); bad values raise ``error`` naming ``path``."""
        if method not in STAIN_METHODS:
            raise error(f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_METHODS)}", path)
        self.method = method
        self.params = params
        self._check(path, error)
        #: Tiles returned unchanged (too few stained pixels) over this normaliser's calls so far.
        self.unchanged_tiles = 0
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    # --- fitting and (de)serialising
    @classmethod
    def fit(cls, image: np.ndarray, method: str = "macenko", *, path: str | os.PathLike | None = None
            ) -> "StainNormalizer":
        """Fit to a reference image, an (H, W, 3) uint8 array (``path`` only names it in errors)."""
        if method not in STAIN_METHODS:
            raise ConfigError(f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_METHODS)}", path)
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ConfigError(f"stain reference must be an (H, W, 3) uint8 RGB image, got {arr.dtype} {arr.shape}",
                              path)
        rgb = torch.from_numpy(np.array(arr, copy=True)).reshape(1, -1, 3)   # a writable copy
        mask = stained_mask(rgb)
        if not bool(enough_stain(mask)[0]):
            raise ConfigError(f"stain reference has too few stained pixels ({int(mask.sum())} of {mask.shape[1]} "
                              f"with OD >= {BETA}) to fit {method}", path)
        _warn_if_not_two_stains(rgb, mask, path)
        if method == "macenko":
            he, conc = macenko_stains(optical_density(rgb).double(), mask)
            max_c = masked_percentile(conc[0], None, 99.0)
            params = {"stain_matrix": he[0].tolist(), "max_concentrations": max_c.tolist(),
                      "io": IO, "alpha": ALPHA, "beta": BETA}
        else:
            mean, std = lab_stats(rgb_u8_to_lab(rgb).double())
            params = {"lab_mean": mean[0].tolist(), "lab_std": std[0].tolist()}
        return cls(method, params, path=path)

    @classmethod
    def load(cls, path: str | os.PathLike, method: str = "macenko") -> "StainNormalizer":
        """A normaliser from a JSON written by ``save``, or fitted with ``method`` to an image file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("stain reference not found", path)
        if path.suffix.lower() == ".json":
            try:
                d = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                msg = f"not a stain reference JSON ({type(exc).__name__}: {exc})".splitlines()[0]
                raise ConfigError(msg, path) from None
            return cls.from_dict(d, path=path)
        return cls.fit(read_rgb(path), method, path=path)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: ``method``, ``version`` and the reference's fitted values."""
        return {"method": self.method, "version": STAIN_DICT_VERSION, **json.loads(json.dumps(self.params))}

    @classmethod
    def from_dict(cls, d: Any, *, path: str | os.PathLike | None = None,
                  error: type[SlidekitError] = ConfigError) -> "StainNormalizer":
        """Inverse of ``to_dict``; a malformed dict raises ``error`` (ConfigError, or CheckpointError for
        a checkpoint's ``ModelSpec.stain``) naming ``path``."""
        if not isinstance(d, dict) or d.get("method") not in STAIN_METHODS:
            got = d.get("method") if isinstance(d, dict) else type(d).__name__
            raise error(f"not a stain reference: method {got!r}, expected one of {', '.join(STAIN_METHODS)}", path)
        version = d.get("version")
        if not isinstance(version, int) or version > STAIN_DICT_VERSION or version < 1:
            raise error(f"stain reference version {version!r} is not supported (this slidekit reads up to "
                        f"{STAIN_DICT_VERSION})", path)
        keys = (("stain_matrix", "max_concentrations", "io", "alpha", "beta") if d["method"] == "macenko"
                else ("lab_mean", "lab_std"))
        missing = [k for k in keys if k not in d]
        if missing:
            raise error(f"stain reference ({d['method']}) lacks {', '.join(missing)}", path)
        return cls(d["method"], {k: d[k] for k in keys}, path=path, error=error)

    def _check(self, path: str | os.PathLike | None, error: type[SlidekitError]) -> None:
        """Refuse values that would give NaN or nonsense."""
        shapes = ({"stain_matrix": (3, 2), "max_concentrations": (2,), "io": (), "alpha": (), "beta": ()}
                  if self.method == "macenko" else {"lab_mean": (3,), "lab_std": (3,)})
        for key, shape in shapes.items():
            try:
                arr = np.asarray(self.params[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise error(f"stain reference {key} is not numeric", path) from None
            if arr.shape != shape or not np.isfinite(arr).all():
                raise error(f"stain reference {key} must be {len(shape) and shape or 'a number'} of finite "
                            f"numbers, got {self.params[key]!r}", path)
            positive = key in ("max_concentrations", "lab_std", "io")
            if positive and (arr <= 0).any():
                raise error(f"stain reference {key} must be positive, got {self.params[key]!r}", path)
            lo, hi = _PLAUSIBLE[key]
            if (arr < lo).any() or (arr > hi).any():
                raise error(f"stain reference {key} {self.params[key]!r} is outside what any RGB image gives "
                            f"({_range_text(lo, hi)}); the file is damaged or hand-edited", path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as JSON, atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def __repr__(self) -> str:
        return f"StainNormalizer(method={self.method!r})"

    # --- applying
    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = (device, torch.float32)
        if key not in self._cache:
            self._cache[key] = {k: torch.tensor(v, dtype=torch.float32, device=device)
                                for k, v in self.params.items() if isinstance(v, list)}
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 batch, (B, H, W, 3) or (B, 3, H, W), on its device; same shape/layout back.

        Tiles with too few stained pixels come back unchanged and add to ``unchanged_tiles``."""
        bhwc, channels_first = to_bhwc(batch)
        b, h, w, _ = bhwc.shape
        # Contiguous (a uint8 copy for channels-first input): the same memory order for both layouts
        # gives the same float reductions, so the two layouts give identical results.
        rgb = bhwc.reshape(b, h * w, 3).contiguous()
        if b == 0 or h * w == 0:
            return batch.clone()
        # On the CPU the work is a dozen memory-bound passes over the pixels: chunks of a few
        # images keep them in cache (1.1-1.3x faster at 1 thread); a GPU takes large chunks, capped
        # so that the float intermediates of a big batch stay around a gigabyte.
        budget = CPU_CHUNK_PIXELS if rgb.device.type == "cpu" else GPU_CHUNK_PIXELS
        step = max(1, budget // (h * w))
        parts, ok = [], []
        for i in range(0, b, step):
            with no_autocast(rgb.device):
                out, good = self._normalise(rgb[i:i + step])
            parts.append(out)
            ok.append(good)
        out, good = (parts[0], ok[0]) if len(parts) == 1 else (torch.cat(parts), torch.cat(ok))
        n_ok = int(good.sum())
        if n_ok < b:   # glass / blank tiles, or a degenerate estimate: those tiles unchanged
            out = torch.where(good[:, None, None], out, rgb)
        self.unchanged_tiles += b - n_ok
        return from_bhwc(out.reshape(b, h, w, 3), channels_first)

    def _normalise(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised uint8 (B, N, 3) of uint8 (B, N, 3) and which images could be normalised (B,)."""
        io, beta = float(self.params.get("io", IO)), float(self.params.get("beta", BETA))
        mask = stained_mask(rgb, io, beta)
        ok = enough_stain(mask)
        ref = self._tensors(rgb.device)
        if self.method == "reinhard":
            out, mean, std = reinhard_transfer(rgb, ref["lab_mean"], ref["lab_std"])
            return out, ok & torch.isfinite(mean).all(dim=1) & (std > 0).all(dim=1)
        he, conc = macenko_stains(optical_density(rgb, io), mask, float(self.params.get("alpha", ALPHA)))
        max_c = masked_percentile(conc.flatten(0, 1), None, 99.0).reshape(-1, 2)       # (B, 2)
        ok = ok & torch.isfinite(he).flatten(1).all(dim=1) & torch.isfinite(max_c).all(dim=1) & (max_c > 0).all(dim=1)
        # Concentration scaling folded into the reference matrix: io * exp(-(HE_ref * s) @ C).
        mix = ref["stain_matrix"] * (ref["max_concentrations"] / max_c.clamp(min=1e-6)).unsqueeze(1)  # (B, 3, 2)
        out = torch.baddbmm(torch.full((1, 1, 1), math.log(io), dtype=conc.dtype, device=conc.device),
                            mix.neg_(), conc).exp_()                                    # (B, 3, N)
        out = out.add_(0.5).clamp_(max=255.0).to(torch.uint8)   # + 0.5 then truncation rounds
        return out.transpose(1, 2), ok


# What a reference fitted to any 8-bit RGB image can hold (per element): L* 0..100, a*/b* about
# -128..128, standard deviations at most half those spans; Macenko's unit stain vectors, and
# concentrations bounded by the optical density of one grey level out of 255 (ln 255 ~ 5.5).
_PLAUSIBLE = {"lab_mean": (np.array([0.0, -128.0, -128.0]), np.array([100.0, 128.0, 128.0])),
              "lab_std": (np.zeros(3), np.array([50.0, 128.0, 128.0])),
              "stain_matrix": (np.full(1, -1.0), np.full(1, 1.0)),
              "max_concentrations": (np.zeros(1), np.full(1, 100.0)),
              "io": (np.full(1, 1.0), np.full(1, 65535.0)),
              "alpha": (np.zeros(1), np.full(1, 50.0)),
              "beta": (np.zeros(1), np.full(1, 5.0))}

# Of the optical density of an H&E image's stained pixels, two stains span >= ~0.95 of the variance
# (0.956-0.995 over NCT-CRC and MoNuSeg tiles); uniform RGB noise gives ~0.67.
TWO_STAIN_MIN = 0.85


def _range_text(lo: np.ndarray, hi: np.ndarray) -> str:
    lo, hi = np.ravel(lo), np.ravel(hi)
    if lo.size == 1:
        return f"{lo[0]:g} to {hi[0]:g}"
    return ", ".join(f"{a:g} to {b:g}" for a, b in zip(lo, hi))


def _warn_if_not_two_stains(rgb: torch.Tensor, mask: torch.Tensor, path: str | os.PathLike | None) -> None:
    """StainWarning when the reference's colours are not two stains (noise, a photo, a fluorescence
    image): normalising to it is a judgement call the user makes knowingly."""
    od = optical_density(rgb).double()[0][mask[0]]
    od = od - od.mean(0)
    var = torch.linalg.svdvals(od) ** 2
    share = float(var[:2].sum() / var.sum()) if float(var.sum()) > 0 else 1.0
    if share < TWO_STAIN_MIN:
        where = f"{path}: " if path is not None else ""
        warnings.warn(f"{where}stain reference does not look like a two-stain (H&E) image: two stains explain "
                      f"{share:.0%} of its colour (H&E gives >= 95%); normalising to it will give odd colours",
                      StainWarning, stacklevel=3)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; ConfigError naming the file if it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "P", "L") and not im.mode.startswith("I;16"):
                raise ConfigError(f"stain reference image mode {im.mode} is not RGB", path)
            if im.mode in ("L",) or im.mode.startswith("I"):
                raise ConfigError("stain reference image is greyscale, an RGB H&E image is needed", path)
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        msg = f"cannot read stain reference image ({type(exc).__name__}: {exc})".splitlines()[0]
        raise ConfigError(msg, path) from None
    return arr


def normalizer_from_options(stain_norm: str | None, stain_ref: str | os.PathLike | None) -> StainNormalizer | None:
    """The normaliser that ``--stain-norm METHOD --stain-ref IMG|JSON`` ask for, or None for none."""
    if stain_norm is None or str(stain_norm).lower() == "none":
        if stain_ref not in (None, ""):
            raise ConfigError(f"--stain-ref {stain_ref} given without --stain-norm (one of {', '.join(STAIN_METHODS)})")
        return None
    method = str(stain_norm).lower()
    if method not in STAIN_METHODS:
        raise ConfigError(f"unknown --stain-norm {stain_norm!r}; choose none, {', '.join(STAIN_METHODS)}")
    if stain_ref in (None, ""):
        raise ConfigError(f"--stain-norm {method} needs --stain-ref (a reference image or a saved stain JSON)")
    norm = StainNormalizer.load(stain_ref, method)
    if norm.method != method:
        raise ConfigError(f"stain reference is a {norm.method} reference, but --stain-norm is {method}", stain_ref)
    return norm


#: A slide whose tissue has its 90th percentile of eosin optical density (colour deconvolution,
#: scikit-image's ``rgb2hed``) under this shows no eosin: an IHC slide (DAB with a haematoxylin
#: counterstain), or a single stain. Measured on the shared real slides: H&E 0.039 (CMU-1) and 0.060
#: (TCGA frozen section); Ki67 IHC 0.000 (OS-2, both scanners).
EOSIN_MIN_OD = 0.01


def eosin_level(rgb: np.ndarray, tissue: np.ndarray) -> float | None:
    """The 90th percentile of eosin optical density over the ``tissue`` pixels of ``rgb`` (an
    overview of the slide, uint8), or None with fewer than ``MIN_STAINED_PIXELS`` tissue pixels.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 RGB overview.
    tissue
        (H, W) boolean tissue mask on the same raster.
    """
    from skimage.color import rgb2hed

    pixels = np.asarray(rgb)[np.asarray(tissue, bool)]
    if len(pixels) < MIN_STAINED_PIXELS:
        return None
    if len(pixels) > 200_000:  # a percentile is stable on a sample; a big overview stays cheap
        pixels = pixels[np.linspace(0, len(pixels) - 1, 200_000).astype(np.int64)]
    return float(np.percentile(rgb2hed(pixels[None])[0, :, 1], 90))


def stain_remark(rgb: np.ndarray, tissue: np.ndarray, normaliser: Any, *, name: str = "") -> str | None:
    """Say so (a ``StainWarning``, and the returned line for the run's summary) when an H&E
    normaliser is applied to a slide whose tissue shows no eosin (IHC such as Ki67/DAB, or a single
    stain): Macenko would take the DAB brown for eosin and Reinhard would pull the slide's colours
    towards an H&E reference's, so the tiles no longer show their stains. Nothing is changed: the
    user asked for the normalisation; this makes the choice visible.

    Parameters
    ----------
    rgb, tissue
        An overview of the slide and its tissue mask (see :func:`eosin_level`).
    normaliser
        The run's ``StainNormalizer`` (None or False: nothing is applied, nothing to say).
    name
        The slide's name, for the message.
    """
    if not normaliser:
        return None
    level = eosin_level(rgb, tissue)
    if level is None or level >= EOSIN_MIN_OD:
        return None
    line = (f"{name + ': ' if name else ''}its tissue shows no eosin (eosin OD p90 {level:.3f} < {EOSIN_MIN_OD}; "
            f"IHC such as Ki67/DAB, or a single stain), yet {normaliser.method} normalisation to an H&E reference "
            "is applied: the normalised tiles will not show this slide's stains")
    warnings.warn(line, StainWarning, stacklevel=2)
    return line

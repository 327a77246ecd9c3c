"""Top-K tiles of a slide by maximum pixel probability, from a heatmap or from a score table.

A tile's score is the largest tumour probability of any heatmap pixel inside it (a segmenter's
"max pixel probability"; for a classification heatmap, the tile's own probability). The heatmap
is scanned band by band, so memory stays flat for slide-sized heatmaps.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidekit.base.errors import LabelError, SlidekitError
from slidekit.infer.heatmap import Heatmap
from slidekit.slidelevel.features import _Channel

DEFAULT_K = 16


@dataclass
class TopK:
    """The K best tiles of one slide, best first: level-0 ``coords``, ``scores``, and their
    ``indices`` in the tile list they were picked from."""

    indices: np.ndarray
    coords: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def topk_indices(scores: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first; ties keep the earlier index first.
    NaN scores rank last. Fewer than ``k`` scores give them all."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((np.arange(len(key)), -key))
    return order[:k]


def topk_mean(probs: np.ndarray, k: int = DEFAULT_K) -> float:
    """Mean of the ``k`` largest values (all of them when there are fewer than ``k``)."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if probs.size == 0:
        raise ValueError("no probabilities to average")
    return float(probs[topk_indices(probs, k)].mean())


def tile_max_scores(prob: Any, coords: np.ndarray, tile_size0: tuple[float, float],
                    scale: tuple[float, float], origin: tuple[float, float] = (0.0, 0.0),
                    band_rows: int = 256) -> np.ndarray:
    """Max of a 2-D probability array-like (numpy or a lazily read channel) over each tile.

    ``coords`` are level-0 top-left corners, ``tile_size0`` the tile (w, h) in level-0 pixels,
    ``scale``/``origin`` map heatmap pixels to level 0 (pixel ``(r, c)`` covers level-0
    ``[ox + c*sx, ox + (c+1)*sx)``). A tile covers every heatmap pixel it overlaps.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    H, W = int(prob.shape[0]), int(prob.shape[1])
    (sx, sy), (ox, oy) = scale, origin
    c0 = np.clip(np.floor((coords[:, 0] - ox) / sx), 0, W).astype(np.int64)
    r0 = np.clip(np.floor((coords[:, 1] - oy) / sy), 0, H).astype(np.int64)
    c1 = np.clip(np.ceil((coords[:, 0] + tile_size0[0] - ox) / sx), 0, W).astype(np.int64)
    r1 = np.clip(np.ceil((coords[:, 1] + tile_size0[1] - oy) / sy), 0, H).astype(np.int64)
    c1, r1 = np.maximum(c1, np.minimum(c0 + 1, W)), np.maximum(r1, np.minimum(r0 + 1, H))
    out = np.full(len(coords), np.nan)
    for b0 in range(0, H, band_rows):
        b1 = min(H, b0 + band_rows)
        hit = np.nonzero((r0 < b1) & (r1 > b0))[0]
        if not len(hit):
            continue
        band = np.asarray(prob[b0:b1], dtype=np.float32)
        for i in hit:
            block = band[max(r0[i], b0) - b0:min(r1[i], b1) - b0, c0[i]:c1[i]]
            if block.size:
                m = float(np.nanmax(block)) if np.isfinite(block).any() else np.nan
                out[i] = m if np.isnan(out[i]) else max(out[i], m)
    return out


def topk_from_heatmap(heatmap: Any, k: int = DEFAULT_K, coords: np.ndarray | None = None,
                      tile_size0: tuple[float, float] | None = None, channel: int | None = None) -> TopK:
    """Top-K tiles of a heatmap (``slidekit.infer.heatmap.Heatmap``, or the path of one / of a directory
    holding ``heatmap.zarr``). Tiles default to the heatmap's own predicted tiles."""
    if not isinstance(heatmap, Heatmap):
        p = Path(heatmap)
        heatmap = Heatmap(p / "heatmap.zarr" if (p / "heatmap.zarr").exists() else p)
    n = heatmap.prob.shape[0]
    c = n - 1 if channel is None else int(channel) % n
    if coords is None:
        coords, _ = heatmap.tiles
    if tile_size0 is None:
        g, smpp = heatmap.attrs["grid"], heatmap.attrs["slide"]["mpp"]
        tile_size0 = (g["size"] * g["mpp"] / smpp[0], g["size"] * g["mpp"] / smpp[1])

    scores = tile_max_scores(_Channel(heatmap.prob, c), coords, tile_size0, heatmap.scale, heatmap.origin,
                             band_rows=max(64, int(heatmap.prob.chunks[1])))
    return topk_from_scores(coords, scores, k)


def topk_from_scores(coords: np.ndarray, scores: np.ndarray, k: int = DEFAULT_K) -> TopK:
    """Top-K of a score table: ``coords`` (N, 2) level-0, ``scores`` (N,)."""
    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coordinates but {len(scores)} scores")
    idx = topk_indices(scores, k) if len(scores) else np.zeros(0, np.int64)
    return TopK(indices=idx, coords=coords[idx], scores=scores[idx])


def read_score_table(path: str | os.PathLike, score: str = "score") -> tuple[np.ndarray, np.ndarray]:
    """(coords, scores) from a CSV with columns ``x``, ``y`` and ``score`` (or the name given)."""
    path = Path(path)
    if not path.exists():
        raise SlidekitError("score table not found", path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        need = {"x", "y", score}
        if not need <= set(cols):
            raise LabelError(f"score table needs columns {sorted(need)}, has {cols}", path)
        xy, s = [], []
        for line, row in enumerate(reader, start=2):
            try:
                xy.append((int(float(row["x"])), int(float(row["y"]))))
                s.append(float(row[score]))
            except (TypeError, ValueError):
                raise LabelError(f"line {line}: x, y and {score} must be numbers", path) from None
    return np.asarray(xy, dtype=np.int64).reshape(-1, 2), np.asarray(s, dtype=np.float64)

"""Scoring slides with a trained MIL checkpoint, and the attention a pathologist can look at.

``deploy`` scores feature files (``slidekit.slidelevel.feature_store``) into a ``cohort.csv``-like
table (one row per slide: status, class probabilities, predicted class, tiles), streaming each
bag chunk by chunk where the network allows it. ``attention_outputs`` writes one slide's
per-tile attention and class scores as a heatmap zarr (+ overlay PNG with legend) through
``slidekit.infer.heatmap`` and as QuPath tile objects with measurements.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from shapely.geometry import box

from slidekit.annotations import Annotation, write_geojson
from slidekit.base.errors import SlidekitError
from slidekit.base.io import write_text_atomic
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.models.mil import MILOutput, load_mil_checkpoint, score_bag
from slidekit.regions.tiling import TileGrid
from slidekit.slidelevel import feature_store

DEFAULT_CHUNK = 4096


@dataclass
class BagScore:
    """One slide's MIL result: class probabilities, attention and per-tile class scores."""

    slide: str
    probs: np.ndarray  # (C,)
    attention: np.ndarray | None  # (N,)
    scores: np.ndarray | None  # (N, C) per-tile class probabilities
    coords: np.ndarray  # (N, 2) level-0
    patch_size_level0: int


def read_bag(path: str | os.PathLike):
    """The feature bag of one file (``feature_store.read_features``)."""
    return feature_store.read_features(Path(path))


def _iter_chunks(path: Path, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield from feature_store.iter_feature_chunks(path, rows)


def _probs(logits: torch.Tensor) -> np.ndarray:
    if logits.numel() == 1:
        p = torch.sigmoid(logits.reshape(1))
        return torch.cat([1 - p, p]).numpy()
    return torch.softmax(logits, -1).numpy()


def score_file(model: torch.nn.Module, path: str | os.PathLike, chunk_rows: int = DEFAULT_CHUNK,
               bag=None) -> BagScore:
    """Score one feature file: streamed ``chunk_rows`` rows at a time where the network allows
    (only one chunk of features in memory), else (TransMIL) read whole. ``bag``: already read."""
    path = Path(path)
    if bag is None and getattr(model, "streamable", False):
        info = feature_store.feature_info(path)  # the bag's name and tile size, features left on disk
        name, side = str(info.slide or path.stem), int(info.patch_size_level0)
        coords: list[np.ndarray] = []

        def chunks() -> Iterator[torch.Tensor]:
            for feats, xy in _iter_chunks(path, chunk_rows):
                coords.append(np.asarray(xy))
                yield torch.as_tensor(np.asarray(feats, dtype=np.float32))

        out: MILOutput = score_bag(model, chunks())
        xy = np.concatenate(coords) if coords else np.zeros((0, 2), np.int64)
    else:
        bag = read_bag(path) if bag is None else bag
        out = score_bag(model, torch.as_tensor(np.asarray(bag.features, np.float32)))
        xy, side, name = np.asarray(bag.coords), int(bag.patch_size_level0), str(bag.slide or path.stem)
    scores = torch.softmax(out.scores, -1).numpy() if out.scores is not None else None
    return BagScore(name, _probs(out.logits), None if out.attention is None else out.attention.numpy(),
                    scores, xy, side)


def deploy(checkpoint: str | os.PathLike, feature_files: Sequence[str | os.PathLike], out_csv: str | os.PathLike,
           chunk_rows: int = DEFAULT_CHUNK, progress: bool = True) -> Path:
    """Score ``feature_files`` with a MIL checkpoint into ``out_csv`` (written atomically).

    One row per file: ``slide, status, features, tiles, p_<class>..., predicted``; a file that
    cannot be read is a ``failed`` row with its error (the others are still scored)."""
    model, mil = load_mil_checkpoint(checkpoint)
    classes = list(mil["classes"])
    rows = []
    from tqdm.auto import tqdm

    for f in tqdm(list(feature_files), desc="mil-deploy", unit="slide", disable=not progress):
        try:
            s = score_file(model, f, chunk_rows)
        except (SlidekitError, OSError, ValueError) as e:
            rows.append({"slide": Path(f).stem, "status": "failed", "features": str(f), "error": str(e)})
            continue
        row = {"slide": s.slide, "status": "done", "features": str(f), "tiles": len(s.coords)}
        row.update({f"p_{c}": round(float(p), 6) for c, p in zip(classes, s.probs)})
        row["predicted"] = classes[int(np.argmax(s.probs))]
        rows.append(row)
    keys = ["slide", "status", "features", "tiles", *[f"p_{c}" for c in classes], "predicted", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, buf.getvalue())
    return out


def _tile_grid(score: BagScore, slide) -> TileGrid:
    """The feature tiles as a TileGrid at level 0 (one heatmap cell per tile)."""
    mpp = tuple(float(m) for m in slide.mpp)
    return TileGrid(coords=score.coords, mpp=mpp[0], size=score.patch_size_level0, overlap=0,
                    slide_dimensions=tuple(slide.dimensions), slide_mpp=mpp,
                    slide_name=getattr(slide, "name", score.slide), slide_id=score.slide)


def attention_outputs(checkpoint: str | os.PathLike, features: str | os.PathLike, slide, out_dir: str | os.PathLike,
                      chunk_rows: int = DEFAULT_CHUNK) -> dict[str, Path]:
    """Write one slide's attention (normalised to [0, 1] by its maximum) and per-tile class scores:
    ``attention.zarr`` (+ ``attention.png`` overlay with legend) and ``tiles.geojson`` (QuPath
    tile objects, measurements ``attention``, ``attention_rank`` and ``score_<class>``)."""
    model, mil = load_mil_checkpoint(checkpoint)
    if feature_store.feature_info(features).patch_size_level0 <= 0:
        raise SlidekitError("the feature file does not say its tile size; attention tiles need it", features)
    s = score_file(model, features, chunk_rows)  # streamed where the network allows
    if s.attention is None:
        raise SlidekitError(f"a {mil['arch']} network has no attention; use abmil, clam or transmil", features)
    classes = list(mil["classes"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    att = s.attention / max(float(s.attention.max()), 1e-12)
    grid = _tile_grid(s, slide)
    values = att[:, None] if s.scores is None else np.concatenate([att[:, None], s.scores], axis=1)
    writer = HeatmapWriter(out / "attention.zarr", grid, "classification", ["attention", *classes],
                           attrs={"mil": {"arch": mil["arch"], "checkpoint": str(checkpoint)}})
    writer.add(np.arange(len(att)), values.astype(np.float32))
    hm: Heatmap = writer.finish()
    hm.overlay(slide, out / "attention.png")
    rank = np.empty(len(att), dtype=np.int64)
    rank[np.argsort(-att, kind="stable")] = np.arange(1, len(att) + 1)
    ps = s.patch_size_level0
    objs = []
    for i, (x, y) in enumerate(s.coords.tolist()):
        meas = {"attention": float(att[i]), "attention_rank": int(rank[i])}
        if s.scores is not None:
            meas.update({f"score_{c}": float(v) for c, v in zip(classes, s.scores[i])})
        objs.append(Annotation(box(x, y, x + ps, y + ps), label="attention", kind="tile", measurements=meas))
    write_geojson(objs, out / "tiles.geojson", bounds=tuple(slide.dimensions))
    return {"heatmap": out / "attention.zarr", "overlay": out / "attention.png", "geojson": out / "tiles.geojson"}


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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from shapely.geometry import box

from slidekit.annotations import Annotation, write_geojson
from slidekit.base.errors import FeatureError, SlidekitError, SlidekitWarning
from slidekit.base.io import file_identity, write_text_atomic
from slidekit.base.outputs import OutputDir
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.models.mil import ATTENTION_ARCHS, MILOutput, load_mil_checkpoint, score_bag
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.options import ReadOptions
from slidekit.regions.tiling import TileGrid
from slidekit.slidelevel import feature_store
from slidekit.slidelevel.mil_tasks import Classification, MILTask, task_from_checkpoint
from slidekit.slides.identity import slide_fingerprint

DEFAULT_CHUNK = 4096


@dataclass
class BagScore:
    """One slide's MIL result: the task's predictions (classification: class probabilities),
    attention and per-tile scores."""

    slide: str
    probs: np.ndarray  # (P,) the task's predictions (classification: class probabilities)
    attention: np.ndarray | None  # (N,)
    scores: np.ndarray | None  # (N, C) per-tile scores (classification: class probabilities)
    coords: np.ndarray  # (N, 2) level-0
    patch_size_level0: int
    outputs: np.ndarray | None = None  # (out_dim,) the head's raw outputs
    score_names: list[str] | None = None  # names of the ``scores`` columns


def read_bag(path: str | os.PathLike):
    """The feature bag of one file (``feature_store.read_features``)."""
    return feature_store.read_features(Path(path))


def _iter_chunks(path: Path, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield from feature_store.iter_feature_chunks(path, rows)


def score_file(model: torch.nn.Module, path: str | os.PathLike, chunk_rows: int = DEFAULT_CHUNK,
               bag=None, task: MILTask | None = None) -> BagScore:
    """Score one feature file: streamed ``chunk_rows`` rows at a time where the network allows
    (only one chunk of features in memory), else (TransMIL) read whole. ``bag``: already read.
    ``task`` turns the head's outputs into predictions (default: classification's softmax)."""
    path = Path(path)
    if bag is None and getattr(model, "streamable", False):
        info = feature_store.feature_info(path)  # the bag's name and tile size, features left on disk
        name, side = str(info.slide or path.stem), int(info.patch_size_level0)
        if info.rows == 0:
            raise FeatureError("the feature file holds no tiles (an empty bag)", path)
        coords: list[np.ndarray] = []

        def chunks() -> Iterator[torch.Tensor]:
            for feats, xy in _iter_chunks(path, chunk_rows):
                coords.append(np.asarray(xy))
                yield torch.as_tensor(np.asarray(feats, dtype=np.float32))

        out: MILOutput = score_bag(model, chunks())
        xy = np.concatenate(coords) if coords else np.zeros((0, 2), np.int64)
    else:
        bag = read_bag(path) if bag is None else bag
        if len(bag) == 0:
            raise FeatureError("the feature file holds no tiles (an empty bag)", path)
        out = score_bag(model, torch.as_tensor(np.asarray(bag.features, np.float32)))
        xy, side, name = np.asarray(bag.coords), int(bag.patch_size_level0), str(bag.slide or path.stem)
    task = task or Classification([str(i) for i in range(max(int(out.logits.numel()), 2))])
    names, scores = task.tile_outputs(out.scores) if out.scores is not None else (None, None)
    return BagScore(name, task.predict(out.logits[None])[0], None if out.attention is None else out.attention.numpy(),
                    scores, xy, side, out.logits.numpy(), names)


def _unchecked_warning(unchecked: dict[str, list[Path]], what: str) -> None:
    """One warning for the files whose records could not be compared (foreign layouts)."""
    if not unchecked:
        return
    files = sorted({str(p) for ps in unchecked.values() for p in ps})
    warnings.warn(f"{len(files)} feature file(s) without slidekit's records ({', '.join(files[:3])}"
                  f"{', ...' if len(files) > 3 else ''}): {', '.join(unchecked)} not checked against {what}",
                  SlidekitWarning, stacklevel=3)


def _failure(path: Path, e: BaseException) -> str:
    """One line naming the file: slidekit errors name it already; anything else gets it added."""
    msg = " ".join(str(e).split())
    if isinstance(e, SlidekitError):
        return msg if e.path is not None else f"{path}: {msg}"
    return f"{path}: {type(e).__name__}: {msg}"


def deploy(checkpoint: str | os.PathLike, feature_files: Sequence[str | os.PathLike], out_csv: str | os.PathLike,
           chunk_rows: int = DEFAULT_CHUNK, progress: bool = True, cohort: str | os.PathLike | None = None) -> Path:
    """Score ``feature_files`` with a MIL checkpoint into ``out_csv`` (written atomically).

    One row per file: ``slide, status, features, tiles``, then the task's columns (classification:
    ``p_<class>..., predicted``). Each file is checked against what the model was trained on
    (feature width; encoder name, weights, µm/px, patch size and token rule where both record
    them): a mismatch, or a file that cannot be read or scored, is a ``failed`` row naming the file
    and the problem, and the others are still scored; the table always has every file's row. Files
    without slidekit's records (TRIDENT, CLAM, STAMP) are scored with one warning naming what
    could not be checked.

    ``cohort``: an ``embed`` cohort's ``--out`` folder, whose slides are scored too (each under its
    id, ``OUT/<id>/features.h5``, with the manifest's ``patient`` and the task's target columns when
    ``cohort.csv`` has them); a slide whose embed row is not done is a ``failed`` row saying so."""
    model, mil = load_mil_checkpoint(checkpoint)
    task = task_from_checkpoint(mil, checkpoint)
    in_dim, encoder = int(mil["in_dim"]), mil.get("encoder") or {}
    rows: list[dict] = []
    unchecked: dict[str, list[Path]] = {}
    jobs: list[tuple[str | os.PathLike, dict]] = [(f, {}) for f in feature_files]
    carried: list[str] = []
    if cohort is not None:
        found, not_done = feature_store.cohort_feature_files(cohort)
        carried = [c for c in ("patient", *getattr(task, "target_columns", ())) if any(c in r for r in found)]
        jobs += [(r["features"], {"slide": r["id"], **{c: r.get(c, "") for c in carried}}) for r in found]
        for line in not_done:
            sid = line.split(":", 1)[0]
            rows.append({"slide": sid, "status": "failed", "features": str(Path(cohort) / sid / "features.h5"),
                         "error": f"{Path(cohort)}: {line}"})
    from tqdm.auto import tqdm

    for f, known in tqdm(jobs, desc="mil-deploy", unit="slide", disable=not progress):
        try:
            info = feature_store.feature_info(f)
            for field in feature_store.check_features_for_model(info, in_dim, encoder):
                unchecked.setdefault(field, []).append(Path(f))
            s = score_file(model, f, chunk_rows, task=task)
        except Exception as e:  # one slide's failure is its row: the table keeps every slide
            rows.append({"slide": Path(f).stem, "status": "failed", "features": str(f), "error": _failure(Path(f), e),
                         **known})
            continue
        rows.append({"slide": s.slide, "status": "done", "features": str(f), "tiles": len(s.coords),
                     **task.deploy_row(s.probs), **known})
    _unchecked_warning(unchecked, f"the model ({checkpoint})")
    keys = ["slide", "status", "features", "tiles", *task.deploy_columns,
            *[c for c in carried if c not in task.deploy_columns], "error"]
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
    mpp = (float(slide.mpp[0]), float(slide.mpp[1]))
    return TileGrid(coords=score.coords, mpp=mpp[0], size=score.patch_size_level0, overlap=0,
                    slide_dimensions=tuple(slide.dimensions), slide_mpp=mpp,
                    slide_name=getattr(slide, "name", score.slide), slide_id=score.slide)


ATTENTION_OUTPUTS = ("attention.zarr", "attention.png", "tiles.geojson")


def _check_tiles_on_slide(coords: np.ndarray, side: int, slide, path: Path) -> None:
    """FeatureError unless every tile's corner (level-0 ``coords``) lies on the slide and the tile size
    ``side`` is at most the slide's."""
    W, H = (int(v) for v in slide.dimensions)
    if not 0 < side <= max(W, H):
        raise FeatureError(f"tile size {side} level-0 px does not fit slide {slide.path} ({W} x {H})", path)
    xy = np.asarray(coords)
    off = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= W) | (xy[:, 1] >= H) if len(xy) else np.zeros(0, bool)
    if off.any():
        i = int(np.argmax(off))
        raise FeatureError(f"{int(off.sum())} tile corner(s) lie off slide {slide.path} ({W} x {H}), e.g. "
                           f"({int(xy[i, 0])}, {int(xy[i, 1])}): features of another slide or level?", path)


def _attention_checks(checkpoint: str | os.PathLike, features: str | os.PathLike, slide: Any) -> tuple:
    """Everything refused before a file is written, without scoring the bag: the model, its task and
    the feature file's record, checked against each other and ``slide``, and the tiles checked to lie
    on the slide (FeatureError naming the file); one warning names what a foreign file does not let us
    check. Returns ``(model, mil, task)``."""
    model, mil = load_mil_checkpoint(checkpoint)
    task = task_from_checkpoint(mil, checkpoint)
    info = feature_store.feature_info(features)
    if info.patch_size_level0 <= 0:
        raise FeatureError("the feature file does not say its tile size; attention tiles need it", features)
    unchecked = feature_store.check_features_for_model(info, int(mil["in_dim"]), mil.get("encoder") or {})
    unchecked += feature_store.check_features_for_slide(info, slide.path)
    if mil["arch"] not in ATTENTION_ARCHS:
        raise FeatureError(f"a {mil['arch']} network has no attention; use abmil, clam or transmil", features)
    assert info.coords is not None  # feature_info reads them
    _check_tiles_on_slide(info.coords, info.patch_size_level0, slide, Path(features))
    _unchecked_warning({u: [Path(features)] for u in unchecked}, f"the model ({checkpoint}) and the slide")
    return model, mil, task


def _attention_score(checked: tuple, features: str | os.PathLike, chunk_rows: int) -> tuple:
    """The checked (``_attention_checks``) model's scores of the bag. Returns ``(mil, task, score)``."""
    model, mil, task = checked
    s = score_file(model, features, chunk_rows, task=task)  # streamed where the network allows
    if s.attention is None:
        raise FeatureError(f"a {mil['arch']} network has no attention; use abmil, clam or transmil", features)
    return mil, task, s


def _write_attention(checkpoint: str | os.PathLike, slide: Any, out: Path, scored: tuple) -> dict:
    """Write the attention outputs of a scored bag into ``out`` (already claimed)."""
    mil, task, s = scored
    names = list(s.score_names or [])
    att = s.attention / max(float(s.attention.max()), 1e-12)
    grid = _tile_grid(s, slide)
    # A value map of one channel, not classes: the overlay (and the viewer) colour it with a colour
    # map whose low values fade into the slide, and the legend is a colour bar for "attention".
    writer = HeatmapWriter(out / "attention.zarr", grid, "classification", ["attention"],
                           attrs={"mil": {"arch": mil["arch"], "checkpoint": str(checkpoint), "task": task.name,
                                          "tile_scores": names, "normalised": "attention / its maximum"}})
    writer.add(np.arange(len(att)), att[:, None].astype(np.float32))
    hm: Heatmap = writer.finish()
    hm.overlay(slide, out / "attention.png")
    rank = np.empty(len(att), dtype=np.int64)
    rank[np.argsort(-att, kind="stable")] = np.arange(1, len(att) + 1)
    ps = s.patch_size_level0
    objs = []
    for i, (x, y) in enumerate(s.coords.tolist()):
        meas = {"attention": float(att[i]), "attention_rank": int(rank[i])}
        if s.scores is not None:
            meas.update({f"score_{c}": float(v) for c, v in zip(names, s.scores[i])})
        objs.append(Annotation(box(x, y, x + ps, y + ps), label="attention", kind="tile", measurements=meas))
    write_geojson(objs, out / "tiles.geojson", bounds=tuple(slide.dimensions))
    return {"tiles": len(att), "arch": mil["arch"], "task": task.name, "tile_scores": names}


def attention_outputs(checkpoint: str | os.PathLike, features: str | os.PathLike, slide: Any,
                      out_dir: str | os.PathLike, chunk_rows: int = DEFAULT_CHUNK) -> dict[str, Path]:
    """Write one slide's attention (normalised to [0, 1] by its maximum) and per-tile class scores:
    ``attention.zarr`` (one value channel ``attention``; + ``attention.png``: the slide with the
    attention in a colour map whose low values are transparent, and its colour-bar legend) and
    ``tiles.geojson`` (QuPath tile objects, measurements ``attention``, ``attention_rank`` and
    ``score_<name>``: the task's per-tile scores, for classification each class's probability).

    Refused before anything is written (FeatureError naming the file): features recorded for
    another slide than ``slide`` (fingerprint), of another width or encoder identity than the
    model's. A file without those records is used with one warning naming what was not checked.
    ``out_dir`` follows the output rule of every command: files slidekit did not write there (or
    another slide's) are not replaced. ``attention_slide`` does the same as a job of the shared
    runner (a rerun skips a finished, verified folder)."""
    scored = _attention_score(_attention_checks(checkpoint, features, slide), features, chunk_rows)
    OutputDir(out_dir, slide.path, slide_fingerprint(slide.path)).claim(*ATTENTION_OUTPUTS)
    out = Path(out_dir)
    _write_attention(checkpoint, slide, out, scored)
    return {"heatmap": out / "attention.zarr", "overlay": out / "attention.png", "geojson": out / "tiles.geojson"}


class AttentionJob(SlideJob):
    """``slidekit mil-attention``: one slide's MIL attention and tile scores (``attention_outputs``)
    as a job of the shared runner: the inputs are checked against the slide before the folder is
    touched, a finished folder whose outputs verify is skipped, one that does not is redone."""

    name = "mil-attention"
    outputs = ATTENTION_OUTPUTS

    def __init__(self, checkpoint: str | os.PathLike, features: str | os.PathLike, *,
                 reading: ReadOptions | None = None, chunk_rows: int = DEFAULT_CHUNK) -> None:
        self.checkpoint, self.features, self.chunk_rows = checkpoint, features, chunk_rows
        self.reading = reading or ReadOptions()
        self._inputs: tuple | None = None

    def config(self) -> dict:
        return {"model": file_identity(self.checkpoint), "features": file_identity(self.features)}

    def check(self, slide: Any) -> None:
        # the checks that need no scoring (identities, tiles on the slide) refuse bad inputs before the
        # folder is touched; the bag is scored in run(), so a finished folder is skipped without scoring
        self._inputs = _attention_checks(self.checkpoint, self.features, slide)

    def figures(self, summary: dict) -> dict:
        return {"tiles": summary["tiles"]}

    def run(self, ctx: JobContext) -> dict:
        assert self._inputs is not None  # check() ran: run_job calls it first
        scored = _attention_score(self._inputs, self.features, self.chunk_rows)
        return _write_attention(self.checkpoint, ctx.slide, ctx.out, scored)


def attention_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | os.PathLike,
                    features: str | os.PathLike, reading: ReadOptions | None = None, progress: bool = True) -> dict:
    """:func:`attention_outputs` for a slide file, as a job of the shared runner; returns its summary.

    Parameters
    ----------
    slide_path
        The slide the features were made from.
    out_dir
        The output folder.
    model
        The MIL checkpoint.
    features
        The slide's feature file.
    reading
        How the slide is opened (``ReadOptions``).
    progress
        Show progress bars.
    """
    return run_job(AttentionJob(model, features, reading=reading), slide_path, out_dir, progress=progress)

"""Nuclei of a whole slide as QuPath detections: the job behind ``slidekit cells``.

A segmentation model (a checkpoint, or the built-in ``hematoxylin`` with a threshold) runs over the
slide's tissue at its µm/px on overlapping tiles (``Predictor``). Each tile's foreground
probability is split into instances (scikit-image watershed): seeded by the foreground minus the
outline when the model has an outline class (``boundary``, ``contour``, ``border``, ``edge``),
else by the maxima of the distance transform. A nucleus is kept by the one tile whose *core* (the
tile less half the overlap on each side that has a neighbour) holds its centroid, so every nucleus
is written exactly once across seams. Nuclei cut by the tile edge lie, whole, in the neighbour
that owns them (the overlap must exceed a nucleus diameter).

Outputs in ``out_dir``: ``cells.geojson`` (QuPath ``detection`` features, streamed band by band;
``cells.geojson.gz`` above ``GZIP_ABOVE_NUCLEI`` nuclei or with ``gzip=True``; QuPath reads
both), ``cells.csv`` (one row per nucleus: centroid in level-0 px and µm, the measurements),
``regions.csv`` with ``roi`` (counts and densities per ROI polygon) and ``summary.json``. Work is
kept per tile row (band) in ``cells.part/``: an interrupted run resumes from the bands it had
finished.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from slidekit.annotations.geometry import make_valid
from slidekit.base.devices import resolve_device
from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.base.io import atomic_path, config_digest
from slidekit.base.resources import configure_threads
from slidekit.base.timing import StageTimer
from slidekit.infer.predictor import Predictor, load_model, release_memory
from slidekit.models.builtin import BUILTINS, builtin_model
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Region, Roi, Tissue
from slidekit.regions.options import OptionGroups, ReadOptions, RoiOptions, RunOptions, TileOptions, TissueOptions
from slidekit.regions.qc import read_qc_labels
from slidekit.regions.qc_detect import ARTEFACTS, LABELS
from slidekit.regions.qc_tiles import TileQc, qc_figures
from slidekit.regions.roi import roi_identity
from slidekit.regions.tiling import TileGrid, TileReader

CELL_OUTPUTS = ("cells.geojson", "cells.geojson.gz", "cells.csv", "regions.csv", "cells.part", "summary.json")
COLUMNS = ["id", "x", "y", "x_um", "y_um", "area_um2", "perimeter_um", "circularity", "solidity",
           "eccentricity", "hematoxylin_od", "eosin_od", "uuid"]
# QuPath measurement names for the columns after the centroid
MEASURE_NAMES = {"area_um2": "Area µm^2", "perimeter_um": "Perimeter µm", "circularity": "Circularity",
                 "solidity": "Solidity", "eccentricity": "Eccentricity", "hematoxylin_od": "Hematoxylin OD mean",
                 "eosin_od": "Eosin OD mean"}
# ``gzip=None`` (auto): GeoJSON of more nuclei than this is written gzip-compressed. A nucleus takes
# about 0.7 kB of GeoJSON, so the plain file stays under ~15 MB (quick to open and to diff).
GZIP_ABOVE_NUCLEI = 20_000
SPLITS = ("auto", "boundary", "distance")
# Tiles of a band run in chunks of this many (see cells_slide): the tile readers' caches and the
# nuclei in memory do not grow with the slide's width.
CHUNK_TILES = 24
BAND_FORMAT = "bands2"  # band files of cells.part/: measurements, then the closed outline as JSON


BOUNDARY_NAMES = frozenset({"boundary", "contour", "border", "edge", "nucleus boundary", "nuclear boundary"})


def boundary_class(classes: list[str]) -> int | None:
    """Index of the class that marks nucleus outlines (named boundary, contour, border or edge), or None."""
    hits = [i for i, c in enumerate(classes) if c.strip().lower() in BOUNDARY_NAMES]
    return hits[-1] if hits else None


def split_instances(prob: np.ndarray, threshold: float = 0.5, min_distance: int = 3,
                    min_area_px: int = 8, boundary: np.ndarray | None = None) -> np.ndarray:
    """Label image of nuclei from a foreground probability map ``prob``.

    Without ``boundary``: threshold, then a watershed on the distance transform seeded at its
    maxima (at least ``min_distance`` px apart) splits touching nuclei. With ``boundary`` (the
    probability of a nucleus-outline class, same shape; ``prob`` then covers nucleus and outline):
    the seeds are the connected pieces of the foreground minus the outline, grown back over the
    foreground by a watershed on the outline probability. Pieces under ``min_area_px`` are dropped.
    """
    fg = prob >= threshold
    if not fg.any():
        return np.zeros(prob.shape, np.int32)
    comp, n = ndi.label(fg)
    areas = np.bincount(comp.ravel())
    keep = areas >= max(1, min_area_px)
    keep[0] = False
    if not keep[1:].any():
        return np.zeros(prob.shape, np.int32)
    if not keep[1:].all():  # small specks out first: less for the watershed and the seeds to do
        fg = keep[comp]
        comp, n = ndi.label(fg)
    if boundary is not None:
        markers, m = ndi.label(fg & (boundary < threshold))
        if m:  # specks of interior (a dip in the outline probability) seed no nucleus of their own
            tiny = np.bincount(markers.ravel()) < max(1, min_area_px // 4)
            tiny[0] = False
            if tiny.any():
                markers[tiny[markers]] = 0
        elevation = boundary
    else:
        dist = ndi.distance_transform_edt(fg)
        # one call over the tile, not one per component (``labels=`` loops over components in Python);
        # a component whose peaks all lost to a neighbour's gets its own seed below
        peaks = peak_local_max(dist, min_distance=max(1, int(min_distance)), exclude_border=False)
        markers = np.zeros(prob.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        m = len(peaks)
        elevation = -dist
    # components without a seed (tiny, flat, or all outline) still get one: their innermost pixel
    seeded = np.zeros(n + 1, bool)
    seeded[comp[markers > 0]] = True
    missing = np.nonzero(~seeded[1:])[0] + 1
    if len(missing):
        score = -elevation if boundary is None else ndi.distance_transform_edt(fg)
        pos = np.array(ndi.maximum_position(score, comp, missing), dtype=np.intp).reshape(-1, 2)
        markers[pos[:, 0], pos[:, 1]] = np.arange(m + 1, m + 1 + len(missing))
    labels = watershed(elevation, markers, mask=fg)
    if min_area_px > 1:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_area_px
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
    return labels.astype(np.int32)


# skimage.measure.perimeter (4-connectivity) weights, indexed by the neighbourhood code
_PERIM_W = np.zeros(50)
_PERIM_W[[5, 7, 15, 17, 25, 27]] = 1
_PERIM_W[[21, 33]] = np.sqrt(2)
_PERIM_W[[13, 23]] = (1 + np.sqrt(2)) / 2


def label_perimeters(labels: np.ndarray, n: int) -> np.ndarray:
    """Perimeter (px) of labels 1..n, each exactly as ``skimage.measure.perimeter`` of its own mask
    (4-connectivity), for all labels in one vectorised pass."""
    L = np.pad(labels, 1)
    c = L[1:-1, 1:-1]
    # border pixel: in a label, with a 4-neighbour outside it
    b = (c > 0) & ((L[:-2, 1:-1] != c) | (L[2:, 1:-1] != c) | (L[1:-1, :-2] != c) | (L[1:-1, 2:] != c))
    B = np.pad(b, 1)
    code = b.astype(np.int64)
    H, W = labels.shape
    for dy, dx, w in ((-1, 0, 2), (1, 0, 2), (0, -1, 2), (0, 1, 2), (-1, -1, 10), (-1, 1, 10), (1, -1, 10), (1, 1, 10)):
        sl = (slice(1 + dy, 1 + dy + H), slice(1 + dx, 1 + dx + W))
        code += w * (B[sl] & (L[sl] == c))
    return np.bincount(c[b].ravel(), _PERIM_W[code[b]], minlength=n + 1)[1:]


def measure_instances(labels: np.ndarray, rgb: np.ndarray, mpp: float) -> list[dict]:
    """Per nucleus of ``labels``: centroid (px), contour (px, (x, y)) and measurements in µm
    (``mpp`` µm per pixel of ``labels``); mean H and E optical density from ``rgb2hed``.

    Area and perimeter are those of ``regionprops`` (pixel count; 4-connectivity perimeter), and
    so is eccentricity (the ellipse with the same second moments); solidity is the outline's area
    over its convex hull's. Sums per label are computed for all nuclei at once; only the outline
    is traced per nucleus (on its bounding box).
    """
    n = int(labels.max())
    if n == 0:
        return []
    flat = labels.ravel()
    yy, xx = np.indices(labels.shape, dtype=np.float64)

    def per_label(w: Any) -> np.ndarray:
        return np.bincount(flat, None if w is None else w.ravel(), minlength=n + 1)[1:]

    area = per_label(None)
    with np.errstate(invalid="ignore", divide="ignore"):  # labels without pixels: skipped below
        cx, cy = per_label(xx) / area, per_label(yy) / area
        vxx, vyy = per_label(xx * xx) / area - cx ** 2, per_label(yy * yy) / area - cy ** 2
        vxy = per_label(xx * yy) / area - cx * cy
        hed = rgb2hed(rgb)
        h_od, e_od = per_label(hed[..., 0]) / area, per_label(hed[..., 1]) / area
    half = np.sqrt(((vxx - vyy) / 2) ** 2 + vxy ** 2)
    l1, l2 = (vxx + vyy) / 2 + half, np.maximum((vxx + vyy) / 2 - half, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
    perimeter = label_perimeters(labels, n)
    out = []
    for k, sl in enumerate(ndi.find_objects(labels)):
        if sl is None or area[k] == 0:
            continue
        y0, x0 = sl[0].start, sl[1].start
        # the outline traced on the mask at twice the resolution (OpenCV, µs per nucleus): its
        # vertices lie a quarter pixel inside the pixel edges, so the polygon rasterises back to
        # the same pixels
        m2 = np.zeros((2 * (sl[0].stop - y0) + 2, 2 * (sl[1].stop - x0) + 2), np.uint8)
        m2[1:-1, 1:-1] = (labels[sl] == k + 1).repeat(2, 0).repeat(2, 1)
        cs, _ = cv2.findContours(m2, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not cs:
            continue
        c = max(cs, key=cv2.contourArea)
        hull = float(cv2.contourArea(cv2.convexHull(c)))
        simple = cv2.approxPolyDP(c, 1.0, True)[:, 0].astype(np.float64)  # 0.5 px at the labels' scale
        # 2x pixel u (padded by one) has its centre at (u - 1 + 0.5) / 2 in the crop's edge coordinates
        xy = (simple - 0.5) / 2 + (x0, y0)
        a_um, per = float(area[k]) * mpp * mpp, float(perimeter[k]) * mpp
        out.append({"centroid": (float(cx[k]) + 0.5, float(cy[k]) + 0.5), "contour": xy,
                    "area_um2": a_um, "perimeter_um": per,
                    "circularity": float(min(1.0, 4 * np.pi * a_um / per ** 2)) if per > 0 else 0.0,
                    "solidity": float(min(1.0, cv2.contourArea(c) / hull)) if hull > 0 else 1.0,
                    "eccentricity": float(ecc[k]), "hematoxylin_od": float(h_od[k]), "eosin_od": float(e_od[k])})
    return out


def nucleus_channels(classes: list[str], channel: int | None = None, split: str = "auto") -> tuple[int, int | None]:
    """(nucleus channel, outline channel or None) of a model with ``classes``.

    ``split``: ``auto`` uses an outline class (:func:`boundary_class`) when the model has one, else
    the distance-transform watershed; ``boundary`` requires one; ``distance`` ignores it.
    ``channel`` (default: the last class that is not the outline) holds the nucleus probability.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    b = None if split == "distance" else boundary_class(classes)
    if split == "boundary" and b is None:
        names = ", ".join(sorted(BOUNDARY_NAMES))
        raise ConfigError(f"split 'boundary' needs a model with an outline class ({names}); "
                          f"this one has {classes}")
    others = [i for i in range(len(classes)) if i != b]
    if not others:
        raise ConfigError(f"the model's only class {classes[0]!r} is an outline class: no nucleus class")
    ch = others[-1] if channel is None else int(channel)
    if not 0 <= ch < len(classes) or ch == b:
        raise ConfigError(f"channel {ch} is not a nucleus class of the model (classes: {classes})")
    return ch, b


def load_cells_model(model: str | os.PathLike) -> tuple[Any, Any, str]:
    """(network, spec, identity) for ``cells_slide``: a checkpoint, or a built-in at full resolution
    (output stride 1: a nucleus needs every pixel; the heatmap built-ins pool by 8)."""
    if str(model) in BUILTINS:
        net, spec = builtin_model(str(model), stride=1, patch_size=256)
        return net, spec, f"builtin:{model}-stride1"
    return load_model(model)


def _cores(grid: TileGrid) -> np.ndarray:
    """(N, 4) core box (x0, y0, x1, y1) of each tile in tile pixels: half the overlap is cut off on
    each side that has a neighbouring tile in the grid; sides without one keep the tile's edge."""
    idx = grid.indices
    have = {tuple(v) for v in idx.tolist()}
    h = grid.overlap / 2
    out = np.zeros((len(grid), 4))
    for i, (c, r) in enumerate(idx.tolist()):
        out[i] = [h if (c - 1, r) in have else -np.inf, h if (c, r - 1) in have else -np.inf,
                  grid.size - h if (c + 1, r) in have else np.inf, grid.size - h if (c, r + 1) in have else np.inf]
    return out


def tile_nuclei(prob: np.ndarray, rgb: np.ndarray, core: np.ndarray, mpp: float, threshold: float,
                min_distance: int, min_area_px: int, boundary: np.ndarray | None = None) -> list[dict]:
    """The nuclei of one tile that it owns (centroid in ``core``)."""
    labels = split_instances(prob, threshold, min_distance, min_area_px, boundary)
    n = int(labels.max())
    if n == 0:
        return []
    # ownership first (cheap centroids), so only owned nuclei are traced and measured
    with np.errstate(invalid="ignore", divide="ignore"):  # labels dropped as too small: NaN, not owned
        cy, cx = np.array(ndi.center_of_mass(labels > 0, labels, np.arange(1, n + 1))).reshape(-1, 2).T + 0.5
    own = (core[0] <= cx) & (cx < core[2]) & (core[1] <= cy) & (cy < core[3])
    lut = np.where(np.concatenate([[False], own]), np.arange(n + 1), 0).astype(np.int32)
    return measure_instances(lut[labels], rgb, mpp)


_FEATURE_HEAD = '{"type": "Feature", "id": "%s", "geometry": {"type": "Polygon", "coordinates": [%s]}, '
_FEATURE_PROPS = ('"properties": {"objectType": "detection", "classification": {"name": "Nucleus", '
                  '"color": [40, 40, 200]}, "measurements": %s}}')


def nucleus_uuid(run_key: str, nid: int) -> str:
    """The QuPath object id of nucleus ``nid`` (1-based row of ``cells.csv``) of the run ``run_key``
    (the job's key: slide fingerprint and configuration). QuPath ids are UUIDs; a name-based UUID
    (RFC 4122 version 5) is the same on every rerun of the same slide and options, so an id kept in a
    QuPath project or a joined table still finds its nucleus, and differs between slides and runs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"slidekit:cells:{run_key}:{nid}"))


def _nuclei_key(config: dict) -> str:
    """The run's configuration without what only changes the file's form (``gzip``): the nuclei, and
    so their ids, are the same in ``cells.geojson`` and ``cells.geojson.gz``."""
    def drop(d: Any) -> Any:
        return {k: drop(v) for k, v in d.items() if k != "gzip"} if isinstance(d, dict) else d

    return config_digest(drop(config))


def _feature_json(oid: str, ring_json: str, measures: dict) -> str:
    """One QuPath detection as GeoJSON text: ``ring_json`` is the closed outline (level-0 px) as JSON,
    already rounded by the band writer (formatted, not parsed and dumped again: millions of nuclei)."""
    return (_FEATURE_HEAD % (oid, ring_json)) + (_FEATURE_PROPS % json.dumps(measures))


@dataclass(frozen=True)
class NucleiOptions:
    """How nuclei are found in the model's output and written.

    Parameters
    ----------
    threshold
        Nucleus probability threshold.
    min_distance_um
        Smallest distance between two nuclei's seeds (µm).
    min_area_um2
        Smallest nucleus kept (µm²).
    channel
        The output channel of the nucleus probability (None: the last class that is not an outline class).
    split
        How touching nuclei are split (:func:`nucleus_channels`: ``auto``, ``boundary``, ``distance``).
    gzip
        Compress the GeoJSON (None: above ``GZIP_ABOVE_NUCLEI`` nuclei).
    """

    threshold: float = 0.5
    min_distance_um: float = 2.0
    min_area_um2: float = 10.0
    channel: int | None = None
    split: str = "auto"
    gzip: bool | None = None


@dataclass(frozen=True)
class CellsOptions(OptionGroups):
    """Every option of ``slidekit cells``, in groups (flat field names work too: ``OptionGroups``)."""

    tiles: TileOptions = TileOptions(min_tissue=0.05)
    reading: ReadOptions = ReadOptions()
    tissue: TissueOptions = TissueOptions()
    roi: RoiOptions = RoiOptions()
    nuclei: NucleiOptions = NucleiOptions()
    run: RunOptions = RunOptions(batch_size=16, workers=0)


class CellsJob(SlideJob):
    """The job behind ``slidekit cells`` (see :func:`cells_slide`); the runner writes the summary."""

    name = "cells"
    outputs = tuple(n for n in CELL_OUTPUTS if n != "summary.json")

    def __init__(self, loaded: tuple, options: CellsOptions) -> None:
        self.net, self.spec, self.ident = loaded
        spec, o = self.spec, options
        if spec.task != "segmentation":
            raise CheckpointError(f"a {spec.task!r} model finds no nuclei (need a segmentation model)")
        size = int(o.tiles.size or spec.patch_size)
        mpp = float(o.tiles.mpp or spec.mpp)
        overlap = int(size // 4 if o.tiles.overlap is None else o.tiles.overlap)
        n = o.nuclei
        nucleus_channels(list(spec.classes), n.channel, n.split)  # a bad channel or split is refused here
        if not 0 < overlap < size:
            raise ConfigError(f"overlap must be between 1 and size-1 px (got {overlap}); nuclei on seams need it")
        r = o.reading
        cfg = {"model": self.ident, "mpp": mpp, "size": size, "overlap": overlap, "threshold": n.threshold,
               "min_distance_um": n.min_distance_um, "min_area_um2": n.min_area_um2, "channel": n.channel,
               "min_tissue": o.tiles.min_tissue, "slide_mpp": r.slide_mpp, "tissue": o.tissue.as_dict() or None,
               "split": n.split, "gzip": n.gzip}
        if r.override_mpp is not None:  # recorded only when set, so earlier runs keep their configuration key
            cfg["override_mpp"] = r.override_mpp
        self.region: Region = Tissue(o.tissue)
        self.roi = None
        if o.roi.roi is not None:
            self.roi = Roi(o.roi.roi, o.roi.roi_class)
            self.roi.annotations()  # a bad ROI file is one line before the slide is opened
            cfg["roi"] = roi_identity(o.roi.roi, o.roi.roi_class)
            self.region = self.region & self.roi
        self.qc = TileQc.of(o.roi.exclude_qc, o.roi.qc_max)  # the runner leaves out tiles over --qc-max ("-qc")
        self.cfg, self.reading, self.opts = cfg, r, o.run

    def config(self) -> dict:
        return dict(self.cfg)

    def figures(self, summary: dict) -> dict:
        return {"tiles": summary["tiles"], "nuclei": summary["nuclei"], "slide_seconds": summary["seconds"],
                **qc_figures(summary)}

    def run(self, ctx: JobContext) -> dict:
        t0 = time.time()
        slide, out, spec, cfg, o = ctx.slide, ctx.out, self.spec, self.cfg, self.opts
        mpp, size, overlap, min_tissue = cfg["mpp"], cfg["size"], cfg["overlap"], cfg["min_tissue"]
        ch, bch = nucleus_channels(list(spec.classes), cfg["channel"], cfg["split"])
        roi_anns = self.roi.annotations() if self.roi is not None else None
        part = out / "cells.part"
        band_key = part / f"{ctx.key}.{BAND_FORMAT}.key"  # bands of another configuration or format: redone
        if part.exists() and not band_key.exists():
            shutil.rmtree(part)  # bands of another configuration
        part.mkdir(parents=True, exist_ok=True)
        band_key.touch()
        timer = StageTimer()
        t_tissue = time.perf_counter()
        # min_tissue=0 without an ROI: the whole slide is tiled, no tissue detection (asked for)
        whole = min_tissue == 0 and roi_anns is None
        if not whole:
            ctx.mask()
        t_tissue = time.perf_counter() - t_tissue
        grid = ctx.grid(mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue, whole_slide=whole)
        cores, rows = _cores(grid), grid.indices[:, 1]
        bands = np.unique(rows)
        done = {int(p.stem.split("-")[1]) for p in part.glob("band-*.csv")}
        todo_bands = [int(b) for b in bands if int(b) not in done]
        configure_threads(o.threads, o.workers)
        predictor = Predictor(self.net, spec, device=o.device, batch_size=o.batch_size, workers=o.workers,
                              progress=False)
        predictor.timer = timer
        sx, sy = grid.scale
        md = max(1, round(cfg["min_distance_um"] / mpp))
        ma = max(1, round(cfg["min_area_um2"] / mpp ** 2))
        bar = None
        if ctx.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(grid), initial=int(np.isin(rows, list(done)).sum()), unit="tile",
                       desc=slide.name, leave=False)
        t_loop = time.perf_counter()
        for b in todo_bands:
            index = np.nonzero(rows == b)[0]
            with atomic_path(part / f"band-{b:06d}.csv") as tmp, open(tmp, "w", newline="") as fband:
                wband = csv.writer(fband)
                # a band in chunks of CHUNK_TILES tiles, each its own sub-grid: the tile readers'
                # decoded-tile caches (sized to their grid's width) and the nuclei held stay the same
                # whatever the slide's width, so memory is flat from 8k² to 40k² and beyond
                for c0 in range(0, len(index), CHUNK_TILES):
                    chunk = index[c0:c0 + CHUNK_TILES]
                    sub = grid.subset(chunk)
                    reader = TileReader(slide, sub)
                    nuclei = []
                    for sidx, y in predictor.predict(slide, sub, output_size=(size, size)):
                        with timer.stage("stitch"):  # instances: watershed, ownership, measures
                            for j, probs in zip(sidx.tolist(), y):
                                i = int(chunk[j])
                                rgb = reader.read(j)
                                x0, y0 = grid.coords[i]
                                # with an outline class, a nucleus is its interior and its outline
                                fg, edge = (probs[ch], None) if bch is None else (probs[ch] + probs[bch], probs[bch])
                                for n in tile_nuclei(fg, rgb, cores[i], mpp, cfg["threshold"], md, ma, edge):
                                    n["xy0"] = n["contour"] * (sx, sy) + (x0, y0)
                                    cx, cy = n["centroid"]
                                    n["x"], n["y"] = x0 + cx * sx, y0 + cy * sy
                                    nuclei.append(n)
                        if bar is not None:
                            bar.update(len(sidx))
                    with timer.stage("write"):
                        _write_rows(wband, nuclei, slide.mpp)
                    del reader, nuclei
            release_memory()
        t_loop = time.perf_counter() - t_loop
        if bar is not None:
            bar.close()
        # with --exclude-qc, each nucleus carries the QC class under its centroid (cells.csv ``qc``): the
        # tiles kept may still hold up to --qc-max of an artefact, and a user re-filters without a rerun
        qc = read_qc_labels(self.qc.path, slide) if isinstance(self.qc, TileQc) else None
        with timer.stage("write"):
            n_cells, per_region, geojson, on_qc = _assemble(out, part, roi_anns, slide, cfg["gzip"],
                                                            tissue=None if whole else ctx.mask(),
                                                            run_key=_nuclei_key(ctx.config), qc=qc)
        shutil.rmtree(part)
        return {"tiles": len(grid), "bands": len(bands), "bands_resumed": len(bands) - len(todo_bands),
                "nuclei": n_cells, **({} if on_qc is None else {"nuclei_on_artefact": on_qc}),
                "instances": (f"watershed from the foreground minus the outline class {spec.classes[bch]!r}"
                              if bch is not None else "distance-transform watershed")
                + "; ownership by centroid in the tile core",
                "geojson": geojson, "regions": per_region,
                "seconds": round(time.time() - t0, 2), "tissue_seconds": round(t_tissue, 2),
                **timer.as_dict(t_loop)}


def cells_job(*, model: str | os.PathLike = "hematoxylin", loaded: tuple | None = None,
              options: CellsOptions | None = None, **flat: Any) -> CellsJob:
    """A :class:`CellsJob`, checked before any slide is opened.

    Parameters
    ----------
    model
        A segmentation checkpoint or a built-in model name.
    loaded
        A ``load_cells_model`` result instead (one model shared across slides).
    options
        The job's :class:`CellsOptions` (None: the defaults).
    **flat
        Single option fields by their flat names (``CellsOptions.of``).
    """
    opts = CellsOptions.of(options, **flat)
    resolve_device(opts.run.device)
    return CellsJob(loaded if loaded is not None else load_cells_model(model or "hematoxylin"), opts)


def cells_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                model: str | os.PathLike = "hematoxylin", loaded: tuple | None = None,
                options: CellsOptions | None = None, progress: bool = True, **flat: Any) -> dict:
    """Detect every nucleus in the tissue of one slide; write ``cells.geojson`` (or
    ``cells.geojson.gz``), ``cells.csv`` (+ ``regions.csv`` with ``roi``) and ``summary.json`` in
    ``out_dir`` (see the module docstring).

    Parameters
    ----------
    slide_path
        The slide file.
    out_dir
        The slide's output folder.
    model
        A segmentation checkpoint or a built-in model name.
    loaded
        A ``load_cells_model`` result instead.
    options
        A :class:`CellsOptions`: tiles (``min_tissue=0`` without an ROI tiles the whole slide
        without tissue detection), reading, ``tissue``, ``roi``, :class:`NucleiOptions`, running.
    progress
        Show a progress bar.
    **flat
        Any single field of those groups by its own name (``mpp=1.0``, ``gzip=False``, ``roi=...``).

    A finished slide whose outputs all verify is skipped (``regions.job``); an interrupted one
    resumes per tile row.
    """
    job = cells_job(model=model, loaded=loaded, options=options, **flat)
    return run_job(job, slide_path, out_dir, progress=progress)


def _write_rows(w: Any, nuclei: list[dict], slide_mpp: tuple[float, float]) -> None:
    """Band rows (csv writer ``w``): per nucleus the centroid, the measurements and its closed
    outline (level-0 px) as JSON in the last column."""
    for n in nuclei:
        xy = np.round(np.asarray(n["xy0"], np.float64), 2)
        ring = json.dumps(np.concatenate([xy, xy[:1]]).tolist())  # closed, as GeoJSON wants
        w.writerow([n["x"], n["y"], n["x"] * slide_mpp[0], n["y"] * slide_mpp[1]]
                   + [n[k] for k in MEASURE_NAMES] + [ring])


def _geojson_name(part: Path, bands: np.ndarray, gzip_: bool | None) -> str:
    """``cells.geojson.gz`` when asked, or (auto) when the bands hold more than GZIP_ABOVE_NUCLEI nuclei."""
    if gzip_ is None:
        n = 0
        for b in bands:
            with open(part / f"band-{int(b):06d}.csv", "rb") as f:
                n += sum(1 for _ in f)
        gzip_ = n > GZIP_ABOVE_NUCLEI
    return "cells.geojson.gz" if gzip_ else "cells.geojson"


#: cells.csv's ``qc`` column: the QC class under a nucleus's centroid ("" on clean tissue or glass).
QC_NAMES = np.array(["" for _ in range(max(LABELS.values()) + 1)], dtype=object)
QC_NAMES[[LABELS[n] for n in ARTEFACTS]] = list(ARTEFACTS)


def qc_classes_at(qc: tuple[np.ndarray, float], slide_mpp: tuple[float, float], xy: np.ndarray) -> np.ndarray:
    """The QC class (``ARTEFACTS`` name, "" where clean) under each level-0 point ``xy`` (N, 2) of a
    slide at ``slide_mpp``, from a QC label map ``qc`` = (labels, its µm/px)."""
    labels, qmpp = qc
    if not len(xy):
        return np.zeros(0, dtype=object)
    col = np.clip((np.asarray(xy[:, 0], np.float64) * slide_mpp[0] / qmpp).astype(np.int64), 0, labels.shape[1] - 1)
    row = np.clip((np.asarray(xy[:, 1], np.float64) * slide_mpp[1] / qmpp).astype(np.int64), 0, labels.shape[0] - 1)
    return QC_NAMES[labels[row, col]]


def _assemble(out: Path, part: Path, roi_anns: Any, slide: Any, gzip_: bool | None = None, tissue: Any = None,
              run_key: str = "", qc: tuple[np.ndarray, float] | None = None) -> tuple[int, list, str, dict | None]:
    """Stream the bands (``part``'s ``band-NNNNNN.csv``, in order) into cells.csv and the GeoJSON (one
    band in memory at a time). ``slide``: its µm/px and level-0 size (to which each ROI is clipped);
    ``tissue``: the mask the nuclei were sought in (its level-0 polygons give each ROI's ``tissue_mm2``);
    ``run_key``: the job's key, which names the nuclei's QuPath UUIDs (:func:`nucleus_uuid`); ``qc``: a
    QC label map (labels, µm/px), whose class under each nucleus becomes cells.csv's last column ``qc``
    (then also returned: the nuclei per artefact class)."""
    slide_mpp, bounds = slide.mpp, slide.dimensions
    bands = np.array(sorted(int(f.stem.split("-")[1]) for f in part.glob("band-*.csv")), np.int64)
    on_qc: dict[str, int] | None = None if qc is None else dict.fromkeys(ARTEFACTS, 0)
    counts = None
    if roi_anns is not None:
        import shapely

        polys = [(a, _roi_geometry(a.geometry, bounds)) for a in roi_anns]
        for _, g in polys:
            shapely.prepare(g)
        counts = [0] * len(polys)
        tissue_geom = _tissue_geometry(tissue)
    nid = 0
    name = _geojson_name(part, bands, gzip_)
    other = out / ("cells.geojson" if name.endswith(".gz") else "cells.geojson.gz")
    other.unlink(missing_ok=True)  # an earlier run's file in the other form would look current
    with atomic_path(out / "cells.csv") as tcsv, atomic_path(out / name) as tgj:
        with open(tcsv, "w", newline="") as fc, (gzip.open(tgj, "wt", compresslevel=5, encoding="utf-8")
                                                 if name.endswith(".gz") else open(tgj, "w", encoding="utf-8")) as fg:
            wc = csv.writer(fc)
            wc.writerow(COLUMNS + ([] if qc is None else ["qc"]))
            fg.write('{"type": "FeatureCollection", "features": [\n')
            first = True
            names = list(MEASURE_NAMES.values())
            for b in bands:
                with open(part / f"band-{int(b):06d}.csv", newline="") as fb:
                    rows = list(csv.reader(fb))
                keep: np.ndarray | None = None
                if counts is not None and rows:  # one vectorised point-in-polygon test per band and region
                    xy = np.array([[float(r[0]), float(r[1])] for r in rows])
                    hits = np.array([np.asarray(shapely.contains_xy(g, xy[:, 0], xy[:, 1])) for _, g in polys])
                    for j in range(len(polys)):
                        counts[j] += int(hits[j].sum())
                    # tiles reach past the ROI: nuclei centred outside it are not written
                    keep = np.asarray(hits.any(axis=0))
                qc_names = None
                if qc is not None and rows:
                    qc_names = qc_classes_at(qc, slide_mpp, np.array([[float(r[0]), float(r[1])] for r in rows]))
                for i, row in enumerate(rows):
                    if keep is not None and not keep[i]:
                        continue
                    nid += 1
                    vals = [round(float(v), 4) for v in row[:-1]]
                    oid = nucleus_uuid(run_key, nid)
                    if qc_names is None:
                        wc.writerow([nid] + vals + [oid])
                    else:
                        wc.writerow([nid] + vals + [oid, qc_names[i]])
                        if qc_names[i] and on_qc is not None:
                            on_qc[qc_names[i]] += 1
                    fg.write(("" if first else ",\n") + _feature_json(oid, row[-1], dict(zip(names, vals[4:]))))
                    first = False
            fg.write("\n]}\n")
    regions = []
    if counts is not None:
        with atomic_path(out / "regions.csv") as tr:
            with open(tr, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["region", "class", "nuclei", "area_mm2", "nuclei_per_mm2", "tissue_mm2"])
                px_mm2 = slide_mpp[0] * slide_mpp[1] / 1e6
                for j, ((a, g), c) in enumerate(zip(polys, counts)):
                    area = g.area * px_mm2  # the ROI as filled (non-zero rule), within the slide
                    dens = c / area if area > 0 else 0.0
                    tis = None if tissue_geom is None else g.intersection(tissue_geom).area * px_mm2
                    w.writerow([j, (a.label or a.name or ""), c, round(area, 6), round(dens, 2),
                                "" if tis is None else round(tis, 6)])
                    regions.append({"region": j, "class": (a.label or a.name or ""), "nuclei": c, "area_mm2": area,
                                    "nuclei_per_mm2": dens, "tissue_mm2": tis})
    return nid, regions, name, on_qc


def _roi_geometry(g: Any, bounds: tuple[int, int] | None) -> Any:
    """One ROI as counted and measured: an invalid outline (a self-intersecting ring, whose lobes
    cancel in the shoelace area) repaired to what QuPath fills for it (non-zero rule), then clipped
    to the slide (a ROI drawn past the slide's edge measures only the slide's part)."""
    import shapely.geometry

    g, _ = make_valid(g)
    if not g.is_valid:  # a last resort for shapes the fill rule leaves invalid
        g = shapely.make_valid(g)
    if bounds is not None:
        g = g.intersection(shapely.geometry.box(0, 0, float(bounds[0]), float(bounds[1])))
    return g


def _tissue_geometry(tissue: Any) -> Any:
    """The level-0 union of a tissue mask's polygons (None without a mask or when it has none)."""
    if tissue is None:
        return None
    import shapely

    polys = list(getattr(tissue, "polygons", None) or [])
    return shapely.union_all(polys) if polys else None

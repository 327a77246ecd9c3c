"""Patch export: a slide's tile grid written as image files plus a table, the dataset people take
elsewhere for training (`slidekit tile SLIDE --export DIR|FILE.zip`).

Layout (a folder, or the same names inside a zip)::

    tiles/x{X}_y{Y}.png    one image per grid tile, named by its level-0 top-left corner
    patches.csv            file, x, y, mpp, size, tissue_fraction (+ label, label_fraction)
                           (+ with exclude_qc, each tile's artefact fractions: qc_pen_ink, qc_fold, ...)
    patches.json           the configuration and counts; written last (its presence = finished)

The tiles are exactly ``read_tiles``' tiles (PNG is lossless; JPEG at ``quality``). Tiles stream
through one chunk at a time (flat memory). A rerun skips a finished export of the same
configuration and resumes an interrupted one: in a folder every tile file is written atomically,
so an existing one is complete; a zip is built as ``FILE.zip.part`` whose last consistent state
(closed central directory) is recorded in ``FILE.zip.part.json`` every few seconds, and renamed
to ``FILE.zip`` when complete. A different configuration starts over, replacing only slidekit's
own files.

Labels (``annotations=``): the ``majority`` rule gives each tile the class covering the largest
share of it (measured on a ``LABEL_GRID`` x ``LABEL_GRID`` lattice of pixel centres, non-zero fill
rule, later classes painted over earlier ones) — empty when unlabelled area is larger; the
``centre`` rule gives the class under the tile's centre point. Unclassified objects count as
class ``Unclassified``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from slidekit.annotations.formats import read_annotations, write_geojson
from slidekit.annotations.geometry import rasterize
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import AnnotationError, GridError
from slidekit.base.io import atomic_path, config_digest, file_identity, write_text_atomic
from slidekit.base.locks import OutputLock
from slidekit.base.outputs import claim_path
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Tissue, build_region
from slidekit.regions.options import OptionGroups, ReadOptions, TileOptions, TissueOptions
from slidekit.regions.qc_tiles import TileQc, fraction_columns
from slidekit.regions.tiling import TileGrid, read_tiles
from slidekit.slides.identity import slide_fingerprint

FORMAT = "slidekit.patches/1"
LABEL_RULES = ("majority", "centre")
LABEL_GRID = 64  # samples per side for the majority rule: 1/4096 of a tile's area per sample
FLUSH_SECONDS = 10.0  # a zip's progress is made durable this often
UNCLASSIFIED = "Unclassified"
PATCH_OUTPUTS = ("tiles", "patches.csv", "patches.json")


def tile_name(x: int, y: int, ext: str) -> str:
    """The file name of the tile whose level-0 top-left corner is (x, y)."""
    return f"tiles/x{int(x)}_y{int(y)}.{ext}"


def encode_tile(tile: np.ndarray, fmt: str, quality: int) -> bytes:
    """PNG (lossless) or JPEG bytes of an RGB uint8 tile."""
    import cv2

    bgr = np.ascontiguousarray(tile[..., ::-1])
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"could not encode a {tile.shape} tile as {fmt}")
    return buf.tobytes()


# ---------------------------------------------------------------------------------------------
# Labels


def _class_name(label: str | None) -> str:
    return str(label) if label not in (None, "") else UNCLASSIFIED


def tile_labels(annotations: list, grid: Any, rule: str = "majority") -> tuple[list[str], np.ndarray]:
    """(label, share of the tile it covers) per tile of ``grid``; "" where no class wins."""
    from shapely import STRtree
    from shapely.geometry import box


    if rule not in LABEL_RULES:
        raise ValueError(f"label rule must be one of {LABEL_RULES}, not {rule!r}")
    anns = [a for a in annotations if a.geometry is not None and not a.geometry.is_empty]
    for a in anns:
        a.label = _class_name(a.label)
    classes = list(dict.fromkeys(a.label for a in anns))  # file order: later classes paint over earlier
    tree = STRtree([a.geometry for a in anns]) if anns else None
    w, h = grid.extent
    labels, shares = [], np.zeros(len(grid), np.float32)
    for i, (x, y) in enumerate(grid.coords.tolist()):
        hits = [] if tree is None else [anns[j] for j in tree.query(box(x, y, x + w, y + h))]
        present = [c for c in classes if any(a.label == c for a in hits)]
        if not present:
            labels.append("")
            continue
        values = {c: k + 1 for k, c in enumerate(present)}
        if rule == "centre":  # one output pixel whose centre is the tile's centre
            px = rasterize(hits, (x, y, w, h), grid.mpp * grid.size, labels=values, slide_mpp=grid.slide_mpp)
        else:
            px = rasterize(hits, (x, y, w, h), grid.mpp * grid.size / LABEL_GRID, labels=values,
                           slide_mpp=grid.slide_mpp)
        counts = np.bincount(px.ravel(), minlength=len(present) + 1)
        best = int(np.argmax(counts[1:])) + 1
        if counts[best] == 0 or counts[best] < counts[0]:  # unlabelled area wins
            labels.append("")
        else:
            labels.append(present[best - 1])
            shares[i] = counts[best] / counts.sum()
    return labels, shares


# ---------------------------------------------------------------------------------------------
# Sinks: a folder or a zip


class _FolderSink:
    """Tiles as files in a folder the runner has locked and claimed (``ExportJob``)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def start(self, key: str) -> set[str]:
        """Names already written by an interrupted run of this configuration."""
        state = _read_json(self.dest / "patches.json.part")
        tiles = self.dest / "tiles"
        if state is None or state.get("config_key") != key:
            shutil.rmtree(tiles, ignore_errors=True)  # ours (claimed): another configuration's tiles
            for name in ("patches.csv", "patches.json"):
                (self.dest / name).unlink(missing_ok=True)
            write_text_atomic(self.dest / "patches.json.part", json.dumps({"config_key": key}))
        tiles.mkdir(parents=True, exist_ok=True)
        return {f"tiles/{p.name}" for p in tiles.iterdir() if not p.name.startswith(".")}

    def add(self, name: str, data: bytes) -> None:
        with atomic_path(self.dest / name) as tmp:
            tmp.write_bytes(data)

    def checkpoint(self) -> None:
        pass

    def finish(self, table: str, summary: dict) -> None:
        write_text_atomic(self.dest / "patches.csv", table)
        write_text_atomic(self.dest / "patches.json", json.dumps(summary, indent=2))
        (self.dest / "patches.json.part").unlink(missing_ok=True)


class _ZipSink:
    def __init__(self, dest: Path, slide: Any, slide_id: str) -> None:
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part")
        self.state = dest.with_name(dest.name + ".part.json")
        claim_path(dest, _is_patch_zip(dest), "a slidekit patch archive")
        claim_path(self.part, _read_json(self.state) is not None, "a slidekit patch archive in progress")
        self.zf: zipfile.ZipFile | None = None

    def finished(self) -> dict | None:
        if not self.dest.exists():
            return None
        try:
            with zipfile.ZipFile(self.dest) as zf:
                return json.loads(zf.read("patches.json"))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None

    def start(self, key: str) -> set[str]:
        state = _read_json(self.state)
        if state is not None and state.get("config_key") == key and self.part.exists():
            with open(self.part, "r+b") as f:
                f.truncate(int(state["size"]))  # drop whatever followed the last consistent state
            self.zf = zipfile.ZipFile(self.part, "a" if state["size"] else "w")
            return set(self.zf.namelist())
        write_text_atomic(self.state, json.dumps({"config_key": key, "size": 0}))
        self.key = key
        self.zf = zipfile.ZipFile(self.part, "w")
        return set()

    def _open_zip(self) -> zipfile.ZipFile:
        assert self.zf is not None, "start() opens the archive"
        return self.zf

    def add(self, name: str, data: bytes) -> None:
        self._open_zip().writestr(name, data, compress_type=zipfile.ZIP_STORED)  # PNG/JPEG are compressed already

    def checkpoint(self) -> None:
        """Close the archive (its central directory makes it consistent) and record its size."""
        key = json.loads(self.state.read_text())["config_key"]
        self._open_zip().close()
        write_text_atomic(self.state, json.dumps({"config_key": key, "size": self.part.stat().st_size}))
        self.zf = zipfile.ZipFile(self.part, "a")

    def finish(self, table: str, summary: dict) -> None:
        zf = self._open_zip()
        zf.writestr("patches.csv", table, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("patches.json", json.dumps(summary, indent=2))
        zf.comment = FORMAT.encode()
        zf.close()
        os.replace(self.part, self.dest)
        self.state.unlink(missing_ok=True)

    def close(self) -> None:
        if self.zf is not None and self.zf.fp is not None:
            self.zf.close()


def _is_patch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.comment == FORMAT.encode()
    except (OSError, zipfile.BadZipFile):
        return False


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(Path(path).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The export


def grid_tile_annotations(grid: Any, labels: list[str] | None = None) -> Iterable:
    """The grid's tiles as QuPath tile objects (classified by ``labels`` when given), with their tissue fraction."""
    from shapely.geometry import box


    w, h = grid.extent
    for i, (x, y) in enumerate(grid.coords.tolist()):
        m = {} if grid.tissue is None else {"tissue_fraction": float(grid.tissue[i])}
        yield Annotation(box(x, y, x + w, y + h), label=(labels[i] or None) if labels else None, kind="tile",
                         measurements=m)


def _is_grid_geojson(path: Path) -> bool:
    """Whether ``path`` is a tile-grid GeoJSON slidekit wrote (every object a tile)."""
    try:
        data = json.loads(Path(path).read_text())
        feats = data.get("features", [])
        return data.get("type") == "FeatureCollection" and all(
            f.get("properties", {}).get("objectType") == "tile" for f in feats)
    except (OSError, ValueError, AttributeError):
        return False


def write_grid_geojson(grid: Any, path: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Write the grid as QuPath tile objects, clipped to the slide (edge tiles overhang it)."""
    claim_path(path, _is_grid_geojson(Path(path)), "a slidekit tile-grid GeoJSON")
    return write_geojson(grid_tile_annotations(grid, labels), path, bounds=grid.slide_dimensions)


@dataclass(frozen=True)
class PatchFormat:
    """How exported tiles are written and labelled.

    Parameters
    ----------
    image_format
        ``"png"`` or ``"jpeg"``.
    quality
        JPEG quality, 1–100.
    annotations
        A QuPath GeoJSON or ASAP XML file whose classes label the tiles (None: no labels).
    label_rule
        How a tile's label is chosen (``LABEL_RULES``: ``majority`` or ``centre``).
    geojson
        Also write the grid as QuPath tile objects to this file.
    reader_threads
        Threads reading tiles (0: the main thread).
    """

    image_format: str = "png"
    quality: int = 90
    annotations: str | os.PathLike | None = None
    label_rule: str = "majority"
    geojson: str | os.PathLike | None = None
    reader_threads: int = 0


@dataclass(frozen=True)
class ExportOptions(OptionGroups):
    """Every option of ``slidekit tile --export``, in groups (flat field names work too; ``workers``
    is the older spelling of ``reader_threads``)."""

    tiles: TileOptions = TileOptions(mpp=0.5, size=256, overlap=0, min_tissue=0.5)
    reading: ReadOptions = ReadOptions()
    tissue: TissueOptions = TissueOptions()
    export: PatchFormat = PatchFormat()

    @classmethod
    def of(cls, options: "OptionGroups | None" = None, **flat: Any) -> Any:
        if "workers" in flat:
            flat["reader_threads"] = flat.pop("workers")
        return super().of(options, **flat)


class ExportJob(SlideJob):
    """A patch export into a folder (``tiles/``, ``patches.csv``, ``patches.json``) through the shared
    runner: a rerun skips it only while every tile file and the table still verify, and redoes it (one
    line) when any was deleted, emptied or changed. Tiles written by an interrupted run of the same
    configuration are kept (``patches.json.part`` records whose they are)."""

    name = "export"
    outputs = (*PATCH_OUTPUTS, "patches.json.part")

    def __init__(self, options: ExportOptions, qc: TileQc | None = None) -> None:
        o = self.options = options
        self.reading = o.reading
        self.region = Tissue(o.tissue)
        self.qc = qc  # tiles over its limits left out by the runner's grid; their fractions in patches.csv

    def config(self) -> dict:
        t, f, r = self.options.tiles, self.options.export, self.options.reading
        return {"format": FORMAT, "mpp": float(t.mpp or 0.5), "size": int(t.size or 256),
                "overlap": int(t.overlap or 0), "min_tissue": float(t.min_tissue), "image_format": f.image_format,
                "quality": int(f.quality) if f.image_format == "jpeg" else None,
                "annotations": None if f.annotations is None else file_identity(f.annotations),
                "label_rule": f.label_rule if f.annotations is not None else None,
                "tissue": self.options.tissue.as_dict() or {}, "slide_mpp": r.slide_mpp, "override_mpp": r.override_mpp}

    def run(self, ctx: JobContext) -> dict:
        cfg, f = ctx.config, self.options.export
        grid = ctx.grid(mpp=cfg["mpp"], size=cfg["size"], overlap=cfg["overlap"], min_tissue=cfg["min_tissue"])
        summary = _write_patches(ctx.slide, grid, _FolderSink(ctx.out), ctx.key, cfg, f, ctx.progress,
                                 qc=None if ctx.qc_counts is None else (ctx.tile_qc, ctx.qc_counts))
        self.grid, self.labels = grid, summary.pop("_labels")
        return summary


def _write_patches(slide: Any, grid: Any, sink: Any, key: str, cfg: dict, f: PatchFormat, progress: bool, *,
                   qc: tuple[np.ndarray, dict] | None = None) -> dict:
    """Label the grid's tiles, write every tile not written yet into ``sink`` and finish it with the
    table and ``patches.json``; the summary (with ``_labels``: the tile labels or None). ``qc``: the kept
    tiles' artefact fractions and the QC filter's counts (``exclude_qc``)."""
    t0 = time.time()
    ext = "png" if f.image_format == "png" else "jpg"
    labels = shares = None
    if f.annotations is not None:
        anns = read_annotations(f.annotations)
        if not anns:
            raise AnnotationError("holds no objects to label tiles with", f.annotations)
        labels, shares = tile_labels(anns, grid, f.label_rule)
    names = [tile_name(x, y, ext) for x, y in grid.coords.tolist()]
    have = sink.start(key)
    todo = np.array([i for i, n in enumerate(names) if n not in have], np.int64)
    last = time.time()
    for (x, y), tile in read_tiles(slide, grid.subset(todo), workers=f.reader_threads, progress=progress):
        sink.add(tile_name(x, y, ext), encode_tile(tile, f.image_format, f.quality))
        if time.time() - last > FLUSH_SECONDS:
            sink.checkpoint()
            last = time.time()
    summary = {"slide": str(slide.path), "config_key": key, "config": cfg, "tiles": len(grid),
               "tiles_resumed": len(grid) - len(todo), "dest": str(sink.dest),
               "labels": None if labels is None else {c: labels.count(c) for c in sorted(set(labels))},
               "seconds": round(time.time() - t0, 2)}
    if qc is not None:
        summary["qc"] = qc[1]
    sink.finish(_table(grid, names, labels, shares, None if qc is None else qc[0]), summary)
    return {**summary, "_labels": labels}


def _check_format(f: PatchFormat) -> None:
    if f.image_format not in ("png", "jpeg"):
        raise ValueError(f"image format must be png or jpeg, not {f.image_format!r}")
    if f.label_rule not in LABEL_RULES:
        raise ValueError(f"label rule must be one of {LABEL_RULES}, not {f.label_rule!r}")
    if not 1 <= int(f.quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, not {f.quality}")


def export_patches(slide_path: str | os.PathLike, dest: str | os.PathLike, *, options: ExportOptions | None = None,
                   exclude_qc: str | os.PathLike | None = None, qc_max: Any = None, progress: bool = True,
                   **flat: Any) -> dict:
    """Write the tiles of a slide's grid into ``dest`` (a folder, or a ``.zip``) with ``patches.csv``.

    See the module docstring for the layout, resume rules and label rules. A folder export is an
    :class:`ExportJob` run by the shared runner (its ``summary.json`` records and verifies every
    output); a zip is one file, finished atomically. Returns the summary (``patches.json``), with
    ``skipped: True`` when a finished export of this configuration was there.

    Parameters
    ----------
    slide_path
        The slide file.
    dest
        A folder, or a ``.zip`` file.
    options
        :class:`ExportOptions` (tiles, reading, ``tissue``, :class:`PatchFormat`; None: the defaults).
    exclude_qc, qc_max
        A ``slidekit qc`` folder of the slide: tiles with more of an artefact class than ``qc_max``
        (``regions.qc_tiles.TileQc``; default 0.5 per class) are not exported; ``patches.csv`` gets
        each kept tile's fractions (``qc_pen_ink``, ...) and the summary the counts removed per class.
    progress
        Show a progress bar.
    **flat
        Single fields by their flat names (``mpp``, ``size``, ``image_format``, ``annotations``, ...).
    """
    o = ExportOptions.of(options, **flat)
    _check_format(o.export)
    qc = TileQc.of(exclude_qc, qc_max)
    dest = Path(dest)
    if dest.suffix.lower() != ".zip":
        job = ExportJob(o, qc)
        summary = run_job(job, slide_path, dest, progress=progress)
        geojson = o.export.geojson
        if geojson is not None and not summary.get("skipped"):
            write_grid_geojson(job.grid, geojson, job.labels)
        elif geojson is not None and not Path(geojson).exists():
            _grid_geojson_of_finished(o, slide_path, dest, is_zip=False, qc=qc)
        return summary
    return _export_zip(slide_path, dest, o, progress, qc)


def _grid_geojson_of_finished(o: ExportOptions, slide_path: str | os.PathLike, dest: Path, *, is_zip: bool,
                              qc: TileQc | None = None) -> None:
    """``--geojson`` asked of an export that was finished already: the grid again, labels from its table."""
    t, geojson = o.tiles, o.export.geojson
    assert geojson is not None  # asked for by the caller
    with o.reading.open(slide_path) as slide:
        grid = TileGrid.from_slide(slide, mpp=float(t.mpp or 0.5), size=int(t.size or 256), overlap=int(t.overlap or 0),
                                   mask=build_region(Tissue(o.tissue), slide), min_tissue=t.min_tissue)
        if qc is not None:
            grid = qc.filter(slide, grid)[0]
    write_grid_geojson(grid, geojson, _labels_of(dest, is_zip) if o.export.annotations else None)


def _export_zip(slide_path: str | os.PathLike, dest: Path, o: ExportOptions, progress: bool,
                qc: TileQc | None = None) -> dict:
    """A zip export: one archive file beside others (its folder is not one slide's), so it is not a
    slide-folder job; built as ``FILE.zip.part`` and renamed when complete."""
    t, f, r = o.tiles, o.export, o.reading
    tissue = o.tissue.as_dict() or None
    mpp, size, overlap, min_tissue = float(t.mpp or 0.5), int(t.size or 256), int(t.overlap or 0), t.min_tissue
    with r.open(slide_path) as slide, OutputLock(dest.parent):
        slide_id = slide_fingerprint(slide.path)
        cfg = {"format": FORMAT, "slide_id": slide_id, "mpp": mpp, "size": size, "overlap": overlap,
               "min_tissue": float(min_tissue), "image_format": f.image_format,
               "quality": int(f.quality) if f.image_format == "jpeg" else None,
               "annotations": None if f.annotations is None else file_identity(f.annotations),
               "label_rule": f.label_rule if f.annotations is not None else None, "tissue": tissue or {},
               "slide_mpp": list(slide.mpp) if slide.mpp else None}
        if qc is not None:  # recorded only when set: earlier zips keep their key; auto: QC beside it (FILE.qc/)
            qc = qc.ready(slide, dest.with_suffix(".qc"), r, progress)
            qc.check(slide)
            cfg["-qc"] = qc.config()
        key = config_digest(cfg)
        sink = _ZipSink(dest, slide, slide_id)
        done = sink.finished()
        if done is not None and done.get("config_key") == key:
            if f.geojson is not None and not Path(f.geojson).exists():
                _grid_geojson_of_finished(o, slide_path, dest, is_zip=True, qc=qc)
            return {**done, "skipped": True}
        mask = build_region(Tissue(TissueOptions.of(tissue)), slide, progress=None if progress else False)
        grid = TileGrid.from_slide(slide, mpp=mpp, size=size, overlap=overlap, mask=mask, min_tissue=min_tissue)
        if len(grid) == 0:
            raise GridError(f"no tile has {min_tissue:.0%} tissue at {mpp} µm/px", slide.path)
        kept = None
        if qc is not None:
            grid, fractions, counts = qc.filter(slide, grid)
            if len(grid) == 0:
                raise GridError(f"every one of its {counts['tiles_before']} tiles has more artefact than --qc-max "
                                "allows", slide.path)
            kept = (fractions, counts)
        try:
            summary = _write_patches(slide, grid, sink, key, cfg, f, progress, qc=kept)
        finally:
            sink.close()
    labels = summary.pop("_labels")
    if f.geojson is not None:
        write_grid_geojson(grid, f.geojson, labels)
    return summary


def _labels_of(dest: Path, is_zip: bool) -> list[str]:
    """The label column of a finished export's table."""
    if is_zip:
        with zipfile.ZipFile(dest) as zf:
            text = zf.read("patches.csv").decode()
    else:
        text = (dest / "patches.csv").read_text()
    return [r.get("label", "") for r in csv.DictReader(io.StringIO(text))]


def _table(grid: Any, names: list[str], labels: list[str] | None, shares: np.ndarray | None,
           fractions: np.ndarray | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "x", "y", "mpp", "size", "tissue_fraction"] + (["label", "label_fraction"] if labels else [])
               + (fraction_columns() if fractions is not None else []))
    tissue = grid.tissue if grid.tissue is not None else np.full(len(grid), np.nan)
    for i, ((x, y), name) in enumerate(zip(grid.coords.tolist(), names)):
        row = [name, x, y, f"{grid.mpp:g}", grid.size, f"{float(tissue[i]):.4f}"]
        if labels is not None:
            assert shares is not None  # tile_labels gives both
            row += [labels[i], f"{float(shares[i]):.4f}"]
        if fractions is not None:
            row += [f"{float(v):.4f}" for v in fractions[i]]
        w.writerow(row)
    return buf.getvalue()

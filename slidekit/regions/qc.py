"""Slide QC as a job: ``qc_slide``/``QcJob`` write the label map (``qc_labels.zarr``, its legend in the
store's attributes; with ``ome_zarr`` also ``qc_labels.ome.zarr``, an NGFF 0.4 label image), ``qc.geojson``
and ``qc.json``; ``QcArtefacts`` is the QC folder as a region that composes with the others, and
``read_qc_labels`` the one reader of a QC folder (it checks that the folder is of the slide asked about).
The detectors are :mod:`slidekit.regions.qc_detect`; per-tile artefact fractions are
:mod:`slidekit.regions.qc_tiles`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, box

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.geometry import clip_geometry
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import ConfigError
from slidekit.base.io import file_identity, write_text_atomic
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Region, _onto
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc_detect import (  # noqa: F401  (re-exported: the names of slidekit.regions.qc)
    ARTEFACTS,
    COLORS,
    GLASS,
    LABELS,
    THRESHOLD_OF,
    TISSUE,
    QcOptions,
    colour_artefacts,
    focus_artefact,
    focus_on_raster,
    qc_labels,
    qc_report,
    sharpness,
)
from slidekit.regions.qc_model import QcModel
from slidekit.regions.qc_zarr import read_label_zarr, write_label_ome_zarr, write_label_zarr
from slidekit.regions.tissue import TissueMask, mask_to_polygons
from slidekit.slides.identity import same_slide

#: What a QC folder holds (the runner's summary aside). ``qc_labels.png``/``qc_classes.json`` are the label
#: map and legend of QC folders written before the zarr store: claimed so that a rerun may remove them.
QC_JOB_OUTPUTS = ("qc_labels.zarr", "qc_labels.ome.zarr", "qc.geojson", "qc.json")
_OLD_OUTPUTS = ("qc_labels.png", "qc_classes.json")
#: The label map's format: part of the configuration, so a folder of the older PNG form is redone.
QC_FORMAT = 2


def qc_legend() -> dict[str, dict]:
    """The label map's legend: class name -> {"value", "color"} (``LABELS``, ``COLORS``)."""
    return {name: {"value": v, "color": list(COLORS[name])} for name, v in LABELS.items()}


class QcJob(SlideJob):
    """Slide QC: ``qc_labels.zarr`` (the uint8 label map, its legend, µm/px and shape in the attributes),
    with ``ome_zarr`` ``qc_labels.ome.zarr`` (NGFF 0.4 multiscale label image in µm), ``qc.geojson`` (one
    classed QuPath annotation per artefact class) and ``qc.json`` (areas, fractions, verdict)."""

    name = "qc"
    outputs = QC_JOB_OUTPUTS + _OLD_OUTPUTS

    def __init__(self, *, options: QcOptions | None = None, reading: ReadOptions | None = None,
                 ome_zarr: bool = False) -> None:
        self.options, self.reading = options or QcOptions(), reading or ReadOptions()
        self.ome_zarr = bool(ome_zarr)
        # QC-by-example models are read now: a bad file is one line before any slide is opened
        self.models = [QcModel.load(m) for m in self.options.models]

    def config(self) -> dict:
        cfg = {"qc": self.options.as_dict(), "slide_mpp": self.reading.slide_mpp,
               "override_mpp": self.reading.override_mpp, "format": QC_FORMAT}
        if self.ome_zarr:  # recorded only when asked
            cfg["ome_zarr"] = True
        return cfg

    def figures(self, summary: dict) -> dict:
        return {"verdict": summary["verdict"], "reasons": "; ".join(summary.get("reasons") or []),
                **{f"{n} fraction": round(c["fraction_of_tissue"], 4) for n, c in summary["classes"].items()}}

    def run(self, ctx: JobContext) -> dict:
        slide, out = ctx.slide, ctx.out
        for name in _OLD_OUTPUTS + (() if self.ome_zarr else ("qc_labels.ome.zarr",)):
            old = out / name  # an earlier run's form of the label map (claimed: slidekit's own)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
        labels, mpp, skipped = qc_labels(slide, self.options, progress=None if ctx.progress else False,
                                         models=self.models)
        report = qc_report(labels, mpp, self.options, skipped)
        legend = qc_legend()
        write_label_zarr(labels, out / "qc_labels.zarr", attrs={
            "format": "slidekit qc labels", "version": QC_FORMAT, "mpp": mpp, "slide_mpp": list(slide.mpp),
            "shape": list(labels.shape), "labels": legend})
        if self.ome_zarr:
            write_label_ome_zarr(labels, out / "qc_labels.ome.zarr", mpp, legend,
                                 name=f"slidekit QC of {Path(slide.path).name}")
        sx, sy = mpp / slide.mpp[0], mpp / slide.mpp[1]
        on_slide = box(0, 0, *slide.dimensions)
        anns = []
        for name in ARTEFACTS:
            polys = [affine_transform(p, [sx, 0, 0, sy, 0, 0]) for p in mask_to_polygons(labels == LABELS[name])]
            clipped = [clip_geometry(p, on_slide)[0] for p in polys]
            parts = [q for c in clipped for q in getattr(c, "geoms", [c])
                     if not q.is_empty and q.geom_type == "Polygon"]
            if parts:
                anns.append(Annotation(MultiPolygon(parts) if len(parts) > 1 else parts[0], label=name,
                                       color=COLORS[name], kind="annotation",
                                       measurements={"Area µm^2": report["classes"][name]["area_um2"]}))
        write_geojson(anns, out / "qc.geojson")
        report = {"slide": str(slide.path), **report}
        write_text_atomic(out / "qc.json", json.dumps(report, indent=2))
        return report


def qc_job(*, options: QcOptions | None = None, slide_mpp: float | None = None, override_mpp: float | None = None,
           backend: str | None = None, ome_zarr: bool = False, **limits: Any) -> QcJob:
    """A :class:`QcJob` from flat options (what a cohort's task builds per slide).

    Parameters
    ----------
    options
        :class:`QcOptions` (None: its defaults); ``limits`` replace single fields by name (``max_blur=0.05``).
    slide_mpp, override_mpp, backend
        How the slide is read (:class:`ReadOptions`).
    ome_zarr
        Also write ``qc_labels.ome.zarr``.
    **limits
        :class:`QcOptions` fields by name.
    """
    from dataclasses import fields, replace

    known = {f.name for f in fields(QcOptions)}
    unknown = sorted(set(limits) - known)
    if unknown:
        raise ConfigError(f"unknown QC option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if limits.get("models") is not None:  # a CLI tuple or a cohort's JSON list: a tuple, as QcOptions keeps it
        limits["models"] = tuple(str(m) for m in limits["models"])
    o = replace(options or QcOptions(), **{k: v for k, v in limits.items() if v is not None})
    return QcJob(options=o, reading=ReadOptions(slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend),
                 ome_zarr=ome_zarr)


def qc_slide(slide: str | os.PathLike, out: str | os.PathLike, *, options: QcOptions | None = None,
             slide_mpp: float | None = None, override_mpp: float | None = None, backend: str | None = None,
             ome_zarr: bool = False, progress: bool = True) -> dict:
    """Run slide QC on ``slide`` into ``out`` (``QcJob`` through the shared runner); return the summary
    (with ``qc.json``'s fields; ``skipped: True`` when the folder was finished already).

    Parameters
    ----------
    slide
        A slide file, or an overview image with ``slide_mpp`` (its µm/px).
    out
        The slide's QC folder.
    options
        Detector thresholds and verdict limits (:class:`QcOptions`; default: its defaults).
    slide_mpp, override_mpp, backend
        How the slide is read (:class:`ReadOptions`).
    ome_zarr
        Also write the label map as OME-Zarr (``qc_labels.ome.zarr``: NGFF 0.4 multiscale labels in µm).
    progress
        Progress bars for slow reads.
    """
    job = qc_job(options=options, slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend, ome_zarr=ome_zarr)
    return run_job(job, slide, out, progress=progress)


@dataclass(frozen=True)
class QcArtefacts(Region):
    """The artefacts of a QC folder (``qc_slide``'s label map): ``Tissue() - QcArtefacts("OUT/qc")``.

    ``classes``: the artefact class names to take (default: every artefact class, not glass).
    """

    path: str | os.PathLike
    classes: Sequence[str] | str | None = None

    def _names(self) -> list[str]:
        names = [self.classes] if isinstance(self.classes, str) else list(self.classes or ARTEFACTS)
        unknown = [n for n in names if n not in LABELS]
        if unknown:
            raise ConfigError(f"{self.path}: unknown QC class {unknown[0]!r} (known: {', '.join(LABELS)})")
        return names

    def build(self, slide: Any, like: TissueMask | None = None, progress: bool | None = None) -> TissueMask:
        labels, mpp = read_qc_labels(self.path, slide)
        values = [LABELS[n] for n in self._names()]
        mask = TissueMask(array=np.isin(labels, values), mpp=mpp, slide_mpp=tuple(slide.mpp))
        return _onto(mask, like)

    def config(self) -> dict:
        return {"qc": {"summary": file_identity(Path(self.path) / "summary.json"), "classes": self._names()}}


def check_qc_folder(folder: str | os.PathLike, slide: Any) -> dict:
    """The summary of the QC folder ``folder`` after checking that it is a finished QC of ``slide``'s file
    (its summary records the slide's fingerprint: a hand-over is checked against what produced it).

    ``slide``: an open slide, or the slide file's path. Raises ConfigError naming the folder when it is no
    QC folder, unfinished, or of another slide file.
    """
    folder = Path(folder)
    slide_path = getattr(slide, "path", slide)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        recorded = summary["config"]["slide_id"]
    except FileNotFoundError:
        raise ConfigError(f"{folder}: not a finished `slidekit qc` folder (no summary.json)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{folder / 'summary.json'}: damaged; cannot tell which slide this QC is of "
                          "(run `slidekit qc` again)") from None
    if not same_slide(recorded, slide_path):
        raise ConfigError(f"{folder}: QC of another slide file than {slide_path} (its summary records {recorded})")
    if "qc_labels.zarr" not in (summary.get("outputs") or []):
        raise ConfigError(f"{folder}: a QC folder of an older slidekit (no qc_labels.zarr); run `slidekit qc` again")
    return summary


def read_qc_labels(folder: str | os.PathLike, slide: Any) -> tuple[np.ndarray, float]:
    """The label map of the QC folder ``folder`` (``LABELS`` values, uint8) and its µm/px, after
    :func:`check_qc_folder`. Raises ConfigError naming the store when it is missing or damaged."""
    check_qc_folder(folder, slide)
    store = Path(folder) / "qc_labels.zarr"
    try:
        labels, attrs = read_label_zarr(store)
        mpp = float(attrs["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{store}: missing or not a QC label map ({e})") from None
    if labels.ndim != 2:
        raise ConfigError(f"{store}: not a 2-D label map")
    return labels, mpp

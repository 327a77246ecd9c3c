"""The per-slide commands a cohort can run: a list of jobs of the shared runner (``regions.job``).

Each task builds the slide's job (a ``SlideJob``: the same object the single-slide command runs, so
a slide's folder in a cohort is exactly what the single-slide command writes) and runs it with
``run_job``; the job's ``figures`` are the slide's row in the cohort table. ``setup`` runs once per
worker process (a model is loaded once, not per slide). ``features`` reads heatmap folders rather
than slides and is the one task that is not a slide job.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from slidekit.cohort.manifest import CohortSlide
from slidekit.cohort.qc_table import write_qc_table
from slidekit.regions.grid_job import grid_job
from slidekit.regions.job import SlideJob, run_job
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc import QcOptions, qc_job
from slidekit.regions.tissue_job import tissue_job
from slidekit.slidelevel.features import features_table


@dataclass(frozen=True)
class CohortTask:
    """A per-slide command: ``setup(options) -> context`` once per worker, then per slide its job
    ``job(context, slide, options)`` run by ``run_job`` (``run`` returns the figures)."""

    name: str
    setup: Callable[[dict], Any]
    job: Callable[[Any, CohortSlide, dict], SlideJob] | None  # (context, slide, options) -> the slide's job
    api: str  # "module:function" whose keyword defaults complete the options (the job's builder)
    inputs: str = "slides"  # "heatmaps" for tasks that read heatmap folders instead of slides
    required: tuple[str, ...] = ()  # outputs a slide done earlier must have, else it is redone
    other: Callable[[Any, CohortSlide, Path, dict, bool], dict] | None = None  # a task that is not a slide job
    defaults: Callable[[], dict] | None = None  # the options' defaults by flat name, where ``api`` takes option groups
    # a cohort-wide table besides cohort.csv, rewritten as slides finish: (out, every slide, config key) -> path
    table: Callable[[Path, Sequence[CohortSlide], str], Path] | None = None

    def run(self, context: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
        """Do one slide into ``out``; return its figures for the cohort table."""
        if self.job is None:
            assert self.other is not None
            return self.other(context, slide, out, options, progress)
        job = self.job(context, slide, options)
        return job.figures(run_job(job, slide.slide, out, progress=progress))

    def effective_options(self, options: dict) -> dict:
        """The options with the API's defaults filled in (None means "the default", as on the CLI),
        so the API and the CLI asking for the same thing get the same configuration key."""
        import importlib
        import inspect

        if self.defaults is not None:
            eff = {k: v for k, v in self.defaults().items() if k in options or k not in _NOT_OPTIONS}
        else:
            module, func = self.api.split(":")
            params = inspect.signature(getattr(importlib.import_module(module), func)).parameters
            eff = {k: p.default for k, p in params.items()
                   if k in options or (p.default is not inspect.Parameter.empty and k not in _NOT_OPTIONS)}
        eff.update({k: v for k, v in options.items() if v is not None})
        return eff


# Parameters of the API calls that are not options a user sets (the cohort runner sets them).
_NOT_OPTIONS = frozenset({"out", "out_dir", "progress", "loaded", "chunk", "heatmaps", "slide_path", "model_path"})


def _nothing(options: dict) -> None:
    return None


def _mpp_options(slide: CohortSlide, options: dict) -> dict:
    """The manifest's per-slide fallback MPP wins over the cohort-wide one."""
    return {"slide_mpp": slide.slide_mpp if slide.slide_mpp is not None else options.get("slide_mpp")}


def _heatmap_setup(options: dict) -> Any:
    from slidekit.infer.predictor import load_model
    from slidekit.models.builtin import DEFAULT_MODEL

    return load_model(options.get("model") or DEFAULT_MODEL)


def _own(options: dict, *drop: str) -> dict:
    return {k: v for k, v in options.items() if k not in ("slide_mpp", "progress", *drop)}


def _slide_qc(slide: CohortSlide, options: dict) -> dict:
    """``exclude_qc`` of a cohort is a QC cohort's output folder: each slide's QC is ``QC_OUT/<slide id>/``
    (the ids of one manifest are the same in every cohort command); ``auto`` stays as it is."""
    if options.get("exclude_qc") is None or str(options["exclude_qc"]) == "auto":
        return options  # auto: each slide's job QCs it first into OUT/<slide id>/qc/
    return {**options, "exclude_qc": str(Path(options["exclude_qc"]) / slide.id)}


def _heatmap_defaults() -> dict:
    from slidekit.infer.predictor import HeatmapOptions
    from slidekit.models.builtin import DEFAULT_MODEL

    return {"model": DEFAULT_MODEL, **HeatmapOptions().flat()}


def _heatmap_job(loaded: Any, slide: CohortSlide, options: dict) -> SlideJob:
    from slidekit.infer.predictor import heatmap_job

    return heatmap_job(loaded=loaded, **_mpp_options(slide, options), **_own(_slide_qc(slide, options), "model"))


def _cells_setup(options: dict) -> Any:
    from slidekit.infer.cells import load_cells_model

    return load_cells_model(options.get("model") or "hematoxylin")


def _cells_defaults() -> dict:
    from slidekit.infer.cells import CellsOptions

    return {"model": "hematoxylin", **CellsOptions().flat()}


def _cells_job(loaded: Any, slide: CohortSlide, options: dict) -> SlideJob:
    from slidekit.infer.cells import cells_job

    return cells_job(loaded=loaded, **_mpp_options(slide, options), **_own(_slide_qc(slide, options), "model"))


def _embed_defaults() -> dict:
    from slidekit.slidelevel.embed import EmbedOptions

    flat = EmbedOptions().flat()
    # the cohort's configuration keys keep embed's earlier spellings of the tile geometry
    flat["tile_mpp"], flat["patch_size"] = flat.pop("mpp"), flat.pop("size")
    return {**flat, "grid": None}


def _embed_job(_: Any, slide: CohortSlide, options: dict) -> SlideJob:
    from slidekit.slidelevel.embed import EmbedJob

    reading = ReadOptions(slide_mpp=_mpp_options(slide, options)["slide_mpp"], override_mpp=options.get("override_mpp"))
    return EmbedJob(reading=reading, geojson=bool(options.get("geojson")),
                    **_own(_slide_qc(slide, options), "override_mpp", "geojson"))


def _tissue_job(_: Any, slide: CohortSlide, options: dict) -> SlideJob:
    return tissue_job(**_mpp_options(slide, options), **_own(options))


def _grid_defaults() -> dict:
    from slidekit.regions.grid_job import GridOptions

    return {"mask_mpp": 8.0, **GridOptions().flat()}


def _grid_job(_: Any, slide: CohortSlide, options: dict) -> SlideJob:
    return grid_job(**_mpp_options(slide, options), **_own(_slide_qc(slide, options)))


def _qc_defaults() -> dict:
    return {**QcOptions().as_dict(), "slide_mpp": None, "override_mpp": None, "backend": None, "ome_zarr": False}


def _qc_job(_: Any, slide: CohortSlide, options: dict) -> SlideJob:
    return qc_job(**_mpp_options(slide, options), **_own(options))


def _features_run(_: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    rows = features_table([slide.slide], out=out / "features.csv", **options)
    return {k: v for k, v in rows[0].items() if k != "heatmap"}


TASKS: dict[str, CohortTask] = {t.name: t for t in (
    CohortTask("heatmap", _heatmap_setup, _heatmap_job, "slidekit.infer.predictor:heatmap_job",
               defaults=_heatmap_defaults),
    CohortTask("cells", _cells_setup, _cells_job, "slidekit.infer.cells:cells_job", defaults=_cells_defaults),
    CohortTask("embed", _nothing, _embed_job, "slidekit.slidelevel.embed:embed_slide",
               required=("embeddings.zarr", "features.h5"), defaults=_embed_defaults),
    CohortTask("tissue", _nothing, _tissue_job, "slidekit.regions.tissue_job:tissue_job"),
    CohortTask("tile", _nothing, _grid_job, "slidekit.regions.grid_job:grid_job", defaults=_grid_defaults),
    CohortTask("qc", _nothing, _qc_job, "slidekit.regions.qc:qc_job", required=("qc.json", "qc_labels.zarr"),
               defaults=_qc_defaults, table=write_qc_table),
    CohortTask("features", _nothing, None, "slidekit.slidelevel.features:features_table", inputs="heatmaps",
               other=_features_run),
)}

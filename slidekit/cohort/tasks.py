"""The per-slide commands a cohort can run: each is the single-slide API call writing into
``OUT/<slide id>/`` exactly as the single-slide command does, plus the figures it reports for the
cohort table. ``setup`` runs once per worker process (a model is loaded once, not per slide)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slidekit.cohort.manifest import CohortSlide
from slidekit.regions.tiling import make_grid
from slidekit.regions.tissue_job import save_tissue
from slidekit.slidelevel.features import features_table


@dataclass(frozen=True)
class CohortTask:
    """A per-slide command: ``setup(options) -> context`` once per worker, then
    ``run(context, slide, out_dir, options, progress) -> figures`` per slide."""

    name: str
    setup: Callable[[dict], Any]
    run: Callable[[Any, CohortSlide, Path, dict, bool], dict]
    api: str  # "module:function" of the single-slide call, whose defaults complete the options
    inputs: str = "slides"  # "heatmaps" for tasks that read heatmap folders instead of slides
    required: tuple[str, ...] = ()  # outputs a slide done earlier must have, else it is redone

    def effective_options(self, options: dict) -> dict:
        """The options with the API's defaults filled in (None means "the default", as on the CLI),
        so the API and the CLI asking for the same thing get the same configuration key."""
        import importlib
        import inspect

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


def _heatmap_run(loaded: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    from slidekit.infer.predictor import heatmap_slide

    opts = {k: v for k, v in options.items() if k not in ("model", "slide_mpp")}
    s = heatmap_slide(slide.slide, out, loaded=loaded, progress=progress, **_mpp_options(slide, options), **opts)
    return {"tiles": s["tiles"], "regions": s["regions"], "area_mm2": round(s["region_area_mm2"], 6),
            "slide_seconds": s["seconds"], "bad_tiles": len(s.get("bad_tiles") or [])}


def _cells_setup(options: dict) -> Any:
    from slidekit.infer.cells import load_cells_model

    return load_cells_model(options.get("model") or "hematoxylin")


def _cells_run(loaded: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    from slidekit.infer.cells import cells_slide

    opts = {k: v for k, v in options.items() if k not in ("model", "slide_mpp")}
    s = cells_slide(slide.slide, out, loaded=loaded, progress=progress, **_mpp_options(slide, options), **opts)
    return {"tiles": s["tiles"], "nuclei": s["nuclei"], "slide_seconds": s["seconds"]}


def _embed_run(_: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    from slidekit.regions.job import run_job
    from slidekit.regions.options import ReadOptions
    from slidekit.slidelevel.embed import EmbedJob

    opts = {k: v for k, v in options.items() if k not in ("slide_mpp", "override_mpp", "geojson", "progress")}
    reading = ReadOptions(slide_mpp=_mpp_options(slide, options)["slide_mpp"], override_mpp=options.get("override_mpp"))
    job = EmbedJob(reading=reading, geojson=bool(options.get("geojson")), **opts)
    return job.figures(run_job(job, slide.slide, out, progress=progress))


def _tissue_run(_: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    from slidekit.regions.tissue_job import TissueJob

    opts = {k: v for k, v in options.items() if k != "slide_mpp"}
    s = save_tissue(str(slide.slide), out, progress=progress, **_mpp_options(slide, options), **opts)
    return TissueJob.figures(TissueJob.__new__(TissueJob), s)


def _tile_run(_: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    opts = {k: v for k, v in options.items() if k != "slide_mpp"}
    grid = make_grid(slide.slide, out=out / "grid.npz", **_mpp_options(slide, options), **opts)
    return {"tiles": len(grid)}


def _features_run(_: Any, slide: CohortSlide, out: Path, options: dict, progress: bool) -> dict:
    rows = features_table([slide.slide], out=out / "features.csv", **options)
    return {k: v for k, v in rows[0].items() if k != "heatmap"}


TASKS: dict[str, CohortTask] = {t.name: t for t in (
    CohortTask("heatmap", _heatmap_setup, _heatmap_run, "slidekit.infer.predictor:heatmap_job"),
    CohortTask("cells", _cells_setup, _cells_run, "slidekit.infer.cells:cells_job"),
    CohortTask("embed", _nothing, _embed_run, "slidekit.slidelevel.embed:embed_slide",
               required=("embeddings.zarr", "features.h5")),
    CohortTask("tissue", _nothing, _tissue_run, "slidekit.regions.tissue_job:save_tissue"),
    CohortTask("tile", _nothing, _tile_run, "slidekit.regions.tiling:make_grid"),
    CohortTask("features", _nothing, _features_run, "slidekit.slidelevel.features:features_table", inputs="heatmaps"),
)}

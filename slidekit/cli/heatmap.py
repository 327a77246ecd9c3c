"""`slidekit heatmap` (slides -> heatmap.zarr, overlay.png, predictions.geojson, summary.json)
and `slidekit convert` (ASAP/ImageScope XML or any GeoJSON form -> QuPath GeoJSON)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slidekit.annotations.formats import read_annotations, write_geojson
from slidekit.annotations.geometry import is_invalid_polygon, make_valid as repair
from slidekit.base.timing import format_split
from slidekit.cli.cohort import cohort_options, is_cohort, run_cohort_cli
from slidekit.cli.common import (
    check_stain_options,
    device_option,
    echo_json,
    fail,
    handle_errors,
    min_tissue_option,
    option,
    quiet_flag,
    quiet_option,
    slide_reading_options,
    stain_options,
    threads_option,
    tile_geometry_options,
    tissue_detection_options,
    tissue_kwargs,
)
from slidekit.cli.scverse import export_after
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc_tiles import check_qc_options
from slidekit.slides.demo import write_demo_slide


@click.command("heatmap")
@click.argument("slides", nargs=-1, type=click.Path(path_type=str))
@option("out", type=click.Path(file_okay=False, path_type=str), required=True,
        detail="directory (one subdirectory per slide, OUT/<slide id>/, for a cohort).")
@option("model", detail="a built-in model (hematoxylin, tissue) or a slidekit checkpoint. [default: hematoxylin]")
@option("demo")
@tile_geometry_options(overlap_detail="[default: size/4 for segmentation, 0 for classification]",
                       aliases={"tile_mpp": ("--mpp",), "tile_size": ("--size",)}, minimum=(8, 0))
@option("heatmap_mpp")
@option("blend")
@option("batch_size", default=32, detail="[32 here: heatmap_slide's default]")
@option("workers", default=2, detail="[2 here: heatmap_slide's default; a cohort uses 0 unless given, as each "
                                      "slide worker reads its own tiles]")
@threads_option
@device_option
@option("threshold", detail="where regions become polygons in predictions.geojson.")
@option("min_area", default=1000.0, detail="polygons in predictions.geojson [1000 here: tumour regions, not cells].")
@min_tissue_option(0.1, "[0.1 here: tiles at the edge of the tissue are predicted too]")
@option("roi", detail="Intersected with tissue; the heatmap is empty outside them.")
@option("roi_class")
@option("exclude_qc")
@option("qc_max")
@tissue_detection_options
@stain_options
@option("tiff")
@option("ome_zarr")
@option("tiles_geojson")
@slide_reading_options
@option("skip_bad_tiles")
@option("spatialdata")
@quiet_option
@cohort_options
@click.pass_context
@handle_errors
def heatmap_cmd(ctx: click.Context, slides: tuple[str, ...], out: str, model: str | None, demo: bool,
                tile_mpp: float | None, tile_size: int | None, overlap: int | None, heatmap_mpp: float | None,
                blend: str,
                batch_size: int, workers: int, threads: int | None, device: str, threshold: float, min_area_um2: float,
                min_tissue: float, tiles_geojson: bool, slide_mpp: float | None, override_mpp: float | None,
                backend: str | None, skip_bad_tiles: bool, stain_norm: str | None, stain_ref: str | None,
                **cohort: Any) -> None:
    """Predict a model over the tissue of each SLIDE and write a heatmap, an overlay and QuPath GeoJSON.

    SLIDES: slide files, folders, globs or manifest CSVs. One slide writes into OUT; a cohort
    writes OUT/<slide id>/ per slide plus OUT/cohort.csv (see docs/cohorts.md).
    Reruns skip finished slides and resume interrupted ones.
    """
    from slidekit.infer.predictor import heatmap_slide, load_model
    from slidekit.models.builtin import DEFAULT_MODEL

    quiet = quiet_flag(ctx)
    tissue = tissue_kwargs(cohort)
    roi, roi_class = cohort.pop("roi"), list(cohort.pop("roi_class")) or None
    if roi_class and roi is None:
        raise click.UsageError("--roi-class needs --roi")
    out_dir = Path(out)
    paths = list(slides)
    if not paths and not demo and not cohort.get("manifest"):
        fail("give at least one SLIDE, or --demo")
    check_stain_options(stain_norm, stain_ref)
    if demo:
        demo_path = out_dir / "demo.tif"
        if not demo_path.exists():
            write_demo_slide(demo_path)
        paths.append(str(demo_path))
    options: dict[str, Any] = dict(
        model=model, mpp=tile_mpp, size=tile_size, overlap=overlap, heatmap_mpp=heatmap_mpp, blend=blend,
        batch_size=batch_size, workers=workers, device=device, threshold=threshold,
        min_area_um2=min_area_um2, min_tissue=min_tissue, tiles_geojson=tiles_geojson,
        slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend,
        on_bad_tile="skip" if skip_bad_tiles else "raise", stain_norm=stain_norm, stain_ref=stain_ref)
    options["tissue"] = tissue
    options["tiff"] = cohort.pop("tiff")
    options["ome_zarr"] = cohort.pop("ome_zarr")
    options.update(exclude_qc=cohort.pop("exclude_qc"), qc_max=list(cohort.pop("qc_max")) or None)
    check_qc_options(options.get("exclude_qc"), options.get("qc_max"))
    if roi is not None:
        if is_cohort(ctx, paths, cohort.get("manifest") or ()):
            raise click.UsageError("--roi belongs to one slide; run `slidekit heatmap` per slide")
        options.update(roi=roi, roi_class=roi_class)
    if is_cohort(ctx, paths, cohort.get("manifest") or ()):
        if ctx.get_parameter_source("workers") != click.core.ParameterSource.COMMANDLINE:
            options["workers"] = 0  # each slide worker reads its own tiles; more processes oversubscribe
        run_cohort_cli(ctx, "heatmap", paths, out, quiet, options)
        return
    options.pop("model")
    s = heatmap_slide(paths[0], out_dir, loaded=load_model(model or DEFAULT_MODEL), progress=not quiet,
                      threads=threads, **options)
    export_after(ctx, out_dir, slide=paths[0], reading=ReadOptions(slide_mpp, override_mpp, backend))
    if not quiet:
        state = "skipped (finished earlier)" if s.get("skipped") else f"{s['seconds']} s"
        click.echo(f"{Path(paths[0]).name}: {s['tiles']} tiles, {s['regions']} regions -> {out_dir} [{state}]")

        if not s.get("skipped") and format_split(s):
            click.echo(f"time: {format_split(s)}")  # where the time went: reading or the model?


@click.command("convert")
@click.argument("annotations", type=click.Path(dir_okay=False, path_type=str))
@option("out", required=True, type=click.Path(dir_okay=False, path_type=str),
        detail="QuPath GeoJSON (.geojson, or .geojson.gz to compress).")
@option("rename")
@option("make_valid")
@quiet_option
@click.pass_context
@handle_errors
def convert_cmd(ctx: click.Context, annotations: str, out: str, rename: tuple[str, ...], make_valid: bool) -> None:
    """Convert ASAP/ImageScope XML (or any GeoJSON form) into a QuPath-ready FeatureCollection."""
    mapping = {}
    for r in rename:
        if "=" not in r:
            fail(f"--rename {r!r}: expected OLD=NEW")
        old, new = r.split("=", 1)
        mapping[old] = new or None
    anns = read_annotations(annotations)
    invalid = repaired = 0
    for a in anns:
        if a.label in mapping:
            a.label = mapping[a.label]
        if is_invalid_polygon(a.geometry):
            invalid += 1
            if make_valid:
                a.geometry, changed = repair(a.geometry)
                repaired += changed
    write_geojson(anns, out)
    if not quiet_flag(ctx):
        if invalid and not make_valid:
            click.echo(f"slidekit: note: {invalid} polygon(s) in {annotations} are invalid (self-intersecting); "
                       "written as drawn (slidekit fills them by the non-zero rule, as QuPath and ASAP do); "
                       "--make-valid repairs them", err=True)
        echo_json({"input": annotations, "output": out, "objects": len(anns),
                   "classes": sorted({str(a.label) for a in anns}), "invalid": invalid, "repaired": repaired})


def register(group: click.Group) -> None:
    """Add `heatmap` and `convert` to the CLI."""
    group.add_command(heatmap_cmd)
    group.add_command(convert_cmd)

"""Core commands: info, demo, tissue, tile."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slidekit.annotations.formats import read_annotations
from slidekit.base.resources import configure_threads
from slidekit.cli.cohort import cohort_options, run_cohort_cli, single_slide, slides_argument
from slidekit.cli.common import (
    echo_json,
    handle_errors,
    min_tissue_option,
    option,
    quiet_flag,
    quiet_option,
    slide_argument,
    slide_reading_options,
    threads_option,
    tile_geometry_options,
    tissue_detection_options,
    tissue_kwargs,
)
from slidekit.cli.scverse import export_after
from slidekit.regions.options import ReadOptions
from slidekit.regions.patches import export_patches, tile_labels, write_grid_geojson
from slidekit.regions.qc_tiles import TileQc, check_qc_options
from slidekit.regions.tiling import make_grid
from slidekit.regions.tissue_job import save_tissue
from slidekit.slides.demo import write_demo_slide
from slidekit.slides.slide import open_slide


@click.command()
@slide_argument
@slide_reading_options
@option("json")
@quiet_option
@handle_errors
def info(slide: str, slide_mpp: float | None, override_mpp: float | None, backend: str | None,
         as_json: bool) -> None:
    """Show a slide's size, levels, pixel size and backend (a slide without MPP shows "MPP: unknown")."""
    with open_slide(slide, mpp=slide_mpp, backend=backend, override_mpp=override_mpp, require_mpp=False) as s:
        d = s.info()
    if str(d.get("vendor")).strip() in ("", "None"):  # tiffslide leaves its vendor property unset (None)
        d["vendor"] = None
    if as_json:
        echo_json(d)
        return
    click.echo(f"{d['path']}")
    click.echo(f"  backend     {d['backend']} ({d['vendor'] or 'unknown vendor'})")
    size = "" if d["size_mm"] is None else f" ({d['size_mm'][0]} x {d['size_mm'][1]} mm)"
    click.echo(f"  dimensions  {d['dimensions'][0]} x {d['dimensions'][1]} px{size}")
    if d["mpp"] is None:
        click.echo("  MPP: unknown (not in the slide's metadata; give --slide-mpp to commands that need it)")
    else:
        click.echo(f"  mpp         {d['mpp'][0]:.4f} x {d['mpp'][1]:.4f} µm/px ({d['mpp_source']}), "
                   f"~{d['magnification']:g}x")
    for i, (dim, ds) in enumerate(zip(d["level_dimensions"], d["level_downsamples"])):
        click.echo(f"  level {i}     {dim[0]} x {dim[1]} px, downsample {ds:g}")


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@quiet_option
@handle_errors
def demo(out: Path) -> None:
    """Write the demo slide (real IHC tissue from scikit-image, on white glass) to OUT."""
    click.echo(str(write_demo_slide(out)))  # no progress to hide: -q is taken like every command's


@click.command()
@slides_argument
@option("out", type=click.Path(file_okay=False, path_type=Path), required=True,
        detail="directory (mask.png, tissue.geojson, tissue.json; OUT/<slide id>/ for a cohort).")
@tissue_detection_options(detector=False, aliases={"tissue_mpp": ("--mask-mpp",), "tissue_min_area": ("--min-area",)})
@slide_reading_options
@threads_option
@option("spatialdata")
@quiet_option
@cohort_options
@handle_errors
@click.pass_context
def tissue(ctx: click.Context, slides: tuple[str, ...], out: Path, tissue_mpp: float | None,
           tissue_min_area: float | None, slide_mpp: float | None, override_mpp: float | None, backend: str | None,
           threads: int | None, **cohort: Any) -> None:
    """Detect tissue; write a mask PNG and tissue polygons as QuPath GeoJSON.

    SLIDES: one slide, or a cohort (several slides, folders, globs, --manifest; see docs/cohorts.md)."""
    options: dict[str, Any] = dict(mask_mpp=8.0 if tissue_mpp is None else tissue_mpp,
                   min_area_um2=20_000.0 if tissue_min_area is None else tissue_min_area,
                   slide_mpp=slide_mpp, backend=backend, override_mpp=override_mpp)
    if single_slide(ctx, slides, cohort):
        if threads is not None:  # else the libraries keep their own defaults
            configure_threads(threads)
        summary = save_tissue(slides[0], out, **options)
        export_after(ctx, out, slide=slides[0], reading=ReadOptions(slide_mpp, override_mpp, backend))
    else:
        return run_cohort_cli(ctx, "tissue", list(slides), str(out), quiet_flag(ctx), options)
    click.echo(f"{summary['regions']} tissue regions, {summary['area_mm2']:.3f} mm² -> {out}")


@click.command()
@slides_argument
@tile_geometry_options(tile_mpp=0.5, tile_size=256, overlap=0,  # tile has no model to take them from
                       aliases={"tile_mpp": ("--mpp",), "tile_size": ("--size",)})
@min_tissue_option(0.5, "[0.5 here: a tile kept for training or export is mostly tissue]")
@option("out", type=click.Path(path_type=Path), default=None,
        detail="grid file to write (.npz); for a cohort, a folder (OUT/<slide id>/grid.npz).")
@option("export")
@option("image_format")
@option("quality")
@option("annotations")
@option("label_rule")
@option("geojson", type=click.Path(dir_okay=False, path_type=Path),
        detail="the grid (classified with --annotations), clipped to the slide.")
@option("reader_threads", detail="For --export.", aliases=("--workers",))
@option("exclude_qc", detail="The kept tiles' artefact fractions: a cohort's OUT/<slide id>/tiles.csv, "
                             "--export's patches.csv, the grid file's meta['qc'].")
@option("qc_max")
@tissue_detection_options
@slide_reading_options
@threads_option
@quiet_option
@cohort_options
@handle_errors
@click.pass_context
def tile(ctx: click.Context, slides: tuple[str, ...], tile_mpp: float, tile_size: int, overlap: int,
         min_tissue: float, out: Path | None, export: Path | None, image_format: str, quality: int,
         annotations: str | None, label_rule: str, geojson: Path | None, reader_threads: int,
         slide_mpp: float | None, override_mpp: float | None, backend: str | None, threads: int | None,
         **cohort: Any) -> None:
    """Make a tile grid at a target MPP and save it, export its tiles as images, or both
    (one slide; a cohort makes grids only: see docs/cohorts.md)."""
    tissue = tissue_kwargs(cohort)
    quiet = quiet_flag(ctx)
    mpp, size = tile_mpp, tile_size
    options: dict[str, Any] = dict(mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue, slide_mpp=slide_mpp,
                   backend=backend, override_mpp=override_mpp, tissue=tissue)
    exclude_qc, qc_max = cohort.pop("exclude_qc"), list(cohort.pop("qc_max")) or None
    check_qc_options(exclude_qc, qc_max)
    if not single_slide(ctx, slides, cohort):
        options.update(exclude_qc=exclude_qc, qc_max=qc_max)
        if export or geojson or annotations:
            raise click.UsageError("--export, --geojson and --annotations take one slide (with its own "
                                   "annotations); run `slidekit tile` per slide")
        if out is None:
            raise click.UsageError("--out is required for a cohort")
        return run_cohort_cli(ctx, "tile", list(slides), str(out), quiet, options)
    qc = TileQc.of(exclude_qc, qc_max)
    if out is None and export is None and geojson is None:
        raise click.UsageError("give --out (grid file), --export (tile images) and/or --geojson")
    if export is None:  # options that would otherwise be ignored without a word
        given = [f"--{n.replace('image_format', 'format').replace('_', '-')}"
                 for n in ("image_format", "quality", "reader_threads")
                 if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if annotations and geojson is None:
            given.append("--annotations")
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise click.UsageError(f"{', '.join(given)} {verb} only with --export"
                                   f"{' or --geojson' if given == ['--annotations'] else ''}")
    if threads is not None:  # else the libraries keep their own defaults
        configure_threads(threads)
    if out is not None:
        grid = make_grid(slides[0], out=out, qc=qc, **options)
        if not quiet:
            click.echo(f"{len(grid)} tiles of {size}px at {mpp} µm/px -> {out}")
    if export is not None:
        s = export_patches(slides[0], export, image_format=image_format, quality=quality, annotations=annotations,
                           label_rule=label_rule, geojson=geojson, reader_threads=reader_threads, progress=not quiet,
                           exclude_qc=exclude_qc, qc_max=qc_max, **options)
        if not quiet:
            state = "skipped (finished earlier)" if s.get("skipped") else f"{s['tiles_resumed']} resumed"
            click.echo(f"{s['tiles']} tiles -> {export} [{state}]")
    elif geojson is not None:
        grid = make_grid(slides[0], qc=qc, **options) if out is None else grid
        labels = tile_labels(read_annotations(annotations), grid, label_rule)[0] if annotations else None
        write_grid_geojson(grid, geojson, labels)
        if not quiet:
            click.echo(f"{len(grid)} tiles -> {geojson}")


def register(group: click.Group) -> None:
    """Add the core commands to the main group."""
    for cmd in (info, demo, tissue, tile):
        group.add_command(cmd)

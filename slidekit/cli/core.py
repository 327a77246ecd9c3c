"""Core commands: info, demo, tissue, tile."""
from __future__ import annotations

from pathlib import Path

import click

from slidekit.cli.cohort import cohort_options, run_cohort_cli, single_slide, slides_argument
from slidekit.cli.common import (echo_json, handle_errors, min_tissue_option, overlap_option, quiet_flag,
                                 quiet_option, size_option, slide_argument, slide_reading_options,
                                 target_mpp_option)


@click.command()
@slide_argument
@slide_reading_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def info(slide: str, slide_mpp: float | None, override_mpp: float | None, backend: str | None,
         as_json: bool) -> None:
    """Show a slide's size, levels, pixel size and backend (a slide without MPP shows "MPP: unknown")."""
    from slidekit.slide import open_slide

    with open_slide(slide, mpp=slide_mpp, backend=backend, override_mpp=override_mpp, require_mpp=False) as s:
        d = s.info()
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
@handle_errors
def demo(out: Path) -> None:
    """Write the demo slide (real IHC tissue from scikit-image, on white glass) to OUT."""
    from slidekit.demo import write_demo_slide

    click.echo(str(write_demo_slide(out)))


@click.command()
@slides_argument
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory (mask.png, tissue.geojson, tissue.json; OUT/<slide id>/ for a cohort).")
@click.option("--mask-mpp", type=float, default=8.0, show_default=True, help="Working pixel size (µm/px).")
@click.option("--min-area", type=float, default=20_000.0, show_default=True,
              help="Smallest tissue region kept, µm².")
@slide_reading_options
@quiet_option
@cohort_options
@handle_errors
@click.pass_context
def tissue(ctx: click.Context, slides: tuple[str, ...], out: Path, mask_mpp: float, min_area: float,
           slide_mpp: float | None, override_mpp: float | None, backend: str | None, quiet: bool,
           **cohort: object) -> None:
    """Detect tissue; write a mask PNG and tissue polygons as QuPath GeoJSON.

    SLIDES: one slide, or a cohort (several slides, folders, globs, --manifest; see docs/cohorts.md)."""
    from slidekit.tissue import save_tissue

    options = dict(mask_mpp=mask_mpp, min_area_um2=min_area, slide_mpp=slide_mpp, backend=backend,
                   override_mpp=override_mpp)
    if single_slide(ctx, slides, cohort):
        summary = save_tissue(slides[0], out, **options)
    else:
        return run_cohort_cli(ctx, "tissue", list(slides), str(out), quiet or quiet_flag(ctx), options)
    click.echo(f"{summary['regions']} tissue regions, {summary['area_mm2']:.3f} mm² -> {out}")


@click.command()
@slides_argument
@target_mpp_option
@size_option
@overlap_option
@min_tissue_option
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Grid file to write (.npz); for a cohort, a folder (OUT/<slide id>/grid.npz).")
@slide_reading_options
@quiet_option
@cohort_options
@handle_errors
@click.pass_context
def tile(ctx: click.Context, slides: tuple[str, ...], mpp: float, size: int, overlap: int, min_tissue: float,
         out: Path, slide_mpp: float | None, override_mpp: float | None, backend: str | None, quiet: bool,
         **cohort: object) -> None:
    """Make a tile grid at a target MPP and save it (one slide, or a cohort: see docs/cohorts.md)."""
    from slidekit.tiling import make_grid

    options = dict(mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue, slide_mpp=slide_mpp,
                   backend=backend, override_mpp=override_mpp)
    if not single_slide(ctx, slides, cohort):
        return run_cohort_cli(ctx, "tile", list(slides), str(out), quiet or quiet_flag(ctx), options)
    grid = make_grid(slides[0], out=out, **options)
    if not (quiet or quiet_flag(ctx)):
        click.echo(f"{len(grid)} tiles of {size}px at {mpp} µm/px -> {out}")


def register(group: click.Group) -> None:
    """Add the core commands to the main group."""
    for cmd in (info, demo, tissue, tile):
        group.add_command(cmd)

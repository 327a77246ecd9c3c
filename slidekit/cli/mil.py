"""MIL commands: `mil-deploy` (score feature files with a MIL checkpoint into a table) and
`mil-attention` (one slide's attention as a heatmap + overlay and QuPath tiles). Training is
`slidekit train mil` (docs/mil.md)."""
from __future__ import annotations

from pathlib import Path

import click

from slidekit.cli.common import (
    cohort_folder_option,
    handle_errors,
    option,
    quiet_flag,
    quiet_option,
    slide_reading_options,
)
from slidekit.regions.options import ReadOptions


@click.command("mil-deploy")
@click.argument("features", nargs=-1, required=False, type=click.Path(path_type=Path))
@option("model", required=True, aliases=("--checkpoint",), metavar="CKPT",
        detail="a MIL checkpoint (`slidekit train mil` OUT/checkpoint.pt).")
@option("out", type=click.Path(dir_okay=False, path_type=Path), required=True,
        detail="table to write: one row per feature file (status, p_<class>, predicted).")
@option("chunk_rows")
@cohort_folder_option("score each slide's features.h5 by its id (a slide whose embed is not done is a failed row).")
@quiet_option
@handle_errors
@click.pass_context
def mil_deploy(ctx: click.Context, features: tuple[Path, ...], model: str, out: Path, chunk_rows: int,
               cohort: str | None = None) -> None:
    """Score slides' feature files (FEATURES: .h5 from `slidekit embed`, TRIDENT, CLAM or STAMP, or SpatialData
    stores of wsidata/LazySlide or sopa (docs/scverse.md); or --cohort)."""
    if not features and cohort is None:
        raise click.UsageError("give FEATURES (feature files) or --cohort EMBED_OUT")
    import csv

    from slidekit.slidelevel.mil_deploy import deploy  # loads torch

    path = deploy(Path(model), features, out, chunk_rows, progress=not quiet_flag(ctx), cohort=cohort)
    with open(path, newline="") as f:
        statuses = [r["status"] for r in csv.DictReader(f)]
    failed = statuses.count("failed")
    click.echo(f"{len(statuses)} slide(s) scored ({failed} failed) -> {path}")
    if failed:
        ctx.exit(1)


@click.command("mil-attention")
@click.argument("features", type=click.Path(path_type=Path))  # a feature file or a SpatialData store
@option("slide", required=True, detail="the slide the features come from (for the overlay and the GeoJSON bounds).")
@option("model", required=True, aliases=("--checkpoint",), metavar="CKPT",
        detail="a MIL checkpoint with attention (abmil, clam, transmil).")
@option("out", type=click.Path(file_okay=False, path_type=Path), required=True,
        detail="folder for attention.zarr, attention.png and tiles.geojson.")
@slide_reading_options
@quiet_option
@handle_errors
def mil_attention(features: Path, slide: str, model: str, out: Path, slide_mpp: float | None,
                  override_mpp: float | None, backend: str | None) -> None:
    """Per-tile attention and class scores of one slide: heatmap + overlay and QuPath tile objects.
    A rerun skips a finished folder whose outputs verify and redoes one that does not."""
    from slidekit.slidelevel.mil_deploy import attention_slide  # loads torch

    reading = ReadOptions(slide_mpp=slide_mpp, override_mpp=override_mpp, backend=backend)
    summary = attention_slide(Path(slide), out, model=Path(model), features=features, reading=reading)
    click.echo(" ".join(str(out / n) for n in summary["outputs"] if n != "summary.json"))


def register(main: click.Group) -> None:
    main.add_command(mil_deploy)
    main.add_command(mil_attention)

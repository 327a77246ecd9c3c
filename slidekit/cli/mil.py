"""MIL commands: `mil-deploy` (score feature files with a MIL checkpoint into a table) and
`mil-attention` (one slide's attention as a heatmap + overlay and QuPath tiles). Training is
`slidekit train mil` (docs/mil.md)."""
from __future__ import annotations

from pathlib import Path

import click

from slidekit.cli.common import handle_errors, quiet_flag, quiet_option
from slidekit.slides.slide import open_slide


@click.command("mil-deploy")
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="MIL checkpoint (`slidekit train mil` OUT/checkpoint.pt).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Table to write: one row per feature file (status, p_<class>, predicted).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Feature rows read at a time (streamed bags; TransMIL reads a bag whole).")
@quiet_option
@handle_errors
@click.pass_context
def mil_deploy(ctx: click.Context, features: tuple[Path, ...], checkpoint: Path, out: Path, chunk_rows: int,
               quiet: bool) -> None:
    """Score slides' feature files (FEATURES: .h5 from `slidekit embed`, TRIDENT, CLAM or STAMP)."""
    from slidekit.slidelevel.mil_deploy import deploy  # loads torch

    path = deploy(checkpoint, features, out, chunk_rows, progress=not quiet_flag(ctx) and not quiet)
    with open(path) as f:
        failed = sum(1 for line in f if ",failed," in line)
    click.echo(f"{len(features)} slide(s) scored ({failed} failed) -> {path}")
    if failed:
        ctx.exit(1)


@click.command("mil-attention")
@click.argument("features", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--slide", "slide_path", type=click.Path(path_type=Path), required=True,
              help="The slide the features come from (for the overlay and the GeoJSON bounds).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="MIL checkpoint with attention (abmil, clam, transmil).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for attention.zarr, attention.png and tiles.geojson.")
@handle_errors
def mil_attention(features: Path, slide_path: Path, checkpoint: Path, out: Path) -> None:
    """Per-tile attention and class scores of one slide: heatmap + overlay and QuPath tile objects."""
    from slidekit.slidelevel.mil_deploy import attention_outputs  # loads torch

    paths = attention_outputs(checkpoint, features, open_slide(slide_path), out)
    click.echo(" ".join(str(p) for p in paths.values()))


def register(main: click.Group) -> None:
    main.add_command(mil_deploy)
    main.add_command(mil_attention)

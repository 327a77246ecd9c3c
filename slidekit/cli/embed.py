"""`slidekit embed SLIDE --model CKPT --out FILE`: per-tile features (zarr) and optional clusters."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slidekit.base.timing import format_split
from slidekit.cli.cohort import cohort_options, run_cohort_cli, single_slide, slides_argument
from slidekit.cli.common import (
    check_stain_options,
    device_option,
    echo_json,
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
from slidekit.regions.qc_tiles import check_qc_options


@click.command("embed")
@slides_argument
@option("model", required=True, aliases=("--encoder",),
        detail="a slidekit checkpoint (e.g. from `slidekit train simclr`; its encoder embeds the tiles), a "
               "torchvision ResNet .pth, timm:NAME with --weights, or a named encoder (uni, uni2-h, virchow2, "
               "h-optimus-0/1, prov-gigapath, resnet18/34/50, any case; docs/models.md) with --weights or "
               "$SLIDEKIT_MODELS.")
@option("weights", detail="For a named encoder (uni, virchow2, ...; else found under $SLIDEKIT_MODELS), a "
                          "torchvision ResNet (resnet18/34/50) or timm:NAME.")
@option("tokens")
@tile_geometry_options(detail="[default: the checkpoint's; --tile-mpp is required for a plain weights file, "
                              "--tile-size is 224 for one]",
                       aliases={"tile_size": ("--patch-size",)}, with_overlap=False)
@option("out", required=True,
        detail="zarr store: features (N, D), coords (N, 2) level-0 x, y, clusters (for a cohort: a folder, "
               "OUT/<slide id>/embeddings.zarr).")
@option("h5")
@option("grid", detail="[default: the model's tile size and MPP over tissue].")
@option("clusters")
@option("geojson", detail="the clusters, coloured by cluster (needs --clusters; for a cohort any value writes "
                          "OUT/<slide id>/clusters.geojson).")
@option("batch_size", default=64, detail="[64 here: embed_slide's default]")
@option("seed")
@min_tissue_option(0.5, "[0.5 here: a feature describes a tile that is mostly tissue]")
@option("exclude_qc")
@option("qc_max")
@tissue_detection_options
@stain_options
@option("workers")
@threads_option
@device_option
@slide_reading_options(backend=False)  # embed_slide reads through the automatic reader
@option("spatialdata")
@quiet_option
@cohort_options
@click.pass_context
@handle_errors
def embed(ctx: click.Context, slides: tuple[str, ...], model: str, weights: str | None, tokens: str | None,
          tile_mpp: float | None,
          tile_size: int | None, out: str, features_h5: str | None, grid: str | None, clusters: int | None,
          geojson: str | None, batch_size: int, seed: int, min_tissue: float, workers: int, threads: int | None,
          device: str,
          slide_mpp: float | None, override_mpp: float | None, stain_norm: str | None,
          stain_ref: str | None, **cohort: Any) -> None:
    """Embed every tissue tile of each SLIDE with the encoder of CKPT; reruns resume or skip.

    SLIDES: one slide, or a cohort (several slides, folders, globs, --manifest; see docs/cohorts.md)."""
    from slidekit.slidelevel.embed import embed_slide, open_embeddings

    if geojson and not clusters:
        raise click.UsageError("--geojson needs --clusters K")
    check_stain_options(stain_norm, stain_ref)
    options: dict[str, Any] = dict(
        model=model, weights=weights, tokens=tokens, tile_mpp=tile_mpp, patch_size=tile_size, min_tissue=min_tissue,
        slide_mpp=slide_mpp, override_mpp=override_mpp, stain_norm=stain_norm, stain_ref=stain_ref,
        batch_size=batch_size, workers=workers, device=device, clusters=clusters, seed=seed)
    options["tissue"] = tissue_kwargs(cohort)
    options.update(exclude_qc=cohort.pop("exclude_qc"), qc_max=list(cohort.pop("qc_max")) or None)
    check_qc_options(options.get("exclude_qc"), options.get("qc_max"))
    quiet = quiet_flag(ctx)
    if not single_slide(ctx, slides, cohort):
        if grid:
            raise click.UsageError("--grid belongs to one slide; a cohort makes each slide's grid")
        if features_h5:
            raise click.UsageError("--h5 belongs to one slide; a cohort writes OUT/<slide id>/features.h5")
        return run_cohort_cli(ctx, "embed", list(slides), out, quiet, {**options, "geojson": bool(geojson)})
    if ctx.meta.get("spatialdata"):
        raise click.UsageError("--spatialdata needs an embed cohort (OUT/<slide id>/features.h5); for one slide write "
                               "--h5 DIR/features.h5 and run `slidekit export-spatialdata DIR --slide SLIDE`")
    path = embed_slide(slides[0], out=out, grid=grid, geojson=geojson, progress=not quiet, threads=threads,
                       features_h5=features_h5, **options)
    emb = open_embeddings(path)

    if not quiet and format_split(emb.attrs.get("timing")):
        click.echo(f"time: {format_split(emb.attrs.get('timing'))}", err=True)  # stdout stays JSON
    echo_json({"out": str(Path(path)), "tiles": int(emb.coords.shape[0]), "dim": int(emb.features.shape[1]),
               "clusters": clusters, "geojson": geojson, "h5": features_h5,
               **({"qc": emb.attrs.get("qc")} if options["exclude_qc"] else {})})


def register(group: click.Group) -> None:
    """Add `embed` to the main group."""
    group.add_command(embed)

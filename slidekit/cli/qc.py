"""``slidekit qc``: slide QC (artefact classes, their areas, a verdict) through ``slidekit.regions.qc``.

The verdict limits (--max-blur, --max-pen, --max-fold, --max-debris, --max-bubble) come from the shared
vocabulary (slidekit/cli/common.py) like every other option.
"""
from __future__ import annotations

from typing import Any, Callable

import click

from slidekit.cli.cohort import run_cohort_cli, single_slide, slides_argument
from slidekit.cli.common import (
    cohort_options,
    echo_json,
    handle_errors,
    option,
    quiet_flag,
    quiet_option,
    slide_reading_options,
)
from slidekit.cli.scverse import export_after
from slidekit.regions.options import ReadOptions
from slidekit.regions.qc import QcOptions, qc_slide
from slidekit.regions.qc_model import train_qc_model

_DEFAULTS = QcOptions()
LIMITS = {  # vocabulary key -> (flag, what it limits)
    "max_blur": ("--max-blur", "Out of focus"),
    "max_pen": ("--max-pen", "Pen ink"),
    "max_fold": ("--max-fold", "Fold"),
    "max_debris": ("--max-debris", "Dark debris"),
    "max_bubble": ("--max-bubble", "Air bubble / edge"),
}


def _limit_option(key: str) -> Callable:
    return option(key, default=getattr(_DEFAULTS, key), show_default=True)


def _limit_options(func: Callable) -> Callable:
    for key in reversed(list(LIMITS)):
        func = _limit_option(key)(func)
    return func


@click.command()
@slides_argument
@option("out", type=click.Path(file_okay=False, path_type=str), required=True,
        detail="directory (qc_labels.zarr, qc.geojson, qc.json, summary.json; a cohort: OUT/<slide id>/ per slide, "
               "OUT/qc.csv and OUT/cohort.csv).")
@_limit_options
@option("qc_model")
@option("ome_zarr")
@slide_reading_options
@option("json")
@option("spatialdata")
@quiet_option
@cohort_options
@handle_errors
@click.pass_context
def qc(ctx: click.Context, slides: tuple[str, ...], out: str, qc_model: tuple[str, ...], ome_zarr: bool,
       slide_mpp: float | None, override_mpp: float | None, backend: str | None, as_json: bool,
       **params: Any) -> None:
    """Slide QC: find pen ink, out-of-focus tissue, folds, dark debris and bubble/coverslip edges; write a
    label map, QuPath annotations (one class each) and qc.json (µm² and fraction of tissue per class, verdict).

    SLIDES: one slide (or overview image), or a cohort (several slides, folders, globs or --manifest CSV):
    each slide's QC in OUT/<slide id>/, and OUT/qc.csv with one row per slide (verdict, reasons, tissue µm²,
    per class fraction and µm²), rewritten as slides finish; reruns skip finished slides.

    An overview image works too: give its µm/px with --slide-mpp (e.g. `slidekit qc overview.png --slide-mpp 16
    --out D`)."""
    limits: dict[str, Any] = {k: float(params.pop(k)) for k in LIMITS}
    if qc_model:
        limits["models"] = tuple(qc_model)
    if not single_slide(ctx, slides, params):
        if as_json:
            raise click.UsageError("--json is for one slide; a cohort writes OUT/qc.csv")
        run_cohort_cli(ctx, "qc", list(slides), out, quiet_flag(ctx),
                       {**limits, "ome_zarr": ome_zarr or None, "slide_mpp": slide_mpp,
                        "override_mpp": override_mpp, "backend": backend})
        return
    slide = slides[0]
    summary = qc_slide(slide, out, options=QcOptions(**limits), slide_mpp=slide_mpp, override_mpp=override_mpp,
                       backend=backend, ome_zarr=ome_zarr, progress=not quiet_flag(ctx))
    export_after(ctx, out, slide=slide, reading=ReadOptions(slide_mpp, override_mpp, backend))
    if as_json:
        echo_json({k: summary[k] for k in ("verdict", "reasons", "tissue_area_um2", "classes", "not_measured")})
        return
    parts = ", ".join(f"{n} {c['fraction_of_tissue']:.1%}" for n, c in summary["classes"].items() if c["measured"])
    done = " (finished already)" if summary.get("skipped") else ""
    click.echo(f"{summary['verdict']}{done}: {parts} of {summary['tissue_area_um2'] / 1e6:.3f} mm² tissue -> {out}")
    for reason in summary["reasons"]:
        click.echo(f"  {reason}")


@click.command("qc-train")
@click.argument("slide", type=click.Path(path_type=str))
@option("scribbles", required=True)
@option("qc_class", required=True)
@option("out", type=click.Path(dir_okay=False, path_type=str), required=True, detail="model file (joblib).")
@option("artefact_class")
@option("good_class")
@slide_reading_options
@quiet_option
@handle_errors
@click.pass_context
def qc_train(ctx: click.Context, slide: str, scribbles: str, qc_class: str, out: str, artefact_class: str,
             good_class: str, slide_mpp: float | None, override_mpp: float | None, backend: str | None) -> None:
    """QC by example: train a pixel classifier from scribbles over an artefact the built-in detectors miss
    (class --artefact-class) and over good tissue (--good-class) on SLIDE; write it to OUT. Use it with
    `slidekit qc --qc-model OUT`: what it finds joins --qc-class."""
    with ReadOptions(slide_mpp, override_mpp, backend).open(slide) as s:
        model = train_qc_model(s, scribbles, artefact=artefact_class, good=good_class, label=qc_class)
    model.save(out)
    if not quiet_flag(ctx):
        t = model.trained_on
        click.echo(f"{qc_class} model from {t['artefact_pixels']} artefact and {t['good_pixels']} good pixels "
                   f"at {model.mpp:g} µm/px -> {out}")


def register(main: click.Group) -> None:
    """Add ``qc`` and ``qc-train`` to the command group."""
    main.add_command(qc)
    main.add_command(qc_train)

"""``slidekit qc``: slide QC (artefact classes, their areas, a verdict) through ``slidekit.regions.qc``.

The verdict limits (--max-blur, --max-pen, --max-fold, --max-debris, --max-bubble) come from the shared
vocabulary (slidekit/cli/common.py) like every other option.
"""
from __future__ import annotations

from typing import Any, Callable

import click

from slidekit.cli.common import (
    echo_json,
    handle_errors,
    option,
    quiet_flag,
    quiet_option,
    slide_argument,
    slide_reading_options,
)
from slidekit.regions.qc import QcOptions, qc_slide

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
@slide_argument
@option("out", type=click.Path(file_okay=False, path_type=str), required=True,
        detail="directory (qc_labels.png, qc_classes.json, qc.geojson, qc.json, summary.json).")
@_limit_options
@slide_reading_options
@option("json")
@quiet_option
@handle_errors
@click.pass_context
def qc(ctx: click.Context, slide: str, out: str, slide_mpp: float | None, override_mpp: float | None,
       backend: str | None, as_json: bool, **limits: Any) -> None:
    """Slide QC: find pen ink, out-of-focus tissue, folds, dark debris and bubble/coverslip edges; write a
    label map, QuPath annotations (one class each) and qc.json (µm² and fraction of tissue per class, verdict).

    An overview image works too: give its µm/px with --slide-mpp (e.g. `slidekit qc overview.png --slide-mpp 16
    --out D`)."""
    given: dict[str, Any] = {k: float(v) for k, v in limits.items()}
    options = QcOptions(**given)
    summary = qc_slide(slide, out, options=options, slide_mpp=slide_mpp, override_mpp=override_mpp,
                       backend=backend, progress=not quiet_flag(ctx))
    if as_json:
        echo_json({k: summary[k] for k in ("verdict", "reasons", "tissue_area_um2", "classes", "not_measured")})
        return
    parts = ", ".join(f"{n} {c['fraction_of_tissue']:.1%}" for n, c in summary["classes"].items() if c["measured"])
    done = " (finished already)" if summary.get("skipped") else ""
    click.echo(f"{summary['verdict']}{done}: {parts} of {summary['tissue_area_um2'] / 1e6:.3f} mm² tissue -> {out}")
    for reason in summary["reasons"]:
        click.echo(f"  {reason}")


def register(main: click.Group) -> None:
    """Add ``qc`` to the command group."""
    main.add_command(qc)

"""Shared CLI pieces: error handling, reusable typed options, output helpers."""
from __future__ import annotations

import functools
import json
import sys
import warnings
from typing import Any, Callable

import click

from slidekit.base.errors import ConfigError, SlidekitError, SlidekitWarning


class Context:
    """Global CLI state: --quiet and --debug."""

    def __init__(self, quiet: bool = False, debug: bool = False) -> None:
        self.quiet = quiet
        self.debug = debug


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit non-zero."""
    click.echo(f"slidekit: error: {message}", err=True)
    sys.exit(code)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: str | None = None, _default: Callable = warnings.showwarning) -> None:
    """slidekit warnings as one line on stderr (``slidekit: warning: ...``); others as Python shows them."""
    if issubclass(category, SlidekitWarning):
        click.echo(f"slidekit: warning: {message}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


def handle_errors(func: Callable) -> Callable:
    """Turn slidekit errors (and Ctrl-C) into one line and a non-zero exit, unless --debug;
    print slidekit warnings as one line each."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(getattr(ctx.find_object(Context), "debug", False))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", SlidekitWarning)
                warnings.showwarning = _show_warning
                return func(*args, **kwargs)
        except SlidekitError as e:
            if debug:
                raise
            fail(str(e))
        except KeyboardInterrupt:
            if debug:
                raise
            fail("interrupted; finished outputs are kept, unfinished ones were not written", 130)
        except (OSError, ValueError) as e:
            if debug:
                raise
            fail(f"{type(e).__name__}: {e}")

    return wrapper


def quiet_flag(ctx: click.Context) -> bool:
    """Whether --quiet was given (globally or on the command)."""
    obj = ctx.find_object(Context)
    return bool(obj and obj.quiet)


def echo_json(data: Any) -> None:
    """Print JSON to stdout."""
    click.echo(json.dumps(data, indent=2))


# Reusable typed options, so every command spells them the same way.
slide_argument = click.argument("slide", type=click.Path(path_type=str))  # a file, or a DICOM WSI folder
mpp_override_option = click.option(
    "--slide-mpp", "slide_mpp", type=click.FloatRange(min=0, min_open=True), default=None,
    help="Pixel size (µm/px) of level 0, used only for slides whose metadata has none.")
force_mpp_option = click.option(
    "--override-mpp", "override_mpp", type=click.FloatRange(min=0, min_open=True), default=None,
    help="Pixel size (µm/px) of level 0 used INSTEAD of the slide's metadata (said on stderr, "
         "recorded in outputs).")

backend_option = click.option("--backend", type=click.Choice(["openslide", "tiffslide", "image"]),
                              default=None, help="Slide reader (default: automatic).")
target_mpp_option = click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.5,
                                 show_default=True, help="Target pixel size of tiles (µm/px).")
size_option = click.option("--size", type=click.IntRange(min=1), default=256, show_default=True,
                           help="Tile size in pixels at the target MPP.")
overlap_option = click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
                              help="Overlap between neighbouring tiles, in target pixels.")
min_tissue_option = click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.5,
                                 show_default=True, help="Minimum tissue fraction to keep a tile.")
workers_option = click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                              help="Parallel readers (0: read in the main thread).")


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a device that does not exist here before any work starts (one line naming the ones that do)."""
    if value in ("auto", "cpu"):  # always exist: no need to load torch to say so (``train --list`` stays fast)
        return value
    from slidekit.base.devices import resolve_device

    try:
        resolve_device(value)
    except ConfigError as e:
        fail(f"--device: {e}")  # one line, like every slidekit error (click's BadParameter adds usage lines)
    return value


device_option = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                             callback=_check_device,
                             help="Where to run models (cuda:N: the N-th visible GPU).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="CPUs to use: one per DataLoader worker, the rest for the model "
                                   "[default: the CPUs this process may use (affinity, cgroup quota)].")


STAIN_NORM_HELP = ("Stain-normalise tiles to --stain-ref on the device [default: the checkpoint's "
                   "normalisation, if it was trained with one; none turns that off].")


def stain_options(func: Callable | None = None, *, norm_help: str = STAIN_NORM_HELP) -> Callable:
    """--stain-norm and --stain-ref: stain normalisation of the tiles a model sees (``slidekit.stain.normalize``);
    ``@stain_options`` or ``@stain_options(norm_help=...)``."""
    def decorate(f: Callable) -> Callable:
        f = click.option("--stain-ref", default=None, type=click.Path(dir_okay=False, path_type=str),
                         metavar="IMG|JSON",
                         help="Stain reference: an H&E image to fit to, or a saved reference (.json).")(f)
        # the methods of slidekit.stain.normalize.STAIN_METHODS, spelt out: importing it would load torch at start-up
        return click.option("--stain-norm", type=click.Choice(["none", "macenko", "reinhard"]), default=None,
                            help=norm_help)(f)

    return decorate if func is None else decorate(func)


def check_stain_options(stain_norm: str | None, stain_ref: str | None) -> None:
    """Refuse a bad --stain-norm/--stain-ref pair before any slide is read (one line)."""
    if stain_norm is not None or stain_ref is not None:
        from slidekit.stain.normalize import normalizer_from_options

        normalizer_from_options(stain_norm, stain_ref)


def slide_reading_options(func: Callable) -> Callable:
    """--slide-mpp (fallback), --override-mpp and --backend: how a command opens its slides."""
    return mpp_override_option(force_mpp_option(backend_option(func)))


def tissue_detection_options(func: Callable) -> Callable:
    """--tissue-mpp, --tissue-min-area and the detection thresholds (``slidekit.regions.tissue.tissue_mask``),
    gathered by ``tissue_kwargs`` into the ``tissue=`` dict the API calls take."""
    opts = [
        click.option("--tissue-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Pixel size (µm/px) tissue is detected at [default: 8]."),
        click.option("--tissue-min-area", type=click.FloatRange(min=0), default=None,
                     help="Smallest tissue region kept, µm² [default: 20000]."),
        click.option("--tissue-min-saturation", type=click.IntRange(0, 255), default=None,
                     help="Lowest saturation threshold of the tissue detector, 0-255 [default: 20]."),
        click.option("--tissue-min-od", type=click.FloatRange(min=0), default=None,
                     help="Lowest optical density of tissue [default: 0.05]."),
        click.option("--tissue-min-contrast", type=click.FloatRange(min=0), default=None,
                     help="Optical density above the glass's counted as tissue [default: 0.02]."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


TISSUE_OPTIONS = {"tissue_mpp": "mpp", "tissue_min_area": "min_area_um2", "tissue_min_saturation": "min_saturation",
                  "tissue_min_od": "min_od", "tissue_min_contrast": "min_contrast"}


def tissue_kwargs(params: dict) -> dict | None:
    """Pop the tissue options out of a command's ``params``; the ``tissue_mask`` keyword arguments that
    were given (None when none was: the defaults)."""
    given = {TISSUE_OPTIONS[k]: params.pop(k) for k in list(params) if k in TISSUE_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    return given or None

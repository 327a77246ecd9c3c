"""Shared CLI pieces: error handling, reusable typed options, output helpers."""
from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

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


slide_argument = click.argument("slide", type=click.Path(path_type=str))  # a file, or a DICOM WSI folder


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


def check_stain_options(stain_norm: str | None, stain_ref: str | None) -> None:
    """Refuse a bad --stain-norm/--stain-ref pair before any slide is read (one line)."""
    if stain_norm is not None or stain_ref is not None:
        from slidekit.stain.normalize import normalizer_from_options

        normalizer_from_options(stain_norm, stain_ref)


# ---------------------------------------------------------------------------------------------------------------
# The CLI vocabulary: every option of every command is made here, by ``option(KEY)`` from one entry of
# ``VOCABULARY`` (one spelling, one meaning, one type per idea) or by a named factory built on it. Commands
# choose a default (where theirs legitimately differs: the help says why), a ``detail`` appended to the help,
# ``required`` and old spellings (``aliases``: hidden, warn once, see ``AliasOption``). tests/test_cli_vocabulary.py
# walks every command and holds this to account.
# ---------------------------------------------------------------------------------------------------------------

_POSITIVE = click.FloatRange(min=0, min_open=True)

# key -> (flags [and the Python name], the idea (the help's fixed first part), click keyword arguments)
VOCABULARY: dict[str, tuple[tuple[str, ...], str, dict[str, Any]]] = {
    # run, output, chatter
    "out": (("--out", "out"), "Output:", dict(type=click.Path(path_type=str))),
    "quiet": (("--quiet", "-q", "quiet"), "No progress bars or chatter.",
              dict(is_flag=True, expose_value=False)),  # callback: _set_quiet (quiet_flag reads it)
    "debug": (("--debug",), "Show tracebacks on errors.", dict(is_flag=True)),
    "version": (("--version",), "Show the version and exit.", {}),
    "json": (("--json", "as_json"), "Print JSON.", dict(is_flag=True)),
    "device": (("--device",), "Where to run models (cuda:N: the N-th visible GPU).",
               dict(default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N", callback=_check_device)),
    "threads": (("--threads",), "CPUs to use: one per DataLoader worker, the rest for the model [default: the CPUs "
                "this process may use (affinity, cgroup quota)].", dict(type=click.IntRange(min=1), default=None)),
    "workers": (("--workers",), "DataLoader worker processes reading tiles (0: read in the main process).",
                dict(type=click.IntRange(min=0), default=0, show_default=True)),
    "reader_threads": (("--reader-threads",), "Threads reading tiles (0: read in the main thread).",
                       dict(type=click.IntRange(min=0), default=0, show_default=True)),
    "batch_size": (("--batch-size",), "Tiles per model batch.",
                   dict(type=click.IntRange(min=1), show_default=True)),
    # how slides are read
    "slide_mpp": (("--slide-mpp", "slide_mpp"),
                  "Pixel size (µm/px) of level 0, used only for slides whose metadata has none.",
                  dict(type=_POSITIVE, default=None)),
    "override_mpp": (("--override-mpp", "override_mpp"), "Pixel size (µm/px) of level 0 used INSTEAD of the slide's "
                     "metadata (said on stderr, recorded in outputs).", dict(type=_POSITIVE, default=None)),
    "backend": (("--backend",), "Slide reader (default: automatic).",
                dict(type=click.Choice(["openslide", "tiffslide", "image"]), default=None)),
    "slide": (("--slide", "slide"), "The slide these outputs come from:",
              dict(type=click.Path(path_type=str), default=None)),
    # the tile grid
    "tile_mpp": (("--tile-mpp", "tile_mpp"), "Tile pixel size in µm/px.", dict(type=_POSITIVE, default=None)),
    "tile_size": (("--tile-size", "tile_size"), "Tile size in pixels at --tile-mpp.",
                  dict(type=click.IntRange(min=1), default=None)),
    "overlap": (("--overlap",), "Overlap between neighbouring tiles, in tile pixels.",
                dict(type=click.IntRange(min=0), default=None)),
    "min_tissue": (("--min-tissue",), "Smallest tissue fraction of a tile to keep it.",
                   dict(type=click.FloatRange(0, 1), show_default=True)),
    "grid": (("--grid",), "Saved tile grid (.npz from `slidekit tile`)",
             dict(type=click.Path(dir_okay=False, path_type=str), default=None)),
    "geojson": (("--geojson",), "Also write tiles as QuPath tile objects:",
                dict(type=click.Path(dir_okay=False, path_type=str), default=None)),
    # tissue detection (slidekit.regions.tissue.tissue_mask)
    "tissue_mpp": (("--tissue-mpp", "tissue_mpp"), "Pixel size (µm/px) tissue is detected at [default: 8].",
                   dict(type=_POSITIVE, default=None)),
    "tissue_min_area": (("--tissue-min-area", "tissue_min_area"), "Smallest tissue region kept, µm² [default: 20000].",
                        dict(type=click.FloatRange(min=0), default=None)),
    "tissue_min_saturation": (("--tissue-min-saturation",),
                              "Lowest saturation threshold of the tissue detector, 0-255 [default: 20].",
                              dict(type=click.IntRange(0, 255), default=None)),
    "tissue_min_od": (("--tissue-min-od",), "Lowest optical density of tissue [default: 0.05].",
                      dict(type=click.FloatRange(min=0), default=None)),
    "tissue_min_contrast": (("--tissue-min-contrast",),
                            "Optical density above the glass's counted as tissue [default: 0.02].",
                            dict(type=click.FloatRange(min=0), default=None)),
    # regions and annotations
    "roi": (("--roi",), "Work only inside these annotations' polygons (one slide only).",
            dict(type=click.Path(dir_okay=False, path_type=str), default=None, metavar="GEOJSON|XML")),
    "spatialdata": (("--spatialdata",), "Also write each slide's results as a SpatialData store, "
                    "OUT/<slide stem>.zarr (a cohort: in each slide's folder), that wsidata/LazySlide open "
                    "(docs/scverse.md; same as `slidekit export-spatialdata OUT` afterwards).",
                    # kept out of the commands' parameters (the jobs do not write it); the CLI exports after them
                    dict(is_flag=True, expose_value=False,
                         callback=lambda ctx, _param, value: ctx.meta.__setitem__("spatialdata", value))),
    "qc_model": (("--qc-model", "qc_model"), "A QC-by-example model (`slidekit qc-train`): what it finds joins the QC "
                 "class it was trained for; repeatable.",
                 dict(multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=str), metavar="FILE")),
    "scribbles": (("--scribbles",), "QuPath GeoJSON (or ASAP XML) with scribbles over the artefact and over good "
                  "tissue.", dict(type=click.Path(exists=True, dir_okay=False, path_type=str), metavar="FILE")),
    "artefact_class": (("--artefact-class",), "The scribbles' class over the artefact.",
                       dict(default="Artefact", show_default=True)),
    "good_class": (("--good-class",), "The scribbles' class over good tissue (and anything else not to flag).",
                   dict(default="Tissue", show_default=True)),
    "qc_class": (("--qc-class",), "The QC class the artefact joins (Pen ink, Dark debris, Fold, Air bubble / edge, "
                 "Out of focus).", dict(default=None)),
    "exclude_qc": (("--exclude-qc",), "Leave out the tiles where a `slidekit qc` folder of the same slide file found "
                   "more artefact than --qc-max allows (a cohort: the QC cohort's --out, each slide's QC in "
                   "QC_OUT/<slide id>/); auto: QC each slide first, into OUT/qc/.",
                   dict(type=click.Path(file_okay=False, path_type=str), default=None, metavar="QC_DIR|auto")),
    "qc_max": (("--qc-max", "qc_max"), "With --exclude-qc: the largest fraction of a tile one artefact class may "
               "cover, F for every class or NAME=F for one (repeatable: --qc-max 0.3 --qc-max 'Pen ink=0.1') "
               "[default: 0.5].", dict(multiple=True, metavar="F|NAME=F")),
    "roi_class": (("--roi-class",), "Use only the --roi polygons of this class (repeatable); an error when none "
                  "has it.", dict(multiple=True, metavar="NAME")),
    "annotations": (("--annotations",), "Label each tile from these annotations (QuPath GeoJSON, ASAP/ImageScope XML).",
                    dict(type=click.Path(dir_okay=False, path_type=str), default=None, metavar="GEOJSON|XML")),
    "label_rule": (("--label-rule",), "majority: the class covering most of the tile (none when unlabelled area is "
                   "larger); centre: the class under the tile's centre.",
                   dict(type=click.Choice(["majority", "centre"]), default="majority", show_default=True)),
    # models
    "model": (("--model", "model"), "The trained model to run:", dict(default=None, metavar="NAME|CKPT")),
    "weights": (("--weights",), "Local weights file (.safetensors/.pth; never downloaded).",
                dict(type=click.Path(dir_okay=False, path_type=str), default=None)),
    "tokens": (("--tokens",), "Which tokens of a timm:NAME ViT make a tile's feature: cls (the class token), mean "
               "(of the patch tokens) or cls+mean (both) [default: the mean of the last block's patch tokens, "
               "recorded as pooled; named encoders use their published rule].",
               dict(type=click.Choice(["cls", "mean", "cls+mean"]), default=None)),
    "init": (("--init",), "Encoder weights to start training from: a slidekit checkpoint, a torchvision ResNet "
             ".pth, or timm:NAME with --weights.", dict(default=None)),
    "init_bn": (("--init-bn",), "BatchNorm running statistics after --init: keep those copied with the weights, "
                "or reestimate them on the training data before training [default: keep]; same as --set init_bn=...",
                # trainers.config.INIT_BN_CHOICES, spelt out: importing it would load the trainers at start-up
                dict(type=click.Choice(["keep", "reestimate"]), default=None)),
    "stain_norm": (("--stain-norm",), "Stain normalisation:",
                   # slidekit.stain.normalize.STAIN_METHODS, spelt out: importing it would load torch at start-up
                   dict(type=click.Choice(["none", "macenko", "reinhard"]), default=None)),
    "stain_ref": (("--stain-ref",), "Stain reference: an H&E image to fit to, or a saved reference (.json).",
                  dict(type=click.Path(dir_okay=False, path_type=str), default=None, metavar="IMG|JSON")),
    "stain_aug": (("--stain-aug",), "Stain augmentation while training (HED jitter or RandStainNA); same as "
                  "--set stain_aug=...", dict(type=click.Choice(["none", "hed", "randstainna"]), default=None)),
    # what model outputs become
    "threshold": (("--threshold",), "Foreground probability threshold:",
                  dict(type=click.FloatRange(0, 1), default=0.5, show_default=True)),
    "min_area": (("--min-area", "min_area_um2"), "Smallest object kept, µm²:",
                 dict(type=click.FloatRange(min=0), show_default=True)),
    "heatmap_mpp": (("--heatmap-mpp",), "Segmentation heatmap pixel size in µm/px [default: the model's output "
                    "resolution].", dict(type=_POSITIVE, default=None)),
    "work_mpp": (("--work-mpp", "work_mpp"), "Work on a view downsampled to this µm/px (default: the heatmap's own "
                 "MPP).", dict(type=_POSITIVE, default=None)),
    "blend": (("--blend",), "How overlapping segmentation outputs are weighted.",
              dict(type=click.Choice(["gaussian", "constant"]), default="gaussian", show_default=True)),
    "tiff": (("--tiff",), "Also write heatmap.tif: a pyramidal TIFF at the heatmap MPP with its physical pixel size, "
             "to open beside the slide (rgb: coloured as the overlay; values: float32 per class).",
             dict(type=click.Choice(["rgb", "values"]), default=None)),
    "ome_zarr": (("--ome-zarr", "ome_zarr"), "Also write the map as an OME-Zarr (NGFF 0.4) multiscale image in µm "
                 "(heatmap.ome.zarr; qc_labels.ome.zarr for qc), for napari, vizarr or QuPath's OME-Zarr reader.",
                 dict(is_flag=True)),
    "tiles_geojson": (("--tiles-geojson",), "Also write tiles.geojson: one QuPath tile per prediction.",
                      dict(is_flag=True)),
    "skip_bad_tiles": (("--skip-bad-tiles",), "Skip damaged (undecodable) tiles with a warning and list them in "
                       "summary.json (bad_tiles) instead of failing the slide.", dict(is_flag=True)),
    "demo": (("--demo",), "Run on the embedded demo slide (written to OUT/demo.tif).", dict(is_flag=True)),
    "min_distance": (("--min-distance", "min_distance_um"), "Smallest distance between two nucleus centres "
                     "(watershed seeds), µm.", dict(type=click.FloatRange(min=0), default=2.0, show_default=True)),
    "split": (("--split",), "Touching nuclei: seeds from the model's outline class (boundary/contour/border/edge) "
              "when it has one (auto), always (boundary), or from the distance transform (distance).",
              dict(type=click.Choice(["auto", "boundary", "distance"]), default="auto", show_default=True)),
    "gzip": (("--gzip/--no-gzip", "gzip"), "Write cells.geojson.gz / plain cells.geojson [default: gzip above "
             "20000 nuclei].", dict(default=None)),
    "h5": (("--h5", "features_h5"), "Also write the HDF5 feature file TRIDENT and CLAM read (features, coords + "
           "their attributes; a cohort always writes OUT/<slide id>/features.h5).",
           dict(type=click.Path(dir_okay=False, path_type=str), default=None)),
    "clusters": (("--clusters",), "Add k-means clusters (k).", dict(type=click.IntRange(min=2), default=None)),
    "seed": (("--seed",), "Random seed (k-means).", dict(type=int, default=0, show_default=True)),
    "export": (("--export", "export"), "Write the grid's tiles as images (tiles/x{X}_y{Y}.png, level-0 corners) with "
               "patches.csv (x, y, mpp, size, tissue_fraction[, label]) into a folder or a zip; reruns resume. One "
               "slide only.", dict(type=click.Path(path_type=Path), default=None, metavar="DIR|FILE.zip")),
    "image_format": (("--format", "image_format"), "Image format of --export (png is lossless).",
                     dict(type=click.Choice(["png", "jpeg"]), default="png", show_default=True)),
    "quality": (("--quality",), "JPEG quality.", dict(type=click.IntRange(1, 100), default=90, show_default=True)),
    "thresholds": (("--thresholds",), "Comma-separated probability thresholds.",
                   dict(default="0.5,0.9", show_default=True)),
    "channel": (("--channel",), "Heatmap channel holding the tumour probability (default: the last one).",
                dict(type=int, default=None)),
    "chunk_rows": (("--chunk-rows",), "Feature rows read at a time (streamed bags; TransMIL reads a bag whole).",
                   dict(type=click.IntRange(min=1), default=4096, show_default=True)),
    "reference": (("--reference",), "Reference CSV with patient stages; prints the quadratic weighted kappa.",
                  dict(type=click.Path(dir_okay=False, path_type=Path), default=None)),
    "rename": (("--rename",), "Rename a class/group, e.g. --rename metastasis=Tumor (repeatable; NEW empty drops "
               "the class).", dict(multiple=True, metavar="OLD=NEW")),
    "make_valid": (("--make-valid",), "Repair self-intersecting (invalid) polygons into the valid shapes QuPath "
                   "and ASAP fill (non-zero winding rule). Without it they are written unchanged.",
                   dict(is_flag=True)),
    "to": (("--to", "to"), "wsinfer DIR (a QuPath WSInfer model folder), torchscript FILE or onnx FILE.",
           dict(nargs=2, type=(click.Choice(["wsinfer", "torchscript", "onnx"]), str), metavar="FORMAT OUT")),
    # training
    "config": (("--config", "config"), "Trainer config (YAML or JSON).",
               dict(type=click.Path(dir_okay=False, path_type=Path), default=None)),
    "set": (("--set", "overrides"), "Override a config option (repeatable).", dict(multiple=True, metavar="KEY=VALUE")),
    "restart": (("--restart",), "Delete the training outputs already in --out and train from scratch (a rerun "
                "otherwise resumes, continues to a larger epochs, or refuses a different config).", dict(is_flag=True)),
    "list": (("--list", "list_only"), "List the available trainers (plug-ins included), one line each, and exit.",
             dict(is_flag=True)),
    "show_config": (("--show-config",), "Print every option of trainer NAME (type, default, help) as a complete YAML "
                    "config, and exit.", dict(is_flag=True)),
    "nproc": (("--nproc",), "Train on N local ranks (torch.distributed through torch's elastic launcher; one per GPU "
              "on CUDA, gloo on CPU); batch_size stays the global batch. See docs/distributed_training.md.",
              dict(type=click.IntRange(min=1), default=None)),
    # slide QC verdict limits (slidekit qc; defaults: slidekit.regions.qc.QcOptions)
    **{f"max_{k}": ((f"--max-{k}", f"max_{k}"),
                    f"Largest fraction of the tissue that may be {what} for the slide to pass.",
                    dict(type=click.FloatRange(0, 1), show_default=True))
       for k, what in (("blur", "out of focus"), ("pen", "pen ink"), ("fold", "fold"), ("debris", "dark debris"),
                       ("bubble", "air bubble or coverslip edge"))},
    # the viewer
    "port": (("--port",), "Port to serve on (0: any free port).",
             dict(type=click.IntRange(0, 65535), default=8000, show_default=True)),
    "host": (("--host",), "Address to bind. Anything but loopback lets other machines see the slides (warned).",
             dict(default="127.0.0.1", show_default=True)),
    "open_slides": (("--open-slides",), "Slides kept open at once (least recently viewed closed first).",
                    dict(type=click.IntRange(min=1), default=8, show_default=True)),
    # cohorts (slidekit.cli.cohort)
    "manifest": (("--manifest", "manifest"), "Cohort manifest CSV: a 'slide' column, optional 'id' and 'slide_mpp' "
                 "(repeatable).", dict(multiple=True, type=click.Path(dir_okay=False, path_type=str))),
    "engine": (("--engine",), "Cohort engine: worker processes on this machine, or Ray tasks.",
               dict(type=click.Choice(["local", "ray"]), default="local", show_default=True)),
    "jobs": (("--jobs",), "Slides processed at once (local worker processes, or Ray CPUs of a local runtime).",
             dict(type=click.IntRange(min=1), default=1, show_default=True)),
    "gpus": (("--gpus",), "One worker per listed GPU, each seeing only its GPU.",
             dict(default=None, metavar="0,1,...")),
    "shard": (("--shard",), "Process only the i-th of N parts of the cohort (Slurm arrays: $SLURM_ARRAY_TASK_ID/N).",
              dict(default=None, metavar="i/N")),
    "ray_address": (("--ray-address",), "Ray cluster to join (--engine ray); default: start a local Ray runtime.",
                    dict(default=None, metavar="auto|HOST:PORT")),
    "retry_failed": (("--retry-failed",), "Run slides that failed in an earlier run again.", dict(is_flag=True)),
    "skip_missing": (("--skip-missing",), "A manifest slide whose file does not exist fails its own row instead of "
                     "refusing the whole manifest (every Slurm array task would refuse it).",
                     # kept out of the commands' parameters (one slide has no manifest); run_cohort_cli reads it
                     dict(is_flag=True, expose_value=False,
                          callback=lambda ctx, _param, value: ctx.meta.__setitem__("skip_missing", value))),
    # outcomes (slidekit.cli.outcomes: clinical tables, survival and regression endpoints)
    "survival": (("--survival", "survival"), "A survival endpoint's time and event columns (repeatable) [default: "
                 "found by name: time+event|status, <name>_time+<name>_event|_status].",
                 dict(multiple=True, metavar="TIME:EVENT")),
    "regression": (("--regression", "regression"), "A numeric target column (repeatable; never guessed).",
                   dict(multiple=True, metavar="COLUMN")),
    "patient_column": (("--patient-column", "patient_column"), "The clinical table's patient column [default: the "
                       "first of patient, PATIENT, patient_id, case_id, case].", dict(default=None)),
    "cutoffs": (("--cutoffs", "cutoffs"), "Risk cut-offs between groups, comma-separated [default: the median].",
                dict(default=None, metavar="R1[,R2...]")),
    # scverse interop (slidekit.cli.scverse: SpatialData stores)
    "store": (("--store", "store"), "SpatialData store to write (a .zarr folder; for a cohort, a folder that gets one "
              "<slide stem>.zarr per slide) [default: <slide stem>.zarr in each slide's output folder].",
              dict(type=click.Path(path_type=str), default=None)),
    "feature_key": (("--feature-key", "feature_key"), "The model part of the feature table's name, "
                    "{feature key}_{tile key} (wsidata's feature_key) [default: the encoder's name].",
                    dict(default=None)),
    "tile_key": (("--tile-key", "tile_key"), "The tiles' shapes element (wsidata's tile_key).",
                 dict(default="tiles", show_default=True)),
}

_ALIAS_META = "slidekit.cli.alias"


class VocabOption(click.Option):
    """An option made by ``option()`` from ``VOCABULARY[key]``: ``vocab_key`` and ``idea`` say which idea it is
    (tests/test_cli_vocabulary.py reads them); ``aliases`` are its old spellings on this command. A value given
    under an old spelling (``AliasOption``) arrives here as if given under this name."""

    def __init__(self, *args: Any, vocab_key: str, idea: str, aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vocab_key, self.idea, self.aliases = vocab_key, idea, tuple(aliases)

    def consume_value(self, ctx: click.Context, opts: Any) -> Any:
        value, source = super().consume_value(ctx, opts)
        key = f"{_ALIAS_META}:{id(ctx)}:{self.name}"
        if key in ctx.meta:  # an old spelling was given (aliases are processed first: see AliasOption)
            alias, alias_value = ctx.meta.pop(key)
            if source == ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{alias} is the old spelling of {self.opts[0]}: give one of them")
            return alias_value, ParameterSource.COMMANDLINE
        return value, source


class AliasOption(click.Option):
    """A hidden old spelling of a ``VocabOption`` (``alias_of``: its Python name). Given on the command line it
    warns once (``slidekit: warning: --tile-mpp is now --mpp``) and hands its value to the option it names;
    click processes options given on the command line before those that were not, so the canonical option,
    when not given itself, always finds the value waiting."""

    def __init__(self, param_decls: Any, *, alias_of: str, canonical: str, **kwargs: Any) -> None:
        (alias,) = param_decls
        name = f"alias__{alias.lstrip('-').replace('-', '_')}__{alias_of}"
        super().__init__([alias, name], hidden=True, expose_value=False, callback=self._given, **kwargs)
        self.alias, self.alias_of, self.canonical = alias, alias_of, canonical

    def _given(self, ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if ctx.get_parameter_source(self.name) != ParameterSource.COMMANDLINE:
            return
        key = f"{_ALIAS_META}:{id(ctx)}:{self.alias_of}"
        if ctx.get_parameter_source(self.alias_of) == ParameterSource.COMMANDLINE or key in ctx.meta:
            raise click.UsageError(f"{self.alias} is the old spelling of {self.canonical}: give one of them")
        warned = ctx.find_root().meta.setdefault("slidekit.cli.warned", set())
        if self.alias not in warned:
            warned.add(self.alias)
            click.echo(f"slidekit: warning: {self.alias} is now {self.canonical}", err=True)
        ctx.meta[key] = (self.alias, value)


def option(key: str, *, detail: str | None = None, aliases: tuple[str, ...] = (), **overrides: Any) -> Callable:
    """The option ``VOCABULARY[key]`` as a click decorator: ``detail`` is appended to its help, ``overrides``
    (default, required, show_default, a narrower range of the same type, ...) are this command's, ``aliases`` its
    old spellings here (hidden; they warn once)."""
    decls, idea, kwargs = VOCABULARY[key]
    kwargs = {**kwargs, **overrides}
    help_text = idea if not detail else f"{idea} {detail}"
    canonical = click.option(*decls, cls=VocabOption, vocab_key=key, idea=idea, aliases=aliases, help=help_text,
                             **kwargs)
    flag = decls[0].split("/")[0]
    name = next((d for d in decls if not d.startswith("-")), flag.lstrip("-").replace("-", "_"))
    alias_kwargs = {k: kwargs[k] for k in ("type", "multiple", "nargs", "is_flag") if k in kwargs}

    def decorate(func: Callable) -> Callable:
        for alias in aliases:
            func = click.option(alias, cls=AliasOption, alias_of=name, canonical=flag, **alias_kwargs)(func)
        return canonical(func)

    return decorate


def options(*decorators: Callable) -> Callable:
    """Several option decorators as one (listed in the order they show in --help)."""
    def decorate(func: Callable) -> Callable:
        for d in reversed(decorators):
            func = d(func)
        return func

    return decorate


def _set_quiet(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is True:
        ctx.ensure_object(Context).quiet = True


# The shared options by name (each is ``option(KEY)``; commands pass their own default/detail where they must).
quiet_option = option("quiet", callback=_set_quiet)  # every command, and the group: read it with quiet_flag(ctx)
debug_option = option("debug")
device_option = option("device")
threads_option = option("threads")
slide_mpp_option = option("slide_mpp")        # a fallback for slides whose metadata has no MPP
override_mpp_option = option("override_mpp")  # replaces the metadata's MPP
backend_option = option("backend")


def version_option(version: str) -> Callable:
    """--version (click's, marked as part of the vocabulary)."""
    decls, idea, _ = VOCABULARY["version"]
    return click.version_option(version, *decls, prog_name="slidekit", cls=VocabOption, vocab_key="version",
                                idea=idea, help=idea)


def slide_reading_options(func: Callable | None = None, *, backend: bool = True) -> Callable:
    """--slide-mpp (fallback), --override-mpp and (where the API reads through a chosen reader) --backend: how a
    command opens its slides. ``@slide_reading_options`` or ``@slide_reading_options(backend=False)``."""
    decorators = [slide_mpp_option, override_mpp_option] + ([backend_option] if backend else [])
    return options(*decorators) if func is None else options(*decorators)(func)


def tile_geometry_options(*, tile_mpp: float | None = None, tile_size: int | None = None,
                          overlap: int | None = None, with_overlap: bool = True, minimum: tuple[int, int] = (1, 0),
                          detail: str = "[default: the model's]", overlap_detail: str | None = None,
                          aliases: dict[str, tuple[str, ...]] | None = None) -> Callable:
    """--tile-mpp, --tile-size and (``with_overlap``) --overlap: the tile grid a command works on (heatmap, cells,
    embed, tile). Old spellings: --mpp/--size (heatmap, cells, tile, embed), --patch-size (embed)."""
    aliases = aliases or {}
    min_size, min_overlap = minimum  # the smallest --tile-size and --overlap this command takes
    shown = tile_mpp is not None  # a command without a model gives its own defaults, and says so
    why = "[{} here: no model to take it from]"
    decorators = [
        option("tile_mpp", default=tile_mpp, show_default=shown, detail=why.format(tile_mpp) if shown else detail,
               aliases=aliases.get("tile_mpp", ())),
        option("tile_size", default=tile_size, show_default=shown,
               detail=why.format(tile_size) if shown else detail, type=click.IntRange(min=min_size),
               aliases=aliases.get("tile_size", ()))]
    if with_overlap:
        decorators.append(option("overlap", default=overlap, show_default=shown,
                                 detail=why.format(overlap) if shown else overlap_detail,
                                 type=click.IntRange(min=min_overlap)))
    return options(*decorators)


def min_tissue_option(default: float, why: str) -> Callable:
    """--min-tissue with this command's default and the reason for it (defaults differ by what a tile is for)."""
    return option("min_tissue", default=default, detail=why)


def tissue_detection_options(func: Callable | None = None, *, detector: bool = True,
                             aliases: dict[str, tuple[str, ...]] | None = None) -> Callable:
    """--tissue-mpp, --tissue-min-area and (``detector``) the detection thresholds
    (``slidekit.regions.tissue.tissue_mask``), gathered by ``tissue_kwargs`` into the ``tissue=`` dict the API
    calls take."""
    aliases = aliases or {}
    keys = ["tissue_mpp", "tissue_min_area"] + (
        ["tissue_min_saturation", "tissue_min_od", "tissue_min_contrast"] if detector else [])
    decorate = options(*(option(k, aliases=aliases.get(k, ())) for k in keys))
    return decorate if func is None else decorate(func)


STAIN_NORM_HELP = ("Stain-normalise tiles to --stain-ref on the device [default: the checkpoint's "
                   "normalisation, if it was trained with one; none turns that off].")


def stain_options(func: Callable | None = None, *, norm_help: str = STAIN_NORM_HELP) -> Callable:
    """--stain-norm and --stain-ref: stain normalisation of the tiles a model sees (``slidekit.stain.normalize``);
    ``@stain_options`` or ``@stain_options(norm_help=...)``."""
    decorate = options(option("stain_norm", detail=norm_help), option("stain_ref"))
    return decorate if func is None else decorate(func)


def cohort_options(func: Callable) -> Callable:
    """--manifest, --engine, --jobs, --gpus, --shard, --ray-address, --retry-failed and --skip-missing
    (slidekit.cli.cohort)."""
    return options(*(option(k) for k in ("manifest", "engine", "jobs", "gpus", "shard", "ray_address",
                                         "retry_failed", "skip_missing")))(func)


TISSUE_OPTIONS = {"tissue_mpp": "mpp", "tissue_min_area": "min_area_um2", "tissue_min_saturation": "min_saturation",
                  "tissue_min_od": "min_od", "tissue_min_contrast": "min_contrast"}


def tissue_kwargs(params: dict) -> dict | None:
    """Pop the tissue options out of a command's ``params``; the ``tissue_mask`` keyword arguments that
    were given (None when none was: the defaults)."""
    given = {TISSUE_OPTIONS[k]: params.pop(k) for k in list(params) if k in TISSUE_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


def cohort_folder_option(detail: str) -> Callable:
    """--cohort EMBED_OUT: an `embed` cohort's --out folder (its cohort.csv, with the manifest's columns such as
    label/patient, and OUT/<id>/features.h5) as the slides a MIL command works on (train mil, mil-deploy)."""
    VOCABULARY.setdefault("cohort", (("--cohort", "cohort"), "Slides of an `embed` cohort (its --out folder: "
                                     "cohort.csv and <id>/features.h5):",
                                     dict(type=click.Path(file_okay=False, path_type=str), default=None,
                                          metavar="EMBED_OUT")))
    return option("cohort", detail=detail)

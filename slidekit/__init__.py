"""slidekit: whole-slide images in, patches, trainers, heatmaps and QuPath GeoJSON out.

The public API has two levels, both stable import paths:

- ``slidekit``: the common names (``import slidekit as sk; sk.open_slide(...)``) and every error and
  warning class;
- ``slidekit.<stage>``: everything public of one stage of the flow (``slidekit.base``, ``slides``,
  ``annotations``, ``regions``, ``stain``, ``models``, ``data``, ``infer``, ``slidelevel``, ``cohort``,
  ``view``).

Modules below a stage (``slidekit.regions.tiling``, ...) are internal and may move. Names from
torch-loading modules load on first use, so ``import slidekit`` never loads torch.
"""
from slidekit.annotations.formats import read_annotations, write_geojson
from slidekit.annotations.geometry import rasterize
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import (
    AnnotationError,
    AnnotationWarning,
    BadTileWarning,
    CheckpointError,
    ConfigError,
    CorruptTileError,
    FeatureError,
    GridError,
    HeatmapError,
    LabelError,
    LockedError,
    ManifestError,
    MissingMPPError,
    MPPOverrideWarning,
    OutputError,
    OutputWarning,
    SlideError,
    SlideIntegrityWarning,
    SlidekitError,
    SlidekitWarning,
    StainWarning,
    TissueError,
    TrainingError,
    TrainingWarning,
)
from slidekit.base.lazy import lazy_exports
from slidekit.base.version import __version__
from slidekit.regions.tiling import TileGrid, TileReader, read_tiles
from slidekit.regions.tissue import TissueMask, tissue_mask
from slidekit.slidelevel.staging import pn_stage, weighted_kappa
from slidekit.slides.demo import write_demo_slide
from slidekit.slides.slide import Slide, magnification_to_mpp, mpp_to_magnification, open_slide

__all__ = [
    # errors
    "SlidekitError", "SlideError", "MissingMPPError", "CorruptTileError", "TissueError", "GridError", "FeatureError",
    "HeatmapError", "AnnotationError", "CheckpointError", "ConfigError", "LabelError", "OutputError", "LockedError",
    "ManifestError", "TrainingError",
    # warnings
    "SlidekitWarning", "MPPOverrideWarning", "BadTileWarning", "SlideIntegrityWarning", "AnnotationWarning",
    "TrainingWarning", "StainWarning", "OutputWarning",
    # slides, regions, annotations
    "Slide", "open_slide", "mpp_to_magnification", "magnification_to_mpp", "write_demo_slide", "TissueMask",
    "tissue_mask", "TileGrid", "TileReader", "read_tiles", "Annotation", "read_annotations", "write_geojson",
    "rasterize",
    # checkpoints, inference, heatmaps (loaded on first use)
    "load_checkpoint", "Predictor", "heatmap_slide", "Heatmap", "HeatmapWriter",
    # slide-level decisions, cohorts
    "pn_stage", "weighted_kappa", "run_cohort",
    # slide QC (loaded on first use)
    "qc_slide",
    "__version__",
]

# torch-heavy parts (and zarr, and the cohort machinery) load on first use, so `import slidekit` stays light.
__getattr__, __dir__ = lazy_exports(__name__, {
    "load_checkpoint": "slidekit.models.checkpoint", "Predictor": "slidekit.infer.predictor",
    "heatmap_slide": "slidekit.infer.predictor", "Heatmap": "slidekit.infer.heatmap",
    "HeatmapWriter": "slidekit.infer.heatmap", "run_cohort": "slidekit.cohort.run",
    "qc_slide": "slidekit.regions.qc"})

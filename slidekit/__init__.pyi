"""Type stub of ``slidekit``: every name of its ``__all__`` for type checkers. At runtime
``__init__.py`` loads some of them on first use (PEP 562); tests/test_public_api.py checks that
this stub and ``__all__`` name the same objects."""
from slidekit.annotations.formats import read_annotations as read_annotations, write_geojson as write_geojson
from slidekit.annotations.geometry import rasterize as rasterize
from slidekit.annotations.objects import Annotation as Annotation
from slidekit.base.errors import (
    AnnotationError as AnnotationError,
    AnnotationWarning as AnnotationWarning,
    BadTileWarning as BadTileWarning,
    CheckpointError as CheckpointError,
    ConfigError as ConfigError,
    CorruptTileError as CorruptTileError,
    FeatureError as FeatureError,
    GridError as GridError,
    HeatmapError as HeatmapError,
    LabelError as LabelError,
    LockedError as LockedError,
    ManifestError as ManifestError,
    MissingMPPError as MissingMPPError,
    MPPOverrideWarning as MPPOverrideWarning,
    OutputError as OutputError,
    OutputWarning as OutputWarning,
    SlideError as SlideError,
    SlideIntegrityWarning as SlideIntegrityWarning,
    SlidekitError as SlidekitError,
    SlidekitWarning as SlidekitWarning,
    StainWarning as StainWarning,
    TissueError as TissueError,
    TrainingError as TrainingError,
    TrainingWarning as TrainingWarning,
)
from slidekit.base.version import __version__ as __version__
from slidekit.cohort.run import run_cohort as run_cohort
from slidekit.infer.heatmap import Heatmap as Heatmap, HeatmapWriter as HeatmapWriter
from slidekit.infer.predictor import Predictor as Predictor, heatmap_slide as heatmap_slide
from slidekit.models.checkpoint import load_checkpoint as load_checkpoint
from slidekit.regions.qc import qc_slide as qc_slide
from slidekit.regions.tiling import TileGrid as TileGrid, TileReader as TileReader, read_tiles as read_tiles
from slidekit.regions.tissue import TissueMask as TissueMask, tissue_mask as tissue_mask
from slidekit.slidelevel.staging import pn_stage as pn_stage, weighted_kappa as weighted_kappa
from slidekit.slides.demo import write_demo_slide as write_demo_slide
from slidekit.slides.slide import (
    Slide as Slide,
    magnification_to_mpp as magnification_to_mpp,
    mpp_to_magnification as mpp_to_magnification,
    open_slide as open_slide,
)

__all__ = [
    "SlidekitError",
    "SlideError",
    "MissingMPPError",
    "CorruptTileError",
    "TissueError",
    "GridError",
    "FeatureError",
    "HeatmapError",
    "AnnotationError",
    "CheckpointError",
    "ConfigError",
    "LabelError",
    "OutputError",
    "LockedError",
    "ManifestError",
    "TrainingError",
    "SlidekitWarning",
    "MPPOverrideWarning",
    "BadTileWarning",
    "SlideIntegrityWarning",
    "AnnotationWarning",
    "TrainingWarning",
    "StainWarning",
    "OutputWarning",
    "Slide",
    "open_slide",
    "mpp_to_magnification",
    "magnification_to_mpp",
    "write_demo_slide",
    "TissueMask",
    "tissue_mask",
    "TileGrid",
    "TileReader",
    "read_tiles",
    "Annotation",
    "read_annotations",
    "write_geojson",
    "rasterize",
    "load_checkpoint",
    "Predictor",
    "heatmap_slide",
    "Heatmap",
    "HeatmapWriter",
    "pn_stage",
    "weighted_kappa",
    "run_cohort",
    "qc_slide",
    "__version__",
]

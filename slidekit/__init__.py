"""slidekit: whole-slide images in, patches, trainers, heatmaps and QuPath GeoJSON out."""
from slidekit.errors import (AnnotationError, CheckpointError, ConfigError, GridError, HeatmapError, LabelError,
                             MissingMPPError, SlideError, SlidekitError, TissueError)
from slidekit.errors import AnnotationWarning, BadTileWarning, CorruptTileError, MPPOverrideWarning, SlidekitWarning
from slidekit.slide import Slide, magnification_to_mpp, mpp_to_magnification, open_slide
from slidekit.tiling import TileGrid, TileReader, read_tiles
from slidekit.tissue import TissueMask, tissue_mask
from slidekit.staging import pn_stage, weighted_kappa
from slidekit.annotations import Annotation, rasterize, read_annotations, write_geojson

__version__ = "0.1.0"

__all__ = [
    "AnnotationError", "CheckpointError", "ConfigError", "GridError", "HeatmapError", "LabelError", "MissingMPPError",
    "SlideError", "SlidekitError", "TissueError", "Slide", "open_slide", "mpp_to_magnification",
    "magnification_to_mpp", "TileGrid", "TileReader", "read_tiles", "TissueMask", "tissue_mask",
    "pn_stage", "weighted_kappa", "SlidekitWarning", "MPPOverrideWarning", "BadTileWarning", "CorruptTileError", "AnnotationWarning",
    "Annotation", "read_annotations", "write_geojson", "rasterize",
    "load_checkpoint", "Predictor", "heatmap_slide", "Heatmap", "HeatmapWriter",
]

# torch-heavy parts load on first use, so `import slidekit` stays light.
_LAZY = {"load_checkpoint": "slidekit.models", "Predictor": "slidekit.inference",
         "heatmap_slide": "slidekit.inference", "Heatmap": "slidekit.heatmap", "HeatmapWriter": "slidekit.heatmap"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slidekit' has no attribute {name!r}")

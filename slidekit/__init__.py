"""slidekit: whole-slide images in, patches, trainers, heatmaps and QuPath GeoJSON out."""
from slidekit.annotations.formats import read_annotations, write_geojson
from slidekit.annotations.geometry import rasterize
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import (AnnotationError, AnnotationWarning, BadTileWarning, CheckpointError, ConfigError,
                                  CorruptTileError, GridError, HeatmapError, LabelError, MissingMPPError,
                                  MPPOverrideWarning, SlideError, SlidekitError, SlidekitWarning, TissueError)
from slidekit.base.version import __version__  # noqa: E402
from slidekit.regions.tiling import TileGrid, TileReader, read_tiles
from slidekit.regions.tissue import TissueMask, tissue_mask
from slidekit.slidelevel.staging import pn_stage, weighted_kappa
from slidekit.slides.slide import Slide, magnification_to_mpp, mpp_to_magnification, open_slide

__all__ = [
    "AnnotationError", "CheckpointError", "ConfigError", "GridError", "HeatmapError", "LabelError", "MissingMPPError",
    "SlideError", "SlidekitError", "TissueError", "Slide", "open_slide", "mpp_to_magnification",
    "magnification_to_mpp", "TileGrid", "TileReader", "read_tiles", "TissueMask", "tissue_mask",
    "pn_stage", "weighted_kappa", "SlidekitWarning", "MPPOverrideWarning", "BadTileWarning", "CorruptTileError", "AnnotationWarning",
    "Annotation", "read_annotations", "write_geojson", "rasterize",
    "load_checkpoint", "Predictor", "heatmap_slide", "Heatmap", "HeatmapWriter",
]

# torch-heavy parts load on first use, so `import slidekit` stays light.
_LAZY = {"load_checkpoint": "slidekit.models.checkpoint", "Predictor": "slidekit.infer.predictor",
         "heatmap_slide": "slidekit.infer.predictor", "Heatmap": "slidekit.infer.heatmap", "HeatmapWriter": "slidekit.infer.heatmap"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slidekit' has no attribute {name!r}")

"""slidekit: whole-slide images in, patches, trainers, heatmaps and QuPath GeoJSON out."""
from slidekit.errors import (AnnotationError, CheckpointError, ConfigError, GridError, LabelError,
                             MissingMPPError, SlideError, SlidekitError, TissueError)
from slidekit.slide import Slide, magnification_to_mpp, mpp_to_magnification, open_slide
from slidekit.tiling import TileGrid, TileReader, read_tiles
from slidekit.tissue import TissueMask, tissue_mask
from slidekit.staging import pn_stage, weighted_kappa

__version__ = "0.1.0"

__all__ = [
    "AnnotationError", "CheckpointError", "ConfigError", "GridError", "LabelError", "MissingMPPError",
    "SlideError", "SlidekitError", "TissueError", "Slide", "open_slide", "mpp_to_magnification",
    "magnification_to_mpp", "TileGrid", "TileReader", "read_tiles", "TissueMask", "tissue_mask",
    "pn_stage", "weighted_kappa",
]

"""A kept old import path: ``from slidekit.errors import SlideError`` worked before the layout change
moved the module to ``slidekit.base.errors``, and keeps working (a plain re-export, no warning).

New code imports the classes from ``slidekit`` (``from slidekit import SlideError``) or
``slidekit.base``. Imports: ``slidekit.base.errors`` only.
"""
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

__all__ = ["SlidekitError", "SlideError", "MissingMPPError", "CorruptTileError", "TissueError", "GridError",
           "FeatureError", "HeatmapError", "AnnotationError", "CheckpointError", "ConfigError", "LabelError",
           "OutputError", "LockedError", "ManifestError", "TrainingError", "SlidekitWarning", "MPPOverrideWarning",
           "BadTileWarning", "SlideIntegrityWarning", "AnnotationWarning", "TrainingWarning", "StainWarning",
           "OutputWarning"]

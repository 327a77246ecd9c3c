"""Typed exceptions. Every error slidekit raises on bad input derives from SlidekitError.

The CLI turns any SlidekitError into one line on stderr and a non-zero exit; the message
therefore names the file and the problem on its own.
"""
from __future__ import annotations

import os
from pathlib import Path


class SlidekitError(Exception):
    """Base of every slidekit exception."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class SlideError(SlidekitError):
    """A slide that is missing, unreadable, truncated, unsupported or lacks required metadata."""


class MissingMPPError(SlideError):
    """The slide has no microns-per-pixel in its metadata and none was given."""


class CorruptTileError(SlideError):
    """A stored tile of the slide is damaged; ``location`` is its level-0 (x, y), ``level`` its level."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 location: tuple[int, int] | None = None, level: int = 0) -> None:
        super().__init__(message, path)
        self.location, self.level = location, level

    def __reduce__(self):  # keep location/level across DataLoader worker pickling
        msg = str(self)
        if self.path is not None and msg.startswith(f"{self.path}: "):
            msg = msg[len(f"{self.path}: "):]
        return (type(self), (msg, self.path, self.location, self.level))


class TissueError(SlidekitError):
    """Tissue detection found nothing usable (e.g. a blank slide)."""


class GridError(SlidekitError):
    """A tile grid file is malformed or does not belong to the slide it is used with."""


class FeatureError(GridError):
    """A per-slide feature file (slidekit, TRIDENT, CLAM or STAMP HDF5) is missing, malformed,
    unfinished or holds non-finite features. A ``GridError`` too, so ``except GridError`` still
    catches it."""


class HeatmapError(SlidekitError):
    """A heatmap store is missing, incomplete or not a slidekit heatmap."""


class AnnotationError(SlidekitError):
    """A GeoJSON or ASAP XML file is malformed or unsupported."""


class CheckpointError(SlidekitError):
    """A checkpoint is not a slidekit checkpoint, is corrupt or comes from an incompatible version."""


class ConfigError(SlidekitError):
    """A configuration file or option is invalid."""


class LabelError(SlidekitError):
    """A label table (CSV) is malformed or inconsistent."""


class SlidekitWarning(UserWarning):
    """Base of every slidekit warning: something was done that the user should know about
    (an override, a skipped tile, an unverifiable file). The CLI prints each as one line."""


class MPPOverrideWarning(SlidekitWarning):
    """A user-given pixel size replaced a different one from the slide's metadata."""


class BadTileWarning(SlidekitWarning):
    """A tile that could not be decoded was skipped, as the caller asked (``on_bad_tile="skip"``)."""


class SlideIntegrityWarning(SlidekitWarning):
    """Part of a slide file could not be verified (it may be damaged)."""


class AnnotationWarning(SlidekitWarning):
    """Annotations were repaired, clipped or dropped (empty rings, out-of-range colours, objects
    past the slide's edge), or rasterising labels matched no object."""


class OutputError(SlidekitError):
    """An output path holds something slidekit did not write (it refuses to replace it), or the
    results of another slide."""


class LockedError(OutputError):
    """Another process holds the output folder's lock."""


class ManifestError(SlidekitError):
    """A cohort manifest (CSV, folder, glob or list of slides) is malformed."""


class TrainingError(SlidekitError):
    """Training cannot go on: the loss or the weights became NaN/inf, or the output directory
    holds a run that does not match the one asked for."""


class TrainingWarning(SlidekitWarning):
    """A training choice the user should know about (a run extended to more epochs, a stage-2
    selection made on a missing or chance-level loss)."""


class StainWarning(SlidekitWarning):
    """A stain normalisation choice the user should know about: one that differs from (or turns
    off) the checkpoint's, or an export whose model expects normalised tiles it cannot make."""


class OutputWarning(SlidekitWarning):
    """A rerun found an output that no longer verifies (deleted, emptied or changed since it was
    written) and redoes the slide."""


# Every class above (the old path ``slidekit.errors`` re-exports exactly these).
__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, (SlidekitError, SlidekitWarning))]

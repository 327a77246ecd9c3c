"""What every stage uses: the exception hierarchy (``errors``), atomic writes and rerun identities
(``io``), output ownership (``outputs``) and folder locks (``locks``), the CPU budget and memory
(``resources``), stage timing (``timing``), torch devices (``devices``) and ``torch.distributed``
(``distributed``), where the real data is (``datapaths``), lazy re-exports (``lazy``), the version.

Imports: the standard library and third-party packages only, never another slidekit package.
``devices`` and ``distributed`` load torch; the rest does not. ``available_devices`` and
``resolve_device`` are re-exported lazily (first use), and ``distributed`` is the module itself,
also loaded on first use (``from slidekit.base import distributed as dist``).
"""
from __future__ import annotations

import importlib
from typing import Any

from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason, require_data_dir
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
from slidekit.base.io import atomic_path, config_digest, file_identity, write_text_atomic
from slidekit.base.lazy import lazy_exports
from slidekit.base.locks import OutputLock
from slidekit.base.outputs import OutputDir, claim_path
from slidekit.base.resources import (
    available_cpus,
    configure_threads,
    cpu_budget,
    peak_rss_mb,
    prefer_passive_waits,
    rss_mb,
)
from slidekit.base.timing import GPUSampler, StageTimer, format_split
from slidekit.base.version import __version__

__all__ = [
    # errors and warnings
    "SlidekitError", "SlideError", "MissingMPPError", "CorruptTileError", "TissueError", "GridError", "FeatureError",
    "HeatmapError", "AnnotationError", "CheckpointError", "ConfigError", "LabelError", "OutputError", "LockedError",
    "ManifestError", "TrainingError", "SlidekitWarning", "MPPOverrideWarning", "BadTileWarning",
    "SlideIntegrityWarning", "AnnotationWarning", "TrainingWarning", "StainWarning", "OutputWarning",
    # atomic writes, rerun identities, output ownership, locks
    "atomic_path", "write_text_atomic", "file_identity", "config_digest", "OutputDir",
    "claim_path", "OutputLock",
    # CPU budget, memory, timing
    "available_cpus", "cpu_budget", "configure_threads", "prefer_passive_waits", "rss_mb", "peak_rss_mb",
    "StageTimer", "GPUSampler", "format_split",
    # torch devices and torch.distributed (torch: loaded on first use)
    "available_devices", "resolve_device", "distributed",
    # where the real data is; lazy re-exports; the version
    "data_dir", "data_missing_reason", "require_data_dir", "add_data_argument", "lazy_exports", "__version__",
]

_getattr, __dir__ = lazy_exports(__name__, {"available_devices": ".devices", "resolve_device": ".devices"})


def __getattr__(name: str) -> Any:
    """The lazy names: ``distributed`` (the module) and the ``devices`` functions, on first use."""
    if name == "distributed":
        return importlib.import_module(".distributed", __name__)
    return _getattr(name)

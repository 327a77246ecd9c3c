"""Type stub of ``slidekit.base``: every name of its ``__all__`` for type checkers. At runtime
``__init__.py`` loads some of them on first use (PEP 562); tests/test_public_api.py checks that
this stub and ``__all__`` name the same objects."""
from slidekit.base import distributed as distributed
from slidekit.base.datapaths import (
    add_data_argument as add_data_argument,
    data_dir as data_dir,
    data_missing_reason as data_missing_reason,
    require_data_dir as require_data_dir,
)
from slidekit.base.devices import available_devices as available_devices, resolve_device as resolve_device
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
from slidekit.base.io import (
    atomic_path as atomic_path,
    config_digest as config_digest,
    file_identity as file_identity,
    write_text_atomic as write_text_atomic,
)
from slidekit.base.lazy import lazy_exports as lazy_exports
from slidekit.base.locks import OutputLock as OutputLock
from slidekit.base.outputs import OutputDir as OutputDir, claim_path as claim_path
from slidekit.base.resources import (
    available_cpus as available_cpus,
    configure_threads as configure_threads,
    cpu_budget as cpu_budget,
    peak_rss_mb as peak_rss_mb,
    prefer_passive_waits as prefer_passive_waits,
    rss_mb as rss_mb,
)
from slidekit.base.timing import GPUSampler as GPUSampler, StageTimer as StageTimer, format_split as format_split
from slidekit.base.version import __version__ as __version__

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
    "atomic_path",
    "write_text_atomic",
    "file_identity",
    "config_digest",
    "OutputDir",
    "claim_path",
    "OutputLock",
    "available_cpus",
    "cpu_budget",
    "configure_threads",
    "prefer_passive_waits",
    "rss_mb",
    "peak_rss_mb",
    "StageTimer",
    "GPUSampler",
    "format_split",
    "available_devices",
    "resolve_device",
    "distributed",
    "data_dir",
    "data_missing_reason",
    "require_data_dir",
    "add_data_argument",
    "lazy_exports",
    "__version__",
]

"""The small typed option groups every per-slide job shares, for the Python API and the CLI alike.

One idea, one object: how a slide is read (:class:`ReadOptions`), how its tissue is found
(:class:`TissueOptions`) and how it is tiled (:class:`TileOptions`). A job takes these objects
instead of a long list of loose keyword arguments, and records their result-affecting parts in its
configuration so that a rerun with other options redoes the slide.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from slidekit.base.errors import ConfigError
from slidekit.regions.tissue import TissueParams
from slidekit.slides.slide import open_slide


@dataclass(frozen=True)
class ReadOptions:
    """How a slide file is opened.

    Parameters
    ----------
    slide_mpp
        µm/px used only where the slide's metadata has none (never a silent guess: a slide without
        either is an error wherever a pixel size is needed).
    override_mpp
        µm/px that replaces the metadata's (warned).
    backend
        ``"openslide"``, ``"tiffslide"`` or None (the default order).
    """

    slide_mpp: float | None = None
    override_mpp: float | None = None
    backend: str | None = None

    def open(self, path: str | os.PathLike) -> Any:
        """Open ``path`` with these options (``slides.slide.open_slide``)."""
        return open_slide(path, mpp=self.slide_mpp, backend=self.backend, override_mpp=self.override_mpp)


@dataclass(frozen=True)
class TissueOptions:
    """Tissue detection options (``regions.tissue.tissue_mask``); only the ones set are passed, so
    the detector's own defaults stay in one place and configurations without options keep their keys.

    Parameters
    ----------
    options
        ``tissue_mask`` keyword arguments (``mpp``, ``min_area_um2``, ``min_hole_um2``,
        ``closing_um``, ``remove_pen``, ``min_saturation``, ``min_od``, ``min_contrast``).
    """

    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        TissueParams.of(**self.options)  # an unknown name is one ConfigError listing the known ones

    @classmethod
    def of(cls, value: "TissueOptions | Mapping[str, Any] | None") -> "TissueOptions":
        """Accept an object, a dict of ``tissue_mask`` options, or None (the detector's defaults)."""
        if isinstance(value, TissueOptions):
            return value
        return cls(dict(value or {}))

    def as_dict(self) -> dict:
        """The options that were set (JSON-able; what configurations record)."""
        return dict(self.options)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.options.items())))


@dataclass(frozen=True)
class TileOptions:
    """A tile grid at a target pixel size.

    Parameters
    ----------
    mpp
        Target µm/px of the tiles (None: the model's).
    size
        Tile side in pixels at ``mpp`` (None: the model's).
    overlap
        Overlap between neighbouring tiles in pixels at ``mpp`` (None: the job's default).
    min_tissue
        Fraction of a tile that must be tissue (inside the region) for it to be kept; 0 keeps all.
    """

    mpp: float | None = None
    size: int | None = None
    overlap: int | None = None
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"tile mpp must be positive, got {self.mpp!r}")
        if self.size is not None and not int(self.size) > 0:
            raise ConfigError(f"tile size must be positive, got {self.size!r}")
        if not 0.0 <= float(self.min_tissue) <= 1.0:
            raise ConfigError(f"min_tissue must be between 0 and 1, got {self.min_tissue!r}")



@dataclass(frozen=True)
class RunOptions:
    """How a job runs (never what it writes: not part of its configuration).

    Parameters
    ----------
    batch_size
        Tiles per model batch.
    workers
        DataLoader worker processes reading tiles (0: read in the main process).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    threads
        CPUs to use (None: those this process may use; ``base.resources.configure_threads``).
    """

    batch_size: int = 32
    workers: int = 0
    device: str = "auto"
    threads: int | None = None


@dataclass(frozen=True)
class RoiOptions:
    """A region of interest: the polygons of a QuPath GeoJSON or ASAP/ImageScope XML file.

    Parameters
    ----------
    roi
        The annotation file (None: no ROI).
    roi_class
        Only its polygons of these classes (None: all).
    exclude_qc
        A ``slidekit qc`` output folder of the same slide file: tiles with more of an artefact class
        than ``qc_max`` allows are left out (``regions.qc_tiles.TileQc``).
    qc_max
        With ``exclude_qc``: the largest fraction of a tile each artefact class may cover, one number
        for every class, ``"NAME=F"`` for one, a mapping or a list of those (None: 0.5 each;
        ``regions.qc_tiles.qc_max_of``).
    """

    roi: str | os.PathLike | None = None
    roi_class: str | tuple[str, ...] | None = None
    exclude_qc: str | os.PathLike | None = None
    qc_max: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.roi_class, list):
            object.__setattr__(self, "roi_class", tuple(self.roi_class))
        if self.roi is None and self.roi_class:
            raise ConfigError(f"roi_class {self.roi_class!r} given without roi (the annotation file to take it from)")


@dataclass(frozen=True)
class StainNormOptions:
    """Stain normalisation of the tiles a model sees.

    Parameters
    ----------
    stain_norm
        ``"none"``, ``"macenko"`` or ``"reinhard"`` (None: the checkpoint's own).
    stain_ref
        The reference image or saved reference.
    """

    stain_norm: str | None = None
    stain_ref: str | os.PathLike | None = None


class OptionGroups:
    """A job's options as small typed groups (each a frozen dataclass field of the subclass), with
    a flat view: every group field by its own name, as the CLI and the cohort table spell them.

    ``MyOptions.of(options, **flat)`` takes an object (or None: the defaults) and flat keywords that
    replace single fields (``workers=0``, ``mpp=0.5``); a keyword no group has is one ConfigError
    naming the known ones. A ``TissueOptions`` group is set by its own name (``tissue={...}``).
    """

    @classmethod
    def of(cls, options: "OptionGroups | None" = None, **flat: Any) -> Any:
        """The options with ``flat`` keywords applied to their groups."""
        base = options if options is not None else cls()
        if not flat:
            return base
        groups: dict[str, Any] = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}  # type: ignore[arg-type]
        owner: dict[str, tuple[str, str | None]] = {}
        for gname, group in groups.items():
            if isinstance(group, TissueOptions):
                owner[gname] = (gname, None)
            else:
                owner.update({f.name: (gname, f.name) for f in dataclasses.fields(group)})
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__} "
                              f"(known: {', '.join(sorted(owner))})")
        changes: dict[str, dict] = {}
        for key, value in flat.items():
            gname, field_name = owner[key]
            if field_name is None:
                groups[gname] = TissueOptions.of(value)
            else:
                changes.setdefault(gname, {})[field_name] = value
        for gname, fields_ in changes.items():
            groups[gname] = dataclasses.replace(groups[gname], **fields_)
        return dataclasses.replace(base, **groups)  # type: ignore[type-var]

    def flat(self) -> dict[str, Any]:
        """Every field of every group by its flat name (a TissueOptions group: its dict, or None when empty)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            group = getattr(self, f.name)
            if isinstance(group, TissueOptions):
                out[f.name] = group.as_dict() or None
            else:
                out.update({g.name: getattr(group, g.name) for g in dataclasses.fields(group)})
        return out


@dataclass(frozen=True)
class GridOptions(OptionGroups):
    """A tile grid over a slide's tissue (``slidekit tile``), in groups (flat field names work too)."""

    tiles: TileOptions = TileOptions(mpp=0.5, size=256, overlap=0, min_tissue=0.5)
    reading: ReadOptions = ReadOptions()
    tissue: TissueOptions = TissueOptions()

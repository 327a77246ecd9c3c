"""The small typed option groups every per-slide job shares, for the Python API and the CLI alike.

One idea, one object: how a slide is read (:class:`ReadOptions`), how its tissue is found
(:class:`TissueOptions`) and how it is tiled (:class:`TileOptions`). A job takes these objects
instead of a long list of loose keyword arguments, and records their result-affecting parts in its
configuration so that a rerun with other options redoes the slide.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from slidekit.base.errors import ConfigError
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

    _KNOWN = frozenset({"mpp", "min_area_um2", "min_hole_um2", "closing_um", "remove_pen", "min_saturation",
                        "min_od", "min_contrast"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - self._KNOWN)
        if unknown:
            known = ", ".join(sorted(self._KNOWN))
            raise ConfigError(f"unknown tissue option(s) {', '.join(unknown)} (known: {known})")

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


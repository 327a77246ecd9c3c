"""Output folders slidekit owns: it replaces only what it wrote, and one folder holds one slide.

A slide's output folder carries a marker, ``.slidekit.json``: the slide it belongs to (path and
fingerprint) and the names slidekit has written there. ``OutputDir.claim(name)`` allows writing
``name`` only when it does not exist yet or the marker lists it; anything else — a user's own
``overlay.png``, a folder that happens to be called ``heatmap.zarr`` — is refused with one line,
never deleted. A folder holding another slide's results (two slides with one file stem, or a
rerun pointed at the wrong folder) is refused the same way, so a collision never loses a result.
Folders written before the marker existed are recognised by their ``summary.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from slidekit.base.errors import OutputError
from slidekit.base.io import write_text_atomic

MARKER = ".slidekit.json"


class OutputDir:
    """A slide's output folder. ``slide_id`` is ``slides.identity.slide_fingerprint`` of the slide file."""

    def __init__(self, path: str | os.PathLike, slide_path: str | os.PathLike, slide_id: str) -> None:
        self.path = Path(path)
        self.slide_path, self.slide_id = str(slide_path), slide_id
        self._marker = self.path / MARKER
        self._state = self._read()
        owner = self._state.get("slide_id")
        if owner and owner != slide_id and not _same_slide(owner, self.slide_path):
            raise OutputError(f"holds the results of another slide ({self._state.get('slide')}); "
                              f"refusing to mix in {self.slide_path} (choose another output folder)", self.path)

    def _read(self) -> dict:
        try:
            state = json.loads(self._marker.read_text())
            if isinstance(state, dict) and isinstance(state.get("files"), list):
                return state
        except FileNotFoundError:
            return self._legacy()
        except ValueError:
            pass
        raise OutputError(f"{MARKER} is damaged; cannot tell which files slidekit wrote here", self.path)

    def _legacy(self) -> dict:
        """A folder from before the marker: its summary.json lists what slidekit wrote."""
        try:
            summary = json.loads((self.path / "summary.json").read_text())
            files = [str(f) for f in summary.get("outputs", [])]
            slide = summary.get("slide")
            ident = (summary.get("config") or {}).get("slide_id")
            if files and slide:
                files += [f"{f}.part" for f in files]
                return {"slide": slide, "slide_id": ident, "files": files}
        except (OSError, ValueError, AttributeError):
            pass
        return {"files": []}

    def owns(self, name: str) -> bool:
        """Whether slidekit wrote (or started writing) ``name`` here."""
        return name in self._state["files"]

    def claim(self, *names: str) -> None:
        """Allow writing (and replacing) ``names``; refuse when one exists and is not slidekit's."""
        # A name swapped for a link out of the folder (``tiles -> /elsewhere``) would have a rerun
        # write, or clear, through it into files slidekit never owned: refused, whatever the marker says.
        links = [n for n in names if (self.path / n).is_symlink()
                 and not (self.path / n).resolve().is_relative_to(self.path.resolve())]
        if links:
            raise OutputError(f"{', '.join(links)} is a link to outside the output folder; refusing to write "
                              "through it (remove the link or choose another output folder)", self.path)
        foreign = [n for n in names if (self.path / n).exists() and not self.owns(n)]
        if foreign:
            raise OutputError(f"{', '.join(foreign)} already exist(s) and slidekit did not write them; refusing "
                              "to replace them (move them away or choose another output folder)", self.path)
        new = [n for n in names if not self.owns(n)]
        if new or self._state.get("slide_id") != self.slide_id:  # (an old-form fingerprint is brought up to date)
            self.path.mkdir(parents=True, exist_ok=True)
            self._state = {"slide": self.slide_path, "slide_id": self.slide_id,
                           "files": sorted(set(self._state["files"]) | set(names))}
            write_text_atomic(self._marker, json.dumps(self._state, indent=1))


# How a recorded fingerprint is compared with a slide file: ``slides.identity`` registers
# ``same_slide`` here when imported (``base`` sits below ``slides`` and cannot import it). Every
# caller got its ``slide_id`` from ``slides.identity``, so the rule is in place whenever one is compared.
_slide_matcher: list[Callable[[str, str], bool]] = []


def register_slide_matcher(func: Callable[[str, str], bool]) -> None:
    """Set the rule ``func(recorded_fingerprint, slide_path) -> bool`` (``slides.identity.same_slide``)."""
    _slide_matcher[:] = [func]


def _same_slide(recorded: str, slide_path: str) -> bool:
    """Either fingerprint form names this slide (an old record is recomputed in the old form);
    False when no rule is registered or the slide cannot be read."""
    if not _slide_matcher:
        return False
    try:
        return bool(_slide_matcher[0](recorded, slide_path))
    except OSError:
        return False


def claim_path(path: str | os.PathLike, is_ours: bool, what: str) -> None:
    """Refuse to replace an existing ``path`` that is not slidekit's (``is_ours`` says whether it is)."""
    path = Path(path)
    if path.exists() and not is_ours:
        raise OutputError(f"exists and is not {what}; refusing to replace it (move it away or choose another "
                          "output path)", path)

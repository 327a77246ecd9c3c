"""One per-slide job runner: everything around a per-slide command's own work, done one way.

A job (heatmap, cells, tissue, tile export, ...) declares its name, its result-affecting
configuration, the outputs it may write in its folder and the region it works on, and does only
its own work in ``run(ctx)``. :func:`run_job` does the rest, the same for one slide and for every
slide of a cohort::

    open the slide (ReadOptions) ─► lock the folder ─► fingerprint ─► claim the outputs
      ─► finished? (summary of this configuration AND every output it lists verifies)
      ─► job.run(ctx): ctx.mask() builds the region (tissue ∧ ROI − ...), ctx.grid() tiles it
      ─► record every output (base.verify) ─► summary.json, written last

"Finished" means every output the summary lists is still the one the run wrote (``base.verify``:
a stat per file when untouched, the contents hashed when not): an output deleted, emptied or
changed since is removed and the slide redone, with one warning saying why.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from slidekit.base.errors import OutputWarning, TissueError
from slidekit.base.io import config_digest, write_text_atomic
from slidekit.base.locks import OutputLock
from slidekit.base.outputs import OutputDir
from slidekit.base.verify import check_output, output_record
from slidekit.regions.masks import Region, build_region
from slidekit.regions.options import ReadOptions
from slidekit.regions.tiling import TileGrid
from slidekit.regions.tissue import TissueMask
from slidekit.slides.identity import slide_fingerprint

SUMMARY = "summary.json"


class TileFilter(Protocol):
    """Tiles a job's grid leaves out after its region (``regions.qc_tiles.TileQc``: ``--exclude-qc``)."""

    def ready(self, slide: Any, folder: Path, reading: Any, progress: bool) -> "TileFilter": ...

    def check(self, slide: Any) -> None: ...

    def config(self) -> dict: ...

    def filter(self, slide: Any, grid: TileGrid) -> tuple[TileGrid, Any, dict]: ...


class SlideJob:
    """A per-slide command run by :func:`run_job`.

    Subclasses set ``name`` and ``outputs`` (every name the job may write in its folder; the
    summary is the runner's) and implement ``config`` and ``run``. ``reading`` says how the slide
    is opened, ``region`` what part of it the job works on (None: the job builds no mask), ``qc``
    which tiles of its grid are left out (``--exclude-qc``; None: none): the runner checks it against
    the slide first, adds it to the configuration (``-qc``), applies it in ``JobContext.grid`` and
    records its counts in the summary (``qc``).
    """

    name: str = "job"
    outputs: tuple[str, ...] = ()
    reading: ReadOptions = ReadOptions()
    region: Region | None = None
    qc: TileFilter | None = None

    def config(self) -> dict:
        """The result-affecting configuration (JSON-able); the runner adds the slide's fingerprint."""
        raise NotImplementedError

    def run(self, ctx: "JobContext") -> dict:
        """Do the job's own work, writing its outputs into ``ctx.out``; return the summary's fields."""
        raise NotImplementedError

    def check(self, slide: Any) -> None:
        """Refuse inputs that do not belong with ``slide`` (a typed error) before anything is written:
        called once the slide is open, before the folder is locked, claimed or created."""

    def figures(self, summary: dict) -> dict:
        """The figures a cohort table shows for one slide (from its summary)."""
        return {}


@dataclass
class JobContext:
    """What a job's ``run`` is given: the open slide, its folder and configuration, the region."""

    job: SlideJob
    slide: Any
    out: Path
    key: str
    config: dict
    progress: bool = True
    _mask: TissueMask | None = field(default=None, repr=False)
    #: After ``grid()`` with a job's ``qc``: the kept tiles' artefact fractions (N, classes) and the counts.
    tile_qc: Any = None
    qc_counts: dict | None = None

    @property
    def slide_id(self) -> str:
        """The slide file's fingerprint (``slides.identity.slide_fingerprint``)."""
        return str(self.config["slide_id"])

    def mask(self) -> TissueMask | None:
        """The job's region built on the slide (once), or None when the job has none."""
        if self._mask is None and self.job.region is not None:
            self._mask = build_region(self.job.region, self.slide, progress=None if self.progress else False)
        return self._mask

    def grid(self, *, mpp: float, size: int, overlap: int = 0, min_tissue: float = 0.5,
             whole_slide: bool = False) -> Any:
        """The tile grid over the region (every tile of the slide with ``whole_slide``).

        Raises TissueError naming the slide when no tile has ``min_tissue`` of region.
        """
        mask = None if whole_slide else self.mask()
        grid = TileGrid.from_slide(self.slide, mpp=mpp, size=size, overlap=overlap, mask=mask,
                                   min_tissue=min_tissue if mask is not None else 0.0)
        if len(grid) == 0:
            raise TissueError(f"no tile has {min_tissue:.0%} tissue at {mpp} µm/px", self.slide.path)
        if self.job.qc is not None:
            grid, self.tile_qc, self.qc_counts = self.job.qc.filter(self.slide, grid)  # TissueError: none left
        return grid


def finished(out: Path, key: str) -> tuple[dict | None, str | None]:
    """A rerun's answer from a folder: ``(summary marked skipped, None)`` when the summary is of
    configuration ``key`` and every output it lists verifies; else ``(None, why or None)``, with the
    stale summary and every output that failed its check removed (they are slidekit's: claimed)."""
    path = out / SUMMARY
    if not path.exists():
        return None, None
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError):
        path.unlink()
        return None, f"{SUMMARY} is damaged"
    if old.get("config_key") != key:
        path.unlink()  # another configuration: redone (the cohort layer says so where it matters)
        return None, None
    records = old.get("records")
    names = [str(n) for n in old.get("outputs") or [] if n != SUMMARY]
    if not isinstance(records, dict) or not names:
        path.unlink()
        return None, "its summary records no outputs to verify (written by an older slidekit)"
    problems = {n: check_output(out / n, records.get(n) or {}) for n in names}
    bad = {n: p for n, p in problems.items() if p}
    if not bad:
        return {**old, "skipped": True}, None
    path.unlink()
    for n in bad:
        p = out / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    return None, "; ".join(bad.values())


def verify_folder(out: str | os.PathLike) -> str | None:
    """Why a folder's finished job does not verify (one phrase), or None when its summary lists
    outputs that all verify. Reads only; what a cohort rerun checks without a worker."""
    out = Path(out)
    try:
        old = json.loads((out / SUMMARY).read_text())
    except FileNotFoundError:
        return f"{SUMMARY} is missing"
    except (OSError, ValueError):
        return f"{SUMMARY} is damaged"
    records = old.get("records") if isinstance(old, dict) else None
    if not isinstance(records, dict):
        return None  # a job without records (an older version): the cohort's own listing decides
    for n in old.get("outputs") or []:
        if n != SUMMARY:
            problem = check_output(out / str(n), records.get(n) or {})
            if problem:
                return problem
    return None


def run_job(job: SlideJob, slide_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            progress: bool = True) -> dict:
    """Run ``job`` on one slide into ``out_dir``; return its summary (``skipped: True`` when it was
    finished already).

    Parameters
    ----------
    job
        The job, with its options.
    slide_path
        The slide file (or DICOM folder).
    out_dir
        The slide's output folder (created; one folder holds one slide's results).
    progress
        Show progress bars.
    """
    out = Path(out_dir)
    with job.reading.open(slide_path) as slide:
        job.check(slide)
        if job.qc is not None:  # its QC folder (made first for --exclude-qc auto), checked against the slide
            job.qc = job.qc.ready(slide, out / "qc", job.reading, progress)
            job.qc.check(slide)
        return _run_locked(job, slide, out, progress)


def _run_locked(job: SlideJob, slide: Any, out: Path, progress: bool) -> dict:
    """The rest of ``run_job`` under the folder's lock (the slide is open)."""
    with OutputLock(out):
        config = {**job.config(), "slide_id": slide_fingerprint(slide.path)}
        if job.qc is not None:  # recorded only when set: the keys of jobs without it hold
            config["-qc"] = job.qc.config()
        key = config_digest(config)
        # Only files slidekit wrote here may be replaced; another slide's folder is refused.
        OutputDir(out, slide.path, config["slide_id"]).claim(*job.outputs, SUMMARY)
        done, why = finished(out, key)
        if done is not None:
            return done
        if why:
            warnings.warn(f"{out}: redoing {job.name}: {why}", OutputWarning, stacklevel=2)
        ctx = JobContext(job, slide, out, key, config, progress)
        fields = job.run(ctx)
        if ctx.qc_counts is not None:
            fields = {**fields, "qc": ctx.qc_counts}
        written = sorted(n for n in job.outputs if not n.endswith(".part") and (out / n).exists())
        summary = {"slide": str(slide.path), "config_key": key, "config": config, **fields,
                   "outputs": written + [SUMMARY],
                   "records": {n: output_record(out / n) for n in written}}
        if why:
            summary["redone"] = why
        write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2))
    return summary

"""Batched inference of a model over a tile grid, and the whole-slide heatmap job.

``Predictor`` reads tiles in DataLoader workers (each with its own slide handle through a
pickled ``TileReader``), pins the uint8 batches, stain-normalises (when asked, or when the
checkpoint carries a stain reference) and normalises them on the device, runs the model (mixed
precision and channels-last on CUDA) and keeps one batch in flight while the caller consumes the
previous one. On CUDA, aligned stored JPEG tiles travel compressed and are decoded on the GPU
(``slidekit.infer.gpu_decode``; ``Predictor.decode`` says which path was taken and why).
``heatmap_slide`` is the job behind ``slidekit heatmap``: slide in,
``heatmap.zarr``, ``overlay.png``, ``predictions.geojson`` and ``summary.json`` out, resumable.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.objects import Annotation
from slidekit.base.devices import resolve_device
from slidekit.base.errors import CheckpointError, ConfigError, SlidekitError, StainWarning
from slidekit.base.io import config_digest, file_identity
from slidekit.base.resources import configure_threads, worker_threads
from slidekit.base.timing import GPUSampler, StageTimer
from slidekit.infer import gpu_decode
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.infer.heatmap_tiff import write_heatmap_tiff
from slidekit.infer.ome_zarr import write_heatmap_ome_zarr
from slidekit.models.builtin import BUILTINS, builtin_model
from slidekit.models.checkpoint import load_checkpoint
from slidekit.regions.job import JobContext, SlideJob, run_job
from slidekit.regions.masks import Region, Roi, Tissue
from slidekit.regions.options import (
    OptionGroups,
    ReadOptions,
    RoiOptions,
    RunOptions,
    StainNormOptions,
    TileOptions,
    TissueOptions,
)
from slidekit.regions.qc import ARTEFACTS
from slidekit.regions.qc_tiles import TileQc, qc_figures
from slidekit.regions.roi import clip_store_to_roi
from slidekit.regions.tiling import TileGrid, TileReader, warn_bad_tiles
from slidekit.regions.tissue import detect_tissue
from slidekit.stain.normalize import StainNormalizer, normalizer_from_options, stain_remark


class _TileBatches(torch.utils.data.Dataset):
    """Item ``b`` is batch ``b`` of ``index``: (tile indices, (k, s, s, 3) uint8 tiles)."""

    def __init__(self, reader: TileReader, index: np.ndarray, batch_size: int) -> None:
        self.reader, self.index, self.batch_size = reader, np.asarray(index, np.int64), batch_size

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.index[b * self.batch_size:(b + 1) * self.batch_size]
        idx, tiles = self.reader.read_batch(idx)  # damaged tiles are left out with on_bad_tile="skip"
        return torch.from_numpy(idx), torch.from_numpy(tiles)


@dataclass(frozen=True)
class CudaOptions:
    """What the Predictor does on CUDA (ignored on the CPU).

    Parameters
    ----------
    amp
        Mixed precision.
    channels_last
        Channels-last memory format.
    gpu_decode
        Decode aligned stored JPEG tiles on the GPU (nvJPEG) where possible.
    """

    amp: bool = True
    channels_last: bool = True
    gpu_decode: bool = True


def _predictor_options(run: RunOptions | None, cuda: CudaOptions | None, flat: dict) -> tuple[RunOptions, CudaOptions]:
    """The Predictor's groups with flat keywords (``device=``, ``workers=``, ``amp=``...) applied."""
    run = run if run is not None else RunOptions(batch_size=32, workers=2)
    cuda = cuda if cuda is not None else CudaOptions()
    run_keys, cuda_keys = {"batch_size", "workers", "device", "threads"}, {"amp", "channels_last", "gpu_decode"}
    unknown = sorted(set(flat) - run_keys - cuda_keys)
    if unknown:
        raise ConfigError(f"unknown Predictor option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(run_keys | cuda_keys))})")
    run = replace(run, **{k: v for k, v in flat.items() if k in run_keys})
    return run, replace(cuda, **{k: v for k, v in flat.items() if k in cuda_keys})


class Predictor:
    """Runs ``model`` (logits) with ``spec`` (normalize/activate/task) over tiles of a grid.

    ``spec`` is a checkpoint's ModelSpec or a built-in's spec: the Predictor uses ``task``,
    ``mean``/``std`` (through ``normalize``) and ``activate``. A damaged tile fails the run
    (CorruptTileError) unless ``on_bad_tile="skip"``: then it gets no output, ``bad_tiles`` lists
    its grid index and a ``BadTileWarning`` says so. ``timer`` (a ``StageTimer``) adds up the
    read / transfer (host<->device copies and input normalisation) / model seconds of every
    ``predict`` (CUDA stages timed with events, so the pipeline is not stalled) and, on CUDA, the
    GPU utilisation sampled during the last one.

    ``stain``: a ``StainNormalizer`` applied to the uint8 batch on the device before
    ``spec.normalize`` (its time counted in "transfer"); None: the checkpoint's (``spec.stain``)
    when it has one; False: none, even where the checkpoint has one. ``stain_unchanged`` counts
    the tiles it left unchanged (too little stain to estimate). ``gpu_decode=False`` keeps the
    decode on the CPU on CUDA too.
    """

    def __init__(self, model: nn.Module, spec: Any, run: RunOptions | None = None, *, progress: bool = False,
                 on_bad_tile: str = "raise", stain: Any = None, cuda: CudaOptions | None = None, **flat: Any) -> None:
        run, cuda = _predictor_options(run, cuda, flat)
        device, batch_size, workers, threads = run.device, run.batch_size, run.workers, run.threads
        amp, channels_last, gpu_decode = cuda.amp, cuda.channels_last, cuda.gpu_decode
        self.on_bad_tile, self.bad_tiles = on_bad_tile, np.zeros(0, np.int64)
        self.stain, self.stain_unchanged = checkpoint_stain(spec) if stain is None else (stain or None), 0
        self.gpu_decode = gpu_decode
        self.decode = {"path": "cpu", "reason": "nothing read yet"}
        if threads is not None:  # else the process's thread settings stay as they are

            configure_threads(threads, workers)
        self.device = resolve_device(device)
        self.spec, self.batch_size, self.workers, self.progress = spec, int(batch_size), int(workers), progress
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is not None:
            # CUDA events and streams use the current device: make it the one asked for (cuda:N)
            torch.cuda.set_device(self.device)
        self.amp = amp and self.cuda
        self.channels_last = channels_last and self.cuda
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.timer = StageTimer()
        self._events: tuple | None = None

    def forward(self, tiles_uint8: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, S, S, 3) uint8 on any device -> probabilities on the device (float32)."""
        marks = self._mark()
        x = tiles_uint8.to(self.device, non_blocking=True)
        if self.stain is not None:
            before = self.stain.unchanged_tiles
            x = self.stain(x)
            self.stain_unchanged += self.stain.unchanged_tiles - before
        x = self.spec.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        m1 = self._mark()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            y = self.spec.activate(self.model(x).float())
            if y.ndim == 4 and output_size is not None and tuple(y.shape[-2:]) != tuple(output_size):
                shrink = y.shape[-1] >= output_size[1]
                y = F.interpolate(y, size=output_size, mode="area" if shrink else "bilinear",
                                  **({} if shrink else {"align_corners": False}))
        y = y.float()
        marks = (marks, m1, self._mark())
        if self.cuda:
            self._events = marks  # read once the batch's copy back has finished (``_emit``)
        else:
            self.timer.add("transfer", marks[1] - marks[0])
            self.timer.add("model", marks[2] - marks[1])
        return y

    def _mark(self) -> Any:
        """A point in time: a recorded CUDA event on CUDA (no sync), else ``perf_counter``."""
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def loader(self, slide: Any, grid: TileGrid, index: np.ndarray | None = None) -> torch.utils.data.DataLoader:
        """The DataLoader of uint8 tile batches (workers read with their own slide handles), or,
        on the GPU decode path (``self.decode["path"] == "gpu"``), of ``gpu_decode.StreamBatches``."""
        index = np.arange(len(grid)) if index is None else np.asarray(index)
        reader = TileReader(slide, grid, on_bad_tile=self.on_bad_tile)
        path, why = gpu_decode.decode_path(reader, self.device)
        if path == "gpu" and not self.gpu_decode:
            path, why = "cpu", "GPU decode turned off (gpu_decode=False)"
        self.decode = {"path": path, "reason": why}
        self._reader = reader
        ds = (gpu_decode.StreamBatches if path == "gpu" else _TileBatches)(reader, index, self.batch_size)

        kw: dict[str, Any] = ({"prefetch_factor": 4, "persistent_workers": False, "worker_init_fn": worker_threads}
                              if self.workers > 0 else {})
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.workers,
                                           pin_memory=self.cuda, **kw)

    def predict(self, slide: Any, grid: TileGrid, index: np.ndarray | None = None,
                output_size: tuple[int, int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(tile indices, outputs)``: (k, C) probabilities or (k, C, h, w) maps
        (resized on the device to ``output_size`` when given), in grid order."""
        index = np.arange(len(grid)) if index is None else np.asarray(index)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(index), unit="tile", desc=getattr(slide, "name", "slide"), leave=False)
        pending = None
        seen = []
        sampler = GPUSampler(self.device) if self.cuda else None
        batches = _clean_worker_errors(self.loader(slide, grid, index))
        decoder = None
        if self.decode["path"] == "gpu":  # workers hand over JPEG streams; decoded here on the GPU

            decoder = gpu_decode.StreamDecoder(self._reader, self.device, self.decode["reason"])
        try:
            if sampler is not None:
                sampler.__enter__()
            while True:
                t = time.perf_counter()
                try:
                    item = next(batches)  # waiting here is the read stage (workers read ahead)
                except StopIteration:
                    break
                if decoder is None:
                    idx, tiles = item
                else:  # the GPU decode counts as reading too
                    idx, tiles = decoder.decode(item)
                    if decoder.path != "gpu":
                        self.decode = {"path": "cpu", "reason": decoder.why}
                self.timer.add("read", time.perf_counter() - t)
                seen.append(idx.numpy())
                if len(idx) == 0:  # every tile of the batch was damaged and skipped
                    continue
                y = self.forward(tiles, output_size)
                if self.cuda:
                    # Copy back asynchronously and consume the previous batch while this one runs.
                    host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                    host.copy_(y, non_blocking=True)
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    current = (idx, host, event, self._events)
                else:
                    current = (idx, y, None, None)  # type: ignore[assignment]  # CPU: no event to wait on
                if pending is not None:
                    yield self._emit(pending, bar)
                pending = current
            if pending is not None:
                yield self._emit(pending, bar)
            self.bad_tiles = np.setdiff1d(index, np.concatenate(seen) if seen else np.zeros(0, np.int64))

            warn_bad_tiles(getattr(slide, "path", slide), grid, self.bad_tiles)
        finally:
            if sampler is not None:
                sampler.__exit__(None, None, None)
                self.timer.gpu = sampler.result()
            if bar is not None:
                bar.close()

    def _emit(self, item: tuple, bar: Any) -> tuple[np.ndarray, np.ndarray]:
        idx, y, event, marks = item
        if event is not None:
            event.synchronize()
            if marks is not None:  # CUDA events: upload+normalise, model, copy back
                e0, e1, e2 = marks
                self.timer.add("transfer", (e0.elapsed_time(e1) + e2.elapsed_time(event)) / 1000)
                self.timer.add("model", e1.elapsed_time(e2) / 1000)
        out = y.numpy()
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            # Never write NaN features or scores as if they were results (weights the loaders
            # refuse are one cause; a network that overflows on some input is another).
            raise CheckpointError(f"the model gave non-finite outputs (NaN or Inf) for "
                                  f"{int((~np.isfinite(out)).reshape(len(out), -1).any(1).sum())} of {len(out)} "
                                  f"tiles of a batch (tile {int(idx[0])} on); its weights are broken or it "
                                  "overflows; nothing of this batch was written")
        self.timer.tiles += len(idx)
        if bar is not None:
            bar.update(len(idx))
        return idx.numpy(), out


def checkpoint_stain(spec: Any) -> Any:
    """The ``StainNormalizer`` a checkpoint's spec carries (``spec.stain``), or None."""
    d = getattr(spec, "stain", None)
    if not d:
        return None

    return StainNormalizer.from_dict(d)


def resolve_stain(spec: Any, stain_norm: str | None, stain_ref: str | os.PathLike | None) -> tuple[Any, dict]:
    """The normaliser a run uses and what to record of it: ``(normaliser | False | None, info)``.

    Nothing asked: the checkpoint's (source "checkpoint"), if it has one. ``stain_norm="none"``
    turns a checkpoint's off (False: the Predictor then applies none). A choice that differs from
    the checkpoint's says so (``StainWarning``). ``info``: ``{"method", "source", "key"}`` (key: a
    digest of the reference, for configuration keys; None when nothing is applied).
    """
    import warnings

    ckpt = getattr(spec, "stain", None) or None
    if stain_norm is None and stain_ref is not None:
        raise ConfigError(f"stain_ref {str(stain_ref)!r} given without stain_norm (macenko or reinhard)")
    if stain_norm is None:
        norm, source = checkpoint_stain(spec), "checkpoint" if ckpt else None
    else:
        norm, source = normalizer_from_options(stain_norm, stain_ref), "option"
        if ckpt and (norm is None or norm.to_dict() != ckpt):
            what = "no stain normalisation" if norm is None else f"{norm.method} normalisation to {stain_ref}"
            warnings.warn(f"{what} instead of the checkpoint's {ckpt.get('method')} normalisation, "
                          "which the model was trained behind", StainWarning, stacklevel=3)
        if norm is None:
            norm, source = (False, "option") if ckpt else (None, None)
    info = {"method": norm.method if norm else None, "source": source,
            "key": config_digest(norm.to_dict())
            if norm else ("none" if norm is False else None)}
    return norm, info


def check_slide_stains(slide: Any, normaliser: Any) -> str | None:
    """``stain.normalize.stain_remark`` on an 8 µm/px overview of ``slide`` (its own tissue detection):
    the line (also a ``StainWarning``) when an H&E normaliser meets a slide without eosin, else None.
    Read only when a normaliser is applied."""
    if not normaliser:
        return None
    mpp = max(8.0, *slide.mpp)
    rgb = slide.read_whole(mpp, progress=False)
    return stain_remark(rgb, detect_tissue(rgb, mpp), normaliser, name=slide.name)


def _clean_worker_errors(batches: Any) -> Iterator:
    """Re-raise a slidekit error from a DataLoader worker as itself, with its one-line message
    (DataLoader re-raises it with the worker's whole traceback folded into the message)."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except SlidekitError as e:
            msg = str(e)
            if "Original Traceback" not in msg:
                raise
            last = [line for line in msg.strip().splitlines() if line.strip()][-1]
            prefix = f"{type(e).__module__}.{type(e).__name__}: "
            clean = type(e).__new__(type(e))
            Exception.__init__(clean, last[len(prefix):] if last.startswith(prefix) else last)
            clean.path = getattr(e, "path", None)
            raise clean from None
        yield item


# ---------------------------------------------------------------------------------------------
# The heatmap job


def load_model(model: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, Any, str]:
    """(network, spec, identity) for a built-in name or a checkpoint path."""
    if str(model) in BUILTINS:
        net, spec = builtin_model(str(model))
        return net, spec, f"builtin:{model}"

    p = Path(model)
    if not p.exists():
        raise CheckpointError(f"neither a built-in model ({', '.join(BUILTINS)}) nor an existing checkpoint file",
                              p)
    ckpt = load_checkpoint(model, map_location="cpu")
    ident = f"checkpoint:{file_identity(p)}"
    return ckpt.model, ckpt.spec, ident


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Batches of float temporaries freed by torch stay in glibc's heap otherwise, and the resident
    size of a long run creeps up with the number of batches rather than staying flat.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None  # glibc malloc_trim, False where there is none, None until looked up


# Every file or store heatmap_slide may write in its output folder (and so may replace on a rerun).
HEATMAP_OUTPUTS = ("heatmap.zarr", "heatmap.zarr.part", "overlay.png", "predictions.geojson", "tiles.geojson",
                   "heatmap.tif", "heatmap.ome.zarr", "bad_tiles.geojson", "summary.json")

# Skipped tiles whose reason is re-read for the damage record (each costs one region read).
MAX_BAD_TILE_REASONS = 10_000


def _bad_tile_coords(hm: Any) -> list[list[int]]:
    """Level-0 (x, y) of the tiles skipped as damaged (recorded in the heatmap store)."""
    skipped = hm.attrs.get("skipped_tiles", [])
    if not skipped:
        return []
    coords, _ = hm.tiles
    return [[int(x), int(y)] for x, y in coords[np.asarray(skipped, dtype=np.int64)]]


def bad_tile_records(slide: Any, coords: list[list[int]], w: float, h: float) -> list[dict]:
    """The damage record: one {"box": level-0 [x0, y0, x1, y1], "reason"} per skipped tile; the
    reason is what the tile check says when the tile's region is read again."""
    records = []
    for i, (x, y) in enumerate(coords):
        reason = f"damaged (reason not re-read: more than {MAX_BAD_TILE_REASONS:,} skipped tiles)"
        if i < MAX_BAD_TILE_REASONS:
            try:
                slide.read_region((x, y), 0, (max(1, round(w)), max(1, round(h))))
                reason = "damaged when read in the run (sound when read again)"
            except SlidekitError as e:
                reason = str(e).split(": ", 1)[-1]
            except Exception as e:  # noqa: BLE001 - a decoder error is the reason itself
                reason = f"{type(e).__name__}: {e}"
        records.append({"box": [int(x), int(y), int(round(x + w)), int(round(y + h))], "reason": reason})
    return records


@dataclass(frozen=True)
class HeatmapOutput:
    """What ``slidekit heatmap`` writes besides the heatmap store.

    Parameters
    ----------
    heatmap_mpp
        µm/px of the heatmap (None: one pixel per tile stride, or the segmentation's output stride).
    blend
        ``"gaussian"`` or ``"constant"`` blending of overlapping tiles.
    chunk
        Heatmap pixels per stored chunk side (the unit of resume).
    threshold, min_area_um2
        ``predictions.geojson``: regions above ``threshold`` of at least ``min_area_um2`` µm².
    tiles_geojson
        Also write ``tiles.geojson`` (one QuPath tile object per tile with its scores).
    tiff
        ``"rgb"`` or ``"values"``: also write ``heatmap.tif`` (a pyramidal TIFF).
    ome_zarr
        Also write ``heatmap.ome.zarr`` (NGFF 0.4).
    on_bad_tile
        ``"raise"`` (a damaged tile stops the slide) or ``"skip"`` (skipped, recorded in ``bad_tiles.geojson``).
    """

    heatmap_mpp: float | None = None
    blend: str = "gaussian"
    chunk: int = 256
    threshold: float = 0.5
    min_area_um2: float = 1000.0
    tiles_geojson: bool = False
    tiff: str | None = None
    ome_zarr: bool = False
    on_bad_tile: str = "raise"


@dataclass(frozen=True)
class HeatmapOptions(OptionGroups):
    """Every option of ``slidekit heatmap``, in groups; ``HeatmapOptions.of(workers=0, mpp=1.0)``
    sets single fields by their flat names (``OptionGroups``)."""

    tiles: TileOptions = TileOptions(min_tissue=0.1)
    reading: ReadOptions = ReadOptions()
    tissue: TissueOptions = TissueOptions()
    roi: RoiOptions = RoiOptions()
    output: HeatmapOutput = HeatmapOutput()
    run: RunOptions = RunOptions(batch_size=32, workers=2)
    stain: StainNormOptions = StainNormOptions()


class HeatmapJob(SlideJob):
    """The job behind ``slidekit heatmap``: predict a model over a slide's region and write
    ``heatmap.zarr``, ``overlay.png``, ``predictions.geojson`` (+ ``tiles.geojson``, ``heatmap.tif``,
    ``heatmap.ome.zarr``, ``bad_tiles.geojson``); the runner (``regions.job``) writes the summary.

    ``loaded`` is a ``load_model`` result; ``options`` a :class:`HeatmapOptions`.
    """

    name = "heatmap"
    outputs = tuple(n for n in HEATMAP_OUTPUTS if n != "summary.json")

    def __init__(self, loaded: tuple, options: HeatmapOptions) -> None:
        self.net, self.spec, self.ident = loaded
        spec, o = self.spec, options
        if spec.task not in ("classification", "segmentation"):
            raise CheckpointError(f"a {spec.task!r} model makes no heatmap (need classification or segmentation)")
        if o.output.on_bad_tile not in ("raise", "skip"):
            raise ConfigError(f"on_bad_tile must be 'raise' or 'skip', not {o.output.on_bad_tile!r}")
        size = int(o.tiles.size or spec.patch_size)
        overlap = o.tiles.overlap if o.tiles.overlap is not None else (size // 4 if spec.task == "segmentation" else 0)
        # the tile geometry resolved against the model's
        self.mpp, self.size, self.overlap = float(o.tiles.mpp or spec.mpp), size, int(overlap)
        self.min_tissue = o.tiles.min_tissue
        self.options, self.reading, self.output, self.run_opts = o, o.reading, o.output, o.run
        self.roi = Roi(o.roi.roi, o.roi.roi_class) if o.roi.roi is not None else None
        if self.roi is not None:
            self.roi.annotations()  # a bad ROI file is one line before the slide is opened
        self.region: Region = Tissue(o.tissue) if self.roi is None else Tissue(o.tissue) & self.roi
        self.qc = TileQc.of(o.roi.exclude_qc, o.roi.qc_max)  # the runner leaves out tiles over --qc-max
        self.stain, self.stain_info = resolve_stain(spec, o.stain.stain_norm, o.stain.stain_ref)
        out, reading = o.output, o.reading
        run_cfg = {"model": self.ident, "mpp": self.mpp, "size": self.size, "overlap": self.overlap,
                   "blend": out.blend, "heatmap_mpp": out.heatmap_mpp, "min_tissue": self.min_tissue,
                   "slide_mpp": reading.slide_mpp, "override_mpp": reading.override_mpp}
        if self.stain_info["key"] is not None:  # recorded only when normalising (or turned off): older keys hold
            run_cfg["stain"] = self.stain_info["key"]
        run_cfg.update(self.region.config())  # "roi", "tissue": recorded only when set, so older keys hold
        self.run_cfg = run_cfg
        out_cfg: dict[str, Any] = {"threshold": out.threshold, "min_area_um2": out.min_area_um2,
                                   "tiles_geojson": out.tiles_geojson}
        if out.tiff:  # recorded only when asked, so earlier runs keep their configuration key
            out_cfg["tiff"] = out.tiff
        if out.ome_zarr:
            out_cfg["ome_zarr"] = True
        self.out_cfg = out_cfg

    def config(self) -> dict:
        return {**self.run_cfg, **self.out_cfg}

    def figures(self, summary: dict) -> dict:
        return {"tiles": summary["tiles"], "regions": summary["regions"],
                "area_mm2": round(summary["region_area_mm2"], 6), "slide_seconds": summary["seconds"],
                "bad_tiles": len(summary.get("bad_tiles") or []), **qc_figures(summary)}

    def _reusable(self, hm_path: Path, run_key: str) -> Any:
        """The finished heatmap store of this prediction configuration, else None (removed)."""
        if not hm_path.exists():
            return None
        try:
            hm = Heatmap(hm_path)
            if hm.attrs.get("run_key") == run_key:
                return hm
        except Exception:  # noqa: BLE001 - an unreadable store is redone, never used
            pass
        shutil.rmtree(hm_path)  # from another configuration: it must not pass for this run's result
        return None

    def run(self, ctx: JobContext) -> dict:
        t0 = time.time()
        slide, out, spec = ctx.slide, ctx.out, self.spec
        o, p = self.output, self.run_opts
        slide.skip_bad_tiles = o.on_bad_tile == "skip"  # whole-slide overviews show damaged tiles grey, warned
        run_key = config_digest({**self.run_cfg, "slide_id": ctx.slide_id})
        hm_path, part = out / "heatmap.zarr", out / "heatmap.zarr.part"
        hm = self._reusable(hm_path, run_key)
        n_tiles = n_done_before = 0
        timer, t_loop = StageTimer(), 0.0
        decode, unchanged = None, 0
        remark = check_slide_stains(slide, self.stain)
        if hm is None:
            ctx.mask()
            release_memory()
            grid = ctx.grid(mpp=self.mpp, size=self.size, overlap=self.overlap, min_tissue=self.min_tissue)
            out.mkdir(parents=True, exist_ok=True)
            seg_mpp = self.mpp * spec.output_stride if spec.task == "segmentation" else None
            meta = {"run_key": run_key, "model": self.ident, "activation": getattr(spec, "activation", "none")}
            writer = HeatmapWriter(part, grid, spec.task, list(spec.classes), list(spec.colors or []),
                                   mpp=o.heatmap_mpp or seg_mpp, blend=o.blend, chunk=o.chunk, attrs=meta)
            todo = writer.todo()
            n_tiles, n_done_before = len(grid), len(grid) - len(todo)

            configure_threads(p.threads, p.workers)  # main process: the CPUs the workers leave
            predictor = Predictor(self.net, spec, device=p.device, batch_size=p.batch_size,
                                  workers=p.workers, progress=ctx.progress, on_bad_tile=o.on_bad_tile,
                                  stain=self.stain)
            predictor.timer = timer
            fsize = writer.footprint if spec.task == "segmentation" else None
            t_loop = time.perf_counter()
            for idx, y in predictor.predict(slide, grid, todo, output_size=fsize):
                with timer.stage("stitch"):
                    writer.add(idx, y)
                    release_memory()
            t_loop = time.perf_counter() - t_loop
            decode, unchanged = predictor.decode, predictor.stain_unchanged
            if len(predictor.bad_tiles):
                writer.skip(predictor.bad_tiles)
            with timer.stage("write"):
                writer.finish()
                if self.roi is not None:  # empty outside the ROI, also where edge tiles reach past it
                    clip_store_to_roi(part, self.roi.annotations(), slide.mpp)
                if hm_path.exists():
                    shutil.rmtree(hm_path)
                os.replace(part, hm_path)
            hm = Heatmap(hm_path)
        else:
            n_tiles = int(hm.attrs["grid"]["tiles"])
            n_done_before = n_tiles
        t_pred = time.time() - t0
        t_write = time.perf_counter()
        hm.overlay(slide, out / "overlay.png")
        if o.tiff:
            write_heatmap_tiff(hm, out / "heatmap.tif", mode=o.tiff)
        if o.ome_zarr:
            write_heatmap_ome_zarr(hm, out / "heatmap.ome.zarr")
        anns = hm.vectorize(threshold=o.threshold, min_area_um2=o.min_area_um2)
        # Clipped to the slide and the heatmap's extent (vectorize clips already; this is the rule).
        write_geojson(anns, out / "predictions.geojson", bounds=hm.bounds)
        w, h = self.size * self.mpp / slide.mpp[0], self.size * self.mpp / slide.mpp[1]
        if o.tiles_geojson:
            coords, values = hm.tiles
            from shapely.geometry import box

            # with --exclude-qc each tile also carries its artefact fractions ("QC Pen ink", ...)
            qc = (self.qc.fractions(slide, np.column_stack([coords, np.full((len(coords), 2), (w, h))])).tolist()
                  if isinstance(self.qc, TileQc) else [[]] * len(coords))
            names = [f"QC {n}" for n in ARTEFACTS]
            tiles = (Annotation(box(x, y, x + w, y + h), kind="tile",
                                measurements={**{c: float(v) for c, v in zip(hm.classes, vals)},
                                              **{n: round(float(f), 4) for n, f in zip(names, fr)}})
                     for (x, y), vals, fr in zip(coords.tolist(), values.tolist(), qc))
            write_geojson(tiles, out / "tiles.geojson", bounds=slide.dimensions)  # edge tiles reach past it
        bad_coords = _bad_tile_coords(hm)
        records = bad_tile_records(slide, bad_coords, w, h)
        if records:  # the damaged regions as QuPath tile objects, each named by its reason
            from shapely.geometry import box

            write_geojson((Annotation(box(*r["box"]), label="Damaged", kind="tile", name=r["reason"])
                           for r in records), out / "bad_tiles.geojson", bounds=slide.dimensions)
        elif (out / "bad_tiles.geojson").exists():
            (out / "bad_tiles.geojson").unlink()  # from an earlier run that skipped tiles
        timer.add("write", time.perf_counter() - t_write)
        return {"task": spec.task, "classes": list(spec.classes), "tiles": n_tiles,
                "tiles_resumed": n_done_before, "heatmap_shape": list(hm.shape), "heatmap_mpp": hm.mpp,
                "regions": len(anns), "region_area_mm2": sum(a.measurements["Area µm^2"] for a in anns) / 1e6,
                "seconds": round(time.time() - t0, 2), "predict_seconds": round(t_pred, 2),
                "slide_mpp": {"used": list(slide.mpp), "source": slide.mpp_source,
                              "metadata": None if slide.metadata_mpp is None else list(slide.metadata_mpp)},
                "bad_tiles": bad_coords,  # level-0 corners; bad_tile_records has boxes and reasons
                "bad_tile_records": records,
                # unchanged_tiles: tiles of this run left as read (too little stain to estimate)
                "stain": {"method": self.stain_info["method"], "source": self.stain_info["source"],
                          "unchanged_tiles": unchanged if self.stain else None, "remark": remark},
                "decode": decode,  # None when the heatmap was there already
                # Where the time went (this run's tiles; a resumed or reused heatmap has fewer).
                **timer.as_dict(t_loop)}


def heatmap_job(*, model: str | os.PathLike = "hematoxylin", loaded: tuple | None = None,
                options: HeatmapOptions | None = None, **flat: Any) -> HeatmapJob:
    """A :class:`HeatmapJob`, checked before any slide is opened or anything written.

    Parameters
    ----------
    model
        A checkpoint or a built-in model name.
    loaded
        A ``load_model`` result instead (one model shared across slides).
    options
        The job's :class:`HeatmapOptions` (None: the defaults).
    **flat
        Single option fields by their flat names, applied to ``options`` (``HeatmapOptions.of``).
    """
    opts = HeatmapOptions.of(options, **flat)
    resolve_device(opts.run.device)  # fail on a missing GPU before anything is written
    return HeatmapJob(loaded if loaded is not None else load_model(model or "hematoxylin"), opts)


def heatmap_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  model: str | os.PathLike = "hematoxylin", loaded: tuple | None = None,
                  options: HeatmapOptions | None = None, progress: bool = True, **flat: Any) -> dict:
    """Predict a model over the tissue of one slide and write, in ``out_dir``: ``heatmap.zarr``,
    ``overlay.png``, ``predictions.geojson`` (+ ``tiles.geojson``) and, last, ``summary.json``.

    Parameters
    ----------
    slide_path
        The slide file.
    out_dir
        The slide's output folder.
    model
        A checkpoint or a built-in model name.
    loaded
        A ``load_model`` result instead (one model shared across slides).
    options
        A :class:`HeatmapOptions`: tiles (``TileOptions``: ``mpp``, ``size``, ``overlap``,
        ``min_tissue``), slide reading (``ReadOptions``), ``tissue`` (``TissueOptions``), ``roi``
        (``RoiOptions``), outputs (:class:`HeatmapOutput`), running (``RunOptions``), stain
        normalisation (``StainNormOptions``; default the checkpoint's own).
    progress
        Show progress bars.
    **flat
        Any single field of those groups by its own name (``workers=0``, ``mpp=1.0``,
        ``threshold=0.3``, ``roi="roi.geojson"``): a shortcut for ``HeatmapOptions.of(...)``.

    A finished slide (a summary of the same configuration whose outputs all verify) is skipped; an
    output deleted, emptied or changed since is redone (``regions.job``); an interrupted run resumes
    from the chunks its ``heatmap.zarr.part`` store had finished.
    """
    job = heatmap_job(model=model, loaded=loaded, options=options, **flat)
    return run_job(job, slide_path, out_dir, progress=progress)

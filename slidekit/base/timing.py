"""Where a long job's time went: wall seconds per stage, tiles/s and (on CUDA) GPU utilisation.

``StageTimer`` adds up seconds for the stages of tile inference -- ``read`` (tile read + decode,
as the consumer waits for it), ``transfer`` (host<->device copies), ``model``, ``stitch``
(blending outputs into the heatmap) and ``write`` (output files) -- and renders the split as one
line (``read 12% · model 81% · stitch 5% · write 2%``). ``GPUSampler`` samples the GPU's
utilisation in a thread through nvidia-ml-py (``pynvml``) when it is installed; without it, or
on CPU, it records nothing and says why in ``gpu["note"]``.

Device work is asynchronous on CUDA: ``StageTimer(device)`` then times ``device_stage`` blocks
and ``marks`` with CUDA events recorded on the stream (no synchronisation per step) and reads
their elapsed times once they have completed (``resolve``; ``flush`` at the end of an epoch waits
for the last one). Host waits (``iterate``: the consumer waiting for a DataLoader) are host time.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

STAGES = ("read", "transfer", "model", "stitch", "write")


class StageTimer:
    """Wall seconds per stage (``STAGES``), tiles counted, and an optional GPU sampler's result.

    ``device``: where ``device_stage``/``mark`` spans run; a CUDA device times them with events.
    """

    def __init__(self, device: Any = None) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.tiles = 0
        self.gpu: dict | None = None
        self._t0 = time.perf_counter()
        self.cuda = device is not None and _device_type(device) == "cuda"
        self.device = device  # CUDA: events are recorded on this device's current stream (cuda:N)
        self._pending: list[tuple[str, Any, Any]] = []  # (stage, start event, end event) not yet read

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (one of ``STAGES``)."""
        if stage not in self.seconds:
            raise ValueError(f"unknown stage {stage!r}: use one of {STAGES}")
        self.seconds[stage] += max(0.0, float(seconds))

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time the ``with`` body into ``stage``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t)

    def iterate(self, iterable: Iterable, stage: str = "read") -> Iterator:
        """Yield from ``iterable``, adding the host's wait for each item to ``stage``."""
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.add(stage, time.perf_counter() - t)
            yield item

    def mark(self) -> Any:
        """A point in time: a CUDA event recorded on the current stream (no sync), else perf_counter."""
        if self.cuda:
            import torch

            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(torch.device(self.device)))
            return e
        return time.perf_counter()

    def add_span(self, stage: str, start: Any, end: Any) -> None:
        """Add the time from mark ``start`` to mark ``end`` to ``stage`` (CUDA: once both completed)."""
        if not self.cuda:
            self.add(stage, end - start)
            return
        if stage not in self.seconds:  # checked now, not when the events are read
            raise ValueError(f"unknown stage {stage!r}: use one of {STAGES}")
        self._pending.append((stage, start, end))
        if len(self._pending) > 64:  # read what has completed; never waits for the device
            self.resolve()

    @contextmanager
    def device_stage(self, stage: str) -> Iterator[None]:
        """Time the ``with`` body's device work into ``stage``: CUDA events on CUDA (read later,
        without a per-step sync), host time otherwise."""
        start = self.mark()
        try:
            yield
        finally:
            self.add_span(stage, start, self.mark())

    def resolve(self, wait: bool = False) -> None:
        """Add the spans whose end events have completed (``wait``: wait for all of them)."""
        if not self._pending:
            return
        if wait:
            self._pending[-1][2].synchronize()  # events complete in stream order
        keep = []
        for stage, start, end in self._pending:
            if wait or end.query():
                self.add(stage, start.elapsed_time(end) / 1000)
            else:
                keep.append((stage, start, end))
        self._pending = keep

    def flush(self) -> None:
        """Wait for the device spans still pending and add them (once, at the end of a run or epoch)."""
        self.resolve(wait=True)

    def split(self) -> str:
        """The stages' shares of their total, e.g. ``read 12% · model 81% · write 7%`` (stages
        under 0.5 % left out; empty when nothing was timed)."""
        total = sum(self.seconds.values())
        if total <= 0:
            return ""
        parts = [f"{k} {100 * v / total:.0f}%" for k, v in self.seconds.items() if v / total >= 0.005]
        return " · ".join(parts)

    def as_dict(self, wall: float | None = None) -> dict[str, Any]:
        """``{"stages": {stage: s}, "tiles_per_s": tiles / wall, "gpu": ...}`` for summaries
        (``wall``: the seconds the tiles took; default: since the timer was made)."""
        wall = time.perf_counter() - self._t0 if wall is None else wall
        out: dict[str, Any] = {"stages": {k: round(v, 3) for k, v in self.seconds.items()},
                               "tiles_per_s": round(self.tiles / wall, 2) if wall > 0 and self.tiles else None}
        if self.gpu is not None:
            out["gpu"] = self.gpu
        return out


def _device_type(device: Any) -> str:
    if isinstance(device, str):
        return device.split(":", 1)[0]
    return getattr(device, "type", str(device))


def format_split(timing: dict | None) -> str:
    """The one-line split of a summary's timing (``as_dict`` form), with tiles/s and GPU use."""
    if not timing or not timing.get("stages"):
        return ""
    t = StageTimer()
    t.seconds.update(timing["stages"])
    line = t.split()
    if timing.get("tiles_per_s"):
        line += f" · {timing['tiles_per_s']:.0f} tiles/s"
    gpu = timing.get("gpu") or {}
    if gpu.get("mean_util") is not None:
        line += f" · GPU {gpu['mean_util']:.0f}% busy"
    return line


class GPUSampler:
    """Samples the utilisation of CUDA device ``index`` every ``interval`` s in a thread.

    Use as a context manager; ``result()`` gives ``{"mean_util", "max_util", "samples"}`` (%), or
    ``{"note": why not}`` when the device is not CUDA or nvidia-ml-py is missing or fails.
    """

    def __init__(self, device: Any, interval: float = 0.2) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None

    def _handle(self) -> Any:
        import torch

        dev = torch.device(self.device)
        if dev.type != "cuda":
            self.note = "not on CUDA"
            return None
        try:
            import pynvml  # nvidia-ml-py, extra [gpu]
        except ImportError:
            self.note = "nvidia-ml-py not installed (pip install slidekit[gpu])"
            return None
        try:
            pynvml.nvmlInit()
            self._nvml = pynvml
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            # NVML counts every GPU; CUDA_VISIBLE_DEVICES renumbers them: match by PCI bus id.
            props = torch.cuda.get_device_properties(index)
            # older torch builds lack the PCI fields (and their stubs do not declare them)
            pci = [getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
            if None not in pci:
                bus = f"{pci[0]:08X}:{pci[1]:02X}:{pci[2]:02X}.0"
                return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # no driver, no permission ...
            self.note = f"NVML unavailable ({type(e).__name__}: {e})"
            return None

    def _run(self, handle: Any) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except Exception as e:
                self.note = f"NVML sampling failed ({type(e).__name__}: {e})"
                return

    def __enter__(self) -> "GPUSampler":
        handle = self._handle()
        if handle is not None:
            self._thread = threading.Thread(target=self._run, args=(handle,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {"note": self.note or "no samples (run shorter than the sampling interval)"}
        return {"mean_util": round(sum(self.samples) / len(self.samples), 1), "max_util": max(self.samples),
                "samples": len(self.samples)}

"""GPU throughput of tile inference: ResNet-50 at 224 px on a synthetic slide.

    python benchmarks/gpu_heatmap.py [--size 40000] [--device cuda] [--batch-size 128]
        [--workers 8] [--max-tiles N] [--json OUT]

Prints and writes: model-only patches/s (random uint8 batches already on the device),
end-to-end patches/s (Predictor: tile read + decode in DataLoader workers, host->device copy,
model), their ratio, the stage split (read / transfer / model), GPU utilisation (nvidia-ml-py)
and the decode path a CUDA run would take (``slidekit.gpu_decode``). Runs on CPU too (use tiny
settings there, e.g. ``--size 2048 --max-tiles 32 --batch-size 8``).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_slide(path: Path, size: int) -> Path:
    """A size² JPEG pyramid (224 px stored tiles) from the scikit-image IHC image, tiled."""
    from skimage import data

    from slidekit.demo import write_pyramid

    ihc = data.immunohistochemistry()
    reps = -(-size // ihc.shape[0])
    row = np.tile(ihc, (1, reps, 1))[:, :size]
    rgb = np.concatenate([row] * reps, axis=0)[:size]  # 40k² RGB is 4.8 GB: fine on a GPU box
    return write_pyramid(path, np.ascontiguousarray(rgb), 0.5, tile=224, quality=85)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tiles", type=int, default=None, help="read only the first N tiles")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torchvision

    import slidekit as sk
    from slidekit.builtin_models import BuiltinSpec
    from slidekit.gpu_decode import decode_path
    from slidekit.models import resolve_device
    from slidekit.resources import available_cpus, configure_threads
    from slidekit.timing import GPUSampler, StageTimer, format_split

    device = resolve_device(args.device)
    configure_threads(args.threads, args.workers)
    net = torchvision.models.resnet50(weights=None, num_classes=2)
    spec = BuiltinSpec(name="resnet50", classes=["a", "b"], colors=[(0, 0, 0), (255, 0, 0)],
                       patch_size=224, mpp=0.5, activation="softmax")
    tmp = tempfile.TemporaryDirectory()
    t = time.perf_counter()
    path = build_slide(Path(tmp.name) / "bench.tif", args.size)
    build_s = time.perf_counter() - t
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=224, min_tissue=0)
    if args.max_tiles:
        grid = grid.subset(np.arange(min(len(grid), args.max_tiles)))
    pred = sk.Predictor(net, spec, device=device, batch_size=args.batch_size, workers=args.workers)
    reader = sk.TileReader(slide, grid)

    # Model only: uint8 batches already on the device, as many tiles as the end-to-end run.
    x = torch.randint(0, 255, (args.batch_size, 224, 224, 3), dtype=torch.uint8, device=device)
    pred.forward(x)  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n_batches = max(1, len(grid) // args.batch_size)
    t = time.perf_counter()
    for _ in range(n_batches):
        pred.forward(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    model_rate = n_batches * args.batch_size / (time.perf_counter() - t)

    pred.timer = StageTimer()  # the end-to-end run only
    t = time.perf_counter()
    with GPUSampler(device) as gpu:
        n = sum(len(idx) for idx, _ in pred.predict(slide, grid))
    wall = time.perf_counter() - t
    timing = pred.timer.as_dict(wall)
    timing["gpu"] = gpu.result()
    results = {
        "slide": f"synthetic {args.size}^2 JPEG q85, 224 px stored tiles", "slide_build_s": round(build_s, 1),
        "device": str(device), "cpus": available_cpus(), "workers": args.workers, "batch_size": args.batch_size,
        "tiles": n, "model_only_patches_per_s": round(model_rate, 1),
        "end_to_end_patches_per_s": round(n / wall, 1), "ratio_end_to_end_to_model": round(n / wall / model_rate, 3),
        "stages": timing["stages"], "split": format_split(timing), "gpu": timing["gpu"],
        "decode_path": list(decode_path(reader, device if device.type == "cuda" else torch.device("cuda"))),
        "amp": pred.amp, "channels_last": pred.channels_last, "load_avg_1min": os.getloadavg()[0],
    }
    for k, v in results.items():
        print(f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

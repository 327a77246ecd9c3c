"""GPU throughput of tile inference: ResNet-50 at 224 px on a synthetic slide.

    python benchmarks/gpu_heatmap.py [--size 40000] [--device cuda] [--batch-size 128]
        [--workers 8] [--max-tiles N] [--json OUT]

Prints and writes: model-only patches/s (random uint8 batches already on the device),
end-to-end patches/s (Predictor: tile read + decode in DataLoader workers, host->device copy,
model), their ratio, the stage split (read / transfer / model), GPU utilisation (nvidia-ml-py)
and the decode path the run took with the reason (``Predictor.decode``; on CUDA the workers hand
JPEG streams to the GPU, ``slidekit.infer.gpu_decode``). On CUDA a second end-to-end run decodes on the
CPU (``gpu_decode=False``) for comparison (``--no-cpu-decode`` skips it). Runs on CPU too (use
tiny settings there, e.g. ``--size 2048 --max-tiles 32 --batch-size 8``).
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

    from slidekit.slides.demo import write_pyramid

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
    ap.add_argument("--slide", type=Path, default=None,
                    help="reuse a slide build_slide wrote (gpu_check builds the 40k² slide once for both models)")
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "vit_b"],
                    help="random-weight network: torchvision ResNet-50 or timm ViT-B/16")
    ap.add_argument("--no-cpu-decode", action="store_true", help="on CUDA, skip the CPU-decode comparison run")
    args = ap.parse_args()

    import torchvision

    import slidekit as sk
    from slidekit.base.devices import resolve_device
    from slidekit.base.resources import available_cpus, configure_threads
    from slidekit.base.timing import GPUSampler, StageTimer, format_split
    from slidekit.infer.gpu_decode import decode_path
    from slidekit.models.builtin import BuiltinSpec

    device = resolve_device(args.device)
    configure_threads(args.threads, args.workers)
    if args.model == "vit_b":
        import timm

        net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=2)
    else:
        net = torchvision.models.resnet50(weights=None, num_classes=2)
    spec = BuiltinSpec(name=args.model, classes=["a", "b"], colors=[(0, 0, 0), (255, 0, 0)],
                       patch_size=224, mpp=0.5, activation="softmax")
    tmp = tempfile.TemporaryDirectory()
    t = time.perf_counter()
    path = args.slide if args.slide else build_slide(Path(tmp.name) / "bench.tif", args.size)
    build_s = time.perf_counter() - t if not args.slide else None
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

    def end_to_end(gpu_decode: bool) -> tuple[int, float, dict, dict]:
        pred.gpu_decode = gpu_decode
        pred.timer = StageTimer()  # the end-to-end run only
        t = time.perf_counter()
        with GPUSampler(device) as gpu:
            n = sum(len(idx) for idx, _ in pred.predict(slide, grid))
        wall = time.perf_counter() - t
        timing = pred.timer.as_dict(wall)
        timing["gpu"] = gpu.result()
        return n, wall, timing, dict(pred.decode)

    n, wall, timing, decode = end_to_end(True)
    cpu_decode = None
    if device.type == "cuda" and not args.no_cpu_decode:
        n2, wall2, timing2, decode2 = end_to_end(False)
        cpu_decode = {"end_to_end_patches_per_s": round(n2 / wall2, 1), "stages": timing2["stages"],
                      "split": format_split(timing2), "gpu": timing2["gpu"], "decode": decode2}
    results = {
        "slide": (f"{args.slide} (--slide; built with --size {args.size})" if args.slide
                  else f"synthetic {args.size}^2 JPEG q85, 224 px stored tiles"),
        "slide_build_s": None if build_s is None else round(build_s, 1),
        "device": str(device), "cpus": available_cpus(), "workers": args.workers, "batch_size": args.batch_size,
        "tiles": n, "model_only_patches_per_s": round(model_rate, 1),
        "end_to_end_patches_per_s": round(n / wall, 1), "ratio_end_to_end_to_model": round(n / wall / model_rate, 3),
        "stages": timing["stages"], "split": format_split(timing), "gpu": timing["gpu"],
        "decode": decode,  # the path this run took, and why
        "decode_path_on_cuda": list(decode_path(reader, device if device.type == "cuda" else torch.device("cuda"))),
        "cpu_decode_run": cpu_decode,
        "model": args.model,
        "peak_gpu_memory_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                if device.type == "cuda" else None),
        "amp": pred.amp, "channels_last": pred.channels_last, "load_avg_1min": os.getloadavg()[0],
    }
    for k, v in results.items():
        print(f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

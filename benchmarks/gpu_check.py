"""The GPU check in one command: ResNet-50 and ViT-B (random weights) over a synthetic slide on
the GPU decode path and the CPU decode path, plus nvJPEG's verdict on the damage-check streams.

    python benchmarks/gpu_check.py --json OUT [--size 40000] [--max-tiles 20000]

The synthetic slide is built once (``slide_build_s``); each model runs ``benchmarks/gpu_heatmap.py``
(the Predictor loop behind ``slidekit heatmap``) on it in its own process: patches/s model-only and end to end,
the stage split, GPU utilisation, the decode path taken and why, the CPU-decode comparison run and peak GPU
memory. ``nvjpeg`` decodes,
for seeded damaged and sound stored tiles, each stream and the two variants of
``tiffio.jpeg_scan_variants`` on the GPU and says whether the GPU check agrees with the CPU's
strict decode, and what the check costs there: nvJPEG milliseconds per tile for the streams alone
and with their variants (the GPU path decodes three streams per stored tile to check it; the CPU
paths decode once, strictly). Without CUDA it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def nvjpeg_verdict(path: Path, n: int = 200, seed: int = 0) -> dict:
    """How the GPU damage check (nvJPEG decodes of each stream and its two variants) judges
    ``n`` seeded damaged tiles and ``n`` sound ones, against the CPU's strict decode."""
    import torch
    from tiling import damage  # benchmarks/tiling.py: the same seeded damages
    from torchvision.io import decode_jpeg

    from slidekit.slides.tiffio import StoredTiles, jpeg_scan_variants, strict_decode

    st = StoredTiles(path, ("page", 0))
    rng = np.random.default_rng(seed)
    out = {"sound_refused": 0, "damaged": n, "damaged_caught_gpu": 0, "damaged_caught_cpu_strict": 0,
           "gpu_decoder_errors": 0}

    def gpu_problem(stream: bytes) -> bool:
        problem, variants = jpeg_scan_variants(stream)
        if problem:
            return True
        if not variants:
            return False
        try:
            imgs = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in [stream, *variants]],
                               device="cuda")
        except RuntimeError:
            out["gpu_decoder_errors"] += 1
            return True
        ref, changed, longer = imgs
        return bool(torch.equal(changed, ref) or not torch.equal(longer, ref))

    sample = rng.integers(0, len(st.offsets), n)
    streams = [st.stream(int(i)) for i in sample]
    with_variants = [b for s in streams for b in [s, *(jpeg_scan_variants(s)[1] or [])]]
    for name, batch in (("stream_only", streams), ("with_variants", with_variants)):
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]
        decode_jpeg(tensors[:8], device="cuda")  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        decode_jpeg(tensors, device="cuda")
        torch.cuda.synchronize()
        out[f"nvjpeg_ms_per_tile_{name}"] = round((time.perf_counter() - t) * 1000 / n, 3)

    for index in sample:
        good = st.stream(int(index))
        out["sound_refused"] += gpu_problem(good)
        bad = st.stream(int(index), damage(st.raw(int(index)), rng))
        out["damaged_caught_gpu"] += gpu_problem(bad)
        out["damaged_caught_cpu_strict"] += strict_decode(bad, st.tile_w, st.tile_h)[1] is not None
    st.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--max-tiles", type=int, default=20000, help="tiles per run (keeps the check under 8 min)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return
    sys.path.insert(0, str(HERE))
    t0 = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(0), "size": args.size, "max_tiles": args.max_tiles,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    from gpu_heatmap import build_slide

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        slide = build_slide(Path(tmp) / "bench.tif", args.size)
        results["slide_build_s"] = round(time.perf_counter() - t, 1)
        for model in ("resnet50", "vit_b"):
            out = Path(tmp) / f"{model}.json"
            cmd = [sys.executable, str(HERE / "gpu_heatmap.py"), "--device", "cuda", "--model", model,
                   "--slide", str(slide), "--size", str(args.size), "--max-tiles", str(args.max_tiles), "--batch-size",
                   str(args.batch_size), "--workers", str(args.workers), "--json", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            results[model] = (json.loads(out.read_text()) if proc.returncode == 0 and out.exists()
                              else {"error": proc.stderr.strip().splitlines()[-1:]})
        small = build_slide(Path(tmp) / "verdict.tif", 4480)
        results["nvjpeg"] = nvjpeg_verdict(small)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

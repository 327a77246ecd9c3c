"""Tiles per second of the encoders a cohort `embed` runs, on this machine's CPUs: the figures behind
the foundation-encoder rows of docs/cohorts.md's sizing (section "Sizing a cohort").

    python benchmarks/encoders_cpu.py [--json OUT] [--threads 2] [--batch 4] [--only resnet50,uni]

Each encoder is timm's architecture with random weights (the speed of a forward pass does not depend
on the weights' values; no weights are downloaded or read), in eval mode under ``torch.inference_mode``,
float32, on 224 px tiles: one warm-up batch, then ``--repeat`` timed batches; the best batch counts.

- ``resnet50``: the ResNet-50 class of the sizing's assumption A2 (2048-d pooled features);
- ``uni``: UNI's ViT-L/16 at 224 px (``vit_large_patch16_224``, 1024-d, 304 M parameters);
- ``vit_g``: a ViT-g/14 at 224 px (``vit_giant_patch14_dinov2`` with ``img_size=224``, 1536-d,
  1.1 B parameters: the size of Prov-GigaPath's tile encoder; UNI2-h's ViT-H/14 sits between).

The machine's load (1-min average, before and after) is recorded: on a shared machine the figures are
lower bounds of what the CPUs give alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import timm
import torch

ENCODERS = {
    "resnet50": dict(name="resnet50", kw={"num_classes": 0}),
    "uni": dict(name="vit_large_patch16_224", kw={"num_classes": 0, "init_values": 1e-5, "dynamic_img_size": True}),
    "vit_g": dict(name="vit_giant_patch14_dinov2", kw={"num_classes": 0, "img_size": 224}),
}


def measure(key: str, batch: int, repeat: int) -> dict:
    spec = ENCODERS[key]
    net = timm.create_model(spec["name"], pretrained=False, **spec["kw"]).eval()
    params = sum(p.numel() for p in net.parameters())
    x = torch.rand(batch, 3, 224, 224)
    times = []
    with torch.inference_mode():
        width = net(x[:1]).shape[-1]  # warm-up (and the feature width)
        for _ in range(repeat):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    best = min(times)
    return {"timm_name": spec["name"], "parameters_m": round(params / 1e6, 1), "feature_dim": int(width),
            "batch": batch, "seconds_per_batch": [round(t, 3) for t in times],
            "tiles_per_s": round(batch / best, 3), "seconds_per_tile": round(best / batch, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default=",".join(ENCODERS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    res = {}
    for key in a.only.split(","):
        res[key] = measure(key, a.batch, a.repeat)
        print(f"{key:9s} {res[key]['parameters_m']:7.1f} M params  {res[key]['tiles_per_s']:7.2f} tiles/s "
              f"({res[key]['seconds_per_tile']:.3f} s per tile)", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpus": len(os.sched_getaffinity(0)), "torch_threads": a.threads, "torch": torch.__version__,
           "timm": timm.__version__, "load_1min_before": round(load0, 2),
           "load_1min_after": round(os.getloadavg()[0], 2), "encoders": res}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

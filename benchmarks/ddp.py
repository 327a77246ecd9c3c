"""SimCLR on 1 and 2 CPU ranks (torch.distributed, gloo): equivalence and throughput.

    python benchmarks/ddp.py --tiles DIR --json OUT.json [--pairs 32] [--crop 64] [--steps 8]

``DIR`` holds a zip of tiles and ``labels.csv`` (``path_in_zip,split,label``), like
``../shared/data/patches_tcga_luadlusc_uni`` (labels unused: SimCLR is unsupervised).

1. Equivalence: the same ResNet-18 + projection head (global batch norm) and the same augmented
   views; one process computes NT-Xent on the whole batch of ``--pairs`` pairs, 2 ranks each
   take half the pairs (``nt_xent_distributed``: negatives gathered from both ranks, DDP).
   Writes ``loss_max_abs_diff`` and ``grad_max_abs_diff`` (2 ranks vs one process, float32 as
   trained) and the same in float64 (``*_float64``: what remains there is arithmetic, not rounding).
2. Throughput: training steps (augmentation, forward, NT-Xent, backward, LARS) at a global batch
   of ``--pairs`` pairs, one thread per rank: ``images_per_s_1`` (1 rank) and ``images_per_s_2``
   (2 ranks; each rank's share of the global batch), counting 2 views per pair.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_tiles(tiles: Path, n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) uint8: the first ``n`` tiles of the archive, resized."""
    from PIL import Image

    labels, zips = tiles / "labels.csv", sorted(tiles.glob("*.zip"))
    if not labels.exists() or not zips:
        sys.exit(f"ddp: {tiles} needs labels.csv and a .zip of tiles")
    with open(labels, newline="") as f:
        names = [row["path_in_zip"] if "path_in_zip" in row else next(iter(row.values())) for row in csv.DictReader(f)]
    out = []
    with zipfile.ZipFile(zips[0]) as zf:
        for name in names[:n]:
            img = Image.open(io.BytesIO(zf.read(name))).convert("RGB").resize((size, size))
            out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    if len(out) < n:
        sys.exit(f"ddp: {tiles} holds {len(out)} tiles, {n} needed")
    return torch.stack(out)


def build(crop: int):
    from slidekit.models.networks import ResNetClassifier
    from trainers.simclr import SimCLRConfig, _Net, make_optimizer
    from trainers.simclr_core import HistologyAugment, ProjectionHead

    torch.manual_seed(0)
    model = ResNetClassifier("resnet18", 0)
    head = ProjectionHead(model.encoder.out_features, None, 128)
    cfg = SimCLRConfig(crop_size=crop, tile_size=crop, batch_size=2)
    return _Net(model, head), HistologyAugment(cfg.augment()), cfg, make_optimizer


def views(tiles: torch.Tensor, crop: int) -> torch.Tensor:
    """(2, n, 3, crop, crop) float views, augmented once with a fixed seed (shared by both runs)."""
    _, augment, _, _ = build(crop)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    v = [torch.stack([augment.geometric(t) for t in tiles]) for _ in range(2)]
    return torch.stack([augment.photometric(x.float().div(255), generator=g) for x in v])


def grads_and_loss(net, v1: torch.Tensor, v2: torch.Tensor) -> tuple[float, dict]:
    from slidekit.base import distributed as dist
    from trainers.simclr_core import nt_xent_distributed

    z = net(torch.cat([v1, v2]))
    loss = nt_xent_distributed(z[: len(v1)], z[len(v1):], 0.1)
    loss.backward()
    mean = dist.all_reduce_mean({"loss": float(loss.detach())})["loss"]
    return mean, {k: p.grad.detach().clone() for k, p in dist.unwrap(net).named_parameters() if p.grad is not None}


def timed_steps(net, opt, augment, tiles: torch.Tensor, pairs: int, steps: int) -> float:
    """Seconds for ``steps`` training steps on this rank's share of ``pairs`` pairs (after 1 warm-up)."""
    from slidekit.base import distributed as dist
    from trainers.simclr_core import nt_xent_distributed

    n = pairs // dist.world_size()
    r = dist.rank()
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            dist.barrier()
            start = time.perf_counter()
        idx = (torch.arange(n) + r * n + step * pairs) % len(tiles)
        v = [torch.stack([augment.geometric(tiles[i]) for i in idx]) for _ in range(2)]
        x = augment.photometric(torch.cat(v).float().div_(255))
        z = net(x)
        loss = nt_xent_distributed(z[:n], z[n:], 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, world: int, port: int, work: str, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from slidekit.base import distributed as dist

    if world > 1:
        dist.init_from_env(torch.device("cpu"))
    data = torch.load(Path(work) / "inputs.pt")
    pairs, crop = args["pairs"], args["crop"]
    n = pairs // world
    net, augment, cfg, make_optimizer = build(crop)
    dnet = dist.wrap(net, torch.device("cpu"), sync_batchnorm=True)
    v = data["views"]
    loss, grads = grads_and_loss(dnet, v[0][rank * n:(rank + 1) * n], v[1][rank * n:(rank + 1) * n])
    dnet.zero_grad(set_to_none=True)
    # the same in float64: what is left of the difference there is arithmetic, not rounding
    net64 = dist.wrap(build(crop)[0].double(), torch.device("cpu"), sync_batchnorm=True)
    loss64, grads64 = grads_and_loss(net64, v[0][rank * n:(rank + 1) * n].double(),
                                     v[1][rank * n:(rank + 1) * n].double())
    del net64
    cfg.batch_size = pairs
    opt = make_optimizer(torch.nn.ModuleList([net.model, net.head]), cfg)
    seconds = timed_steps(dnet, opt, augment, data["tiles"], pairs, args["steps"])
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "loss64": loss64, "grads64": grads64, "seconds": seconds},
                   Path(work) / f"world{world}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=32, help="global batch (pairs per step)")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    if a.pairs % 2:
        sys.exit("ddp: --pairs must be even (split over 2 ranks)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    tiles = load_tiles(a.tiles, min(4 * a.pairs, 128), 2 * a.crop)
    args = {"pairs": a.pairs, "crop": a.crop, "steps": a.steps}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as work:
        torch.save({"tiles": tiles, "views": views(tiles[: a.pairs], a.crop)}, Path(work) / "inputs.pt")
        rank_main(0, 1, 0, work, args)
        mp.spawn(rank_main, args=(2, free_port(), work, args), nprocs=2, join=True)
        one, two = torch.load(Path(work) / "world1.pt"), torch.load(Path(work) / "world2.pt")
    images = 2 * a.pairs * a.steps
    result = {
        "loss_1": one["loss"], "loss_2": two["loss"],
        "loss_max_abs_diff": abs(one["loss"] - two["loss"]),
        "grad_max_abs_diff": max(float((one["grads"][k] - two["grads"][k]).abs().max()) for k in one["grads"]),
        "grad_max_abs": max(float(g.abs().max()) for g in one["grads"].values()),
        "loss_max_abs_diff_float64": abs(one["loss64"] - two["loss64"]),
        "grad_max_abs_diff_float64": max(float((one["grads64"][k] - two["grads64"][k]).abs().max())
                                         for k in one["grads64"]),
        "images_per_s_1": images / one["seconds"], "images_per_s_2": images / two["seconds"],
        "pairs_global": a.pairs, "crop": a.crop, "steps": a.steps, "threads_per_rank": 1,
        "backbone": "resnet18", "cpus_visible": os.cpu_count(), "torch": torch.__version__,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

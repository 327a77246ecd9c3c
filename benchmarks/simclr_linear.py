"""SimCLR vs random initialisation, judged by linear evaluation on real TCGA LUAD/LUSC tiles.

    python benchmarks/simclr_linear.py [--tiles DIR] [--data DIR] --init {random,simclr} --seed 0 --json OUT.json

``DIR`` holds a zip of tiles and ``labels.csv`` (``path_in_zip,split,label``), like
``../shared/data/patches_tcga_luadlusc_uni``. With ``--init simclr`` the encoder (ResNet-18) is
pre-trained with ``slidekit train simclr``'s trainer on the *train* tiles without their labels,
plus unlabelled patches of other real data beside ``DIR`` when present (tissue tiles of the
H&E slides in ``wsi/``, capped per slide, and the MoNuSeg images): diversity is Ciga et al.'s
point. ``--init random`` skips pre-training. Both then run the same linear evaluation: frozen
pooled features of the train split -> standardised L2 logistic regression -> accuracy and
macro-F1 on the test split. Prints and writes ``{"init", "seed", "accuracy", "macro_f1",
"pretrain_seconds", ...}``.

Scale: everything is sized to finish in about 10 minutes on a 2-core CPU (``--budget`` caps the
pre-training wall time; the LR schedule follows the clock). Tiles are treated as 0.5 µm/px
(20x; the UNI archive does not say) and seen whole at ``--tile-size`` px.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.seeds import add_baseline_argument, add_seeds_argument, run_with_baseline  # noqa: E402
from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason  # noqa: E402

TILE_MPP = 0.5  # assumed pixel size of the archive's 256 px tiles


def load_split(tiles: Path) -> tuple[Path, list[dict]]:
    """The archive and the rows of labels.csv."""
    labels = tiles / "labels.csv"
    zips = sorted(tiles.glob("*.zip"))
    if not labels.exists() or not zips:
        sys.exit(f"simclr_linear: {tiles} needs labels.csv and a .zip of tiles")
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    return zips[0], rows


def read_tiles(zpath: Path, names: list[str]) -> list[np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(zpath) as zf:
        return [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]


def extra_sources(shared: Path, tile_mpp: float) -> list[dict]:
    """Unlabelled real H&E beside the tiles: slide tissue tiles (capped) and MoNuSeg images."""
    out: list[dict] = []
    wsi = shared / "wsi"
    slides = [{"slides": [str(wsi / "CMU-1-Small-Region.svs")], "cap": 64}]
    # No MPP in its metadata; nuclei sizes say about 1 µm/px (a downsampled TCGA frozen section).
    slides.append({"slides": [str(wsi / "TCGA-CR-7395-01A-01-TS1.svs")], "slide_mpp": 1.0, "cap": 64})
    for s in slides:
        if Path(s["slides"][0]).exists():
            out.append({**s, "name": Path(s["slides"][0]).stem, "weight": 0.5})
    monuseg = shared / "nuclei_monuseg" / "images"
    if monuseg.is_dir():
        out.append({"folder": str(monuseg), "image_mpp": 0.25, "name": "monuseg", "weight": 0.25})
    return out


def recalibrate_bn(model, sources: list[dict], mpp: float, tile_size: int, crop_size: int, seed: int,
                   batches: int = 20, batch_size: int = 128) -> None:
    """Re-estimate BatchNorm running statistics on augmented pre-training patches, no gradients.

    Separates what pre-training gains from data-fitted normalisation alone from what it gains
    from the contrastive objective.
    """
    import torch

    from trainers.simclr_core import AugmentConfig, HistologyAugment
    from trainers.simclr_data import PatchPool, build_sources

    aug = HistologyAugment(AugmentConfig(size=crop_size))
    pool = PatchPool(build_sources(sources, mpp, tile_size, None, seed), transform=aug.geometric)
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            idx = rng.integers(len(pool), size=batch_size)
            model.features(aug.photometric(torch.stack([pool[int(i)] for i in idx]).float() / 255))
    model.eval()


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=Path, default=None,
                    help="tile folder (default: patches_tcga_luadlusc_uni in the real-data folder)")
    add_data_argument(ap)
    ap.add_argument("--init", required=True, choices=["random", "simclr"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=480.0, help="pre-training wall-time cap (s)")
    ap.add_argument("--steps", type=int, default=1200, help="pre-training steps (upper bound)")
    ap.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    ap.add_argument("--tile-size", type=int, default=96, help="tiles are seen whole at this size (px)")
    ap.add_argument("--crop-size", type=int, default=48, help="encoder input during pre-training (px)")
    ap.add_argument("--eval-size", type=int, default=None, help="encoder input for evaluation [tile size]")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--no-extra", action="store_true", help="pre-train on the train tiles only")
    ap.add_argument("--work", type=Path, default=None, help="keep the pre-training run here (resumable)")
    ap.add_argument("--recalibrate-bn", action="store_true",
                    help="control for --init random: re-estimate BatchNorm statistics on the pre-training "
                         "patches (no gradient steps) before evaluating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    add_seeds_argument(ap)
    add_baseline_argument(ap, "--init", ["random", "simclr"], "accuracy")
    args = ap.parse_args(argv)
    summary = run_with_baseline(ap, args, main, argv, "--init", ["accuracy", "macro_f1"], seed_dirs=("--work",))
    if summary is not None:
        return summary
    # the extra unlabelled sources come from the real-data folder: --data, else the parent of an
    # explicit --tiles, else $SLIDEKIT_DATA / ../shared/data
    shared = args.tiles.resolve().parent if args.tiles is not None and args.data is None else data_dir(args.data)
    if args.tiles is None:
        reason = data_missing_reason(args.data)
        if reason is not None:
            ap.error(reason)
        args.tiles = data_dir(args.data) / "patches_tcga_luadlusc_uni"

    import torch

    torch.set_num_threads(args.threads)
    from slidekit.models.checkpoint import load_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.slidelevel.linear_eval import linear_eval
    from trainers.base import seed_everything
    from trainers.simclr import SimCLRConfig, SimCLRTrainer

    zpath, rows = load_split(args.tiles)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    train_x = read_tiles(zpath, [r["path_in_zip"] for r in train])
    test_x = read_tiles(zpath, [r["path_in_zip"] for r in test])
    side = train_x[0].shape[0]
    mpp = TILE_MPP * side / args.tile_size  # a whole tile is one patch of tile_size px
    eval_size = args.eval_size or args.tile_size
    extra_info: dict = {}
    pretrain_seconds = 0.0
    sources = [{"zip": str(zpath), "members": [r["path_in_zip"] for r in train], "image_mpp": TILE_MPP,
                "name": "train tiles (labels unused)", "weight": 1.0}]
    if not args.no_extra:
        sources += extra_sources(shared, TILE_MPP)
    if args.init == "simclr":
        cfg = SimCLRConfig(sources=sources, mpp=mpp, tile_size=args.tile_size, crop_size=args.crop_size,
                           cap=None, epochs=1, steps_per_epoch=args.steps, batch_size=args.batch_size,
                           optimizer="adam", lr=1e-3, lr_scaling="none", weight_decay=1e-6,
                           warmup_epochs=0, time_budget_s=args.budget, temperature=0.1,
                           jitter="heavy", min_crop=0.15, seed=args.seed, num_workers=0)
        scratch = None if args.work else tempfile.TemporaryDirectory(prefix="simclr_linear_")
        work = args.work or Path(scratch.name)
        t0 = time.perf_counter()
        ckpt_path = SimCLRTrainer(cfg).fit(work, device=args.device, progress=sys.stderr.isatty())
        pretrain_seconds = time.perf_counter() - t0
        ckpt = load_checkpoint(ckpt_path)
        model = ckpt.model
        metrics = json.loads((Path(work) / "metrics.json").read_text())
        extra_info = {"pretrain_steps": int(sum(m.get("steps", 0) for m in metrics)),
                      "final_loss": metrics[-1]["loss"] if metrics else None,
                      "sources": ckpt.spec.extra.get("simclr", {}).get("sources")}
        if scratch is not None:
            scratch.cleanup()
    else:
        seed_everything(args.seed)
        model = ResNetClassifier("resnet18", 0)
        if args.recalibrate_bn:
            recalibrate_bn(model, sources, mpp, args.tile_size, args.crop_size, args.seed)
            extra_info = {"recalibrated_bn": True}
    t1 = time.perf_counter()
    res = linear_eval(model, train_x, [r["label"] for r in train], test_x, [r["label"] for r in test],
                      size=eval_size, C=args.C, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = {"init": args.init, "seed": args.seed, "accuracy": round(res["accuracy"], 4),
           "macro_f1": round(res["macro_f1"], 4), "pretrain_seconds": round(pretrain_seconds, 1),
           "eval_seconds": round(time.perf_counter() - t1, 1), "n_train": res["n_train"], "n_test": res["n_test"],
           "tile_size": args.tile_size, "crop_size": args.crop_size, "eval_size": eval_size, "C": args.C,
           "load_avg_1min": round(os.getloadavg()[0], 2), **extra_info}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

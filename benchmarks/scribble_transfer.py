"""Scribble pre-training transfers: a nuclei segmenter's encoder, judged on real LUAD/LUSC tiles.

    python benchmarks/scribble_transfer.py [--data DIR] --seeds 0 1 2 --json OUT.json
    python benchmarks/scribble_transfer.py --protocol paper [--quick] [--seeds ...] --json OUT.json

``--protocol frozen`` (the default) is the frozen-probe protocol below; ``--protocol paper`` is the
papers' protocol (whole-network fine-tuning with R % of the labels, 10 seeds, class-label and
SimCLR arms), in ``benchmarks/scribble_transfer_paper.py``.

The claim of the scribble pre-training papers: spatial labels on one image set make an encoder
that classifies another set better than none, and about as well as full masks. Per seed:

1. ``scribble``: the ``scribble`` trainer (partial cross-entropy, ResNet-18 U-Net, random init)
   on all 15 MoNuSeg images with scribbles generated from their instance masks at ``--fraction``
   (as ``benchmarks/nuclei_scribbles.py`` does);
2. ``full``: the same trainer, same steps and seed, on the whole masks of the same images;
3. ``random``: no pre-training (and ``random_bn``: the random encoder with its BatchNorm
   statistics re-estimated on MoNuSeg crops, no gradient step, which separates what fitted
   normalisation alone gives from what the labels give).

Each encoder is copied into a ResNet-18 patch classifier (``transfer_encoder``) and linearly
evaluated on the real TCGA LUAD/LUSC tiles (``patches_tcga_luadlusc_uni``: 130 train, 60 test):
frozen pooled features -> standardised L2 logistic regression -> accuracy and macro-F1 on test
(``slidekit.slidelevel.linear_eval``). ``--fine-tune-epochs N`` also fine-tunes each encoder end
to end (off by default: CPU time). The classification tiles are never seen in pre-training.

Both image sets are seen at ``--mpp`` (default 1 µm/px: MoNuSeg's 0.25 µm/px images at a quarter,
the tiles' assumed 0.5 µm/px at half, 128 px). Writes per seed ``accuracy_<init>``,
``macro_f1_<init>``, and with ``--seeds`` (benchmarks/seeds.py) their ``_per_seed``/``_mean``/``_sd``,
``diff_*`` = scribble - random accuracy and ``diff_vs_full_*`` = scribble - full accuracy
(``diff_full_vs_random_*``: full - random). Sized for a 2-core CPU: about 300 CPU s per seed
(measured under load), so about 15 min for 3 seeds on an idle machine. Figures: docs/trainers/scribble.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.seeds import add_seeds_argument, run_seeds  # noqa: E402
from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason  # noqa: E402
from slidekit.base.io import write_text_atomic  # noqa: E402
from slidekit.base.resources import available_cpus  # noqa: E402

INITS = ("random", "random_bn", "scribble", "full")
MONUSEG_MPP = 0.25
TILE_MPP = 0.5  # assumed pixel size of the LUAD/LUSC archive's 256 px tiles (as benchmarks/simclr_linear.py)
PAIRS = {"vs_full": ("accuracy_scribble", "accuracy_full"), "full_vs_random": ("accuracy_full", "accuracy_random")}


def per_seed_metrics(inits: tuple[str, ...] = INITS, fine_tune: bool = False) -> list[str]:
    """The keys the multi-seed summary reports, the paired one (scribble accuracy) first."""
    order = ["scribble", *[i for i in inits if i != "scribble"]]
    keys = [f"accuracy_{i}" for i in order] + [f"macro_f1_{i}" for i in order]
    if fine_tune:
        keys += [f"ft_accuracy_{i}" for i in order]
    return keys


def pretrain(method: str, monuseg: Path, names: list[str], args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    """Train the scribble segmenter on scribbles (``scribble``) or whole masks (``full``); its checkpoint."""
    import trainers
    from benchmarks.nuclei_scribbles import write_training_folder

    scale = MONUSEG_MPP / args.mpp
    folder = work / f"data_{method}"
    write_training_folder(monuseg, names, "full" if method == "full" else "pce", args.fraction, args.seed,
                          scale, folder)
    per_image = max(1, math.ceil(args.steps_per_epoch * args.batch_size / len(names)))
    options = dict(data=str(folder), labels="labels", classes=["background", "nucleus"], seed=args.seed,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone=args.backbone,
                   crop=args.crop, scale=1.0, image_mpp=args.mpp, samples_per_image=per_image)
    cls = trainers.get("scribble")
    t0 = time.perf_counter()
    ckpt = cls(trainers.make_config(cls.Config, options)).fit(work / f"run_{method}", device="cpu",
                                                               progress=not args.quiet)
    return Path(ckpt), time.perf_counter() - t0


def recalibrate_bn(model, crops, batch_size: int = 32) -> None:
    """Re-estimate every BatchNorm's running statistics on ``crops`` (normalised NCHW), no gradients."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # the plain average over all batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            model.features(crops[i:i + batch_size])
    model.eval()


def monuseg_crops(monuseg: Path, names: list[str], mpp: float, size: int, n: int, seed: int):
    """``n`` random ``size`` px crops of the MoNuSeg images at ``mpp``, normalised like the encoders' input."""
    import torch

    from slidekit.data.datasets import load_image_folder
    from slidekit.models.spec import ModelSpec

    _, imgs, _ = load_image_folder(monuseg, masks=None, names=names, scale=MONUSEG_MPP / mpp)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = imgs[int(rng.integers(len(imgs)))]
        y, x = (int(rng.integers(s - size + 1)) for s in im.shape[:2])
        out.append(im[y:y + size, x:x + size])
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255
    spec = ModelSpec(arch="resnet-classifier", classes=["a", "b"])
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def _protocol(argv: list[str]) -> str:
    """The value of ``--protocol`` in ``argv`` (``frozen`` when absent)."""
    for i, a in enumerate(argv):
        if a.startswith("--protocol="):
            return a.split("=", 1)[1]
        if a == "--protocol" and i + 1 < len(argv):
            return argv[i + 1]
    return "frozen"


def main(argv: list[str] | None = None) -> dict:
    args_in = sys.argv[1:] if argv is None else list(argv)
    if _protocol(args_in) == "paper":
        from benchmarks.scribble_transfer_paper import main as paper_main

        return paper_main(args_in)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=["frozen", "paper"], default="frozen",
                    help="frozen: frozen encoder + logistic probe (this file); paper: the papers' fine-tuning protocol")
    add_data_argument(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fraction", type=float, default=0.3, help="share of nuclei scribbled (scribble pre-training)")
    ap.add_argument("--mpp", type=float, default=1.0, help="µm/px both image sets are seen at")
    ap.add_argument("--crop", type=int, default=96, help="pre-training crop (px)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--fine-tune-epochs", type=int, default=0,
                    help="also fine-tune each encoder end to end for this many epochs (0: linear evaluation only)")
    ap.add_argument("--bn-crops", type=int, default=256, help="MoNuSeg crops for the random_bn control")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep the pre-training runs here (reruns resume)")
    ap.add_argument("--quiet", action="store_true")
    add_seeds_argument(ap)
    args = ap.parse_args(argv)
    if args.seeds:
        return run_seeds(main, argv, args.seeds, per_seed_metrics(fine_tune=args.fine_tune_epochs > 0),
                         pair=("accuracy_scribble", "accuracy_random"), pairs=PAIRS, json_out=args.json,
                         seed_dirs=("--work",))
    reason = data_missing_reason(args.data)
    if reason is not None:
        ap.error(reason)
    shared = data_dir(args.data)
    monuseg, tiles = shared / "nuclei_monuseg", shared / "patches_tcga_luadlusc_uni"
    for need in (monuseg / "images", tiles / "labels.csv"):
        if not need.exists():
            ap.error(f"scribble_transfer: {need} not found (the real-data folder needs nuclei_monuseg/ and "
                     "patches_tcga_luadlusc_uni/)")

    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.simclr_linear import load_split, read_tiles
    from slidekit.data.datasets import list_images
    from slidekit.models.checkpoint import transfer_encoder
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec
    from slidekit.slidelevel.linear_eval import fine_tune, linear_eval
    from trainers.base import seed_everything

    zpath, rows = load_split(tiles)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    train_x = read_tiles(zpath, [r["path_in_zip"] for r in train])
    test_x = read_tiles(zpath, [r["path_in_zip"] for r in test])
    train_y, test_y = [r["label"] for r in train], [r["label"] for r in test]
    eval_size = round(train_x[0].shape[0] * TILE_MPP / args.mpp)
    norm = ModelSpec(arch="resnet-classifier", classes=["a", "b"])  # the trainers' input normalisation
    names = list_images(monuseg / "images")

    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="scribble_transfer_")
    work = args.work or Path(scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"seed": args.seed}
    models = {}
    for init in INITS:
        seed_everything(args.seed)
        clf = ResNetClassifier(args.backbone, 0)
        if init == "random_bn":
            recalibrate_bn(clf, monuseg_crops(monuseg, names, args.mpp, args.crop, args.bn_crops, args.seed))
        elif init in ("scribble", "full"):
            ckpt, seconds = pretrain(init, monuseg, names, args, work)
            transfer_encoder(ckpt, clf)
            out[f"pretrain_seconds_{init}"] = round(seconds, 1)
        models[init] = clf
    if scratch is not None:
        scratch.cleanup()
    t0 = time.perf_counter()
    for init, clf in models.items():
        res = linear_eval(clf, train_x, train_y, test_x, test_y, size=eval_size, C=args.C,
                          mean=norm.mean, std=norm.std)
        out[f"accuracy_{init}"] = round(res["accuracy"], 4)
        out[f"macro_f1_{init}"] = round(res["macro_f1"], 4)
        if args.fine_tune_epochs > 0:
            ft = fine_tune(clf, train_x, train_y, test_x, test_y, size=eval_size, epochs=args.fine_tune_epochs,
                           lr=1e-4, seed=args.seed, mean=norm.mean, std=norm.std)
            out[f"ft_accuracy_{init}"] = round(ft["accuracy"], 4)
            out[f"ft_macro_f1_{init}"] = round(ft["macro_f1"], 4)
    out.update({"eval_seconds": round(time.perf_counter() - t0, 1), "n_train": len(train), "n_test": len(test),
                "n_pretrain_images": len(names), "eval_size": eval_size,
                "pretrain_steps": args.epochs * args.steps_per_epoch, "load_avg_1min": round(os.getloadavg()[0], 2),
                "cpus": available_cpus(),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                           if k not in ("json", "work", "seeds")}})
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    return out


if __name__ == "__main__":
    main()

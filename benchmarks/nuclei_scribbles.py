"""Scribble-supervised nuclei segmentation on MoNuSeg-style folders (the S2L paper's Table 2).

    python benchmarks/nuclei_scribbles.py [--data DIR] [--eval-data DIR] --method {full,pce,s2l} \\
        --fraction 0.3 --seed 0 --json OUT.json

Trains on every image in ``--data`` (``images/*.png`` + ``masks_instance/*.png``; default: ``nuclei_monuseg``
in the real-data folder, ``$SLIDEKIT_DATA`` or ``../shared/data``), generating the
scribbles itself from the instance masks at ``--fraction`` (``slidekit.annotations.scribbles``); ``full``
trains on the whole masks. Evaluates on ``--eval-data`` (same layout), or, without it, on a fixed
seeded third of ``--data`` (training then uses the other two thirds). Prints and writes
``{"method", "fraction", "seed", "iou", "mdice", "pixel_dice", "object_dice", "train_seconds", ...}``:
``mdice`` is the S2L paper's mDice, the object-level Dice (``object_dice`` is the same value under
its plain name); ``pixel_dice`` is the foreground Dice, averaged over images like ``iou``.
``--validate`` trains on part of the training images and scores on the rest (a fixed seeded third
of them), never on the held-out test images: the mode for choosing settings.

CPU budget (2 cores, no GPU, no ImageNet weights): images are halved (0.25 -> 0.5 µm/px), a
ResNet18 U-Net (random init) trains on random 128-px crops, batch 8, ``--steps-per-epoch`` 20 x
``--epochs`` 24 (480 steps), AdamW 1e-3 with a cosine decay. S2L: warm-up 10 epochs, EMA of
whole-image predictions every epoch from epoch 6, α 0.2, τ 0.8, λ 0.5. ``train_cpu_seconds`` is
the process CPU time: the wall time on an otherwise idle machine at ``--threads 1``. Predictions are upsampled back
to full resolution for scoring.
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
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.seeds import add_baseline_argument, add_seeds_argument, run_with_baseline  # noqa: E402
from slidekit.annotations.scribbles import IGNORE, foreground_iou, generate_scribbles, segmentation_scores  # noqa: E402
from slidekit.base.datapaths import data_dir, data_missing_reason  # noqa: E402
from slidekit.base.io import write_text_atomic  # noqa: E402
from slidekit.data.datasets import list_images, load_image_folder  # noqa: E402
from slidekit.models.checkpoint import load_checkpoint  # noqa: E402

SPLIT_SEED = 20240613  # the default train/eval split never changes with --seed
METHODS = {"full": "scribble", "pce": "scribble", "s2l": "s2l"}


def default_split(names: list[str]) -> tuple[list[str], list[str]]:
    """A fixed, seeded split: one third (at least one image) held out for evaluation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    n_eval = max(1, len(names) // 3)
    held = sorted(names[i] for i in order[:n_eval])
    return [n for n in names if n not in held], held


def write_training_folder(data: Path, names: list[str], method: str, fraction: float, seed: int,
                          scale: float, out: Path) -> dict:
    """Scaled images + label PNGs (full masks or generated scribbles) for the trainer."""
    from PIL import Image

    _, imgs, insts = load_image_folder(data, masks="masks_instance", names=names, scale=scale,
                                       mask_kind="instances")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    labelled = []
    for i, (name, img, inst) in enumerate(zip(names, imgs, insts)):
        if method == "full":
            lab = (inst > 0).astype(np.uint8)
        else:
            lab = generate_scribbles(inst, fraction, seed=seed * 100003 + i)
        labelled.append(float((lab != IGNORE).mean()))
        Image.fromarray(img).save(out / "images" / f"{name}.png")
        Image.fromarray(lab).save(out / "labels" / f"{name}.png")
    return {"labelled_pixel_fraction": float(np.mean(labelled))}


def pixel_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground Dice of one image, 2·IoU / (1 + IoU) (1.0 when both are empty, like the IoU)."""
    iou = foreground_iou(pred, gt)
    return 2 * iou / (1 + iou)


def scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    """``segmentation_scores`` (iou, mdice = object Dice) plus ``pixel_dice``, ``object_dice`` and
    the per-image IoU, all means over images."""
    out = segmentation_scores(preds, gts)
    out["pixel_dice"] = float(np.mean([pixel_dice(p, g) for p, g in zip(preds, gts)]))
    out["object_dice"] = out["mdice"]
    out["iou_per_image"] = [round(foreground_iou(p, g), 4) for p, g in zip(preds, gts)]
    return out


def s2l_log(run_dir: Path) -> dict:
    """The S2L run's pseudo-label figures: consistent share when L_up starts and at the end."""
    path = run_dir / "metrics.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    ema = [r["ema_consistent"] for r in rows if r.get("ema_consistent") is not None]
    pseudo = [r["pseudo_fraction"] for r in rows if r.get("pseudo_fraction") is not None]
    return {"ema_consistent_first": ema[0] if ema else None, "ema_consistent_last": ema[-1] if ema else None,
            "pseudo_fraction_last": pseudo[-1] if pseudo else None}


def evaluate(ckpt_path: Path, data: Path, names: list[str], scale: float) -> dict:
    """Mean foreground IoU, pixel Dice and object Dice at the masks' full resolution."""
    from trainers.scribble import predict_images

    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model.to(memory_format=torch.channels_last)
    _, imgs, _ = load_image_folder(data, masks=None, names=names, scale=scale)
    _, _, gts = load_image_folder(data, masks="masks_instance", names=names, scale=1.0, mask_kind="instances")
    preds = []
    for img, gt in zip(imgs, gts):
        probs = predict_images(model, ckpt.spec, [torch.from_numpy(img).permute(2, 0, 1).contiguous()])[0]
        probs = F.interpolate(probs[None], size=gt.shape, mode="bilinear", align_corners=False)[0]
        preds.append((probs.argmax(0) == 1).numpy())
    return scores(preds, gts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="a MoNuSeg-style folder, or the real-data folder holding nuclei_monuseg/ "
                         "(default: $SLIDEKIT_DATA, else ../shared/data)")
    ap.add_argument("--eval-data", type=Path, default=None)
    ap.add_argument("--method", required=True, choices=sorted(METHODS))
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--scale", type=float, default=0.5, help="resize factor for training and inference")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--steps-per-epoch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--warmup-epochs", type=int, default=10)
    ap.add_argument("--ema-every", type=int, default=1)
    ap.add_argument("--ema-start", type=int, default=6)
    ap.add_argument("--ema-alpha", type=float, default=0.2, help="S2L: α of the prediction average")
    ap.add_argument("--threshold", type=float, default=0.8, help="S2L: τ, the consistency threshold")
    ap.add_argument("--lambda-up", type=float, default=0.5, help="S2L: λ, weight of the pseudo-label loss")
    ap.add_argument("--validate", action="store_true",
                    help="train on two thirds of the training images, score on the other third (the "
                         "held-out test images are not used): for choosing settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the training folder and run here")
    ap.add_argument("--quiet", action="store_true")
    add_seeds_argument(ap)
    add_baseline_argument(ap, "--method", METHODS, "iou")
    args = ap.parse_args(argv)
    summary = run_with_baseline(ap, args, main, argv, "--method", ["iou", "mdice", "pixel_dice", "object_dice"],
                                seed_dirs=("--workdir",))
    if summary is not None:
        return summary
    if args.data is None or not (args.data / "images").is_dir():
        reason = data_missing_reason(args.data)
        if reason is not None:
            ap.error(reason)
        args.data = data_dir(args.data) / "nuclei_monuseg"
        if not (args.data / "images").is_dir():
            ap.error(f"no MoNuSeg-style folder (images/, masks_instance/) at {args.data}")
    torch.set_num_threads(args.threads)

    import trainers

    names = list_images(args.data / "images")
    if args.eval_data is None:
        train_names, eval_names = default_split(names)
        eval_dir = args.data
    else:
        train_names, eval_names, eval_dir = names, list_images(args.eval_data / "images"), args.eval_data
    if args.validate:  # settings are chosen on part of the training images, never on the test ones
        train_names, eval_names = default_split(train_names)
        eval_dir = args.data

    with tempfile.TemporaryDirectory(prefix="nuclei_scribbles_") as tmp:
        work = args.workdir or Path(tmp)
        folder = work / f"data_{args.method}_{args.fraction}_{args.seed}"
        label_stats = write_training_folder(args.data, train_names, args.method, args.fraction, args.seed,
                                            args.scale, folder)
        cls = trainers.get(METHODS[args.method])
        per_image = max(1, math.ceil(args.steps_per_epoch * args.batch_size / len(train_names)))
        options = dict(data=str(folder), labels="labels", classes=["background", "nucleus"], seed=args.seed,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone=args.backbone,
                       crop=args.crop, scale=1.0, image_mpp=0.25 / args.scale, samples_per_image=per_image)
        if args.method == "s2l":
            options.update(warmup_epochs=args.warmup_epochs, ema_every=args.ema_every, ema_start=args.ema_start,
                           ema_alpha=args.ema_alpha, threshold=args.threshold, lambda_up=args.lambda_up)
        trainer = cls(trainers.make_config(cls.Config, options))
        run_dir = work / f"run_{args.method}_{args.fraction}_{args.seed}"
        t0, c0 = time.perf_counter(), time.process_time()
        ckpt = trainer.fit(run_dir, device=args.device, progress=not args.quiet)
        train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        found = evaluate(ckpt, eval_dir, eval_names, args.scale)
        log = s2l_log(run_dir) if args.method == "s2l" else {}

    result = {"method": args.method, "fraction": args.fraction, "seed": args.seed, "iou": found["iou"],
              "mdice": found["mdice"], "pixel_dice": found["pixel_dice"], "object_dice": found["object_dice"],
              "iou_per_image": found["iou_per_image"], "eval_images": eval_names,
              "evaluated_on": "validation" if args.validate else "test", **log,
              "train_seconds": round(train_seconds, 1),
              "train_cpu_seconds": round(train_cpu, 1), "load_average": list(os.getloadavg()),
              "n_train": len(train_names), "n_eval": len(eval_names), **label_stats,
              "config": {k: v for k, v in vars(args).items() if k not in ("data", "eval_data", "json", "workdir")
                         } | {"data": str(args.data), "eval_data": str(args.eval_data) if args.eval_data else None}}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    return result


if __name__ == "__main__":
    main()

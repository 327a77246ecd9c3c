"""Stain robustness and stain-normalisation speed (issue 11).

    python benchmarks/stain.py [--data DIR] --json OUT [--quick]

``DIR`` is a MoNuSeg-style folder (``images/*.png`` + ``masks_instance/*.png``) or the real-data
folder holding ``nuclei_monuseg/`` (default: ``$SLIDEKIT_DATA``, else ``../shared/data``; the run
is skipped with one line when that default is absent).

(a) Speed: images/s of Macenko and Reinhard normalisation on CPU of a batch of ``--tiles`` tiles
    of ``--tile`` px (crops of the test images), at ``--bench-threads`` torch threads: slidekit's
    batched ``StainNormalizer`` vs torchstain's per-image normalisers (the reference implementation).
(b) Robustness: the nuclei scribble benchmark (``benchmarks/nuclei_scribbles.py``: its fixed split,
    scribbles and scoring, reused by import) trains the ``scribble`` trainer on the training split
    several times, as ``none`` (no stain option), ``norm`` (``stain_norm: macenko`` to a training
    image, carried by the checkpoint so test inputs are normalised too) and ``aug_*``
    (``stain_aug: hed`` / ``randstainna``). Each model is scored (foreground IoU) on the held-out
    images as they are and on stain-shifted copies: ``slidekit.stain.augment.hed_shift`` with fixed,
    seeded per-image perturbations (another lab's staining) at two strengths. ``iou_shifted_*`` is
    the mean over the strengths. ``shift_loss_halved``: the better of norm/aug recovers at least half
    of ``iou_original - iou_shifted_none``.

The trainings run as ``--jobs`` parallel processes of ``--threads`` torch threads each.
``--quick`` is a smoke run (few steps, 3 images) whose figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nuclei_scribbles import default_split, evaluate, write_training_folder  # noqa: E402
from benchmarks.seeds import add_seeds_argument, run_seeds  # noqa: E402
from slidekit.base.datapaths import data_dir, data_missing_reason  # noqa: E402
from slidekit.base.io import write_text_atomic  # noqa: E402
from slidekit.data.datasets import list_images, load_image_folder  # noqa: E402

SHIFT_SEED = 20261130  # the shifted test copies never change between runs
TILE_SEED = 7


# ------------------------------------------------------------------------------------ test shifts

def shift_params(n: int, strength: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image HED ``alpha`` (scale) and ``beta`` (offset, OD units), shape (n, 3): another lab.

    The lab's direction is fixed: paler haematoxylin (alpha < 1, beta < 0) and more eosin
    (alpha > 1, beta > 0), a common difference between labs' H&E; DAB untouched (an offset there
    only tints the glass yellow or green). Each image's magnitude is seeded, ``strength/2 ..
    strength`` per channel and parameter; the same ``seed`` gives the same draws at every strength,
    so the strong shift is the mild one, larger. (Random signs per image were tried first: the
    unprotected model lost only 0.02 IoU at strength 0.5; see docs/stain.md.)
    """
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.5, 1.0, size=(2, n, 3)) * strength * np.array([-1.0, 1.0, 0.0])
    return torch.tensor(1.0 + d[0], dtype=torch.float32), torch.tensor(d[1], dtype=torch.float32)


def write_shifted_folder(data: Path, names: list[str], strength: float, seed: int, out: Path) -> dict:
    """``out/images/NAME.png``: the full-resolution image HED-shifted; ``out/masks_instance``: links
    to the original masks (scored as in the nuclei benchmark). Returns the shift parameters and the
    mean absolute RGB change."""
    from PIL import Image

    from slidekit.stain.augment import hed_shift

    _, imgs, _ = load_image_folder(data, masks=None, names=names, scale=1.0)
    alpha, beta = shift_params(len(names), strength, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks_instance").mkdir(parents=True, exist_ok=True)
    deltas = []
    for i, (name, img) in enumerate(zip(names, imgs)):
        shifted = hed_shift(torch.from_numpy(np.array(img))[None], alpha[i:i + 1], beta[i:i + 1])[0]
        shifted = shifted.numpy()
        deltas.append(float(np.abs(shifted.astype(np.int16) - img.astype(np.int16)).mean()))
        Image.fromarray(shifted).save(out / "images" / f"{name}.png")
        src = next((data / "masks_instance").glob(f"{name}.*"))
        link = out / "masks_instance" / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
    return {"strength": strength, "alpha": alpha.tolist(), "beta": beta.tolist(),
            "mean_abs_rgb_change": float(np.mean(deltas))}


# ----------------------------------------------------------------------------------------- speed

def sample_tiles(data: Path, names: list[str], n: int, size: int) -> torch.Tensor:
    """``n`` seeded ``size``-px crops of the full-resolution images, (n, size, size, 3) uint8."""
    _, imgs, _ = load_image_folder(data, masks=None, names=names, scale=1.0)
    rng = np.random.default_rng(TILE_SEED)
    tiles = []
    for k in range(n):
        img = imgs[k % len(imgs)]
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        tiles.append(img[y:y + size, x:x + size])
    return torch.from_numpy(np.ascontiguousarray(np.stack(tiles)))


def _rate(fn, n_images: int, reps: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return n_images * reps / (time.perf_counter() - t0)


def time_normalizers(tiles: torch.Tensor, ref: np.ndarray, threads: int, reps: int) -> dict:
    """Images/s of slidekit's batched normalisers and of torchstain's per-image ones."""
    from slidekit.stain.normalize import StainNormalizer

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict = {"threads": threads, "tiles": int(tiles.shape[0]), "tile_px": int(tiles.shape[1]), "reps": reps}
        for method in ("macenko", "reinhard"):
            norm = StainNormalizer.fit(ref, method=method)
            out[f"slidekit_{method}_images_per_s"] = round(_rate(lambda norm=norm: norm(tiles), len(tiles), reps), 1)
            out[f"slidekit_{method}_unchanged_tiles"] = int(norm.unchanged_tiles)
        out.update(_time_torchstain(tiles, ref, reps))
    finally:
        torch.set_num_threads(old)
    return out


def _time_torchstain(tiles: torch.Tensor, ref: np.ndarray, reps: int) -> dict:
    try:
        import torchstain
    except ImportError:
        return {"torchstain": "not installed (dev extra)"}
    chw = [t.permute(2, 0, 1).contiguous() for t in tiles]
    ref_chw = torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1).contiguous()
    from importlib.metadata import version  # torchstain.__version__ lags its releases

    out: dict = {"torchstain_version": version("torchstain")}
    mac = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    mac.fit(ref_chw)
    rei = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    rei.fit(ref_chw)
    for name, fn in (("macenko", lambda t: mac.normalize(I=t, stains=False)), ("reinhard", rei.normalize)):
        def run_all(fn=fn) -> None:
            for t in chw:
                fn(t)
        try:
            out[f"torchstain_{name}_images_per_s"] = round(_rate(run_all, len(chw), reps), 1)
        except Exception as e:  # torchstain fails on tiles it cannot estimate; say so instead of a rate
            out[f"torchstain_{name}_images_per_s"] = None
            out[f"torchstain_{name}_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


# ------------------------------------------------------------------------------------ robustness

def train_and_score(variant: str, options: dict, run_dir: str, threads: int, eval_sets: dict[str, str],
                    eval_names: list[str], scale: float) -> dict:
    """One training (in a worker process) and its IoU on each evaluation folder."""
    import warnings

    torch.set_num_threads(threads)
    import trainers

    cls = trainers.get("scribble")
    trainer = cls(trainers.make_config(cls.Config, options))
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = trainer.fit(Path(run_dir), device="cpu", progress=False)
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    scores = {name: evaluate(ckpt, Path(folder), eval_names, scale) for name, folder in eval_sets.items()}
    from slidekit.models.checkpoint import load_checkpoint

    stain = load_checkpoint(ckpt).spec.stain
    return {"variant": variant, "iou": {k: v["iou"] for k, v in scores.items()},
            "mdice": {k: v["mdice"] for k, v in scores.items()},
            "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
            "checkpoint_stain": stain["method"] if stain else None,
            "warnings": sorted({f"{type(w.message).__name__}: {w.message}"[:200] for w in caught})}


def resolve_data(ap: argparse.ArgumentParser, explicit: Path | None) -> Path | None:
    """The MoNuSeg-style folder, or None (with the reason printed) when the default data is absent."""
    if explicit is not None and (explicit / "images").is_dir():
        return explicit
    reason = data_missing_reason(explicit)
    if reason is not None:
        if explicit is not None:
            ap.error(reason)
        print(f"benchmarks/stain.py: skipped: {reason}", file=sys.stderr)
        return None
    folder = data_dir(explicit) / "nuclei_monuseg"
    if not (folder / "images").is_dir():
        ap.error(f"no MoNuSeg-style folder (images/, masks_instance/) at {explicit or folder}")
    return folder


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="a MoNuSeg-style folder, or the real-data folder holding nuclei_monuseg/")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 images, few steps, small speed test")
    ap.add_argument("--method", choices=("pce", "full"), default="pce",
                    help="pce: scribbles at --fraction (the nuclei benchmark); full: whole masks")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--strengths", default="0.5,0.7", help="the two HED shift strengths of the test copies")
    ap.add_argument("--aug", default="hed,randstainna", help="augmentations trained (comma-separated)")
    ap.add_argument("--aug-strength", type=float, default=0.2,
                    help="stain_aug_strength of the HED jitter (0.2: Tellez et al.'s HED-strong); RandStainNA has none")
    ap.add_argument("--norm-method", default="macenko", choices=("macenko", "reinhard"))
    ap.add_argument("--ref", default=None, help="the reference image's name (default: the first training image)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings run in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--bench-threads", type=int, default=1)
    ap.add_argument("--bench-reps", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the folders and runs here")
    add_seeds_argument(ap)
    args = ap.parse_args(argv)
    data = resolve_data(ap, args.data)
    if data is None:
        return None
    if args.seeds:  # stain normalisation vs no stain option on the shifted test copies, paired by seed
        return run_seeds(main, argv, args.seeds, ["iou_original", "iou_shifted_none", "iou_shifted_norm",
                                                  "iou_shifted_aug", "iou_recovered"],
                         pair=("iou_shifted_norm", "iou_shifted_none"), json_out=args.json,
                         seed_dirs=("--workdir",))
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    augs = [a.strip() for a in args.aug.split(",") if a.strip()]
    names = list_images(data / "images")
    train_names, eval_names = default_split(names)
    if args.quick:  # 2 training images, 1 test image, 2 epochs of 2 steps, a small speed test
        train_names, eval_names = train_names[:2], eval_names[:1]
        args.epochs, args.steps_per_epoch, args.batch_size = 2, 2, 2
        args.tiles, args.tile, args.bench_reps = 4, 128, 1
        augs = augs[:1]
    ref_name = args.ref or train_names[0]
    if ref_name not in train_names:
        ap.error(f"--ref {ref_name!r} is not a training image ({', '.join(train_names)})")
    t_start = time.perf_counter()
    load0 = list(os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="stain_bench_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        # the reference as the network sees it (the training folder's scale)
        _, (ref_img,), _ = load_image_folder(data, masks=None, names=[ref_name], scale=args.scale)
        ref_path = work / f"reference_{ref_name}.png"
        Image.fromarray(ref_img).save(ref_path)
        _, (ref_full,), _ = load_image_folder(data, masks=None, names=[ref_name], scale=1.0)
        ref_full = np.array(ref_full)  # writable (torch warns on read-only arrays)

        # (a) speed, before the trainings so they do not share the CPU with it
        tiles = sample_tiles(data, eval_names, args.tiles, args.tile)
        speed = time_normalizers(tiles, ref_full, args.bench_threads, args.bench_reps)

        # (b) data: training folder, shifted test copies
        folder = work / "train"
        label_stats = write_training_folder(data, train_names, args.method, args.fraction, args.seed,
                                            args.scale, folder)
        eval_sets = {"original": str(data)}
        shifts = {}
        for s in strengths:
            key = f"shift_{s:g}"
            shifts[key] = write_shifted_folder(data, eval_names, s, SHIFT_SEED, work / key)
            eval_sets[key] = str(work / key)

        per_image = max(1, math.ceil(args.steps_per_epoch * args.batch_size / len(train_names)))
        base = dict(data=str(folder), labels="labels", classes=["background", "nucleus"], seed=args.seed,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone="resnet18",
                    crop=args.crop, scale=1.0, image_mpp=0.25 / args.scale, samples_per_image=per_image)
        variants = {"none": {}, "norm": {"stain_norm": args.norm_method, "stain_ref": str(ref_path)}}
        for a in augs:
            variants[f"aug_{a}"] = {"stain_aug": a} | ({"stain_aug_strength": args.aug_strength} if a == "hed" else {})
        t_train = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {v: pool.submit(train_and_score, v, base | opts, str(work / f"run_{v}"), args.threads,
                                      eval_sets, eval_names, args.scale)
                       for v, opts in variants.items()}
            runs = {v: f.result() for v, f in futures.items()}
        train_wall = time.perf_counter() - t_train

    def shifted_mean(v: str) -> float:
        return float(np.mean([runs[v]["iou"][k] for k in shifts]))

    iou_original = runs["none"]["iou"]["original"]
    shifted_none, shifted_norm = shifted_mean("none"), shifted_mean("norm")
    aug_scores = {v: shifted_mean(v) for v in runs if v.startswith("aug_")}
    best_aug = max(aug_scores, key=aug_scores.get)
    lost = iou_original - shifted_none
    recovered = max(shifted_norm, aug_scores[best_aug]) - shifted_none
    result = {
        "iou_original": iou_original,
        "iou_shifted_none": shifted_none,
        "iou_shifted_norm": shifted_norm,
        "iou_shifted_aug": aug_scores[best_aug],
        "normalize_images_per_s": speed[f"slidekit_{args.norm_method}_images_per_s"],
        # half the loss recovered; a shift that costs nothing has nothing to recover (false, see note)
        "shift_loss_halved": bool(lost > 0 and recovered >= 0.5 * lost),
        "iou_lost_to_shift": lost,
        "iou_recovered": recovered,
        "aug_variant": best_aug,
        "iou_shifted_aug_by_kind": aug_scores,
        "iou_by_model": {v: r["iou"] for v, r in runs.items()},
        "mdice_by_model": {v: r["mdice"] for v, r in runs.items()},
        "speed": speed,
        "shifts": shifts,
        "reference_image": ref_name,
        "runs": {v: {k: r[k] for k in ("train_seconds", "train_cpu_seconds", "checkpoint_stain", "warnings")}
                 for v, r in runs.items()},
        "train_wall_seconds": round(train_wall, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "load_average": {"start": load0, "end": list(os.getloadavg())},
        "cpus": os.cpu_count(),
        "n_train": len(train_names), "n_eval": len(eval_names), **label_stats,
        "quick": args.quick,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("json", "workdir")} | {"data": str(data), "steps": args.epochs * args.steps_per_epoch},
    }
    if lost <= 0:
        result["note"] = "the shift cost the unprotected model no IoU: nothing to recover"
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    return result


if __name__ == "__main__":
    main()

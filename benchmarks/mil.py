"""MIL benchmark on a composite cohort of real tissue: attention-MIL vs pooling at a low witness rate.

    python benchmarks/mil.py --seeds 0 1 2 --json OUT.json [--data DIR] [--slides 48] [--witness 0.03]

The cohort is composed as ``benchmarks/pn_cohort.py`` composes it (its materials and mosaic):
every slide is a mosaic of normal tissue blocks from the two real SVS slides at 4 µm/px with
1-3 lymphoid follicles (NCT-CRC-HE lymphocyte tile) as confounders; a positive slide also holds
one small lesion (a blob of the MoNuSeg tumour mosaic) covering about ``--witness`` of its tiles.
Slides are ``--grid`` x ``--grid`` tiles of 32 px (128 µm); two slides per patient, labels per
slide. Features: a randomly initialised torchvision ResNet-18 (slidekit ``make_encoder``, seed 0,
no pretrained weights: none can be downloaded here), global-average pooled stages 1-4
concatenated (960 dims), standardised over the cohort (no labels used), written as HDF5 feature
files read through ``slidekit.slidelevel.feature_store``.

Each seed draws a new cohort and runs ``slidekit train mil`` (patient-level stratified 4-fold
CV) for meanpool, topk_mean, abmil, clam and transmil; AUC is over the out-of-fold predictions.
``attention_auc``: on each positive slide, how well the out-of-fold ABMIL model's attention ranks
lesion tiles (>= 50% lesion) above the others (ROC AUC), averaged over positive slides.
Keys: ``auc_<method>`` (mean over seeds; also as ``auc_<method>_mean``), ``auc_<method>_sd``,
``auc_<method>_per_seed``, the same for ``attention_auc`` and ``witness_rate`` (mean fraction of
lesion tiles on positives), the seeds harness's paired ``diff_*`` of ABMIL - mean pooling
(``diff_per_seed``, ``diff_mean``, ``diff_sd``, ``diff_wins``), ``seconds_<method>`` (all seeds),
``wall_s``, ``date``, ``cpus`` and ``load_average_at_end`` (the machine may be shared).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks.pn_cohort as pn  # noqa: E402
from benchmarks.seeds import finish_report, mean_sd  # noqa: E402
from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason  # noqa: E402
from slidekit.base.io import write_text_atomic  # noqa: E402

TILE = 32
METHODS = ("meanpool", "topk_mean", "abmil", "clam", "transmil")


def compose(materials, n_slides: int, grid: int, witness: float, rng: np.random.Generator):
    """(rgb, lesion mask, label) per slide; half the slides positive."""
    import cv2

    normal, tumour, lymphoid = materials
    side = grid * TILE
    out = []
    for i in range(n_slides):
        positive = i % 2 == 1
        rgb = pn.mosaic((side, side), normal, rng)
        for _ in range(rng.integers(1, 4)):  # lymphoid follicles in every slide: the confounder
            d = int(rng.uniform(0.6, 1.5) * TILE)
            m = pn.blob(d, rng)
            src = cv2.resize(lymphoid[rng.integers(len(lymphoid))], m.shape[::-1])
            y, x = rng.integers(0, side - m.shape[0]), rng.integers(0, side - m.shape[1])
            rgb[y:y + m.shape[0], x:x + m.shape[1]][m] = src[m]
        lesion = np.zeros((side, side), bool)
        if positive:
            d = 2 * np.sqrt(witness * side * side / np.pi) * 1.1  # a blob of about that area
            m = pn.blob(d, rng)
            tum = pn.mosaic(m.shape, tumour, rng)
            y, x = rng.integers(0, side - m.shape[0]), rng.integers(0, side - m.shape[1])
            rgb[y:y + m.shape[0], x:x + m.shape[1]][m] = tum[m]
            lesion[y:y + m.shape[0], x:x + m.shape[1]] = m
        out.append((rgb, lesion, int(positive)))
    return out


def tile_features(slides, threads: int = 1) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Random ResNet-18 features (960-d) of every 32 px tile, lesion fraction of each tile."""
    import torch

    from slidekit.models.backbones import make_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = make_encoder("resnet18").eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats, fracs, coords = [], [], None
    for rgb, lesion, _ in slides:
        g = rgb.shape[0] // TILE
        tiles = rgb.reshape(g, TILE, g, TILE, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, TILE, TILE)
        frac = lesion.reshape(g, TILE, g, TILE).mean(axis=(1, 3)).reshape(-1)
        with torch.no_grad():
            x = (torch.from_numpy(tiles).float() / 255 - mean) / std
            maps = enc(x)
            f = torch.cat([m.mean(dim=(2, 3)) for m in maps[-4:]], dim=1)
        feats.append(f.numpy())
        fracs.append(frac)
        yy, xx = np.divmod(np.arange(g * g), g)
        coords = np.stack([xx, yy], 1).astype(np.int64) * TILE
    allf = np.concatenate(feats)
    mu, sd = allf.mean(0), allf.std(0) + 1e-6
    return [((f - mu) / sd).astype(np.float32) for f in feats], fracs, coords


RESULT_OPTIONS = ("slides", "grid", "witness", "epochs", "patience", "lr")


def _cached(work: Path, seed: int, args) -> dict | None:
    """A finished seed's result in ``work`` made with the same options (a rerun with --work reuses it)."""
    try:
        r = json.loads((work / "result.json").read_text())
    except (OSError, ValueError):
        return None
    same = r.get("options") == {k: getattr(args, k) for k in RESULT_OPTIONS} and r.get("seed") == seed
    return r if same else None


def run_seed(materials, seed: int, args, work: Path) -> dict:
    import h5py
    from sklearn.metrics import roc_auc_score

    from slidekit.models.mil import load_mil_checkpoint
    from slidekit.slidelevel.mil_deploy import score_file
    from trainers.base import train

    done = _cached(work, seed, args)
    if done is not None:
        print(f"seed {seed}: reusing {work / 'result.json'}", flush=True)
        return done
    materials = materials()
    t_seed = time.perf_counter()
    rng = np.random.default_rng(seed)
    slides = compose(materials, args.slides, args.grid, args.witness, rng)
    feats, fracs, coords = tile_features(slides)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (f, (_, _, label)) in enumerate(zip(feats, slides)):
        p = work / f"slide_{i:03d}.h5"
        with h5py.File(p, "w") as h:
            h["features"] = f
            h["coords"] = coords
            h["coords"].attrs["patch_size_level0"] = TILE
        rows.append({"slide": f"slide_{i:03d}", "label": "tumour" if label else "normal",
                     "patient": f"patient_{i // 2:03d}", "features": p.name})
    table = work / "slides.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = {"seed": seed, "witness_rate": float(np.mean([(fr >= 0.5).mean() for fr, s in zip(fracs, slides)
                                                           if s[2]]))}
    for arch in METHODS:
        t0 = time.perf_counter()
        out = work / arch
        train("mil", None, out, {"slides": str(table), "arch": arch, "folds": 4, "epochs": args.epochs,
                                 "patience": args.patience, "lr": args.lr, "seed": seed, "bootstrap": 200,
                                 "classes": ["normal", "tumour"]}, device="cpu", progress=False)
        m = json.loads((out / "metrics.json").read_text())
        result[f"auc_{arch}"] = m["overall"]["auc"]
        result[f"auc_{arch}_ci95"] = m["ci95"].get("auc")
        result[f"seconds_{arch}"] = round(time.perf_counter() - t0, 1)
        if arch == "abmil":  # attention of each positive slide's out-of-fold model
            with open(out / "oof.csv") as fh:
                fold_of = {r["slide"]: int(r["fold"]) for r in csv.DictReader(fh)}
            models = {k: load_mil_checkpoint(out / f"fold_{k}.pt")[0] for k in set(fold_of.values())}
            aucs = []
            for i, (_, _, label) in enumerate(slides):
                lesion_tiles = fracs[i] >= 0.5
                if not label or lesion_tiles.all() or not lesion_tiles.any():
                    continue
                s = score_file(models[fold_of[f"slide_{i:03d}"]], work / f"slide_{i:03d}.h5")
                aucs.append(roc_auc_score(lesion_tiles, s.attention))
            result["attention_auc"] = float(np.mean(aucs))
        print(f"seed {seed} {arch}: AUC {result[f'auc_{arch}']:.3f} ({result[f'seconds_{arch}']} s)", flush=True)
    print(f"seed {seed}: attention AUC {result['attention_auc']:.3f}, witness rate {result['witness_rate']:.3f}",
          flush=True)
    result["seconds"] = round(time.perf_counter() - t_seed, 1)
    result["options"] = {k: getattr(args, k) for k in RESULT_OPTIONS}
    write_text_atomic(work / "result.json", json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--slides", type=int, default=48, help="slides per seed (half positive, 2 per patient)")
    ap.add_argument("--grid", type=int, default=16, help="tiles per side of a slide (32 px tiles)")
    ap.add_argument("--witness", type=float, default=0.03, help="lesion area as a fraction of the slide")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder (default: a temporary one); a rerun into it reuses finished seeds")
    ap.add_argument("--note", default=None, help="a line stored as the result's 'note' (e.g. how it was run)")
    add_data_argument(ap)
    args = ap.parse_args(argv)
    why = data_missing_reason(args.data)
    if why:
        raise SystemExit(why)
    pn.DATA = data_dir(args.data)
    import tempfile

    t0 = time.perf_counter()
    loaded: list = []

    def materials():  # loaded once, and only when a seed is not cached
        if not loaded:
            loaded.append(pn.load_materials(48))
        return loaded[0]

    with tempfile.TemporaryDirectory(prefix="mil_bench_") as tmp:
        work = args.work or Path(tmp)
        runs = [run_seed(materials, s, args, work / f"seed{s}") for s in args.seeds]
    out: dict = {"seeds": list(args.seeds), "slides": args.slides, "grid": args.grid, "witness": args.witness,
                 "encoder": "resnet18 (random init, seed 0), GAP of stages 1-4, 960-d",
                 "epochs": args.epochs, "folds": 4}
    for key in [f"auc_{m}" for m in METHODS] + ["attention_auc", "witness_rate"]:
        values = [r[key] for r in runs]
        out[key], out[f"{key}_sd"] = mean_sd(values)
        out[f"{key}_per_seed"] = values
        out[f"{key}_mean"] = out[key]  # the seeds harness's name for the same mean (benchmarks/seeds.py)
    out["abmil_minus_meanpool"] = out["auc_abmil"] - out["auc_meanpool"]
    diff = [r["auc_abmil"] - r["auc_meanpool"] for r in runs]  # paired by seed, as the harness pairs
    out["diff_of"] = "auc_abmil - auc_meanpool"
    out["diff_per_seed"] = diff
    out["diff_mean"], out["diff_sd"] = mean_sd(diff)
    out["diff_wins"] = sum(d >= 0 for d in diff)
    for arch in METHODS:
        out[f"seconds_{arch}"] = round(sum(r[f"seconds_{arch}"] for r in runs), 1)
    return finish_report(out, runs, t0=t0, json_path=args.json, note=args.note)


if __name__ == "__main__":
    main()

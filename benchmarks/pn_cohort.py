"""pN-staging benchmark on a composite cohort of real tissue: mixed-supervision EM vs pixel labels only.

    python benchmarks/pn_cohort.py --seeds 0 1 2 --json OUT.json [--data DIR] [--work DIR]
    python benchmarks/pn_cohort.py --seed 0 --json OUT.json            # one seed

No public CAMELYON slides are reachable here, so the cohort is composed from the real tissue in
the real-data folder (``--data``, else ``$SLIDEKIT_DATA``, else ``../shared/data``):

- normal tissue: a mosaic of tissue blocks from the SVS slides (CMU-1 heart, TCGA-CR-7395);
- lymphoid follicles (NCT-CRC-HE lymphocyte tile), the classic false positive in lymph nodes:
  0-1 per pixel-labelled slide, 2-5 per slide-labelled or held-out node;
- lesions: a mosaic of the MoNuSeg H&E images (tumour tissue of 8 organs), pasted as irregular
  blobs of a controlled largest diameter in µm: ITC 50-180 µm, micro 0.3-1.8 mm, macro 2.1-2.4 mm;
- patients: 5 nodes each, the node-label lists of real CAMELYON17 patients
  (``camelyon/stage_labels.csv``), drawn stratified by pN stage;
- two centres: a few pixel-labelled positive slides from centre A; every slide-labelled training
  slide and every held-out slide from centre B, whose stain differs (HED stain shift plus a
  slight blur), so pixel labels alone do not transfer.

``--regime cross-centre`` (the default; issue 22): 4 pixel-labelled slides (2 micro, 2 macro),
16 training patients (80 node slides) and ``--test-patients`` (60) held-out patients; besides the
stain, each centre has its own real tissue source (``CENTRE_SOURCES``): centre A the CMU-1 slide
and the MoNuSeg training images (TCGA FFPE "DX" slides), centre B TCGA-CR-7395 and the MoNuSeg
test images (mostly frozen "TS" / "BS" sections), as Camelyon16 (one hospital's masks) against
Camelyon17 (other hospitals' node labels). ``--regime v1`` is the first benchmark: 6 pixel
slides, 12 training and 24 held-out patients, both centres cut from the same tissue.

Slides are pyramidal JPEG TIFFs at 4 µm/px (slidekit.slides.demo.write_pyramid); models work at 8 µm/px
on 64 px patches so the whole benchmark fits a 2-core CPU. It runs (a) ``mixed-em`` (pixel masks +
node labels, EM rounds, ``morph-lgbm`` stage 2, round selected by the lowest stage-2 out-of-fold
loss on the training slides) and (b) the same trainer's round 0, i.e. pixel labels only + the same
stage 2, stages the held-out patients and scores them with the quadratic weighted kappa. It also
trains ``topk-mean`` on the selected round's heatmaps. The E-step choices (``--threshold``,
``--pseudo-top-k``, ``--positive-negatives``, ``--min-hard-negatives``, ``--select-from``) are
passed to the trainer; ``--eval-rounds all`` scores every round on the held-out patients and
``round_rules`` in the JSON gives the held-out kappa of the round each selection rule would keep
(a diagnostic: nothing is selected on the held-out patients). Prints and writes JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.seeds import add_seeds_argument, run_seeds  # noqa: E402
from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason  # noqa: E402

DATA = Path()  # the real-data folder; set by main() from --data / $SLIDEKIT_DATA / ../shared/data

SLIDE_MPP = 4.0           # level 0 of the composite slides
MODEL_MPP = 8.0
PATCH = 64
SLIDE_UM = (3000.0, 2500.0)
PREDICT_TILE = 384        # one heatmap tile covers a whole composite slide at MODEL_MPP
STAGE_ORDER = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")
SIZE_RANGES_UM = {"itc": (50.0, 180.0), "micro": (300.0, 1800.0), "macro": (2100.0, 2400.0)}


# ----------------------------------------------------------------------------------- materials

def _tissue_blocks(rgb: np.ndarray, block: int, min_tissue: float = 0.97) -> list[np.ndarray]:
    from slidekit.regions.tissue import detect_tissue

    mask = detect_tissue(rgb, SLIDE_MPP, min_area_um2=0)
    mask = getattr(mask, "array", mask)
    out = []
    step = max(4, block // 3)
    for y in range(0, rgb.shape[0] - block + 1, step):
        for x in range(0, rgb.shape[1] - block + 1, step):
            if mask[y:y + block, x:x + block].mean() >= min_tissue:
                out.append(rgb[y:y + block, x:x + block])
    return out


NORMAL_SLIDES = {"CMU-1-Small-Region.svs": None, "TCGA-CR-7395-01A-01-TS1.svs": 0.5}  # name -> --mpp


def load_materials(block: int = 48, normal_slides: tuple[str, ...] = tuple(NORMAL_SLIDES),
                   monuseg_split: str | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(normal, tumour, lymphoid) blocks at SLIDE_MPP from the real slides, the MoNuSeg images and
    the NCT-CRC-HE lymphocyte tile. ``normal_slides`` picks the SVS slides of the normal tissue and
    ``monuseg_split`` (``train`` / ``test``, None: both) the MoNuSeg images of the tumour tissue."""
    import cv2

    from slidekit.slides.slide import open_slide

    normal = []
    for name in normal_slides:
        with open_slide(DATA / "wsi" / name, mpp=NORMAL_SLIDES[name]) as s:
            normal += _tissue_blocks(s.read_whole(SLIDE_MPP), block)
    tumour = []
    with open(DATA / "nuclei_monuseg" / "index.csv") as f:
        for row in csv.DictReader(f):
            if monuseg_split is not None and row["monuseg_split"] != monuseg_split:
                continue
            img = cv2.cvtColor(cv2.imread(str(DATA / "nuclei_monuseg" / row["image"])), cv2.COLOR_BGR2RGB)
            mpp = float(row["mpp_from_xml"] or 0.25)
            n = max(block, int(round(img.shape[0] * mpp / SLIDE_MPP)))
            small = cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)
            tumour += [small[y:y + block, x:x + block] for y in range(0, n - block + 1, 7)
                       for x in range(0, n - block + 1, 7)]
    import tifffile

    lym = tifffile.imread(DATA / "patches_nct_crc_he_100k_sample" / "LYM-AATTSRNN.tif")[..., :3]
    n = int(round(lym.shape[0] * 0.5 / SLIDE_MPP))
    lym = cv2.resize(lym, (n, n), interpolation=cv2.INTER_AREA)
    # the tile is Macenko-normalised and very dark; lift it to the brightness of routine H&E
    lym = (255 * (lym / 255.0) ** 0.55).astype(np.uint8)
    b = n * 3 // 4
    lymphoid = [lym[y:y + b, x:x + b] for y in range(0, n - b + 1, 2) for x in range(0, n - b + 1, 2)]
    return normal, tumour, lymphoid


def mosaic(shape: tuple[int, int], blocks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Cover ``shape`` with randomly chosen, flipped and rotated blocks, feathered where they overlap."""
    b = blocks[0].shape[0]
    step = b * 2 // 3
    h, w = shape
    acc = np.zeros((h + b, w + b, 3), np.float32)
    wsum = np.zeros((h + b, w + b, 1), np.float32)
    ramp = np.minimum(np.arange(b) + 1, b - np.arange(b)).astype(np.float32)
    win = np.minimum.outer(ramp, ramp)[..., None]
    for y in range(0, h, step):
        for x in range(0, w, step):
            blk = np.rot90(blocks[rng.integers(len(blocks))], rng.integers(4))
            if rng.random() < 0.5:
                blk = blk[:, ::-1]
            acc[y:y + b, x:x + b] += blk * win
            wsum[y:y + b, x:x + b] += win
    return (acc[:h, :w] / np.maximum(wsum[:h, :w], 1e-6)).astype(np.uint8)


def blob(diameter_px: float, rng: np.random.Generator, aspect: float | None = None,
         max_angle: float = np.pi) -> np.ndarray:
    """An irregular lesion outline whose largest diameter is about ``diameter_px`` (bool mask)."""
    import cv2

    aspect = rng.uniform(0.55, 0.95) if aspect is None else aspect
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    r = 1 + 0.12 * np.sin(3 * t + rng.uniform(0, 6)) + 0.07 * np.sin(5 * t + rng.uniform(0, 6))
    pts = np.column_stack([r * np.cos(t), aspect * r * np.sin(t)])
    ang = rng.uniform(-max_angle, max_angle)
    pts = pts @ np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
    pts = pts * (diameter_px / d)
    pts -= pts.min(0)
    size = np.ceil(pts.max(0)).astype(int) + 2
    m = np.zeros((size[1], size[0]), np.uint8)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def stain_shift(rgb: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Centre B's stain: haematoxylin weaker and bluer, eosin stronger (HED space), slight blur."""
    import cv2
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= 0.65
    hed[..., 1] *= 1.6
    hed[..., 2] *= 1.3
    out = (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    out = cv2.GaussianBlur(out, (0, 0), 0.8)
    res = rgb.copy()
    res[tissue] = out[tissue]
    return res


def make_slide(label: str, normal: list, tumour: list, lymphoid: list, rng: np.random.Generator,
               centre: str, follicles_range: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rgb, tumour mask) at SLIDE_MPP of one lymph-node slide with a lesion of class ``label``;
    ``follicles_range`` (lo, hi): rng.integers(lo, hi) follicles (default: 2-5 in centre B, 0-1 in A)."""
    from slidekit.slidelevel.features import size_class

    W, H = int(SLIDE_UM[0] / SLIDE_MPP), int(SLIDE_UM[1] / SLIDE_MPP)
    yy, xx = np.mgrid[0:H, 0:W]
    ang = np.arctan2(yy - H / 2, xx - W / 2)
    rad = 0.47 + 0.025 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.02 * np.cos(5 * ang + rng.uniform(0, 6))
    tissue = np.hypot((xx - W / 2) / W, (yy - H / 2) / H) < rad
    rgb = np.full((H, W, 3), 244, np.uint8)
    tex = mosaic((H, W), normal, rng)
    rgb[tissue] = tex[tissue]
    # Lymphoid follicles: dense lymphocytes, the classic false positive in lymph nodes. Centre A's
    # pixel-labelled slides show almost none, centre B's nodes several.
    follicles = np.zeros((H, W), bool)
    if follicles_range is None:
        follicles_range = (2, 6) if centre == "B" else (0, 2)
    for _ in range(rng.integers(*follicles_range)):
        b = blob(rng.uniform(250, 700) / SLIDE_MPP, rng, rng.uniform(0.7, 1.0))
        bh, bw = b.shape
        y0, x0 = rng.integers(0, H - bh), rng.integers(0, W - bw)
        follicles[y0:y0 + bh, x0:x0 + bw] |= b
    follicles &= tissue
    rgb = np.where(follicles[..., None], mosaic((H, W), lymphoid, rng), rgb)
    mask = np.zeros((H, W), bool)
    if label != "negative":
        lo, hi = SIZE_RANGES_UM[label]
        lesions = [rng.uniform(lo, hi)]
        if label == "itc":
            lesions += list(rng.uniform(lo, hi, size=rng.integers(0, 3)))
        for d_um in lesions:
            for _ in range(50):
                aspect = rng.uniform(0.55, 0.75) if label == "macro" else None
                b = blob(d_um / SLIDE_MPP, rng, aspect, 0.35 if label == "macro" else np.pi)
                bh, bw = b.shape
                if bh >= H or bw >= W:
                    continue
                y0, x0 = rng.integers(0, H - bh), rng.integers(0, W - bw)
                if tissue[y0:y0 + bh, x0:x0 + bw][b].all():
                    mask[y0:y0 + bh, x0:x0 + bw] |= b
                    break
        tum = mosaic((H, W), tumour, rng)
        soft = mask.astype(np.float32)
        rgb = np.where(mask[..., None], tum, rgb)
        from skimage.measure import label as cc, regionprops

        got = max((r.feret_diameter_max for r in regionprops(cc(mask))), default=0) * SLIDE_MPP
        if size_class(got) != label:
            return make_slide(label, normal, tumour, lymphoid, rng, centre, follicles_range)
        del soft
    if centre == "B":
        rgb = stain_shift(rgb, tissue)
    return rgb, mask


def pick_patients(n_by_stage: dict[str, int], rng: np.random.Generator, exclude: set) -> list[tuple[str, list[str]]]:
    """Real CAMELYON17 patients (their five node labels), ``n_by_stage`` of each stage."""
    from slidekit.slidelevel.staging import read_label_csv

    table = read_label_csv(DATA / "camelyon" / "stage_labels.csv")
    by_patient = table.nodes_by_patient()
    out = []
    for stage, n in n_by_stage.items():
        cands = sorted(p for p, s in table.patients.items() if s == stage and p not in exclude)
        for p in rng.choice(cands, size=n, replace=False):
            out.append((str(p), list(by_patient[str(p)].values())))
            exclude.add(str(p))
    return out


def build_cohort(out: Path, seed: int, n_train: dict, n_test: dict, n_pixel: dict, regime: str = "v1") -> dict:
    """Write slides, masks and tables under ``out``; returns the cohort description.

    ``regime`` ``v1``: both centres cut from the same tissue (only centre B's stain differs);
    ``cross-centre``: each centre has its own real tissue source as well (see ``CENTRE_SOURCES``)."""
    import cv2

    from slidekit.slides.demo import write_pyramid

    done = out / "cohort.json"
    if done.exists():
        return json.loads(done.read_text())
    rng = np.random.default_rng(seed)
    if regime == "v1":
        materials = dict.fromkeys("AB", load_materials())
    else:
        materials = {c: load_materials(normal_slides=src["normal"], monuseg_split=src["tumour"])
                     for c, src in CENTRE_SOURCES.items()}
    slides_dir, masks_dir = out / "slides", out / "masks"
    slides_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(exist_ok=True)
    used: set = set()
    train_pat = pick_patients(n_train, rng, used)
    test_pat = pick_patients(n_test, rng, used)
    cohort = {"pixel": [], "train": [], "test": []}

    def write(name: str, label: str, centre: str, with_mask: bool) -> dict:
        rgb, mask = make_slide(label, *materials[centre], rng, centre)
        path = slides_dir / f"{name}.tif"
        write_pyramid(path, rgb, SLIDE_MPP, tile=256, min_size=256)
        rec = {"slide": str(path), "label": label, "centre": centre}
        if with_mask:
            m = cv2.resize(mask.astype(np.uint8) * 255, (mask.shape[1] // 2, mask.shape[0] // 2),
                           interpolation=cv2.INTER_AREA)
            mp = masks_dir / f"{name}.png"
            cv2.imwrite(str(mp), m)
            rec["mask"] = str(mp)
        return rec

    k = 0
    for label, n in n_pixel.items():
        for _ in range(n):
            cohort["pixel"].append(write(f"centreA_{k:02d}", label, "A", True))
            k += 1
    for split, pats in (("train", train_pat), ("test", test_pat)):
        for p, labels in pats:
            for j, lab in enumerate(labels):
                rec = write(f"{p}_node_{j}", lab, "B", False)
                rec["patient"] = p
                cohort[split].append(rec)
    cohort["regime"] = regime
    done.write_text(json.dumps(cohort, indent=1))
    return cohort


# the cross-centre regime's tissue per centre: centre A (pixel masks) has FFPE diagnostic tissue
# (the CMU-1 heart slide, the MoNuSeg training images: TCGA "DX" slides), centre B (node labels
# and held-out nodes) frozen / other sections (TCGA-CR-7395 "TS", the MoNuSeg test images: mostly
# "TS"/"BS"), on top of centre B's stain shift and follicles
CENTRE_SOURCES = {"A": {"normal": ("CMU-1-Small-Region.svs",), "tumour": "train"},
                  "B": {"normal": ("TCGA-CR-7395-01A-01-TS1.svs",), "tumour": "test"}}


def allocate(n: int, available: dict[str, int]) -> dict[str, int]:
    """``n`` patients split over the stages in proportion to ``available`` (largest remainder,
    ties to the stage listed first), at least one of each available stage when ``n`` allows and
    never more than are available."""
    total = sum(available.values())
    if n > total:
        raise ValueError(f"{n} patients asked for, {total} available")
    quota = {k: n * v / total for k, v in available.items()}
    out = {k: min(int(q), available[k]) for k, q in quota.items()}
    if n >= sum(v > 0 for v in available.values()):
        for k, v in available.items():
            if v and not out[k]:
                out[k] = 1
    while sum(out.values()) > n:  # the minimum of one pushed the total over: take from the largest
        k = max(out, key=lambda j: (out[j] - quota[j], out[j]))
        out[k] -= 1
    for k in sorted(available, key=lambda j: -(quota[j] - out[j])):
        if sum(out.values()) >= n:
            break
        if out[k] < available[k]:
            out[k] += 1
    while sum(out.values()) < n:  # every remainder used: fill wherever patients are left
        k = next(j for j in available if out[j] < available[j])
        out[k] += 1
    return out


def stage_counts() -> dict[str, int]:
    """Patients per pN stage in the CAMELYON17 label table (STAGE_ORDER order)."""
    from slidekit.slidelevel.staging import read_label_csv

    table = read_label_csv(DATA / "camelyon" / "stage_labels.csv")
    stages = list(table.patients.values())
    return {s: stages.count(s) for s in STAGE_ORDER}


# ------------------------------------------------------------------------------------ pipeline

def _predict_share(ckpt: Path, records: list[dict], out: Path, tile: int) -> None:
    import torch

    torch.set_num_threads(1)
    predict_heatmaps(ckpt, records, out, tile)


def predict_heatmaps(ckpt: Path, records: list[dict], out: Path, tile: int, workers: int = 1) -> list[Path]:
    """Heatmaps of ``records`` with a segmenter checkpoint, at the model's MPP (resumable).
    ``workers`` > 1: the slides are shared out over that many processes (one torch thread each;
    every slide's heatmap is the same as from one process)."""
    from slidekit.models.checkpoint import load_checkpoint
    from slidekit.slides.slide import open_slide
    from trainers.mixed_em import HeatmapTiling, predict_heatmap

    if workers > 1 and len(records) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(_predict_share, ckpt, records[k::workers], out, tile) for k in range(workers)]:
                f.result()
    ck = load_checkpoint(ckpt)
    paths = []
    for rec in records:
        d = out / Path(rec["slide"]).stem
        with open_slide(rec["slide"]) as s:
            predict_heatmap(ck.model, ck.spec, s, d / "heatmap.zarr", tiling=HeatmapTiling(tile=tile))
        paths.append(d)
    return paths


def stage_and_score(records: list[dict], node_pred: list[str]) -> tuple[float, float, dict]:
    """(kappa over patients, slide accuracy, per-patient stages) for predicted node labels."""
    from slidekit.slidelevel.staging import pn_stage, weighted_kappa

    pats: dict[str, list[tuple[str, str]]] = {}
    for rec, p in zip(records, node_pred):
        pats.setdefault(rec["patient"], []).append((rec["label"], p))
    ref = [pn_stage([a for a, _ in v]) for v in pats.values()]
    pred = [pn_stage([b for _, b in v]) for v in pats.values()]
    acc = float(np.mean([r["label"] == p for r, p in zip(records, node_pred)]))
    return weighted_kappa(ref, pred), acc, {k: (r, p) for k, r, p in zip(pats, ref, pred)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="Write the result here.")
    ap.add_argument("--work", type=Path, default=None, help="Work directory (default: a temp dir).")
    ap.add_argument("--rounds", type=int, default=None, help="EM rounds (default: 3 in v1, 2 cross-centre)")
    ap.add_argument("--init-steps", type=int, default=150)
    ap.add_argument("--round-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: 2 on an idle 2-core machine, 1 when the cores are busy: "
                         "oversubscribed torch threads slow down several-fold)")
    ap.add_argument("--small", action="store_true", help="A tiny cohort (smoke test).")
    ap.add_argument("--regime", choices=("cross-centre", "v1"), default="cross-centre",
                    help="cross-centre (default): 4 pixel-labelled slides whose tissue source and stain differ "
                         "from the slide-labelled and held-out nodes', --test-patients held out; v1: the first "
                         "benchmark (6 pixel slides, one tissue source, 24 held-out patients)")
    ap.add_argument("--test-patients", type=int, default=60, help="held-out patients (cross-centre regime)")
    ap.add_argument("--train-patients", type=int, default=16,
                    help="slide-labelled training patients, 5 nodes each (cross-centre regime)")
    ap.add_argument("--threshold", type=float, default=0.4, help="mixed-em E-step threshold T")
    ap.add_argument("--pseudo-top-k", type=int, default=0,
                    help="mixed-em: positive pseudo-labels from each positive slide's k best patches only (0: all)")
    ap.add_argument("--positive-negatives", type=float, default=0.0,
                    help="mixed-em: positive-slide patches below this max probability become hard negatives (0: off)")
    ap.add_argument("--min-hard-negatives", type=int, default=200, help="mixed-em min_hard_negatives")
    ap.add_argument("--select-from", type=int, choices=(0, 1), default=1,
                    help="mixed-em select_from: 0 lets round 0 (pixel labels only) win the round selection")
    ap.add_argument("--topk-mean", action=argparse.BooleanOptionalAction, default=None,
                    help="also train and score topk-mean (default: in the v1 regime only; when off, the "
                         "topk_mean key is null)")
    ap.add_argument("--eval-workers", type=int, default=1,
                    help="processes predicting the held-out heatmaps (same heatmaps, sooner on spare cores)")
    ap.add_argument("--eval-rounds", choices=("selected", "all"), default="selected",
                    help="held-out heatmaps of round 0 and the selected round only, or of every round (a "
                         "diagnostic of the round-selection rules; never used to select anything)")
    add_data_argument(ap)
    add_seeds_argument(ap)
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.regime == "v1" else 2
    if args.topk_mean is None:
        args.topk_mean = args.regime == "v1"
    if args.seeds:  # the mixed-EM run of issue 22: mixed vs pixel labels only, paired by seed
        return run_seeds(main, argv, args.seeds, ["kappa_mixed", "kappa_pixel_only", "slide_accuracy_mixed",
                                                  "slide_accuracy_pixel_only"] + ["topk_mean.kappa"] * args.topk_mean,
                         pair=("kappa_mixed", "kappa_pixel_only"), json_out=args.json, seed_dirs=("--work",))
    global DATA
    reason = data_missing_reason(args.data)
    if reason is not None:
        ap.error(reason)
    DATA = data_dir(args.data)

    import tempfile

    import torch

    if args.threads <= 0:
        cores = os.cpu_count() or 1
        args.threads = max(1, min(2, cores)) if os.getloadavg()[0] < 0.75 * cores else 1
    torch.set_num_threads(args.threads)
    t_start = time.time()
    # CPU clocks at this run's start: with --seeds every seed runs in this one process
    cpu_start = (time.process_time(), _children_cpu())
    work = args.work or Path(tempfile.mkdtemp(prefix="pn_cohort_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work, t_start, cpu_start)
    finally:
        if args.work is None:  # a temporary work directory is removed; --work keeps everything
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, t_start: float, cpu_start: tuple[float, float]) -> dict:
    """The benchmark proper, in ``work``; ``t_start`` and ``cpu_start`` (process, workers) are the
    clocks at the run's start."""
    if args.small:
        n_train = {"pN0": 1, "pN0(i+)": 0, "pN1mi": 1, "pN1": 1, "pN2": 0}
        n_test = {"pN0": 1, "pN0(i+)": 0, "pN1mi": 0, "pN1": 1, "pN2": 0}
        n_pixel = {"micro": 1, "macro": 1}
    elif args.regime == "v1":
        n_train = {"pN0": 3, "pN0(i+)": 1, "pN1mi": 3, "pN1": 3, "pN2": 2}
        n_test = {"pN0": 6, "pN0(i+)": 3, "pN1mi": 5, "pN1": 7, "pN2": 3}
        n_pixel = {"itc": 1, "micro": 2, "macro": 3}
    else:  # cross-centre: stratified by stage over the 100 CAMELYON17 patients
        n_train, n_test = regime_split(stage_counts(), args.train_patients, args.test_patients)
        n_pixel = {"micro": 2, "macro": 2}
    print(f"building cohort in {work} ...", flush=True)
    cohort = build_cohort(work / "cohort", args.seed, n_train, n_test, n_pixel,
                          args.regime)
    t_cohort = time.time() - t_start
    print(f"cohort: {len(cohort['pixel'])} pixel-labelled (centre A), {len(cohort['train'])} training and "
          f"{len(cohort['test'])} held-out node slides (centre B) in {t_cohort:.0f} s", flush=True)

    # mixed-supervision EM (round 0 = pixel labels only)
    table = work / "train_slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "mask"])
        for r in cohort["pixel"]:
            w.writerow([r["slide"], r["label"], r["mask"]])
        for r in cohort["train"]:
            w.writerow([r["slide"], r["label"], ""])
    from trainers.mixed_em import MixedEMConfig, MixedEMTrainer

    cfg = MixedEMConfig(slides=str(table), mpp=MODEL_MPP, patch_size=PATCH, rounds=args.rounds,
                        init_steps=args.init_steps, round_steps=args.round_steps, batch_size=10, lr=1e-3,
                        seed=args.seed, predict_batch=4, predict_tile=PREDICT_TILE,
                        min_hard_negatives=args.min_hard_negatives, stage2_work_mpp=MODEL_MPP,
                        threshold=args.threshold, pseudo_top_k=args.pseudo_top_k,
                        positive_negatives=args.positive_negatives, select_from=args.select_from)
    em_dir = work / "mixed_em"
    t0 = time.time()
    MixedEMTrainer(cfg).fit(em_dir, device="cpu", progress=False)
    t_em = time.time() - t0
    sel = json.loads((em_dir / "selected.json").read_text())
    metrics = json.loads((em_dir / "metrics.json").read_text())
    print(f"mixed-em: {args.rounds} rounds in {t_em:.0f} s, selected round {sel['selected_round']} "
          f"(stage-2 losses {[round(loss, 4) for loss in sel['losses']]})", flush=True)

    # evaluate round 0 (pixel labels only) and the selected round on the held-out patients
    from slidekit.slidelevel.features import features_from_view, open_heatmap_view
    from trainers.stage2 import MorphClassifier

    results = {}
    test = cohort["test"]
    t0 = time.time()
    evaluated = {}
    todo = [0, sel["selected_round"]]
    if args.eval_rounds == "all":
        todo = list(range(len(metrics)))
    for rnd in dict.fromkeys(todo):
        rdir = em_dir / "rounds" / f"r{rnd}"
        hms = predict_heatmaps(rdir / "checkpoint.pt", test, work / "test_heatmaps" / f"r{rnd}", PREDICT_TILE,
                               args.eval_workers)
        feats = [features_from_view(open_heatmap_view(p), work_mpp=MODEL_MPP) for p in hms]
        clf = MorphClassifier.load(rdir / "morph_lgbm.json")
        pred = clf.predict(feats)
        kappa, acc, stages = stage_and_score(test, pred)
        evaluated[rnd] = {"kappa": kappa, "slide_accuracy": acc, "round": rnd, "heatmaps": hms, "features": feats,
                          "stages": stages, "pred": pred}
    for tag, rnd in (("pixel_only", 0), ("mixed", sel["selected_round"])):
        results[tag] = evaluated[rnd]
        print(f"{tag:10s} round {rnd}: kappa {results[tag]['kappa']:.4f}, "
              f"slide accuracy {results[tag]['slide_accuracy']:.3f}", flush=True)
    t_eval = time.time() - t0
    heldout_rounds = [{"round": r, "kappa": v["kappa"], "slide_accuracy": v["slide_accuracy"]}
                      for r, v in sorted(evaluated.items())]
    rules = round_rules(metrics, {r: v["kappa"] for r, v in evaluated.items()})

    # topk-mean on the selected round's heatmaps
    t0 = time.time()
    topk = None
    if args.topk_mean:
        topk = run_topk_mean(em_dir, sel["selected_round"], cohort, results["mixed"], args.seed)
        print(f"topk-mean: slide AUC {topk['auc']:.3f}, binary accuracy {topk['binary_accuracy']:.3f}, "
              f"kappa (with morphology size rule) {topk['kappa']:.4f} in {time.time() - t0:.0f} s", flush=True)

    t_topk = time.time() - t0
    out = {
        "kappa_mixed": results["mixed"]["kappa"],
        "kappa_pixel_only": results["pixel_only"]["kappa"],
        "slide_accuracy_mixed": results["mixed"]["slide_accuracy"],
        "slide_accuracy_pixel_only": results["pixel_only"]["slide_accuracy"],
        "rounds": args.rounds,
        "selected_round": sel["selected_round"],
        "seconds": time.time() - t_start,
        "topk_mean": topk,
        "stage2_losses": sel["losses"],
        "per_round": metrics,
        "cohort": {"pixel_slides": len(cohort["pixel"]), "train_slides": len(cohort["train"]),
                   "test_slides": len(test), "test_patients": len(results["mixed"]["stages"]),
                   "slide_mpp": SLIDE_MPP, "model_mpp": MODEL_MPP, "patch": PATCH, "seed": args.seed,
                   "seconds_build": t_cohort},
        "test_stages": {p: {"true": r, "mixed": results["mixed"]["stages"][p][1],
                            "pixel_only": results["pixel_only"]["stages"][p][1]}
                        for p, (r, _) in results["mixed"]["stages"].items()},
        "load_average": os.getloadavg(),
        "threads": args.threads,
        "regime": cohort.get("regime", "v1"),
        "options": {k: getattr(args, k) for k in ("rounds", "init_steps", "round_steps", "threshold",
                                                   "pseudo_top_k", "positive_negatives", "min_hard_negatives",
                                                   "select_from", "eval_rounds", "topk_mean")},
        # held-out kappa of every evaluated round and of the round each selection rule would keep:
        # a diagnostic only (the trainer selects from slide labels of the training slides alone)
        "heldout_per_round": heldout_rounds,
        "round_rules": rules,
        # this run's CPU time in this process (about its wall time on an idle core) and in the
        # --eval-workers processes; a run of several seeds counts each seed's own
        "cpu_seconds": time.process_time() - cpu_start[0],
        "cpu_seconds_workers": _children_cpu() - cpu_start[1],
        "seconds_stages": {"cohort": t_cohort, "mixed_em": t_em, "heldout_eval": t_eval, "topk_mean": t_topk},
    }
    print(json.dumps({k: v for k, v in out.items() if k not in ("per_round", "test_stages")}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return out


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def regime_split(counts: dict[str, int], n_train: int, n_test: int) -> tuple[dict[str, int], dict[str, int]]:
    """Training and held-out patients per stage, each stratified over what is left."""
    train = allocate(n_train, counts)
    test = allocate(n_test, {k: counts[k] - train[k] for k in counts})
    return train, test


def round_rules(metrics: list[dict], heldout_kappa: dict[int, float]) -> dict[str, dict]:
    """The round each selection rule keeps (from the per-round training metrics only) and, where
    that round was evaluated, its held-out kappa. Rules: the trainer's default (out-of-fold stage-2
    loss over the EM rounds), the same with round 0 competing, the in-sample loss, the highest
    out-of-fold accuracy (EM rounds, first on ties), and simply the last round."""
    from trainers.mixed_em import choose_round

    rows = sorted(metrics, key=lambda r: r["round"])
    acc = [float(r.get("stage2_cv_accuracy") or float("nan")) for r in rows]
    em = [i for i in range(1, len(rows)) if acc[i] == acc[i]]
    picks = {"cv_loss": choose_round(rows, "cv_loss", 1)["selected_round"],
             "cv_loss_with_round0": choose_round(rows, "cv_loss", 0)["selected_round"],
             "train_loss": choose_round(rows, "train_loss", 1)["selected_round"],
             "cv_accuracy": max(em, key=lambda i: (acc[i], -i)) if em else len(rows) - 1,
             "last": len(rows) - 1}
    return {k: {"round": r, "kappa": heldout_kappa.get(r)} for k, r in picks.items()}


def run_topk_mean(em_dir: Path, rnd: int, cohort: dict, mixed: dict, seed: int) -> dict:
    """Train topk-mean on the training slides' top-16 tiles of the selected round, test it."""
    import torch
    from sklearn.metrics import roc_auc_score

    from slidekit.slidelevel.features import predicted_size_class
    from trainers.stage2 import SlideRecord, TopKMeanConfig, TopKMeanTrainer, read_bags, topk_mean_probs

    def recs(items, hms):
        return [SlideRecord(Path(r["slide"]), r["label"], heatmap=h) for r, h in zip(items, hms)]

    train_hms = [em_dir / "rounds" / f"r{rnd}" / "heatmaps" / f"{i:05d}" for i in range(len(cohort["train"]))]
    # the patch CNN starts from the selected segmenter's encoder (same ResNet encoder names)
    cfg = TopKMeanConfig(k=16, mpp=MODEL_MPP, patch_size=PATCH, epochs=6, lr=3e-4, batch_slides=4, seed=seed,
                         init=str(em_dir / "rounds" / f"r{rnd}" / "checkpoint.pt"))
    train_recs = recs(cohort["train"], train_hms)
    bags = torch.from_numpy(read_bags(train_recs, cfg.k, cfg.mpp, cfg.patch_size))
    labels = torch.tensor([r.positive for r in train_recs], dtype=torch.float32)
    from slidekit.models.checkpoint import load_checkpoint
    from trainers.stage2 import fit_topk_mean

    ckpt = fit_topk_mean(TopKMeanTrainer(cfg), em_dir.parent / "topk_mean", bags, labels, device="cpu",
                         progress=False)
    ck = load_checkpoint(ckpt)
    test_recs = recs(cohort["test"], mixed["heatmaps"])
    probs = topk_mean_probs(ck.model, ck.spec, read_bags(test_recs, cfg.k, cfg.mpp, cfg.patch_size))
    truth_pos = np.array([r.positive for r in test_recs])
    node = []
    for p, f in zip(probs, mixed["features"]):
        if p < 0.5:
            node.append("negative")
        else:
            c = predicted_size_class(f)
            node.append("itc" if c == "negative" else c)
    kappa, acc, _ = stage_and_score(cohort["test"], node)
    auc = float(roc_auc_score(truth_pos, probs)) if 0 < truth_pos.sum() < len(truth_pos) else float("nan")
    return {"auc": auc, "binary_accuracy": float(((probs >= 0.5) == truth_pos).mean()), "kappa": kappa,
            "slide_accuracy": acc}


if __name__ == "__main__":
    main()

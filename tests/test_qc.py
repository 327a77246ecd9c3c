"""Slide QC (slidekit.regions.qc): artefacts drawn onto a synthetic textured slide with known masks are
found per class, clean and pale-but-sharp tissue is not flagged, qc.json's figures are the label map's,
the verdict fails for the right reason, ``Tissue() - QcArtefacts(out)`` drops the artefacts, the runner
skips and redoes, the CLI runs, and the pen rule finds the ink of real HistoQC overviews (shared data)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import box, shape

from slidekit.base.errors import OutputWarning
from slidekit.cli.common import Context
from slidekit.cli.qc import register
from slidekit.regions.masks import Tissue
from slidekit.regions.options import TissueOptions
from slidekit.regions.qc import ARTEFACTS, LABELS, QcArtefacts, QcOptions, focus_on_raster, qc_slide, sharpness
from slidekit.regions.qc_detect import _grey_reader, _tile_cache_bytes
from slidekit.regions.qc_zarr import read_label_zarr
from slidekit.slides.demo import write_pyramid
from slidekit.slides.slide import open_slide

MPP = 1.0  # level-0 µm/px of the synthetic slide (4096 x 3072 px: 4.1 x 3.1 mm)
W, H = 4096, 3072
INKS = {"blue": ((30, 60, 200), [(300, 300), (1500, 500), (2500, 250)]),
        "green": ((20, 150, 80), [(3700, 400), (3800, 1500), (3600, 2700)]),
        "black": ((25, 25, 30), [(600, 2800), (1800, 2950), (3000, 2750)]),
        "red": ((210, 20, 30), [(1700, 1300), (2000, 1500), (2100, 1900)])}


def draw_slide(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A textured H&E-like ellipse of tissue on glass with a blurred rectangle, a fold band, pen strokes of
    four colours, dark debris and a pale (low-contrast, sharp) stroma patch; returns RGB and level-0 masks."""
    rng = np.random.default_rng(seed)
    rgb = np.full((H, W, 3), 242, np.uint8)
    ellipse = np.zeros((H, W), np.uint8)
    cv2.ellipse(ellipse, (W // 2, H // 2), (int(W * 0.4), int(H * 0.4)), 0, 0, 360, 1, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 1.5)
    noise /= noise.std()
    tex = np.array([215, 140, 185], np.float32) + noise[..., None] * np.array([12, 20, 14], np.float32)
    nuclei = np.zeros((H, W), np.uint8)
    for _ in range(6000):
        cv2.circle(nuclei, (int(rng.integers(0, W)), int(rng.integers(0, H))), int(rng.integers(2, 5)), 1, -1)
    tex[nuclei > 0] = [110, 70, 160]
    tissue = ellipse > 0
    rgb[tissue] = np.clip(tex, 0, 255).astype(np.uint8)[tissue]
    truth: dict[str, np.ndarray] = {"tissue": tissue}
    # pale stroma: a third of the contrast, paler (sharp: must not be called out of focus)
    pale = np.zeros((H, W), np.uint8)
    cv2.rectangle(pale, (1700, 2100), (2600, 2550), 1, -1)
    pale_tex = np.array([232, 195, 215], np.float32) + noise[..., None] * np.array([4, 7, 5], np.float32)
    rgb[pale > 0] = np.clip(pale_tex, 0, 255).astype(np.uint8)[pale > 0]
    truth["pale"] = pale > 0
    blur = np.zeros((H, W), np.uint8)
    cv2.rectangle(blur, (800, 1000), (1500, 2000), 1, -1)
    rgb[blur > 0] = cv2.GaussianBlur(rgb, (0, 0), 8)[blur > 0]
    truth["Out of focus"] = blur > 0
    fold = np.zeros((H, W), np.uint8)
    cv2.line(fold, (2300, 700), (3000, 2000), 1, 120)
    # the tissue lying on itself: two layers, so its optical density doubles (Beer-Lambert)
    rgb[fold > 0] = np.clip(255 * (rgb[fold > 0].astype(np.float32) / 255) ** 2, 0, 255).astype(np.uint8)
    truth["Fold"] = fold > 0
    pen = np.zeros((H, W), bool)
    for colour, (value, points) in INKS.items():
        m = np.zeros((H, W), np.uint8)
        cv2.polylines(m, [np.array(points, np.int32)], False, 1, 40)
        rgb[m > 0] = value
        truth[f"ink {colour}"] = m > 0
        pen |= m > 0
    truth["Pen ink"] = pen
    debris = np.zeros((H, W), np.uint8)
    for x, y, r in [(1200, 700, 25), (2600, 1000, 30), (3300, 1200, 20), (1000, 2300, 28)]:
        cv2.circle(debris, (x, y), r, 1, -1)
    rgb[debris > 0] = (35, 32, 30)
    truth["Dark debris"] = debris > 0
    return rgb, truth


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qc")
    rgb, truth = draw_slide()
    slide = write_pyramid(root / "drawn.tif", rgb, MPP)
    out = root / "qc"
    summary = qc_slide(slide, out, progress=False)
    labels = read_label_zarr(out / "qc_labels.zarr")[0]
    return {"slide": slide, "out": out, "summary": summary, "labels": labels, "truth": truth, "root": root}


def _on_labels(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A level-0 mask on the label raster: the cells it covers at least half."""
    return cv2.resize(mask.astype(np.float32), labels.shape[::-1], interpolation=cv2.INTER_AREA) > 0.5


def _scores(found: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    inter = float((found & truth).sum())
    return (inter / max((found | truth).sum(), 1), inter / max(truth.sum(), 1), inter / max(found.sum(), 1))


# Measured on this slide (IoU, recall, precision): blur 0.82/0.82/1.00, fold 0.94/1.00/0.94,
# pen 0.89/1.00/0.89 (the detector takes the stroke's mixed rim pixels too), debris 0.71/0.71/1.00 (blobs of
# 5-7 label pixels across lose their mixed rim). Bounds below leave room, not slack for a broken rule.
BOUNDS = {"Out of focus": (0.7, 0.7, 0.95), "Fold": (0.85, 0.9, 0.85), "Pen ink": (0.8, 0.95, 0.8),
          "Dark debris": (0.5, 0.5, 0.9)}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_each_class_finds_its_drawn_region(drawn: dict, name: str) -> None:
    labels = drawn["labels"]
    iou, recall, precision = _scores(labels == LABELS[name], _on_labels(drawn["truth"][name], labels))
    lo_iou, lo_recall, lo_precision = BOUNDS[name]
    assert iou >= lo_iou and recall >= lo_recall and precision >= lo_precision, (name, iou, recall, precision)


@pytest.mark.parametrize("colour", list(INKS))
def test_every_ink_colour_is_pen(drawn: dict, colour: str) -> None:
    labels = drawn["labels"]
    stroke = _on_labels(drawn["truth"][f"ink {colour}"], labels)
    assert (labels[stroke] == LABELS["Pen ink"]).mean() >= 0.95, colour


def test_clean_and_pale_tissue_is_not_flagged(drawn: dict) -> None:
    labels, truth = drawn["labels"], drawn["truth"]
    artefacts = np.zeros(truth["tissue"].shape, bool)
    for name in ("Out of focus", "Fold", "Pen ink", "Dark debris"):
        artefacts |= truth[name]
    near = cv2.dilate(_on_labels(artefacts, labels).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    inner = cv2.erode(_on_labels(truth["tissue"], labels).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    clean = inner & ~near
    flagged = labels[clean] >= 2
    assert flagged.mean() <= 0.02, flagged.mean()
    assert (labels[clean] == LABELS["Tissue"]).mean() >= 0.98
    pale = _on_labels(truth["pale"], labels) & ~near
    assert (labels[pale] == LABELS["Out of focus"]).mean() <= 0.02  # sharp but pale stroma is in focus
    assert (labels[~cv2.dilate(_on_labels(truth["tissue"] | artefacts, labels).astype(np.uint8),
                               np.ones((7, 7), np.uint8)).astype(bool)] == LABELS["Glass"]).mean() >= 0.99


def test_qc_json_areas_are_the_label_counts(drawn: dict) -> None:
    out, labels = drawn["out"], drawn["labels"]
    report = json.loads((out / "qc.json").read_text())
    legend = read_label_zarr(out / "qc_labels.zarr")[1]
    px = legend["mpp"] ** 2
    assert legend["mpp"] == 8.0 and legend["shape"] == list(labels.shape)
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    tissue = counts[1:].sum()
    assert report["tissue_area_um2"] == pytest.approx(tissue * px)
    for name in ARTEFACTS:
        c = report["classes"][name]
        assert c["value"] == legend["labels"][name]["value"] == LABELS[name]
        assert c["area_um2"] == pytest.approx(counts[LABELS[name]] * px)
        assert c["fraction_of_tissue"] == pytest.approx(counts[LABELS[name]] / tissue)
    assert report["not_measured"] == []
    # the summary carries the report's fields
    assert drawn["summary"]["verdict"] == report["verdict"]


def test_geojson_has_one_classed_annotation_per_found_class(drawn: dict) -> None:
    out = drawn["out"]
    report = json.loads((out / "qc.json").read_text())
    features = json.loads((out / "qc.geojson").read_text())["features"]
    by_class = {f["properties"]["classification"]["name"]: f for f in features}
    found = {n for n, c in report["classes"].items() if c["pixels"]}
    assert set(by_class) == found and len(features) == len(found)
    for name, f in by_class.items():
        g = shape(f["geometry"])
        assert box(0, 0, W, H).buffer(1e-6).covers(g)
        assert g.area * MPP * MPP == pytest.approx(report["classes"][name]["area_um2"], rel=1e-6)
        assert f["properties"]["objectType"] == "annotation"


def test_verdict_fails_with_the_reason(drawn: dict) -> None:
    loose = dict(max_pen=1.0, max_blur=1.0, max_fold=1.0, max_debris=1.0, max_bubble=1.0)
    ok = qc_slide(drawn["slide"], drawn["root"] / "loose", options=QcOptions(**loose), progress=False)
    assert ok["verdict"] == "pass" and ok["reasons"] == []
    fold = ok["classes"]["Fold"]["fraction_of_tissue"]
    strict = qc_slide(drawn["slide"], drawn["root"] / "strict", options=QcOptions(**{**loose, "max_fold": fold / 2}),
                      progress=False)
    assert strict["verdict"] == "fail"
    assert len(strict["reasons"]) == 1 and strict["reasons"][0].startswith("Fold:")
    assert not strict["classes"]["Fold"]["pass"] and strict["classes"]["Pen ink"]["pass"]


def test_tissue_minus_qc_artefacts(drawn: dict) -> None:
    labels, out = drawn["labels"], drawn["out"]
    with open_slide(drawn["slide"]) as slide:
        tissue = Tissue().build(slide, progress=False)
        kept = (Tissue() - QcArtefacts(out)).build(slide, progress=False)
        only_fold = (Tissue() - QcArtefacts(out, "Fold")).build(slide, progress=False)
    assert kept.array.shape == tissue.array.shape == labels.shape  # both at 8 µm/px on this slide
    artefact = labels >= 2
    assert not (kept.array & artefact).any()
    assert (kept.array == (tissue.array & ~artefact)).all()
    assert not (only_fold.array & (labels == LABELS["Fold"])).any()
    assert (only_fold.array & (labels == LABELS["Out of focus"])).any()
    assert (Tissue() - QcArtefacts(out)).config() != Tissue().config()
    with pytest.raises(Exception, match="unknown QC class"):
        QcArtefacts(out, "Smudge").config()


def test_qc_artefacts_resample_onto_another_raster(drawn: dict) -> None:
    with open_slide(drawn["slide"]) as slide:
        coarse = (Tissue(TissueOptions({"mpp": 16.0})) - QcArtefacts(drawn["out"], "Fold")).build(slide)
    # nearest resampling: a 16 µm cell takes the 8 µm label pixel at its centre
    fold = (drawn["labels"] == LABELS["Fold"])[1::2, 1::2][:coarse.array.shape[0], :coarse.array.shape[1]]
    assert coarse.mpp == 16.0 and fold.any() and not (coarse.array & fold).any()


@pytest.mark.parametrize(("f", "shape", "block_pixels"), [(4, (100, 75), 75 * 16 * 3), (4, (100, 75), 1 << 12),
                                                      (2, (61, 150), 1 << 12), (1, (97, 130), 2000)])
def test_focus_in_blocks_is_the_focus_of_the_whole_view(f: int, shape: tuple[int, int], block_pixels: int) -> None:
    """Blocks of any size (strips and rows that do not divide the raster, f of 1, 2 or 4 grey pixels a label
    pixel), read with their margins: the same sharpness as the whole view in one piece."""
    rng = np.random.default_rng(1)
    grey = cv2.GaussianBlur(rng.integers(0, 255, (shape[0] * f + 3, shape[1] * f - 2), np.uint8), (0, 0), 1.0)
    whole = focus_on_raster(grey, f, shape, 8.0 / f, QcOptions(), block_pixels=1 << 30)
    blocks = focus_on_raster(grey, f, shape, 8.0 / f, QcOptions(), block_pixels=block_pixels)
    assert np.isfinite(whole).mean() > 0.9
    np.testing.assert_allclose(blocks, whole, rtol=1e-4, equal_nan=True)


def test_focus_read_from_the_slide_in_blocks_is_the_focus_of_the_whole_view(tmp_path: Path) -> None:
    """The slide is read block by block, down strips narrower than the slide: each block's columns and rows
    (its margins too) are the whole grey view's, and the tile cache holds a block's read, not the level's width."""
    rng = np.random.default_rng(2)
    rgb = cv2.GaussianBlur(rng.integers(0, 255, (1200, 1700, 3), np.uint8), (0, 0), 1.2)
    path = write_pyramid(tmp_path / "noise.tif", rgb, 1.0, compression="none")
    shape, f, bmpp = (150, 212), 4, 2.0  # 8 µm/px labels: 600 x 848 grey px at 2 µm/px
    with open_slide(path) as slide:
        grey = cv2.cvtColor(slide.read_scaled((0, 0), (shape[1] * f, shape[0] * f), bmpp), cv2.COLOR_RGB2GRAY)
        whole = focus_on_raster(grey, f, shape, bmpp, QcOptions(), block_pixels=1 << 30)
        blocks = focus_on_raster(_grey_reader(slide, bmpp), f, shape, bmpp, QcOptions(), block_pixels=1 << 14)
        level = slide.best_level_for_mpp(bmpp)
        tw, th = slide.tile_size(level)
        on_level = round(100 * bmpp / (slide.mpp[0] * slide.level_downsamples[level]))  # a read 100 grey px wide
        across = -(-slide.level_dimensions[level][0] // tw)
        assert -(-on_level // tw) + 1 < across
        assert _tile_cache_bytes(slide, bmpp, 100) == 2 * (-(-on_level // tw) + 1) * tw * th * 4
        assert _tile_cache_bytes(slide, bmpp, 10**6) == _tile_cache_bytes(slide, bmpp) == 2 * across * tw * th * 4
        # with the read's height: every tile row it touches and one more (3 for a read under one tile row)
        assert _tile_cache_bytes(slide, bmpp, 100, 100) == 3 * (-(-on_level // tw) + 1) * tw * th * 4
    assert np.isfinite(whole).mean() > 0.9
    np.testing.assert_allclose(blocks, whole, rtol=1e-4, equal_nan=True)


def test_holes_in_sharp_tissue_are_not_blur_but_blur_is() -> None:
    """Loose stroma: sharp texture with many white clefts 16-32 px across (2 µm/px). Against the plain grey
    variance (``band_um`` far above the clefts) the clefts' coarse contrast reads as blur; against the
    detail below ``blur_band_um`` it does not, while the same texture blurred (σ 6 µm) still is blur."""
    rng = np.random.default_rng(0)
    n = 600
    tex = cv2.GaussianBlur(rng.normal(0, 1, (n, n)).astype(np.float32), (0, 0), 1.0)
    tex = 150 + 15 * tex / tex.std()
    holes = np.zeros((n, n), np.uint8)
    for _ in range(400):
        cv2.circle(holes, (int(rng.integers(0, n)), int(rng.integers(0, n))), int(rng.integers(8, 16)), 1, -1)
    clefts = np.where(holes > 0, 235, tex)
    blurred = cv2.GaussianBlur(tex, (0, 0), 3.0)
    o = QcOptions()

    def called_blur(grey: np.ndarray, band_um: float) -> float:
        ref = float(np.nanmedian(sharpness(tex.astype(np.uint8), 2.0, o.blur_window_um, o.blur_min_variance,
                                           band_um=band_um)))
        s = sharpness(np.clip(grey, 0, 255).astype(np.uint8), 2.0, o.blur_window_um, o.blur_min_variance,
                      band_um=band_um)
        return float(np.nanmean(s < o.blur_ratio * ref))

    assert 0.3 < holes.mean() < 0.45
    assert called_blur(clefts, o.blur_band_um) < 0.01 and called_blur(blurred, o.blur_band_um) > 0.95
    assert called_blur(clefts, 400.0) > 0.1  # the plain variance: what the detail is there for


def test_rerun_skipped_and_damaged_output_redone(drawn: dict, tmp_path: Path) -> None:
    out = tmp_path / "qc"
    first = qc_slide(drawn["slide"], out, progress=False)
    assert not first.get("skipped")
    assert qc_slide(drawn["slide"], out, progress=False)["skipped"] is True
    chunk = next(p for p in (out / "qc_labels.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"not a chunk")
    with pytest.warns(OutputWarning, match="redoing qc"):
        again = qc_slide(drawn["slide"], out, progress=False)
    assert not again.get("skipped") and "redone" in again
    assert (read_label_zarr(out / "qc_labels.zarr")[0] == drawn["labels"]).all()


def test_cli(drawn: dict, tmp_path: Path) -> None:
    @click.group()
    def group() -> None:
        pass

    register(group)
    args = ["qc", str(drawn["slide"]), "--out", str(tmp_path / "c"), "--max-fold", "0.001", "-q"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(group, args, obj=Context())
    assert r.exit_code == 0, r.output
    assert r.output.startswith("fail:") and "Fold:" in r.output
    report = json.loads((tmp_path / "c" / "qc.json").read_text())
    assert report["classes"]["Fold"]["max_fraction"] == 0.001
    r = CliRunner().invoke(group, args + ["--json"], obj=Context())
    assert r.exit_code == 0 and json.loads(r.output)["verdict"] == "fail"


# Measured (Dice against the hand-drawn mask, at a stated 16 µm/px): green 0.92, black 0.94.
@pytest.mark.parametrize("name", ["pen_green", "pen_black"])
def test_pen_ink_on_real_overviews(shared_data: Path, tmp_path: Path, name: str) -> None:
    image = shared_data / "qc" / f"{name}.png"
    if not image.exists():
        pytest.skip(f"real data not found — {image}")
    summary = qc_slide(image, tmp_path / name, slide_mpp=16.0, progress=False)
    labels = read_label_zarr(tmp_path / name / "qc_labels.zarr")[0]
    truth = cv2.imread(str(shared_data / "qc" / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert labels.shape == truth.shape  # the overview's own pixels (16 µm/px is coarser than 8)
    ink = labels == LABELS["Pen ink"]
    dice = 2 * (ink & truth).sum() / (ink.sum() + truth.sum())
    assert dice >= 0.88 and (ink & truth).sum() / truth.sum() >= 0.85, dice
    assert summary["not_measured"] == ["Out of focus"]  # 16 µm/px is too coarse to judge focus


# Measured (Dice against the hand-drawn edge lines, at a stated 16 µm/px): 0.55 (0.14 while the dark band of
# the edge was called black pen).
def test_coverslip_edge_on_a_real_overview(shared_data: Path, tmp_path: Path) -> None:
    image = shared_data / "qc" / "coverslip_edge_he.png"
    if not image.exists():
        pytest.skip(f"real data not found — {image}")
    qc_slide(image, tmp_path / "edge", slide_mpp=16.0, progress=False)
    labels = read_label_zarr(tmp_path / "edge" / "qc_labels.zarr")[0]
    truth = cv2.imread(str(shared_data / "qc" / "coverslip_edge_he_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    edge = labels == LABELS["Air bubble / edge"]
    assert 2 * (edge & truth).sum() / (edge.sum() + truth.sum()) >= 0.5
    assert (labels[truth] == LABELS["Pen ink"]).mean() < 0.05  # the edge's dark band is not pen


def test_heatmap_and_cells_leave_qc_artefacts_out(drawn: dict, tmp_path: Path) -> None:
    """`--exclude-qc` composes the QC's artefacts into the job's region: fewer tiles than without it,
    recorded in the configuration; the QC of another slide file is refused in one line."""
    from click.testing import CliRunner

    from slidekit.cli import main
    from slidekit.infer.cells import cells_slide
    from slidekit.infer.predictor import heatmap_slide

    fast = dict(workers=0, device="cpu", progress=False, mpp=8.0, size=32, min_tissue=0.5)
    plain = heatmap_slide(drawn["slide"], tmp_path / "plain", model="tissue", **fast)
    clean = heatmap_slide(drawn["slide"], tmp_path / "clean", model="tissue", exclude_qc=drawn["out"], **fast)
    assert 0 < clean["tiles"] < plain["tiles"]
    assert "-qc" in clean["config"] and "-qc" not in plain["config"]
    cells = cells_slide(drawn["slide"], tmp_path / "cells", exclude_qc=drawn["out"], workers=0, device="cpu",
                        progress=False, mpp=4.0, size=64, gzip=False)
    assert "-qc" in cells["config"]
    other = write_pyramid(tmp_path / "other.tif", draw_slide(seed=1)[0], MPP)
    r = CliRunner().invoke(main, ["heatmap", str(other), "--model", "tissue", "--out", str(tmp_path / "o"),
                                  "--exclude-qc", str(drawn["out"]), "--device", "cpu", "--workers", "0", "-q"])
    assert r.exit_code != 0 and "QC of another slide file" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "summary.json").exists()

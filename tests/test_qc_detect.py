"""QC detectors (slidekit.regions.qc_detect) on small synthetic views with known masks: an air bubble is
found and filled and textured tissue holds none; a fold (doubled tissue, same colour) is a fold while
equally dark tissue of a colour of its own is not, on H&E and on IHC (DAB brown, haematoxylin blue)
alike; a bent black stroke is ink and a black blob debris; a straight dark line across the view is a
coverslip edge;
and the benchmark's artefact generator (benchmarks/qc_synth.py) draws what its masks say."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from slidekit.regions.qc_detect import QcOptions, _ring_coverage, air_bubbles, colour_artefacts

MPP = 8.0  # µm per pixel of the views (the label raster's default)
N = 320  # 2.56 mm square


def tissue_view(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Textured H&E-pink tissue (an ellipse) on glass at 8 µm/px with scattered purple nuclei clusters."""
    rng = np.random.default_rng(seed)
    rgb = np.full((N, N, 3), 242, np.uint8)
    tissue = np.zeros((N, N), np.uint8)
    cv2.ellipse(tissue, (N // 2, N // 2), (int(N * 0.44), int(N * 0.42)), 0, 0, 360, 1, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (N, N)).astype(np.float32), (0, 0), 1.0)
    noise /= noise.std()
    tex = np.array([220, 150, 190], np.float32) + noise[..., None] * np.array([10, 16, 12], np.float32)
    rgb[tissue > 0] = np.clip(tex, 0, 255).astype(np.uint8)[tissue > 0]
    return rgb, tissue > 0


def od_scale(rgb: np.ndarray, mask: np.ndarray, factor: np.ndarray | float) -> None:
    """Multiply the optical density of ``rgb`` under ``mask`` by ``factor`` (per channel allowed), in place."""
    od = -np.log(np.maximum(rgb[mask].astype(np.float32), 1) / 255.0) * np.asarray(factor, np.float32)
    rgb[mask] = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_air_bubble_found_and_filled() -> None:
    rgb, tissue = tissue_view()
    disc = np.zeros((N, N), np.uint8)
    cv2.circle(disc, (150, 170), 40, 1, -1)
    inside = disc > 0
    rgb[inside] = (rgb[inside] + (255 - rgb[inside].astype(np.float32)) * 0.4).astype(np.uint8)  # paler
    cv2.circle(rgb, (150, 170), 40, (90, 90, 90), 1)  # a thin grey rim
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions())
    assert dice(masks["Air bubble / edge"], inside) >= 0.85
    assert not masks["Fold"][inside].any() and not masks["Pen ink"][inside].any()


def test_no_bubble_in_plain_or_dotted_tissue() -> None:
    rgb, tissue = tissue_view(seed=1)
    rng = np.random.default_rng(1)
    for _ in range(400):  # dark grey dots: texture, not a rim
        cv2.circle(rgb, (int(rng.integers(40, N - 40)), int(rng.integers(40, N - 40))), 1, (80, 80, 80), -1)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    lines = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) > 25
    assert not air_bubbles(rgb, grey, lines, MPP, QcOptions()).any()
    assert not colour_artefacts(rgb, MPP, tissue, QcOptions())["Air bubble / edge"].any()


def test_ring_coverage_is_the_share_of_the_circle_on_a_rim() -> None:
    grey = np.full((200, 200), 200, np.uint8)
    cv2.circle(grey, (100, 100), 50, 60, 2)  # a rim 16 µm thick at 8 µm/px
    neutral = np.ones_like(grey, bool)
    cov = _ring_coverage(grey, neutral, np.array([100.0, 100.0]), np.array([100.0, 100.0]),
                         np.array([50.0, 30.0]), 25.0)
    assert cov[0] >= 0.95 and cov[1] == 0.0
    grey[:, 100:] = 200  # half the rim erased
    half = _ring_coverage(grey, neutral, 100.0, 100.0, 50.0, 25.0)[0]
    assert 0.45 <= half <= 0.55
    # a stained (not grey) rim is not a bubble's
    assert _ring_coverage(grey, np.zeros_like(neutral), 100.0, 100.0, 50.0, 25.0)[0] == 0.0


def test_fold_keeps_its_colour_dense_nuclei_do_not() -> None:
    rgb, tissue = tissue_view(seed=2)
    fold = np.zeros((N, N), np.uint8)
    cv2.line(fold, (60, 120), (200, 90), 1, 22)
    fold = (fold > 0) & tissue
    od_scale(rgb, fold, 2.0)  # two layers of the same tissue
    dense = np.zeros((N, N), np.uint8)
    cv2.line(dense, (80, 230), (230, 220), 1, 22)
    dense = (dense > 0) & tissue
    rgb[dense] = (120, 70, 160)  # haematoxylin-rich, as dark: nuclei packed, not folded
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions())
    assert dice(masks["Fold"], fold) >= 0.8
    assert masks["Fold"][dense].mean() < 0.05
    # the density is judged at the pixel's own colour: a stricter seed ratio than the doubling finds nothing
    assert not colour_artefacts(rgb, MPP, tissue, QcOptions(fold_seed_ratio=2.5))["Fold"].any()


def ihc_view(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ki67-like IHC tissue at 8 µm/px: pale haematoxylin-blue with scattered brown (DAB) nuclei and a
    few dense DAB-positive clusters (brown, as dark as a fold); returns RGB, tissue and the clusters."""
    rng = np.random.default_rng(seed)
    rgb = np.full((N, N, 3), 238, np.uint8)
    tissue = np.zeros((N, N), np.uint8)
    cv2.ellipse(tissue, (N // 2, N // 2), (int(N * 0.44), int(N * 0.42)), 0, 0, 360, 1, -1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (N, N)).astype(np.float32), (0, 0), 1.0)
    noise /= noise.std()
    tex = np.array([175, 188, 212], np.float32) + noise[..., None] * np.array([10, 9, 7], np.float32)
    rgb[tissue > 0] = np.clip(tex, 0, 255).astype(np.uint8)[tissue > 0]
    dots = (rng.random((N, N)) < 0.04) & (tissue > 0)
    rgb[dots] = (150, 120, 100)  # single DAB-positive nuclei
    clusters = np.zeros((N, N), np.uint8)
    for x, y in [(90, 230), (230, 240), (250, 100)]:
        cv2.circle(clusters, (x, y), 14, 1, -1)
    clusters_m = (clusters > 0) & (tissue > 0)
    rgb[clusters_m] = np.clip(np.array([120, 75, 45], np.float32) + noise[clusters_m][:, None] * 6, 0, 255
                              ).astype(np.uint8)  # dense DAB: dark, brown
    return rgb, tissue > 0, clusters_m


def test_fold_on_ihc_tissue_is_found_dab_clusters_are_not() -> None:
    rgb, tissue, clusters = ihc_view()
    fold = np.zeros((N, N), np.uint8)
    cv2.line(fold, (60, 110), (200, 70), 1, 24)
    fold = (fold > 0) & tissue & ~cv2.dilate(clusters.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    od_scale(rgb, fold, 1.9)  # the section lying on itself: the blue tissue and its brown nuclei doubled
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions())
    assert dice(masks["Fold"], fold) >= 0.8
    assert masks["Fold"][clusters].mean() < 0.05
    assert masks["Fold"][tissue & ~fold].mean() < 0.01


def test_bent_black_stroke_is_ink_black_blob_is_debris() -> None:
    rgb, tissue = tissue_view(seed=3)
    stroke = np.zeros((N, N), np.uint8)
    # a U whose bounding box is nearly square and well filled: shape by bounding box says "blob"
    cv2.polylines(stroke, [np.array([(90, 90), (90, 150), (150, 150), (150, 90)], np.int32)], False, 1, 10)
    blob = np.zeros((N, N), np.uint8)
    cv2.circle(blob, (220, 220), 9, 1, -1)
    rgb[stroke > 0] = (25, 25, 30)
    rgb[blob > 0] = (30, 28, 28)
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions())
    assert masks["Pen ink"][stroke > 0].mean() > 0.95
    assert masks["Dark debris"][blob > 0].mean() > 0.8 and not masks["Pen ink"][blob > 0].any()


def test_straight_dark_line_across_the_view_is_an_edge_a_marker_line_ending_on_it_is_ink() -> None:
    """A coverslip's edge runs straight off the slide at both ends; a black marker line, however straight,
    ends on the slide (and one that bends is ink wherever it ends)."""
    rgb, tissue = tissue_view(seed=4)
    edge, marker, bent = (np.zeros((N, N), np.uint8) for _ in range(3))
    cv2.line(edge, (40, 0), (70, N - 1), 1, 5)  # top border to bottom border, across glass and tissue
    cv2.line(marker, (260, 0), (250, 230), 1, 8)  # from the top border, ending on the slide
    cv2.polylines(bent, [np.array([(100, 319), (165, 265), (230, 319)], np.int32)], False, 1, 5)  # border to border
    for m in (edge, marker, bent):
        rgb[m > 0] = (28, 28, 30)
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions())
    assert masks["Air bubble / edge"][edge > 0].mean() > 0.95 and not masks["Pen ink"][edge > 0].any()
    assert masks["Pen ink"][marker > 0].mean() > 0.95 and not masks["Air bubble / edge"][marker > 0].any()
    assert masks["Pen ink"][bent > 0].mean() > 0.95
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions(edge_max_bend=0.0))  # no line is that straight
    assert masks["Pen ink"][edge > 0].mean() > 0.95


def test_generator_draws_what_its_masks_say(shared_data: Path) -> None:
    from benchmarks.qc_synth import CLASSES, draw_artefacts, real_tissue

    base = real_tissue(shared_data, "cmu1")
    rgb, masks = draw_artefacts(base, seed=0)
    assert rgb.shape == base.shape
    changed = np.abs(rgb.astype(np.int16) - base).max(-1) > 0
    for name in CLASSES:
        assert masks[name].any(), name
        assert changed[masks[name]].mean() > 0.5, name  # drawn where the mask says
    for a in CLASSES:  # no two classes overlap
        for b in CLASSES:
            assert a == b or not (masks[a] & masks[b]).any(), (a, b)
    union = np.logical_or.reduce([masks[n] for n in CLASSES])
    # and nowhere else on tissue (the blur also smooths the glass inside its ellipse; glass is not scored)
    assert changed[~union & masks["tissue"]].mean() < 0.001
    again, _ = draw_artefacts(base, seed=0)
    assert np.array_equal(rgb, again)  # a seed draws the same slide


@pytest.mark.parametrize("colour", ["green", "blue", "black", "red"])
def test_every_ink_colour_over_tissue(colour: str) -> None:
    from benchmarks.qc_synth import INKS

    rgb, tissue = tissue_view(seed=4)
    stroke = np.zeros((N, N), np.uint8)
    cv2.polylines(stroke, [np.array([(60, 80), (160, 200), (260, 120)], np.int32)], False, 1, 12)
    s = stroke > 0
    rgb[s] = np.clip(rgb[s] * (np.array(INKS[colour], np.float32) / 255), 0, 255).astype(np.uint8)
    masks = colour_artefacts(rgb, MPP, tissue, QcOptions())
    assert dice(masks["Pen ink"], s) >= 0.85, colour
    assert not masks["Pen ink"][tissue & ~cv2.dilate(stroke, np.ones((7, 7), np.uint8)).astype(bool)].any()


def test_neutral_grey_band_is_no_fold() -> None:
    """A dark grey band (a coverslip edge's shadow, a bubble's rim) is much denser than the pale grey on the
    slide, but no stain is grey."""
    rgb, tissue = tissue_view(seed=5)
    band = np.zeros((N, N), np.uint8)
    cv2.line(band, (70, 60), (90, 260), 1, 16)
    band = (band > 0) & tissue
    rgb[band] = (95, 95, 98)
    smudge = np.zeros((N, N), np.uint8)  # pale grey smudges read as tissue: what grey normally looks like here
    cv2.rectangle(smudge, (150, 60), (260, 160), 1, -1)
    rgb[(smudge > 0) & tissue] = (205, 205, 208)
    assert not colour_artefacts(rgb, MPP, tissue, QcOptions())["Fold"][band].any()
    # the neutral-colour rule is what keeps it out
    assert colour_artefacts(rgb, MPP, tissue, QcOptions(fold_min_spread=0))["Fold"][band].mean() > 0.5

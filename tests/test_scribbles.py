"""Scribble generation from masks (S2L protocol) and the segmentation metrics."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from slidekit.annotations.scribbles import (
    IGNORE,
    foreground_iou,
    generate_scribbles,
    instances_from_mask,
    object_dice,
    segmentation_scores,
    skeleton_pieces,
)


def discs(shape=(120, 160), n=20, seed=0, border=False) -> np.ndarray:
    """An instance map of non-overlapping discs (optionally some cut by the image border)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    k = 0
    for _ in range(500):
        if k == n:
            break
        r = rng.integers(3, 8)
        lo = -r // 2 if border else r + 1
        cy, cx = rng.integers(lo, shape[0] - lo), rng.integers(lo, shape[1] - lo)
        d = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (ndi.binary_dilation(d, iterations=2) & (inst > 0)).any():
            continue
        k += 1
        inst[d] = k
    return inst


def check_inside(scrib: np.ndarray, inst: np.ndarray) -> None:
    assert set(np.unique(scrib)) <= {0, 1, IGNORE}
    assert (inst[scrib == 1] > 0).all(), "foreground scribble outside the objects"
    assert (inst[scrib == 0] == 0).all(), "background scribble on an object"


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_scribbles_inside_their_class_and_fraction_respected(fraction):
    inst = discs(n=20)
    s = generate_scribbles(inst, fraction, seed=1)
    check_inside(s, inst)
    touched = np.unique(inst[s == 1])
    assert len(touched) == max(1, round(fraction * 20))
    # Background: as many pieces as foreground pieces (here there are plenty to choose from).
    bg_parts = ndi.label(s == 0, structure=np.ones((3, 3)))[1]
    assert 1 <= bg_parts <= len(touched)
    assert (s != IGNORE).mean() < 0.2  # scribbles are sparse


def test_scribbles_are_seeded():
    inst = discs(n=15, seed=3)
    a = generate_scribbles(inst, 0.3, seed=7)
    assert np.array_equal(a, generate_scribbles(inst, 0.3, seed=7))
    assert not np.array_equal(a, generate_scribbles(inst, 0.3, seed=8))


def test_border_objects_and_edge_cases():
    inst = discs(n=25, seed=2, border=True)
    assert (inst[0] > 0).any() or (inst[-1] > 0).any() or (inst[:, 0] > 0).any()
    s = generate_scribbles(inst, 1.0, seed=0, width=3)
    check_inside(s, inst)
    # No objects: no foreground, one background stroke.
    empty = np.zeros((50, 60), np.int32)
    s = generate_scribbles(empty, 0.5, seed=0)
    assert (s == 1).sum() == 0 and (s == 0).sum() > 0
    # All foreground: no background to scribble on, and no crash.
    full = np.ones((30, 30), np.int32)
    s = generate_scribbles(full, 1.0)
    assert (s == 0).sum() == 0 and (s == 1).sum() > 0
    # One-pixel objects, objects on the very border, a boolean mask input.
    tiny = np.zeros((20, 20), bool)
    tiny[0, 0] = tiny[19, 19] = tiny[10, 10] = True
    s = generate_scribbles(tiny, 1.0)
    assert (s == 1).sum() == 3
    check_inside(s, ndi.label(tiny)[0])
    # Fraction 0: nothing drawn.
    assert (generate_scribbles(inst, 0.0) == IGNORE).all()
    with pytest.raises(ValueError):
        generate_scribbles(inst, 1.5)


def test_few_background_pieces():
    inst = np.zeros((40, 40), np.int32)
    for k, (r, c) in enumerate([(5, 5), (5, 30), (30, 5), (30, 30), (18, 18)], start=1):
        inst[r:r + 6, c:c + 6] = k
    pieces = skeleton_pieces(inst == 0)
    s = generate_scribbles(inst, 1.0, seed=0)
    check_inside(s, inst)
    assert ndi.label(s == 0, structure=np.ones((3, 3)))[1] <= max(len(pieces), 1)


def test_real_monuseg_masks(shared_data):
    from PIL import Image

    inst = np.asarray(Image.open(shared_data / "nuclei_monuseg" / "masks_instance" /
                                 "TCGA-CU-A0YN-01A-02-BSB.png")).astype(np.int32)
    n = len(np.unique(inst)) - 1
    s = generate_scribbles(inst, 0.3, seed=0)
    check_inside(s, inst)
    assert abs(len(np.unique(inst[s == 1])) - 0.3 * n) <= 1


def test_foreground_iou():
    a = np.zeros((10, 10), bool)
    b = a.copy()
    assert foreground_iou(a, b) == 1.0
    a[:5] = True
    assert foreground_iou(a, b) == 0.0
    b[:, :5] = True
    assert foreground_iou(a, b) == pytest.approx(25 / 75)


def test_object_dice_by_hand():
    gt = np.zeros((10, 10), np.int32)
    gt[0:2, 0:2] = 1  # 4 px
    gt[5:9, 5:9] = 2  # 16 px
    assert object_dice(gt, gt) == 1.0
    pred = np.zeros_like(gt)
    pred[0:2, 0:1] = 1  # half of object 1: Dice 2*2/(4+2)
    pred[5:9, 5:9] = 2
    d1 = 2 * 2 / 6
    g_side = (4 * d1 + 16 * 1.0) / 20
    p_side = (2 * d1 + 16 * 1.0) / 18
    assert object_dice(pred, gt) == pytest.approx(0.5 * (g_side + p_side))
    # A merged prediction covering both objects is penalised against each of them.
    merged = np.zeros_like(gt)
    merged[0:9, 0:9] = 1
    assert object_dice(merged, gt) < 0.5
    assert object_dice(np.zeros_like(gt), gt) == 0.0
    assert object_dice(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    # Labels need not be consecutive.
    assert object_dice(pred * 7, gt * 3) == pytest.approx(object_dice(pred, gt))


def test_segmentation_scores_average_over_images():
    gt = discs(n=5)
    perfect = segmentation_scores([gt > 0, gt > 0], [gt, gt])
    assert perfect["iou"] == 1.0 and perfect["mdice"] == pytest.approx(object_dice(instances_from_mask(gt > 0), gt))
    half = segmentation_scores([gt > 0, np.zeros_like(gt, bool)], [gt, gt])
    assert half["iou"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        segmentation_scores([], [])

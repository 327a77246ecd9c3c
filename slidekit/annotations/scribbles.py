"""Scribbles from full masks (as in Scribble2Label) and the metrics used to judge scribble training.

Scribble label maps use class indices (0 = background, 1 = foreground) and ``IGNORE`` (255) where
nothing was drawn, the convention of every slidekit scribble trainer.

Generation follows Lee & Jeong, "Scribble2Label" (MICCAI 2020): foreground scribbles are the
skeletons of the annotated objects, of which a ``fraction`` is kept; background scribbles are
pieces of the skeleton of the background, as many pieces as foreground pieces were kept.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

IGNORE = 255

_EIGHT = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8)


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _n_keep(n: int, fraction: float) -> int:
    if n == 0 or fraction <= 0:
        return 0
    return int(min(n, max(1, round(fraction * n))))


def _grow(lines: np.ndarray, region: np.ndarray, width: int) -> np.ndarray:
    """Thicken 1-px lines to about ``width`` px without leaving their class region."""
    if width <= 1:
        return lines
    grown = ndi.binary_dilation(lines, structure=np.ones((3, 3), bool), iterations=(width - 1) // 2 or 1)
    return grown & region


def skeleton_pieces(mask: np.ndarray, min_length: int = 3) -> list[np.ndarray]:
    """Split the skeleton of a boolean mask into branch pieces, as (k, 2) row/col index arrays.

    Junction pixels (more than two skeleton neighbours) are removed so that every piece is a
    simple stroke; pieces shorter than ``min_length`` pixels are dropped. Pixels outside the
    image count as not-skeleton, so pieces ending at the border are kept whole and never wrap.
    """
    if not mask.any():
        return []
    skel = skeletonize(mask)
    neighbours = ndi.convolve(skel.astype(np.uint8), _EIGHT, mode="constant", cval=0)
    strokes = skel & (neighbours <= 2)
    lab, n = ndi.label(strokes, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    order = np.argsort(lab, axis=None, kind="stable")
    flat = lab.ravel()[order]
    starts = np.searchsorted(flat, np.arange(1, n + 2))
    pieces = []
    for i in range(n):
        idx = order[starts[i]:starts[i + 1]]
        if len(idx) >= min_length:
            pieces.append(np.stack(np.unravel_index(idx, mask.shape), axis=1))
    return pieces


def generate_scribbles(instances: np.ndarray, fraction: float = 1.0,
                       seed: int | np.random.Generator | None = 0, width: int = 1,
                       bg_margin: int = 1, ignore: int = IGNORE) -> np.ndarray:
    """Scribble label map (uint8: 0 background, 1 foreground, ``ignore`` unlabelled) from an
    instance map (0 = background, 1..N = objects) or a boolean foreground mask.

    A ``fraction`` of the objects (at least one when there are any) get their skeleton as a
    foreground scribble. The background skeleton is computed on the background eroded by
    ``bg_margin`` px (so strokes keep off object edges), split into pieces at junctions, and as
    many pieces as foreground pieces are kept (all of them when there are fewer; one when the
    image has no objects). Every scribble pixel lies inside its own class.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = _rng(seed)
    inst = np.asarray(instances)
    if inst.dtype == bool:
        inst = ndi.label(inst)[0]
    out = np.full(inst.shape, ignore, np.uint8)
    fg = inst > 0

    boxes = ndi.find_objects(inst.astype(np.int64, copy=False))
    ids = [i + 1 for i, b in enumerate(boxes) if b is not None]
    keep = rng.choice(ids, size=_n_keep(len(ids), fraction), replace=False) if ids else np.empty(0, np.int64)
    fg_lines = np.zeros(inst.shape, bool)
    for obj in keep:
        box = boxes[obj - 1]
        obj_mask = inst[box] == obj
        sk = skeletonize(obj_mask)
        if not sk.any():  # tiny objects skeletonise to nothing; use their centre pixel
            rr, cc = np.nonzero(obj_mask)
            sk[rr[len(rr) // 2], cc[len(cc) // 2]] = True
        fg_lines[box] |= sk
    out[_grow(fg_lines, fg, width)] = 1

    if fraction > 0:
        bg = ~fg
        bg_core = ndi.binary_erosion(bg, iterations=bg_margin, border_value=1) if bg_margin > 0 else bg
        pieces = skeleton_pieces(bg_core)
        n_bg = min(len(pieces), max(len(keep), 1))
        bg_lines = np.zeros(inst.shape, bool)
        for j in rng.choice(len(pieces), size=n_bg, replace=False) if n_bg else []:
            rr, cc = pieces[j].T
            bg_lines[rr, cc] = True
        out[_grow(bg_lines, bg, width) & (out == ignore)] = 0
    return out


# ---------------------------------------------------------------------------------------- metrics

def foreground_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of the foreground of one image (1.0 when both are empty)."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else float(np.count_nonzero(p & g) / union)


def instances_from_mask(mask: np.ndarray) -> np.ndarray:
    """Connected components (4-connected) of a binary prediction as an instance map."""
    return ndi.label(np.asarray(mask) > 0)[0]


def object_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Object-level Dice with object matching (Sirinukunwattana et al., GlaS 2017).

    Both inputs are instance maps (0 = background). Each ground-truth object is matched to the
    predicted object it overlaps most and vice versa; the two area-weighted mean Dice values are
    averaged. 1.0 when both are empty, 0.0 when only one is.
    """
    p = np.asarray(pred).astype(np.int64, copy=False).ravel()
    g = np.asarray(gt).astype(np.int64, copy=False).ravel()
    np_, ng = int(p.max(initial=0)) + 1, int(g.max(initial=0)) + 1
    area_p = np.bincount(p, minlength=np_).astype(np.float64)
    area_g = np.bincount(g, minlength=ng).astype(np.float64)
    area_p[0] = area_g[0] = 0
    if area_p.sum() == 0 and area_g.sum() == 0:
        return 1.0
    if area_p.sum() == 0 or area_g.sum() == 0:
        return 0.0
    both = (p > 0) & (g > 0)
    pairs, inter = np.unique(g[both] * np_ + p[both], return_counts=True)
    gi, pi = pairs // np_, pairs % np_

    def side(a_ids: np.ndarray, b_ids: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> float:
        best_inter = np.zeros(len(area_a))
        best_other = np.zeros(len(area_a), np.int64)
        order = np.lexsort((inter, a_ids))  # per object of a, its largest overlap comes last
        a_sorted = a_ids[order]
        last = order[np.r_[a_sorted[1:] != a_sorted[:-1], True]]
        best_inter[a_ids[last]] = inter[last]
        best_other[a_ids[last]] = b_ids[last]
        dice = np.where(best_inter > 0,
                        2 * best_inter / np.maximum(area_a + area_b[best_other], 1), 0.0)
        return float((dice * area_a).sum() / area_a.sum())

    return 0.5 * (side(gi, pi, area_g, area_p) + side(pi, gi, area_p, area_g))


def segmentation_scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, float]:
    """Mean foreground IoU and mean object Dice over images (binary predictions vs instance maps)."""
    if len(preds) != len(gts) or not preds:
        raise ValueError("need the same, non-zero number of predictions and ground truths")
    ious = [foreground_iou(p, g) for p, g in zip(preds, gts)]
    dices = [object_dice(instances_from_mask(p), g) for p, g in zip(preds, gts)]
    return {"iou": float(np.mean(ious)), "mdice": float(np.mean(dices)), "n_images": len(preds)}

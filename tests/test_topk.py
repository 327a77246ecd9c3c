"""Top-K tiles by max pixel probability, and the top-K mean."""
from __future__ import annotations

import numpy as np
import pytest

from slidekit.base.errors import LabelError
from slidekit.slidelevel.topk import read_score_table, tile_max_scores, topk_from_scores, topk_indices, topk_mean


def test_topk_indices_order_ties_nan():
    s = np.array([0.1, 0.9, np.nan, 0.9, 0.5])
    assert topk_indices(s, 3).tolist() == [1, 3, 4]
    assert topk_indices(s, 10).tolist() == [1, 3, 4, 0, 2]
    with pytest.raises(ValueError):
        topk_indices(s, 0)


def test_topk_mean():
    p = np.arange(100) / 100
    assert topk_mean(p, 16) == pytest.approx(np.mean(np.arange(84, 100) / 100))
    assert topk_mean([0.2, 0.4], 16) == pytest.approx(0.3)  # fewer than K: all of them


def test_tile_max_scores_band_wise():
    prob = np.zeros((64, 64), np.float32)
    prob[40, 10] = 0.8      # inside tile (0, 32)
    prob[31, 33] = 0.6      # inside tile (32, 0), on the band boundary below
    coords = np.array([[0, 0], [32, 0], [0, 32], [32, 32]]) * 2  # level-0, heatmap scale 2
    s = tile_max_scores(prob, coords, (64, 64), scale=(2, 2), band_rows=8)
    assert s.tolist() == pytest.approx([0.0, 0.6, 0.8, 0.0])
    top = topk_from_scores(coords, s, k=2)
    assert top.indices.tolist() == [2, 1] and top.coords.tolist() == [[0, 64], [64, 0]]


def test_score_table(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("x,y,score\n0,0,0.1\n256,0,0.7\n")
    coords, scores = read_score_table(p)
    assert topk_from_scores(coords, scores, 1).coords.tolist() == [[256, 0]]
    (tmp_path / "bad.csv").write_text("x,y\n0,0\n")
    with pytest.raises(LabelError, match="bad.csv"):
        read_score_table(tmp_path / "bad.csv")


def test_topk_from_heatmap_on_disk(tmp_path):
    from test_features import _write_heatmap  # pytest puts tests/ on sys.path (rootdir-relative)

    from slidekit.slidelevel.topk import topk_from_heatmap

    p = np.zeros((300, 300), np.float32)
    p[250, 120] = 0.9
    p[10, 10] = 0.5
    _write_heatmap(tmp_path / "h" / "heatmap.zarr", p)
    top = topk_from_heatmap(tmp_path / "h", k=2)
    assert top.coords.tolist() == [[200, 400], [0, 0]]
    assert top.scores.tolist() == pytest.approx([0.9, 0.5])

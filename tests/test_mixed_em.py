"""Mixed-supervision EM: E-step rules, the 2:1:7 batch ratio, round selection, masks, a tiny run."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import zarr

from slidekit.data.sampling import FixedRatioSampler, ratio_counts
from trainers.mixed_em import e_step, mask_patch, pseudo_label, select_round

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_threshold_drops_patches():
    p = np.full((8, 8), 0.39, np.float32)
    assert pseudo_label(p, True) is None          # max below T = 0.4: dropped
    assert pseudo_label(p, False) is None
    p[3, 3] = 0.4
    assert pseudo_label(p, True) is not None      # max == T is kept


def test_positive_scaling_clipping_and_floor():
    p = np.array([[0.0, 0.002, 0.0025, 0.003], [0.1, 0.2, 0.25, 0.9]], np.float32)
    y = pseudo_label(p, True, threshold=0.4, scale=4.0, floor=0.01)
    np.testing.assert_allclose(y, [[0, 0, 0.01, 0.012], [0.4, 0.8, 1.0, 1.0]], atol=1e-6)
    assert y.max() <= 1.0


def test_negative_slides_give_all_zero_hard_negatives():
    p = np.zeros((4, 4), np.float32)
    p[0, 0] = 0.95
    y = pseudo_label(p, False)
    assert y is not None and y.shape == p.shape and not y.any()


def test_e_step_writes_zarr_and_index(tmp_path):
    hi = np.full((4, 4), 0.2, np.float32)
    hi[1, 1] = 0.6
    lo = np.full((4, 4), 0.1, np.float32)
    slides = [[(0, hi), (1, lo), (2, hi)], [(0, lo), (5, hi)]]
    found = e_step(iter(slides), [True, False], tmp_path / "pl.zarr")
    assert found["positive"].tolist() == [[0, 0], [0, 2]]
    assert found["hard_negative"].tolist() == [[1, 5]]
    arr = zarr.open_array(str(tmp_path / "pl.zarr"), mode="r")
    assert arr.shape == (2, 4, 4) and arr.chunks == (1, 4, 4)
    np.testing.assert_allclose(np.asarray(arr[1], np.float32), pseudo_label(hi, True), atol=1e-3)


def test_ratio_2_1_7_over_many_batches():
    sizes = [30, 12, 500]
    s = FixedRatioSampler(sizes, [2, 1, 7], batch_size=20, num_batches=200, seed=3)
    per_batch = []
    total = Counter()
    for batch in s:
        c = Counter(s.source_of(i) for i in batch)
        per_batch.append((c[0], c[1], c[2]))
        total.update(c)
        assert len(batch) == 20
    assert set(per_batch) == {(4, 2, 14)}
    assert total[0] / total[1] == pytest.approx(2.0) and total[2] / total[1] == pytest.approx(7.0)
    # each source is drawn without repeats until exhausted
    first = [i for b in list(s)[:15] for i in b if s.source_of(i) == 0]
    assert len(set(first)) == 30
    assert list(s) == list(s)  # deterministic


def test_ratio_counts_and_empty_source():
    assert ratio_counts(10, [2, 1, 7]) == [2, 1, 7]
    assert ratio_counts(7, [2, 1, 7]) == [1, 1, 5]
    s = FixedRatioSampler([10, 0, 40], [2, 1, 7], batch_size=9, num_batches=5)
    for b in s:
        c = Counter(s.source_of(i) for i in b)
        assert c[1] == 0 and (c[0], c[2]) == (2, 7)
    with pytest.raises(ValueError):
        FixedRatioSampler([0, 0], [1, 1], 4, 1)


def test_round_selection_by_lowest_stage2_loss():
    assert select_round([0.2, 0.9, 0.5, 0.7]) == 2          # round 0 (pixel-only) is not an EM round
    assert select_round([0.9, 0.5, float("nan"), 0.4]) == 3
    assert select_round([0.9, float("nan")]) == 1            # nothing finite: the last round
    assert select_round([0.3]) == 0
    assert select_round([0.2, 0.9, 0.5], first=0) == 0


def test_mask_patch_maps_level0_boxes():
    mask = np.zeros((100, 200), np.float32)   # covers a 400 x 200 slide at half resolution
    mask[:, 100:] = 1
    left = mask_patch(mask, (400, 200), (0, 0), (100, 100), 16)
    right = mask_patch(mask, (400, 200), (250, 50), (100, 100), 16)
    edge = mask_patch(mask, (400, 200), (150, 0), (100, 100), 16)
    assert left.max() == 0 and right.min() == 1
    assert edge[:, :6].max() < 0.5 and edge[:, 10:].min() > 0.5


@pytest.mark.slow
def test_tiny_mixed_em_run(tmp_path):
    """End to end on four small synthetic slides: rounds logged, a round selected, files written."""
    from conftest import mixed_em_slides

    from trainers.mixed_em import MixedEMConfig, MixedEMTrainer

    mixed_em_slides(tmp_path)
    cfg = MixedEMConfig(slides=str(tmp_path / "slides.csv"), mpp=8.0, patch_size=32, rounds=1, init_steps=3,
                        round_steps=2, batch_size=10, predict_tile=128, min_tissue=0.1)
    ckpt = MixedEMTrainer(cfg).fit(tmp_path / "out", device="cpu", progress=False)
    sel = json.loads((tmp_path / "out" / "selected.json").read_text())
    assert sel["selected_round"] == 1 and len(sel["losses"]) == 2
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["n_pixel"] > 0
    assert ckpt.exists() and (tmp_path / "out" / "morph_lgbm.json").exists()
    assert (tmp_path / "out" / "rounds" / "r1" / "pseudo_labels.zarr").exists()
    # a rerun finds the finished run and returns at once
    assert MixedEMTrainer(cfg).fit(tmp_path / "out", device="cpu", progress=False) == ckpt


def test_hard_negatives_topped_up_with_highest_scoring(tmp_path):
    def patch(v):
        return np.full((2, 2), v, np.float32)

    slides = [[(0, patch(0.5)), (1, patch(0.3)), (2, patch(0.1)), (3, patch(0.35))]]
    plain = e_step(iter(slides), [False], tmp_path / "a.zarr")
    assert plain["hard_negative"].tolist() == [[0, 0]]
    topped = e_step(iter(slides), [False], tmp_path / "b.zarr", min_hard_negatives=3)
    assert topped["hard_negative"].tolist() == [[0, 0], [0, 3], [0, 1]]


def _fake_rounds(out, cv_losses, chance=0.69, train_losses=None):
    """A mixed-em output folder with per-round files and metrics, as the trainer leaves it."""
    rows = []
    for r, cv in enumerate(cv_losses):
        rdir = out / "rounds" / f"r{r}"
        rdir.mkdir(parents=True)
        (rdir / "checkpoint.pt").write_text(f"round {r}")
        (rdir / "morph_lgbm.json").write_text("{}")
        rows.append({"round": r, "stage2_cv_loss": cv, "stage2_chance_loss": chance,
                     "stage2_train_loss": (train_losses or [0.1 * (r + 1)] * len(cv_losses))[r]})
    (out / "metrics.json").write_text(json.dumps(rows))


@pytest.mark.parametrize("cv, train, match, selected", [
    ([0.5, float("nan"), float("nan")], [0.3, 0.2, 0.25], "out-of-fold loss is NaN in every EM round", 1),
    ([0.5, 0.72, 0.70], None, r"round 2's stage-2 loss 0.7 .* no better than chance \(0.69", 2),
    ([0.5, float("nan")], [0.3, float("nan")], "no EM round has a finite stage-2 loss", 1),
])
def test_round_selection_on_nan_or_chance_level_loss_warns(tmp_path, cv, train, match, selected):
    from slidekit.base.errors import TrainingWarning
    from trainers.mixed_em import MixedEMConfig, MixedEMTrainer

    t = MixedEMTrainer(MixedEMConfig(slides="x.csv", rounds=len(cv) - 1))
    t.out = tmp_path
    _fake_rounds(tmp_path, cv, train_losses=train)
    with pytest.warns(TrainingWarning) as caught:
        ckpt = t._select()
    assert any(re.search(match, str(w.message)) for w in caught)
    sel = json.loads((tmp_path / "selected.json").read_text())
    assert sel["selected_round"] == selected and sel["warnings"] and ckpt.read_text() == f"round {selected}"


def test_round_selection_below_chance_is_quiet(tmp_path):
    import warnings

    from trainers.mixed_em import choose_round

    rows = [{"round": 0, "stage2_cv_loss": 0.6, "stage2_chance_loss": 0.69},
            {"round": 1, "stage2_cv_loss": 0.4, "stage2_chance_loss": 0.69}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_round(rows)["warnings"] == [] and choose_round(rows)["selected_round"] == 1


def test_mixed_em_config_ranges():
    from slidekit.base.errors import ConfigError
    from trainers.config import load_config
    from trainers.mixed_em import MixedEMConfig

    for bad in ("ratio=2,1", "rounds=-1", "patch_size=0", "threshold=1.5", "selection=best"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(MixedEMConfig, None, [bad])


def test_top_k_keeps_each_positive_slides_best_patches(tmp_path):
    def patch(v):
        return np.full((2, 2), v, np.float32)

    # slide 0 positive: four patches pass T, the two best (tiles 2 and 0) are kept, in tile order;
    # slide 1 negative: unaffected by top_k
    slides = [[(0, patch(0.8)), (1, patch(0.5)), (2, patch(0.9)), (3, patch(0.45)), (4, patch(0.1))],
              [(0, patch(0.6)), (1, patch(0.2))]]
    found = e_step(iter(slides), [True, False], tmp_path / "k.zarr", top_k=2)
    assert found["positive"].tolist() == [[0, 0], [0, 2]]
    assert found["hard_negative"].tolist() == [[1, 0]]
    arr = zarr.open_array(str(tmp_path / "k.zarr"), mode="r")
    np.testing.assert_allclose(np.asarray(arr[1], np.float32), pseudo_label(patch(0.9), True), atol=1e-3)
    assert e_step(iter(slides), [True, False], tmp_path / "all.zarr")["positive"].shape == (4, 2)


def test_positive_slide_negatives_below_their_threshold(tmp_path):
    def patch(v):
        return np.full((2, 2), v, np.float32)

    slides = [[(0, patch(0.8)), (1, patch(0.02)), (2, patch(0.2))]]
    plain = e_step(iter(slides), [True], tmp_path / "a.zarr")
    assert plain["hard_negative"].shape == (0, 2)       # the paper's rule: negatives from negative slides only
    found = e_step(iter(slides), [True], tmp_path / "b.zarr", positive_negatives=0.05)
    assert found["positive"].tolist() == [[0, 0]] and found["hard_negative"].tolist() == [[0, 1]]


def test_round_zero_may_win_the_selection_when_asked():
    from trainers.mixed_em import choose_round

    rows = [{"round": 0, "stage2_cv_loss": 0.3, "stage2_chance_loss": 0.69},
            {"round": 1, "stage2_cv_loss": 0.4, "stage2_chance_loss": 0.69}]
    assert choose_round(rows)["selected_round"] == 1
    chosen = choose_round(rows, first=0)
    assert chosen["selected_round"] == 0 and chosen["select_from"] == 0


def test_new_e_step_options_are_checked():
    from slidekit.base.errors import ConfigError
    from trainers.config import load_config
    from trainers.mixed_em import MixedEMConfig

    for bad in ("pseudo_top_k=-1", "positive_negatives=0.5", "select_from=2"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(MixedEMConfig, None, [bad])
    cfg = load_config(MixedEMConfig, None, ["pseudo_top_k=4", "positive_negatives=0.05", "select_from=0"])
    assert (cfg.pseudo_top_k, cfg.positive_negatives, cfg.select_from) == (4, 0.05, 0)

"""``benchmarks/scribble_transfer.py --protocol paper --quick`` end to end (issue 34): the fixed keys, finite
scores in [0, 1], the R % subsets and the pool/validation/test separation."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import scribble_transfer, scribble_transfer_paper  # noqa: E402
from benchmarks.scribble_transfer_paper import ARMS, RATIOS, subset  # noqa: E402


def test_subsets_are_stratified_nested_in_the_pool_and_seeded():
    labels = np.array([0] * 56 + [1] * 48)
    small = subset(labels, 5, seed=3)
    assert len(small) == 5 and set(labels[small]) == {0, 1}  # at least one tile of each class
    assert len(subset(labels, 20, seed=3)) == 21 and len(subset(labels, 100, seed=3)) == 104
    assert (subset(labels, 5, seed=3) == small).all()           # the seed picks the subset ...
    assert not all((subset(labels, 5, seed=s) == small).all() for s in range(4, 9))  # ... and others differ


def test_paper_protocol_quick_end_to_end(shared_data, tmp_path):
    out = tmp_path / "paper.json"
    result = scribble_transfer.main(["--protocol", "paper", "--quick", "--data", str(shared_data),
                                     "--seeds", "0", "1", "--json", str(out), "--log-every", "0"])
    saved = json.loads(out.read_text())
    assert saved["protocol"] == "paper" and saved["quick"] is True and saved["seeds"] == [0, 1]
    for arm in ARMS:
        for pct in RATIOS:
            for metric in ("accuracy", "macro_f1"):
                key = f"{metric}_{arm}_r{pct}"
                per_seed = saved[f"{key}_per_seed"]
                assert len(per_seed) == 2
                for v in [*per_seed, saved[f"{key}_mean"], saved[f"{key}_sd"]]:
                    assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0, (key, v)
    # paired differences by seed (benchmarks/seeds.py), spatial arms against class labels and random init
    for pct in RATIOS:
        d = saved[f"diff_scribble_vs_class_r{pct}_per_seed"]
        assert d == pytest.approx([a - b for a, b in zip(saved[f"accuracy_scribble_r{pct}_per_seed"],
                                                          saved[f"accuracy_class_r{pct}_per_seed"])])
        assert f"diff_full_vs_random_r{pct}_mean" in saved
    assert "accuracy_scribble_bnre_r20_mean" in saved and "diff_scribble_bnre_vs_kept_r20_mean" in saved
    # pre-training curves of every pre-trained arm, the same number of steps each
    assert set(saved["pretrain_curves"]) == {"class", "scribble", "full", "simclr"}
    assert all(c["step"][-1] == saved["pretrain_steps"] for c in saved["pretrain_curves"].values())
    assert all(math.isfinite(v) for c in saved["pretrain_curves"].values() for v in c["loss"])
    assert set(saved["pretrain_plateau"]) == {"class", "scribble", "full", "simclr"}
    assert all(isinstance(p["converged"], bool) for p in saved["pretrain_plateau"].values())
    assert saved["simclr_chance_loss"] == pytest.approx(math.log(2 * saved["size"]["pretrain_batch"] - 1), abs=1e-4)
    # the R % subsets grow with R; the validation tiles come out of the training split, never the test
    run = saved["runs"][0]
    assert run["n_train_r5"] <= run["n_train_r20"] <= run["n_train_r100"] == saved["n_pool"]
    assert run["n_train_r5"] < run["n_train_r100"]
    for key in ("date", "load_avg_1min", "cpu_seconds_total", "tile_px", "pretrain_crop_px"):
        assert key in saved
    assert result["accuracy_random_r5_mean"] == saved["accuracy_random_r5_mean"]


def test_paper_protocol_tiles_split_keeps_test_apart(shared_data):
    size = scribble_transfer_paper.PaperSize(tile_size=32)
    tiles = scribble_transfer_paper.load_tiles(shared_data / "patches_tcga_luadlusc_uni", size)
    assert len(tiles["pool_y"]) + len(tiles["val_y"]) == 130 and len(tiles["test_y"]) == 60
    pool = {t.tobytes() for t in tiles["pool_x"]} | {t.tobytes() for t in tiles["val_x"]}
    assert not pool & {t.tobytes() for t in tiles["test_x"]}


def test_plateau_check_tells_a_falling_curve_from_a_flat_one():
    from benchmarks.scribble_transfer_paper import plateau

    steps = np.arange(600)
    falling = list(1.0 / (1 + steps / 20))           # still gaining > 2 % per 60 steps at the end
    flat = list(0.3 + 0.7 * np.exp(-steps / 40))     # flat long before the end
    f, g = plateau(falling), plateau(flat)
    assert f["window_steps"] == g["window_steps"] == 60
    assert not f["converged"] and f["last_gain"] > 0.02
    assert g["converged"] and g["last_gain"] < 0.02 and g["first_step"] is not None and g["first_step"] < 400
    assert len(g["smoothed"]) == 10
    assert plateau([1.0, 0.9])["converged"] is False  # too short to judge


def test_pretraining_resumes_to_the_same_result(shared_data, tmp_path, monkeypatch):
    import torch

    from benchmarks.scribble_transfer_paper import QUICK, PaperSize, load_source, pretrain

    monkeypatch.setattr(scribble_transfer_paper, "CHECKPOINT_EVERY", 2)
    torch.set_num_threads(1)
    size = PaperSize(**{**QUICK, "pretrain_steps": 4, "max_source_images": 2})
    src = load_source(shared_data / "nuclei_monuseg", size)
    ck = tmp_path / "scribble.ckpt"
    whole, rec = pretrain("scribble", src, size, resume=ck)  # leaves its step-2 checkpoint behind
    assert ck.is_file() and torch.load(ck, weights_only=False)["step"] == 2
    again, rec2 = pretrain("scribble", src, size, resume=ck)  # continues from step 2
    assert rec2["curve"]["loss"] == rec["curve"]["loss"]
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    fresh, rec3 = pretrain("scribble", src, size)  # no checkpoint: the same run from scratch
    assert rec3["curve"]["loss"] == rec["curve"]["loss"]

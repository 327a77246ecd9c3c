"""The multi-seed benchmark harness (benchmarks/seeds.py): arithmetic on tiny fake runs, key names,
first-seed compatibility, and that every learning benchmark offers --seeds."""
from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

import pytest

from benchmarks.seeds import (
    add_baseline_argument,
    add_seeds_argument,
    combine_seed_files,
    mean_sd,
    run_seeds,
    run_with_baseline,
    strip_options,
    summarise,
    with_seed_dirs,
)


def test_mean_sd_is_the_sample_sd():
    m, sd = mean_sd([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7)
    assert sd == pytest.approx(0.2)  # ddof=1: sqrt((0.04 + 0 + 0.04) / 2)
    assert mean_sd([0.3]) == (0.3, None)
    assert mean_sd([]) == (None, None)


def test_summarise_pairs_by_seed_and_keeps_the_first_seed_keys():
    runs = [{"kappa_mixed": 0.9, "kappa_pixel_only": 0.8, "other": "a", "topk_mean": {"kappa": 0.5}},
            {"kappa_mixed": 0.7, "kappa_pixel_only": 0.75, "other": "b", "topk_mean": {"kappa": 0.6}},
            {"kappa_mixed": 0.8, "kappa_pixel_only": 0.6, "other": "c", "topk_mean": {"kappa": 0.7}}]
    out = summarise(runs, [0, 1, 2], ["kappa_mixed", "kappa_pixel_only", "topk_mean.kappa"],
                    pair=("kappa_mixed", "kappa_pixel_only"))
    assert out["kappa_mixed"] == 0.9 and out["other"] == "a" and out["topk_mean"] == {"kappa": 0.5}
    assert out["kappa_mixed_per_seed"] == [0.9, 0.7, 0.8]
    assert out["kappa_pixel_only_per_seed"] == [0.8, 0.75, 0.6]
    assert out["kappa_mixed_mean"] == pytest.approx(0.8)
    assert out["kappa_mixed_sd"] == pytest.approx(0.1)
    assert out["topk_mean_kappa_mean"] == pytest.approx(0.6)
    diff = [0.1, -0.05, 0.2]
    assert out["diff_per_seed"] == pytest.approx(diff)
    assert out["diff_mean"] == pytest.approx(sum(diff) / 3)
    m = sum(diff) / 3
    assert out["diff_sd"] == pytest.approx(math.sqrt(sum((d - m) ** 2 for d in diff) / 2))
    assert out["diff_wins"] == 2
    assert out["diff_of"] == "kappa_mixed - kappa_pixel_only"
    assert out["seeds"] == [0, 1, 2] and [r["other"] for r in out["runs"]] == ["a", "b", "c"]


def test_summarise_writes_named_extra_pairs_beside_the_plain_diff():
    runs = [{"accuracy_scribble": 0.8, "accuracy_random": 0.7, "accuracy_full": 0.85},
            {"accuracy_scribble": 0.75, "accuracy_random": 0.7, "accuracy_full": 0.7}]
    out = summarise(runs, [0, 1], ["accuracy_scribble", "accuracy_random"],
                    pair=("accuracy_scribble", "accuracy_random"),
                    pairs={"vs_full": ("accuracy_scribble", "accuracy_full")})
    assert out["diff_per_seed"] == pytest.approx([0.1, 0.05]) and out["diff_wins"] == 2
    assert out["diff_vs_full_of"] == "accuracy_scribble - accuracy_full"
    assert out["diff_vs_full_per_seed"] == pytest.approx([-0.05, 0.05])  # a pair of metrics not summarised
    assert out["diff_vs_full_mean"] == pytest.approx(0.0)
    assert out["diff_vs_full_sd"] == pytest.approx(math.sqrt(0.005))
    assert out["diff_vs_full_wins"] == 1
    assert "accuracy_full_per_seed" not in out


def test_scribble_transfer_reports_every_init_with_scribble_first():
    from benchmarks.scribble_transfer import INITS, PAIRS, per_seed_metrics

    keys = per_seed_metrics()
    assert keys[0] == "accuracy_scribble"  # the paired metric leads
    assert {f"accuracy_{i}" for i in INITS} | {f"macro_f1_{i}" for i in INITS} == set(keys)
    assert "ft_accuracy_full" in per_seed_metrics(fine_tune=True)
    assert all(a in keys and b in keys for a, b in PAIRS.values())


def test_summarise_refuses_a_seed_count_mismatch():
    with pytest.raises(ValueError):
        summarise([{"iou": 0.5}], [0, 1], ["iou"])


def test_strip_options_and_seed_dirs():
    argv = ["--method", "s2l", "--seeds", "0", "1", "2", "--json", "o.json", "--seed=4", "--epochs", "3"]
    assert strip_options(argv) == ["--method", "s2l", "--epochs", "3"]
    assert with_seed_dirs(["--work", "w", "--x", "1"], ["--work"], "seed1") == ["--work", str(Path("w/seed1")),
                                                                                 "--x", "1"]
    assert with_seed_dirs(["--work=w"], ["--work"], "seed2") == [f"--work={Path('w/seed2')}"]


def _fake_benchmark(calls: list):
    """A benchmark main: iou depends on seed and method; writes its --json like the real ones."""
    def main(argv):
        ap = argparse.ArgumentParser()
        ap.add_argument("--method", default="s2l")
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--json", type=Path)
        ap.add_argument("--work", type=Path)
        add_seeds_argument(ap)
        args = ap.parse_args(argv)
        assert args.seeds is None  # the harness never hands --seeds down
        calls.append((args.method, args.seed, args.work))
        iou = 0.5 + 0.1 * args.seed + (0.05 if args.method == "s2l" else 0.0) - (0.2 if args.seed == 2 else 0)
        if args.method == "pce" and args.seed == 2:
            iou += 0.1  # the baseline wins on seed 2
        args.json.write_text(json.dumps({"method": args.method, "seed": args.seed, "iou": iou, "mdice": iou + 0.1}))
    return main


def test_run_seeds_runs_each_method_per_seed_and_writes_the_summary(tmp_path, capsys):
    calls = []
    out_path = tmp_path / "out.json"
    argv = ["--method", "s2l", "--baseline", "pce", "--seeds", "0", "1", "2", "--work", str(tmp_path / "w"),
            "--json", str(out_path)]
    out = run_seeds(_fake_benchmark(calls), argv, [0, 1, 2], ["iou", "mdice"],
                    pair=("iou", "baseline_iou"), variants={"baseline_": ["--method", "pce"]}, json_out=out_path,
                    seed_dirs=("--work",), drop=("--baseline",))
    assert [(m, s) for m, s, _ in calls] == [("s2l", 0), ("pce", 0), ("s2l", 1), ("pce", 1), ("s2l", 2), ("pce", 2)]
    assert calls[0][2] == tmp_path / "w" / "seed0" and calls[1][2] == tmp_path / "w" / "seed0_baseline"
    written = json.loads(out_path.read_text())
    assert written["iou_per_seed"] == pytest.approx(out["iou_per_seed"])
    # first-seed compatibility: the plain keys are the main method's seed-0 run
    assert written["method"] == "s2l" and written["seed"] == 0 and written["iou"] == pytest.approx(0.55)
    assert written["iou_per_seed"] == pytest.approx([0.55, 0.65, 0.55])
    assert written["baseline_iou_per_seed"] == pytest.approx([0.5, 0.6, 0.6])
    assert written["baseline_mdice_per_seed"] == pytest.approx([0.6, 0.7, 0.7])
    assert written["diff_per_seed"] == pytest.approx([0.05, 0.05, -0.05])
    assert written["diff_mean"] == pytest.approx(0.05 / 3)
    assert written["diff_wins"] == 2
    assert written["runs"][1]["baseline"]["method"] == "pce"
    assert (tmp_path / "out.seed1.json").is_file() and (tmp_path / "out.seed1.baseline.json").is_file()
    for key in ("iou_mean", "iou_sd", "mdice_mean", "mdice_sd", "baseline_iou_mean", "diff_sd"):
        assert written[key] is not None


def _baseline_parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="s2l")
    ap.add_argument("--json", type=Path)
    add_seeds_argument(ap)
    add_baseline_argument(ap, "--method", ["pce", "s2l"], "iou")
    return ap


def test_run_with_baseline_pairs_the_first_metric_and_refuses_a_baseline_without_seeds(tmp_path):
    ap = _baseline_parser()
    assert run_with_baseline(ap, ap.parse_args([]), None, [], "--method", ["iou"]) is None  # a plain run
    with pytest.raises(SystemExit) as e:  # ap.error: exit status 2
        run_with_baseline(ap, ap.parse_args(["--baseline", "pce"]), None, [], "--method", ["iou"])
    assert e.value.code == 2
    calls = []
    argv = ["--method", "s2l", "--baseline", "pce", "--seeds", "1", "2", "--json", str(tmp_path / "o.json")]
    out = run_with_baseline(ap, ap.parse_args(argv), _fake_benchmark(calls), argv, "--method", ["iou", "mdice"])
    assert [(m, s) for m, s, _ in calls] == [("s2l", 1), ("pce", 1), ("s2l", 2), ("pce", 2)]
    assert out["diff_of"] == "iou - baseline_iou"
    assert out["diff_per_seed"] == pytest.approx([0.05, -0.05])
    assert out["baseline_mdice_per_seed"] == pytest.approx([0.7, 0.7])
    assert json.loads((tmp_path / "o.json").read_text())["diff_wins"] == 1
    # no baseline: per-seed values only, nothing paired
    argv = ["--seeds", "0", "--json", str(tmp_path / "p.json")]
    out = run_with_baseline(ap, ap.parse_args(argv), _fake_benchmark([]), argv, "--method", ["iou"])
    assert out["iou_per_seed"] == pytest.approx([0.55]) and "diff_mean" not in out


def test_nuclei_scores_add_pixel_and_object_dice():
    import numpy as np

    from benchmarks.nuclei_scribbles import pixel_dice, scores

    gt = np.zeros((8, 8), np.uint16)
    gt[1:3, 1:3] = 1          # two nuclei of 4 px
    gt[5:7, 5:7] = 2
    pred = gt > 0
    pred[5:7, 5:8] = True     # the second one 2 px too large: IoU 8/10
    assert pixel_dice(pred, gt) == pytest.approx(2 * 0.8 / 1.8)
    out = scores([pred, gt > 0], [gt, gt])
    assert out["iou"] == pytest.approx(0.9) and out["iou_per_image"] == [0.8, 1.0]
    assert out["pixel_dice"] == pytest.approx((2 * 0.8 / 1.8 + 1.0) / 2)
    assert out["object_dice"] == out["mdice"] and 0 < out["mdice"] < 1


def test_combine_seed_files_summarises_seeds_run_as_separate_processes(tmp_path):
    main = _fake_benchmark([])
    out_path = tmp_path / "o.json"
    for seed in (0, 1, 2):  # what three (or six) separate processes write
        main(["--method", "s2l", "--seed", str(seed), "--json", str(tmp_path / f"o.seed{seed}.json")])
        main(["--method", "pce", "--seed", str(seed), "--json", str(tmp_path / f"o.seed{seed}.baseline.json")])
    out = combine_seed_files(out_path, [0, 1, 2], ["iou"], ["baseline_"], pair=("iou", "baseline_iou"))
    expected = run_seeds(_fake_benchmark([]), ["--method", "s2l"], [0, 1, 2], ["iou"], pair=("iou", "baseline_iou"),
                         variants={"baseline_": ["--method", "pce"]}, json_out=tmp_path / "r.json")
    for key in ("iou_per_seed", "baseline_iou_per_seed", "diff_per_seed", "diff_mean", "diff_sd", "diff_wins"):
        assert out[key] == pytest.approx(expected[key])
    assert json.loads(out_path.read_text())["runs"][2]["baseline"]["method"] == "pce"
    (tmp_path / "o.seed1.baseline.json").unlink()
    with pytest.raises(SystemExit, match="seed 1: no result"):
        combine_seed_files(out_path, [0, 1, 2], ["iou"], ["baseline_"])


def test_run_seeds_refuses_a_repeated_seed(tmp_path):
    with pytest.raises(SystemExit):
        run_seeds(_fake_benchmark([]), [], [0, 0], ["iou"])


@pytest.mark.parametrize("name", ["nuclei_scribbles", "pn_cohort", "simclr_linear", "stain", "scribble_transfer"])
def test_each_benchmark_offers_seeds(name, capsys):
    mod = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "--seeds" in capsys.readouterr().out

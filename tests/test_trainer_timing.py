"""Where a training epoch's time goes: read / transfer / model / write seconds and samples/s in the
trainers' metrics (issue 9 item 1), the one-line split at the end, StageTimer's host and device spans."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import trainers
from slidekit.base.timing import StageTimer
from tests.test_scribble_trainer import make_nuclei_folder
from trainers.scribble import ScribbleTrainer
from trainers.stage2 import TopKMeanConfig, TopKMeanTrainer, fit_topk_mean

STAGE_KEYS = ("read", "transfer", "model", "write")


def check_rows(rows: list[dict], samples_per_epoch: int | None = None) -> None:
    for r in rows:
        for k in (*STAGE_KEYS, "wall", "samples_per_s"):
            assert isinstance(r[k], (int, float)) and r[k] >= 0, (k, r)
        assert r["model"] > 0 and r["write"] > 0 and r["samples_per_s"] > 0
        # the stages are disjoint parts of the epoch: together no longer than it (rounding aside)
        assert sum(r[k] for k in STAGE_KEYS) <= r["wall"] + 0.01, r
        if samples_per_epoch is not None:  # samples/s counts the samples the epoch trained on
            # the rate is taken over the training part of the epoch, which lies between the timed stages
            # and the whole epoch less its write (bookkeeping between them can be long on a busy machine)
            timed = sum(r[k] for k in ("read", "transfer", "model"))
            assert r["samples_per_s"] * timed <= samples_per_epoch * 1.05, r
            assert r["samples_per_s"] * (r["wall"] - r["write"]) >= samples_per_epoch * 0.98, r


def test_stage_timer_times_host_waits_and_device_spans_on_cpu():
    t = StageTimer("cpu")
    assert not t.cuda and not StageTimer().cuda  # the old no-argument timer is unchanged

    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    assert list(t.iterate(slow())) == [0, 1, 2]
    assert t.seconds["read"] >= 0.055
    with t.device_stage("model"):
        time.sleep(0.02)
    a = t.mark()
    time.sleep(0.01)
    t.add_span("transfer", a, t.mark())
    t.flush()  # nothing pending on CPU
    assert t.seconds["model"] >= 0.018 and 0.009 <= t.seconds["transfer"] < t.seconds["model"]
    with pytest.raises(ValueError):
        t.add_span("decode", a, t.mark())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA events)")
def test_stage_timer_reads_cuda_events_without_a_sync_per_span():
    t = StageTimer("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(100):  # more than the pending limit: completed spans are read as they finish
        with t.device_stage("model"):
            x = (x @ x).tanh_()
    t.flush()
    assert t.seconds["model"] > 0 and not t._pending


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA events, GPU sampling)")
def test_scribble_on_cuda_times_device_stages_with_events(tmp_path):
    root = make_nuclei_folder(tmp_path / "data", n_images=2, size=64)
    cfg = trainers.make_config(ScribbleTrainer.Config, dict(data=str(root), classes=["bg", "nucleus"], crop=32,
                                                            epochs=1, batch_size=4, samples_per_image=4))
    ScribbleTrainer(cfg).fit(tmp_path / "run", device="cuda", progress=False)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    check_rows(rows)
    assert rows[0]["transfer"] > 0
    # nvidia-ml-py samples every 0.2 s: a utilisation in % when the epoch lasted long enough for a sample
    assert "gpu_util" not in rows[0] or 0 <= rows[0]["gpu_util"] <= 100


def test_scribble_metrics_hold_the_stage_split_and_the_run_prints_it(tmp_path, capsys):
    root = make_nuclei_folder(tmp_path / "data", n_images=2, size=64)
    cfg = trainers.make_config(ScribbleTrainer.Config, dict(data=str(root), classes=["bg", "nucleus"], crop=32,
                                                            epochs=2, batch_size=4, samples_per_image=4))
    ScribbleTrainer(cfg).fit(tmp_path / "run", device="cpu", progress=True)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(rows) == 2
    check_rows(rows, samples_per_epoch=8)
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(STAGE_KEYS) | {"samples_per_s", "wall"} <= set(header)
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("time: ")]
    assert len(line) == 1 and "model " in line[0] and "samples/s" in line[0], line


def test_topk_mean_metrics_hold_the_stage_split_and_quiet_prints_nothing(tmp_path, capsys):
    bags = np.random.default_rng(0).integers(0, 255, size=(4, 2, 32, 32, 3)).astype(np.uint8)
    labels = torch.tensor([1, 0, 1, 0], dtype=torch.float32)
    cfg = TopKMeanConfig(k=2, mpp=8.0, patch_size=32, epochs=2, batch_slides=2)
    fit_topk_mean(TopKMeanTrainer(cfg), tmp_path / "tk", torch.from_numpy(bags), labels, device="cpu",
                  progress=False)
    rows = json.loads((tmp_path / "tk" / "metrics.json").read_text())
    check_rows(rows, samples_per_epoch=8)  # 4 slides x 2 patches
    assert "time: " not in capsys.readouterr().err


@pytest.mark.slow
# the toy cohort's round choice is arbitrary
@pytest.mark.filterwarnings("ignore::slidekit.base.errors.TrainingWarning")
def test_mixed_em_rounds_hold_the_stage_split_with_stain_options(tmp_path):
    from conftest import mixed_em_slides
    from PIL import Image

    from slidekit.models.checkpoint import load_checkpoint
    from slidekit.stain.normalize import normalizer_from_options
    from tests.test_scribble_trainer import synthetic_nuclei
    from trainers.mixed_em import MixedEMConfig, MixedEMTrainer

    mixed_em_slides(tmp_path)
    Image.fromarray(synthetic_nuclei(64, seed=5)[0]).save(tmp_path / "ref.png")
    cfg = MixedEMConfig(slides=str(tmp_path / "slides.csv"), mpp=8.0, patch_size=32, rounds=1, init_steps=3,
                        round_steps=2, batch_size=10, predict_tile=128, min_tissue=0.1, stain_norm="reinhard",
                        stain_ref=str(tmp_path / "ref.png"), stain_aug="hed")
    ckpt = MixedEMTrainer(cfg).fit(tmp_path / "out", device="cpu", progress=False)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    check_rows(rows)  # M-step + round heatmaps (read/transfer/model), round and run checkpoints (write)
    assert load_checkpoint(ckpt).spec.stain == normalizer_from_options("reinhard", tmp_path / "ref.png").to_dict()

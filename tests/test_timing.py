"""Per-stage timing: the stage split in summary.json, the one-line split, GPU sampling skipped on CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import slidekit as sk
from slidekit.base.timing import STAGES, GPUSampler, StageTimer, format_split
from tests.conftest import synthetic_slide


def test_split_line_shares_and_unknown_stage():
    t = StageTimer()
    t.add("read", 1.0)
    t.add("model", 3.0)
    with pytest.raises(ValueError):
        t.add("decode", 1.0)
    assert t.split() == "read 25% · model 75%"
    t.tiles = 40
    d = t.as_dict(wall=4.0)
    assert d["stages"] == {"read": 1.0, "transfer": 0.0, "model": 3.0, "stitch": 0.0, "write": 0.0}
    assert d["tiles_per_s"] == 10.0
    assert format_split(d) == "read 25% · model 75% · 10 tiles/s"
    assert format_split({}) == ""


def test_gpu_sampler_is_a_clean_no_op_on_cpu():
    with GPUSampler("cpu", interval=0.01) as s:
        pass
    assert s.result() == {"note": "not on CUDA"}


def test_heatmap_summary_has_stage_seconds_and_the_cli_prints_the_split(tmp_path):
    path = synthetic_slide(tmp_path / "s.tif", tissue_box=(256, 256, 1280, 1024))
    s = sk.heatmap_slide(path, tmp_path / "hm", workers=0, progress=False, device="cpu")
    assert set(s["stages"]) == set(STAGES)
    assert all(s["stages"][k] > 0 for k in ("read", "model", "stitch", "write"))
    assert sum(s["stages"].values()) <= s["seconds"] + 0.05
    assert s["tiles_per_s"] > 0 and "gpu" not in s
    assert json.loads((tmp_path / "hm" / "summary.json").read_text())["stages"] == s["stages"]

    from slidekit.cli import main

    r = CliRunner().invoke(main, ["heatmap", str(path), "--out", str(tmp_path / "cli"), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["heatmap", str(path), "--out", str(tmp_path / "cli2"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("time: ")]
    assert len(line) == 1 and "read " in line[0] and "model " in line[0] and "tiles/s" in line[0]


def test_predictor_times_read_transfer_and_model_per_tile():
    from torch import nn

    from slidekit.models.builtin import builtin_model

    net, spec = builtin_model("hematoxylin")
    p = sk.Predictor(net, spec, device="cpu", workers=0, batch_size=4)
    assert isinstance(p.model, nn.Module)
    x = np.zeros((2, spec.patch_size, spec.patch_size, 3), np.uint8)
    import torch

    p.forward(torch.from_numpy(x))
    assert p.timer.seconds["model"] > 0 and p.timer.seconds["transfer"] > 0

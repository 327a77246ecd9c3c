"""MIL networks, the `mil` trainer with patient-level CV, deploy and attention outputs."""
from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from slidekit.base.errors import ConfigError
from slidekit.models.mil import (
    MIL_ARCHS,
    MILEnsemble,
    build_mil,
    load_mil_checkpoint,
    save_mil_checkpoint,
    shift_head_bias,
)
from slidekit.slidelevel.mil_deploy import deploy, score_file
from trainers.base import available, train


def _write_bag(path, n, positive, rng, d=8, witness=0.05):
    feats = rng.normal(0, 1, (n, d)).astype(np.float32)
    lesion = np.zeros(n, bool)
    if positive:
        lesion[rng.choice(n, max(1, int(n * witness)), replace=False)] = True
        feats[lesion, 0] += 4.0  # the witness direction
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 64
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = coords
        f["coords"].attrs["patch_size_level0"] = 64
    return lesion


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    rows, lesions = [], {}
    for i in range(24):
        label = "tumour" if i % 2 else "normal"
        p = tmp_path / f"s{i}.h5"
        lesions[p.stem] = _write_bag(p, 60 + i, label == "tumour", rng)
        rows.append({"slide": f"s{i}.tif", "label": label, "patient": f"p{i // 2}", "features": p.name})
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table, lesions


@pytest.mark.parametrize("arch", MIL_ARCHS)
def test_networks_shapes_and_streaming(arch):
    torch.manual_seed(0)
    model = build_mil(arch, 8, 3).eval()
    x = torch.randn(37, 8)
    out = model(x, label=1)
    assert out.logits.shape == (3,)
    if arch in ("abmil", "clam", "transmil"):
        assert out.attention.shape == (37,)
        assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-5)
    if arch == "clam":
        assert out.instance_loss is not None and torch.isfinite(out.instance_loss)
    if model.streamable:  # chunked scoring gives the same slide logits and attention
        with torch.no_grad():
            whole = model(x)
            parts = model.forward_chunks(iter(x.split(10)))
        assert torch.allclose(whole.logits, parts.logits, atol=1e-5)
        if whole.attention is not None:
            assert torch.allclose(whole.attention, parts.attention, atol=1e-6)


def test_trainer_registered():
    assert "mil" in available()


@pytest.mark.slow
def test_cv_train_deploy(cohort, tmp_path):
    table, lesions = cohort
    out = tmp_path / "run"
    ckpt = train("mil", None, out, {"slides": str(table), "arch": "abmil", "folds": 3, "epochs": 25,
                                    "patience": 25, "lr": 3e-3, "bootstrap": 50}, device="cpu", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["folds"]) == 3 and m["patients"] == 12
    assert m["overall"]["auc"] > 0.85, m["overall"]
    lo, hi = m["ci95"]["auc"]
    assert lo <= m["overall"]["auc"] <= hi
    with open(out / "oof.csv") as f:
        oof = list(csv.DictReader(f))
    assert len(oof) == 24
    by_patient = {}
    for r in oof:  # patient-level folds: both slides of a patient in one fold
        by_patient.setdefault(r["patient"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in by_patient.values())
    model, mil = load_mil_checkpoint(ckpt)
    assert mil["classes"] == ["normal", "tumour"] and mil["arch"] == "abmil"
    # attention ranks witness tiles first on positive slides
    s = score_file(model, tmp_path / "s1.h5", chunk_rows=7)
    assert s.attention is not None and lesions["s1"][np.argmax(s.attention)]
    files = [tmp_path / "s1.h5", tmp_path / "s2.h5", tmp_path / "missing.h5"]
    table_out = deploy(ckpt, files, tmp_path / "cohort.csv", progress=False)
    with open(table_out) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert float(rows[0]["p_tumour"]) > float(rows[1]["p_tumour"])
    # a rerun of the finished run returns the checkpoint without training
    mtime = ckpt.stat().st_mtime
    again = train("mil", None, out, {"slides": str(table), "arch": "abmil", "folds": 3, "epochs": 25,
                                     "patience": 25, "lr": 3e-3, "bootstrap": 50}, device="cpu", progress=False)
    assert again == ckpt and ckpt.stat().st_mtime == mtime


def test_attention_heatmap_geojson_and_cli(tmp_path):
    from click.testing import CliRunner

    from slidekit.annotations import read_annotations
    from slidekit.cli import main
    from slidekit.infer.heatmap import Heatmap
    from slidekit.models.mil import save_mil_checkpoint
    from slidekit.slides.demo import write_pyramid

    rng = np.random.default_rng(1)
    slide = write_pyramid(tmp_path / "s.tif", rng.integers(0, 255, (640, 640, 3), dtype=np.uint8), mpp=1.0)
    feats = tmp_path / "s.h5"
    _write_bag(feats, 100, True, rng)  # 10 x 10 tiles of 64 px
    torch.manual_seed(0)
    ckpt = save_mil_checkpoint(tmp_path / "m.pt", build_mil("abmil", 8, 2).eval(),
                               {"arch": "abmil", "in_dim": 8, "classes": ["normal", "tumour"], "hidden": 128})
    r = CliRunner().invoke(main, ["mil-attention", str(feats), "--slide", str(slide), "--model", str(ckpt),
                                  "--out", str(tmp_path / "att")])
    assert r.exit_code == 0, r.output
    model, _ = load_mil_checkpoint(ckpt)
    s = score_file(model, feats)
    hm = Heatmap(tmp_path / "att" / "attention.zarr")
    assert hm.classes == ["attention"]  # a value map (issue 29 item 4); class scores are tile measurements
    objs = read_annotations(tmp_path / "att" / "tiles.geojson")
    assert len(objs) == 100 and all(o.kind == "tile" for o in objs)
    top = max(objs, key=lambda o: o.measurements["attention"])
    assert top.measurements["attention"] == pytest.approx(1.0) and top.measurements["attention_rank"] == 1
    i = int(np.argmax(s.attention))
    assert top.geometry.bounds[:2] == tuple(float(v) for v in s.coords[i])
    assert (tmp_path / "att" / "attention.png").exists()
    # deploy through the CLI: a missing file is a failed row and a non-zero exit
    r = CliRunner().invoke(main, ["mil-deploy", str(feats), str(tmp_path / "nope.h5"), "--model", str(ckpt),
                                  "--out", str(tmp_path / "cohort.csv"), "--quiet"])
    assert r.exit_code == 1 and "1 failed" in r.output
    # a pooling network has no attention: one line, non-zero exit
    save_mil_checkpoint(tmp_path / "mean.pt", build_mil("meanpool", 8, 2),
                        {"arch": "meanpool", "in_dim": 8, "classes": ["normal", "tumour"], "hidden": 128})
    r = CliRunner().invoke(main, ["mil-attention", str(feats), "--slide", str(slide), "--model",
                                  str(tmp_path / "mean.pt"), "--out", str(tmp_path / "att2")])
    assert r.exit_code != 0 and "no attention" in r.output


def test_bags_beyond_the_cache_are_read_per_use_and_train_the_same(cohort, tmp_path, monkeypatch):
    """Bags past ``bag_cache_mb`` stay on disk and are read at each use; the run is the same run."""
    import trainers.mil as tm
    from slidekit.base.errors import ConfigError

    table, _ = cohort
    paths = sorted(table.parent.glob("s*.h5"), key=lambda p: int(p.stem[1:]))
    sizes = [tm.feature_info(p).nbytes for p in paths]
    bags = tm.Bags(paths, sizes[0] + sizes[1], torch.device("cpu"))
    assert sorted(bags.resident) == [0, 1]  # the first two fit the budget, no more
    assert torch.equal(bags[5], torch.as_tensor(tm.read_features(paths[5]).features)) and bags.file_reads == 1
    bags[0]
    assert bags.file_reads == 1  # a held bag is not read again

    reads = []
    real = tm.read_features
    monkeypatch.setattr(tm, "read_features", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    cfg = {"slides": str(table), "arch": "abmil", "folds": 2, "epochs": 2, "patience": 2, "bootstrap": 0}
    train("mil", None, tmp_path / "held", cfg, device="cpu", progress=False)
    assert len(reads) == 24  # default cache: every bag read once
    reads.clear()
    train("mil", None, tmp_path / "disk", {**cfg, "bag_cache_mb": 0}, device="cpu", progress=False)
    assert len(reads) > 24 * 2  # nothing held: each bag read at every use (2 epochs of train/val, test)
    assert (tmp_path / "held" / "oof.csv").read_text() == (tmp_path / "disk" / "oof.csv").read_text()

    monkeypatch.setattr(tm, "_free_memory_bytes", lambda: 100)  # a bag larger than the free memory
    with pytest.raises(ConfigError, match=r"s\d+\.h5: its bag \(\d+ tiles x 8"):
        tm.Bags(paths, None, torch.device("cpu"))


@pytest.mark.parametrize("arch", MIL_ARCHS)
def test_shift_head_bias_moves_every_output_by_the_offset(arch):
    torch.manual_seed(0)
    model = build_mil(arch, 8, 2).eval()
    x = torch.randn(20, 8)
    before = model(x)
    shift_head_bias(model, [0.5, -1.0])
    after = model(x)
    assert torch.allclose(after.logits, before.logits - torch.tensor([0.5, -1.0]), atol=1e-5)
    if arch != "clam":  # clam's tile scores come from its instance heads
        assert torch.allclose(after.scores, before.scores - torch.tensor([0.5, -1.0]), atol=1e-5)


class _AttendFirst(torch.nn.Module):
    def forward(self, h):
        return 60.0 * h[:, 0]  # all attention on the tiles of the first kind


def test_abmil_attention_plus_mean_pooling_sees_the_share_of_a_tile_kind(tmp_path):
    """A softmax attention sums to 1: a bag of 1 lesion tile in 10 and one of 5 in 10 pool to the same
    vector; with the mean beside it the head sees the share (a burden). Streaming, tiles scored alone,
    the checkpoint and the config follow the pooling."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    few, many = torch.stack([a] + [b] * 9), torch.stack([a] * 5 + [b] * 5)
    out = {}
    for pooling in ("attention", "attention+mean"):
        torch.manual_seed(0)
        model = build_mil("abmil", 2, 1, hidden=2, dropout=0.0, pooling=pooling).eval()
        with torch.no_grad():
            model.embed.net[0].weight.copy_(torch.eye(2))
            model.embed.net[0].bias.zero_()
        model.attention = _AttendFirst()
        with torch.no_grad():
            out[pooling] = [float(model(bag).logits[0]) for bag in (few, many)]
            assert torch.allclose(model.forward_chunks(iter([many[:3], many[3:]])).logits, model(many).logits,
                                  atol=1e-5)
            assert torch.allclose(model(many).scores[0], model(many[:1]).logits, atol=1e-5)  # a bag of one
    assert out["attention"][0] == pytest.approx(out["attention"][1], abs=1e-5)
    assert abs(out["attention+mean"][0] - out["attention+mean"][1]) > 1e-3

    torch.manual_seed(0)
    model = build_mil("abmil", 8, 1, pooling="attention+mean").eval()
    ckpt = save_mil_checkpoint(tmp_path / "m.pt", model, {"arch": "abmil", "in_dim": 8, "out_dim": 1,
                                                          "task": "regression", "pooling": "attention+mean",
                                                          "fold_state": {"target_mean": 0.0, "target_sd": 1.0}})
    loaded, mil = load_mil_checkpoint(ckpt)
    x = torch.randn(12, 8)
    assert mil["pooling"] == "attention+mean" and torch.allclose(loaded(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="abmil's and clam's"):
        build_mil("meanpool", 8, 1, pooling="attention+mean")
    with pytest.raises(ConfigError, match="pooling"):
        train("mil", None, tmp_path / "r", {"slides": "x.csv", "arch": "meanpool", "pooling": "attention+mean"},
              device="cpu", progress=False)


def test_ensemble_averages_members_and_trains_one_network_per_seed(cohort, tmp_path):
    """``ensemble=2``: two networks per fold from different seeds, trained apart (the first is the single
    network's run), stored as one checkpoint whose outputs are the members' mean; deploy scores with it."""
    torch.manual_seed(0)
    model = build_mil("abmil", 8, 2, members=3).eval()
    assert isinstance(model, MILEnsemble) and len(model.members) == 3 and not model.streamable
    x = torch.randn(15, 8)
    with torch.no_grad():
        out, parts = model(x), [m(x) for m in model.members]
    assert torch.allclose(out.logits, torch.stack([p.logits for p in parts]).mean(0))
    assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert not torch.allclose(parts[0].logits, parts[1].logits)  # different initialisations

    table, _ = cohort
    cfg = {"slides": str(table), "arch": "abmil", "folds": 3, "epochs": 3, "patience": 3, "lr": 3e-3,
           "hidden": 16, "bootstrap": 0}
    train("mil", None, tmp_path / "one", cfg, device="cpu", progress=False)
    ckpt = train("mil", None, tmp_path / "two", {**cfg, "ensemble": 2}, device="cpu", progress=False)
    record = json.loads((tmp_path / "two" / "fold_0.json").read_text())
    single = json.loads((tmp_path / "one" / "fold_0.json").read_text())
    assert len(record["members"]) == 2 and record["members"][0]["val_loss"] == pytest.approx(single["val_loss"])
    ens, mil = load_mil_checkpoint(tmp_path / "two" / "fold_0.pt")
    first, _ = load_mil_checkpoint(tmp_path / "one" / "fold_0.pt")
    assert mil["members"] == 2 and isinstance(ens, MILEnsemble)
    with torch.no_grad():
        assert torch.allclose(ens.members[0](x).logits, first(x).logits, atol=1e-6)
    with open(deploy(ckpt, [tmp_path / "s1.h5"], tmp_path / "scored.csv", progress=False)) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["status"] == "done" and 0 <= float(rows[0]["p_tumour"]) <= 1
    with pytest.raises(ConfigError, match="ensemble"):
        train("mil", None, tmp_path / "bad", {**cfg, "ensemble": 0}, device="cpu", progress=False)

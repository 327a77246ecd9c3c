"""Provenance at the MIL hand-overs (issue 29 items 1-3, 11, 13): mil-deploy and mil-attention compare
what each feature file records (encoder, weights, µm/px, patch size, token rule, width, slide) with
the checkpoint and the slide, through the CLI where the user meets them."""
from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import slidekit.slidelevel.mil_deploy as deploy
from slidekit.base.errors import FeatureError, LabelError
from slidekit.cli import main
from slidekit.models.mil import build_mil, save_mil_checkpoint
from slidekit.slidelevel.feature_store import FeatureWriter, tool_attrs
from slidekit.slides.demo import write_pyramid
from slidekit.slides.identity import slide_fingerprint
from trainers.base import train

ENCODER = {"name": "resnet18", "weights": "/models/enc.pt:1000:17", "dim": 8, "mpp": 0.5, "patch_size": 32,
           "mean": [0.5] * 3, "std": [0.5] * 3, "tokens": "pooled"}
SIDE = 64  # level-0 tile side


def _slidekit_file(path, slide, rng, encoder=None, dim=8, n=100):
    """A slidekit feature file recording ``encoder`` and ``slide``'s name and fingerprint."""
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * SIDE
    enc = {**(encoder or ENCODER), "dim": dim}
    record = {"name": slide.name, "fingerprint": slide_fingerprint(slide), "dimensions": [640, 640], "mpp": [1.0, 1.0]}
    w = FeatureWriter(path, coords, dim, enc, record, tool_attrs(32, SIDE, 1.0, 2.0, (640, 640), slide.stem))
    w.write(0, rng.normal(0, 1, (n, dim)).astype(np.float32))
    return w.close()


def _foreign_file(path, rng, dim=8, n=100):
    """A TRIDENT-like file: features and coords, no encoder or slide records."""
    side = int(np.ceil(np.sqrt(n)))
    with h5py.File(path, "w") as f:
        f["features"] = rng.normal(0, 1, (n, dim)).astype(np.float32)
        f["coords"] = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * SIDE
        f["coords"].attrs["patch_size_level0"] = SIDE
    return path


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    a = write_pyramid(tmp_path / "a.tif", rng.integers(0, 255, (640, 640, 3), dtype=np.uint8), mpp=1.0)
    b = write_pyramid(tmp_path / "b.tif", rng.integers(0, 255, (640, 640, 3), dtype=np.uint8), mpp=1.0)
    torch.manual_seed(0)
    ckpt = save_mil_checkpoint(tmp_path / "m.pt", build_mil("abmil", 8, 2).eval(),
                               {"arch": "abmil", "in_dim": 8, "classes": ["he", "ihc"], "hidden": 128,
                                "encoder": ENCODER})
    return tmp_path, rng, a, b, ckpt


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_deploy_fails_rows_of_other_encoders_and_widths_and_keeps_every_row(setup):
    tmp, rng, a, _, ckpt = setup
    files = {
        "good": _slidekit_file(tmp / "good.h5", a, rng),
        "copy": _slidekit_file(tmp / "copy.h5", a, rng, {**ENCODER, "weights": "/elsewhere/enc.pt:1000:99"}),
        "resnet34": _slidekit_file(tmp / "resnet34.h5", a, rng, {**ENCODER, "name": "resnet34"}),
        "mpp": _slidekit_file(tmp / "mpp.h5", a, rng, {**ENCODER, "mpp": 2.0}),
        "tokens": _slidekit_file(tmp / "tokens.h5", a, rng, {**ENCODER, "tokens": "cls"}),
        "weights": _slidekit_file(tmp / "weights.h5", a, rng, {**ENCODER, "weights": "/models/other.pt:5:17"}),
        "wide": _slidekit_file(tmp / "wide.h5", a, rng, dim=16),
        "foreign": _foreign_file(tmp / "foreign.h5", rng),
        "foreign_wide": _foreign_file(tmp / "foreign_wide.h5", rng, dim=16),
        "missing": tmp / "missing.h5",
    }
    r = _invoke("mil-deploy", *files.values(), "--model", ckpt, "--out", tmp / "scored.csv", "--quiet")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "RuntimeError" not in r.output
    with open(tmp / "scored.csv") as f:
        rows = {r["features"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(files)
    status = {k: rows[str(p)]["status"] for k, p in files.items()}
    assert status == {"good": "done", "copy": "done", "resnet34": "failed", "mpp": "failed", "tokens": "failed",
                      "weights": "failed", "wide": "failed", "foreign": "done", "foreign_wide": "failed",
                      "missing": "failed"}
    err = {k: rows[str(p)]["error"] for k, p in files.items()}
    assert err["resnet34"].startswith(str(files["resnet34"])) and "encoder 'resnet34' (the model's: 'resnet18')" \
        in err["resnet34"]
    assert "µm/px 2.0 (the model's: 0.5)" in err["mpp"]
    assert "token rule 'cls' (the model's: 'pooled')" in err["tokens"]
    assert "encoder weights other.pt (the model's: enc.pt)" in err["weights"]
    for k in ("wide", "foreign_wide"):
        assert err[k].startswith(str(files[k])) and "16 wide; the model takes 8" in err[k]
    assert str(files["missing"]) in err["missing"]
    assert float(rows[str(files["good"])]["p_he"]) + float(rows[str(files["good"])]["p_ihc"]) == pytest.approx(1)
    # one warning, naming the foreign file and what could not be checked
    warned = [line for line in r.output.splitlines() if "warning" in line and "not checked" in line]
    assert len(warned) == 1 and "foreign.h5" in warned[0] and "µm/px" in warned[0] and "not checked" in warned[0]


def test_attention_refuses_another_slide_width_or_encoder_and_writes_nothing(setup):
    tmp, rng, a, b, ckpt = setup
    feats = _slidekit_file(tmp / "a.h5", a, rng)
    for bad, slide, words in [(feats, b, "fingerprint"),
                              (_slidekit_file(tmp / "w.h5", a, rng, dim=16), a, "16 wide"),
                              (_slidekit_file(tmp / "e.h5", a, rng, {**ENCODER, "mpp": 2.0}), a, "µm/px 2.0")]:
        out = tmp / f"att_{bad.stem}"
        r = _invoke("mil-attention", bad, "--slide", slide, "--model", ckpt, "--out", out)
        assert r.exit_code != 0 and words in r.output and str(bad) in r.output, r.output
        lines = [line for line in r.output.strip().splitlines() if "is now --model" not in line]
        assert "Traceback" not in r.output and len(lines) == 1, r.output
        assert not out.exists()
    with pytest.raises(FeatureError):  # the API's typed error
        from slidekit.slidelevel.mil_deploy import attention_outputs
        from slidekit.slides.slide import open_slide

        attention_outputs(ckpt, feats, open_slide(b), tmp / "api")
    r = _invoke("mil-attention", feats, "--slide", a, "--model", ckpt, "--out", tmp / "att", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp / "att" / "attention.png").exists() and (tmp / "att" / "tiles.geojson").exists()
    # a foreign file: used, with one warning naming what could not be checked
    r = _invoke("mil-attention", _foreign_file(tmp / "f.h5", rng), "--slide", a, "--model", ckpt,
                "--out", tmp / "att_f")
    assert r.exit_code == 0, r.output
    warned = [line for line in r.output.splitlines() if "warning" in line and "not checked" in line]
    assert len(warned) == 1 and "slide fingerprint" in warned[0] and "encoder" in warned[0]


def test_attention_does_not_replace_a_users_files(setup):
    tmp, rng, a, _, ckpt = setup
    feats = _slidekit_file(tmp / "a.h5", a, rng)
    out = tmp / "mine"
    out.mkdir()
    (out / "attention.png").write_bytes(b"my figure")
    r = _invoke("mil-attention", feats, "--slide", a, "--model", ckpt, "--out", out)
    assert r.exit_code != 0 and "attention.png" in r.output and "did not write" in r.output, r.output
    assert (out / "attention.png").read_bytes() == b"my figure" and not (out / "tiles.geojson").exists()
    # its own outputs are replaced on a rerun
    for _ in range(2):
        r = _invoke("mil-attention", feats, "--slide", a, "--model", ckpt, "--out", tmp / "ours", "--quiet")
        assert r.exit_code == 0, r.output


def _table(tmp, rows):
    table = tmp / "slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table


def test_training_refuses_degenerate_cohorts(setup):
    tmp, rng, a, _, _ = setup
    files = [_foreign_file(tmp / f"s{i}.h5", rng) for i in range(8)]
    rows = [{"slide": f"s{i}", "label": "tumour" if i % 2 else "normal", "patient": f"p{i}", "features": f.name}
            for i, f in enumerate(files)]
    cfg = {"folds": 2, "epochs": 1, "patience": 1, "bootstrap": 0}

    def run(name, table_rows):
        return train("mil", None, tmp / name, {"slides": str(_table(tmp, table_rows)), **cfg}, device="cpu",
                     progress=False)

    with pytest.raises(LabelError, match="every slide has the label 'normal'"):
        run("one", [{**r, "label": "normal"} for r in rows])
    with pytest.warns(Warning, match=r"\['Tumour'\] have one slide each"):
        run("typo", [{**r, "label": "Tumour"} if i == 1 else r for i, r in enumerate(rows)])
    with pytest.raises(LabelError, match="feature file .*s0.h5 is also slide 's0'"):
        run("twice", [*rows, {**rows[0], "slide": "s0-again", "patient": "p99"}])
    with h5py.File(tmp / "empty.h5", "w") as f:
        f["features"] = np.zeros((0, 8), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    with pytest.raises(FeatureError, match="empty.h5: the feature file holds no tiles"):
        run("empty", [*rows, {**rows[0], "slide": "e", "features": "empty.h5", "patient": "p99"}])
    _slidekit_file(tmp / "mixed.h5", a, rng)
    with pytest.raises(FeatureError, match="2 different encoders: .*mixed.h5"):
        run("mixed", [*rows, {**rows[0], "slide": "m", "features": "mixed.h5", "patient": "p99"}])
    assert json.loads((tmp / "typo" / "metrics.json").read_text())["classes"] == ["Tumour", "normal", "tumour"]


def _attending_model(tmp, witness_dim=0):
    """An ABMIL whose attention logit is 10 * tanh(relu(x[witness_dim])): tiles with a large feature
    there take (nearly) all the attention, tiles with 0 there none."""
    model = build_mil("abmil", 8, 2, hidden=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.net[0].weight.copy_(torch.eye(8))
        model.attention.v[0].weight[0, witness_dim] = 1.0
        model.attention.u[0].bias.fill_(20.0)  # gate open
        model.attention.w.weight[0, 0] = 10.0
    return save_mil_checkpoint(tmp / "attend.pt", model, {"arch": "abmil", "in_dim": 8, "hidden": 8,
                                                          "classes": ["normal", "tumour"], "encoder": ENCODER})


def test_attention_overlay_shows_the_attended_tiles(tmp_path):
    """attention.png colours the attended tiles and leaves the others as the slide (item 4), by pixels."""
    from PIL import Image

    from slidekit.infer.heatmap import Heatmap
    from slidekit.infer.legend import read_legend

    grey = np.full((640, 640, 3), 200, np.uint8)
    slide = write_pyramid(tmp_path / "grey.tif", grey, mpp=1.0)
    n, side = 100, 10
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * SIDE
    feats = np.zeros((n, 8), np.float32)
    lesion = [23, 24, 33, 34]  # tiles (3, 2), (4, 2), (3, 3), (4, 3): level-0 x 192-320, y 128-256
    feats[lesion, 0] = 5.0
    record = {"name": slide.name, "fingerprint": slide_fingerprint(slide)}
    w = FeatureWriter(tmp_path / "g.h5", coords, 8, ENCODER, record, tool_attrs(32, SIDE, 1.0, 2.0, (640, 640), "g"))
    w.write(0, feats)
    h5 = w.close()
    r = _invoke("mil-attention", h5, "--slide", slide, "--model", _attending_model(tmp_path), "--out",
                tmp_path / "att", "--quiet")
    assert r.exit_code == 0, r.output
    hm = Heatmap(tmp_path / "att" / "attention.zarr")
    assert hm.classes == ["attention"]
    png = tmp_path / "att" / "attention.png"
    legend = read_legend(png)
    assert legend["kind"] == "colorbar" and legend["label"].startswith("attention")
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)[:640, :640]  # the slide part, above the legend
    diff = np.abs(img - 200).sum(-1)
    inside = diff[128 + 8:256 - 8, 192 + 8:320 - 8]
    outside = np.concatenate([diff[:120].ravel(), diff[264:].ravel(), diff[:, :184].ravel(), diff[:, 328:].ravel()])
    assert np.median(inside) > 60, np.median(inside)  # coloured where the attention is
    assert np.percentile(outside, 99) < 12, np.percentile(outside, 99)  # the bare slide elsewhere


def test_attention_refuses_tiles_off_the_slide(setup):
    tmp, rng, a, _, ckpt = setup
    path = _foreign_file(tmp / "off.h5", rng)
    with h5py.File(path, "r+") as f:
        xy = f["coords"][:]
        xy[5] = [-64, 0]
        xy[6] = [10**9, 0]
        f["coords"][:] = xy
    r = _invoke("mil-attention", path, "--slide", a, "--model", ckpt, "--out", tmp / "off", "-q")
    assert r.exit_code != 0 and "2 tile corner(s) lie off slide" in r.output and "Traceback" not in r.output
    assert not (tmp / "off").exists()


def test_attention_reruns_skip_a_verified_folder_and_redo_a_damaged_one(setup):
    """mil-attention is a job of the shared runner: its outputs are recorded and verified on a rerun."""
    import json

    tmp, rng, a, _, ckpt = setup
    feats = _slidekit_file(tmp / "rerun.h5", a, rng)
    out = tmp / "att_rerun"
    assert _invoke("mil-attention", feats, "--slide", a, "--model", ckpt, "--out", out, "-q").exit_code == 0
    first = json.loads((out / "summary.json").read_text())
    assert set(first["records"]) == {"attention.zarr", "attention.png", "tiles.geojson"}
    png = (out / "attention.png").stat().st_mtime_ns
    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished folder's bag was scored again")

    with pytest.MonkeyPatch.context() as mp:  # a verified folder is skipped without scoring the bag
        mp.setattr(deploy, "score_file", no_scoring)
        r = _invoke("mil-attention", feats, "--slide", a, "--model", ckpt, "--out", out, "-q")
    assert r.exit_code == 0 and (out / "attention.png").stat().st_mtime_ns == png, r.output  # nothing rewritten
    (out / "tiles.geojson").write_text("{}")
    r = _invoke("mil-attention", feats, "--slide", a, "--model", ckpt, "--out", out, "-q")
    assert r.exit_code == 0 and "redoing mil-attention: tiles.geojson" in r.output, r.output
    assert json.loads((out / "tiles.geojson").read_text())["features"]  # made again

"""Stage-2 classifiers: LightGBM on a toy morphology table, top-K mean training, slide tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slidekit.base.errors import LabelError
from slidekit.slidelevel.features import heatmap_features, size_class
from trainers.stage2 import (
    MorphClassifier,
    TopKMeanConfig,
    TopKMeanTrainer,
    fit_morph_lgbm,
    fit_topk_mean,
    read_slide_table,
    topk_mean_probs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy_rows(n_per_class: int, rng: np.random.Generator):
    rows, labels = [], []
    for label, (lo, hi) in {"negative": (0, 0), "itc": (60, 180), "micro": (400, 1800),
                            "macro": (2200, 2900)}.items():
        for _ in range(n_per_class):
            d = rng.uniform(lo, hi) if hi else 0.0
            p = np.full((400, 400), 0.05, np.float32)
            if d:
                yy, xx = np.mgrid[0:400, 0:400]
                p[np.hypot(yy - 200, xx - 200) * 8.0 <= d / 2] = rng.uniform(0.7, 0.99)
            rows.append(heatmap_features(p, 8.0))
            labels.append(label)
    return rows, labels


def test_morph_lgbm_on_toy_table(tmp_path):
    rng = np.random.default_rng(0)
    rows, labels = _toy_rows(8, rng)
    clf, metrics = fit_morph_lgbm(rows, labels, seed=0, cv_folds=4)
    assert metrics["cv_accuracy"] >= 0.9
    assert metrics["train_loss"] < metrics["cv_loss"] + 1e-9 or metrics["cv_loss"] < 0.5
    test_rows, test_labels = _toy_rows(3, np.random.default_rng(1))
    assert np.mean([a == b for a, b in zip(clf.predict(test_rows), test_labels)]) >= 0.9
    clf.save(tmp_path / "m.json")
    back = MorphClassifier.load(tmp_path / "m.json")
    np.testing.assert_allclose(back.predict_proba(test_rows), clf.predict_proba(test_rows), atol=1e-9)


def test_morph_lgbm_binary_and_single_class():
    rows, labels = _toy_rows(4, np.random.default_rng(0))
    clf, _ = fit_morph_lgbm(rows, ["negative" if lab == "negative" else "positive" for lab in labels],
                            classes=("negative", "positive"))
    assert clf.predict_proba(rows).shape == (16, 2)
    only, m = fit_morph_lgbm(rows[:4], labels[:4])
    assert only.predict(rows[-1:]) == ["negative"]
    with pytest.raises(LabelError):
        fit_morph_lgbm(rows, ["positive"] * len(rows))


def test_topk_mean_trains_and_averages_k_patches(tmp_path):
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    bags = g.integers(150, 255, size=(6, 2, 32, 32, 3)).astype(np.uint8)
    labels = torch.tensor([1, 0] * 3, dtype=torch.float32)
    bags[::2, :, 8:24, 8:24] = [60, 20, 120]           # positive slides: a dark lesion in every top tile
    cfg = TopKMeanConfig(k=2, mpp=8.0, patch_size=32, epochs=4, lr=3e-3, batch_slides=6)
    ckpt = fit_topk_mean(TopKMeanTrainer(cfg), tmp_path / "tk", torch.from_numpy(bags), labels, device="cpu",
                         progress=False)
    import json

    from slidekit.models.checkpoint import load_checkpoint

    losses = [r["loss"] for r in json.loads((tmp_path / "tk" / "metrics.json").read_text())]
    assert len(losses) == 4 and losses[-1] < losses[0]
    ck = load_checkpoint(ckpt)
    assert ck.spec.extra["k"] == 2 and ck.spec.activation == "sigmoid"
    probs = topk_mean_probs(ck.model, ck.spec, bags)
    with torch.inference_mode():
        x = ck.spec.normalize(torch.from_numpy(bags.reshape(12, 32, 32, 3)))
        patch = torch.sigmoid(ck.model(x)[:, 0]).reshape(6, 2).mean(1).numpy()
    np.testing.assert_allclose(probs, patch, rtol=1e-5)   # slide probability = mean of its K patch probabilities


def test_slide_table(tmp_path):
    (tmp_path / "t.csv").write_text("slide,label,mask\na.tif,macro,a.png\nb.tif,Negative,\nc.tif,1,\n")
    recs = read_slide_table(tmp_path / "t.csv")
    assert [r.label for r in recs] == ["macro", "negative", "positive"]
    assert recs[0].mask == tmp_path / "a.png" and recs[1].mask is None
    assert [r.positive for r in recs] == [True, False, True]
    (tmp_path / "bad.csv").write_text("slide,label\na.tif,tumourish\n")
    with pytest.raises(LabelError, match="bad.csv.*line 2"):
        read_slide_table(tmp_path / "bad.csv")
    (tmp_path / "nolabel.csv").write_text("slide\na.tif\n")
    with pytest.raises(LabelError, match="columns"):
        read_slide_table(tmp_path / "nolabel.csv")


def test_trainers_registered():
    import trainers

    names = trainers.available()
    assert {"mixed-em", "topk-mean", "morph-lgbm"} <= set(names)
    assert trainers.get("mixed-em").consumes == {"pixel_masks", "slide_labels"}


def test_size_class_consistent_with_labels():
    assert size_class(2500) == "macro"


@pytest.mark.parametrize("rows, match", [
    ("a.tif,macro\nb.tif,negative\na.tif,negative\n",
     r"line 4: slide 'a.tif' is listed under two labels \('macro' on line 2"),
    ("a.tif,macro\n./a.tif,macro\n", r"line 3: slide './a.tif' is listed twice \(also on line 2\)"),
    ("x/a.tif,macro\nx/a.svs,negative\n", "x/a.svs' is listed under two labels"),
])
def test_slide_table_refuses_a_slide_given_twice(tmp_path, rows, match):
    (tmp_path / "t.csv").write_text("slide,label\n" + rows)
    with pytest.raises(LabelError, match=match) as err:
        read_slide_table(tmp_path / "t.csv")
    assert "t.csv" in str(err.value) and "\n" not in str(err.value)


def test_morph_lgbm_reports_the_chance_loss():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 3))
    _, m = fit_morph_lgbm(X, ["negative"] * 9 + ["macro"] * 3, classes=("negative", "positive"), cv_folds=3)
    p = np.array([0.75, 0.25])
    assert m["chance_loss"] == pytest.approx(-(p * np.log(p)).sum())


def test_morph_lgbm_follows_the_run_folder_rules(tmp_path):
    """morph-lgbm into a folder holding another trainer's run is refused instead of overwriting it."""
    import json

    from slidekit.base.errors import TrainingError
    from trainers.stage2 import MorphLGBMConfig, MorphLGBMTrainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"trainer": "scribble", "epochs": 3}))
    (out / "metrics.json").write_text("[]")
    with pytest.raises(TrainingError, match="holds a 'scribble' run, not 'morph-lgbm'"):
        MorphLGBMTrainer(MorphLGBMConfig(slides=str(tmp_path / "t.csv"))).fit(out)
    assert (out / "metrics.json").read_text() == "[]"

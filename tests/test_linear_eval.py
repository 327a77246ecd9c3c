"""Linear evaluation (frozen features + logistic regression) and fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slidekit.base.errors import LabelError
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from slidekit.slidelevel.linear_eval import (
    extract_features,
    fine_tune,
    linear_eval,
    linear_probe,
    prepare_batch,
    scores,
)


def _colour_patches(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = "red" if i % 2 else "blue"
        base = np.array([200, 60, 80] if label == "red" else [70, 80, 200])
        img = np.clip(base + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        images.append(img)
        labels.append(label)
    return images, labels


def test_scores_and_linear_probe_on_separable_features():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    x = rng.normal(size=(40, 5)) + 4 * y[:, None]
    res = linear_probe(x[:30], y[:30], x[30:], y[30:])
    assert res["accuracy"] == 1.0 and res["macro_f1"] == 1.0 and res["n_test"] == 10
    s = scores(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert s["accuracy"] == 0.75 and s["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    with pytest.raises(LabelError):
        linear_probe(x[:4], [1, 1, 1, 1], x[4:8], [1, 0, 1, 0])


def test_extract_features_is_frozen_and_matches_model():
    torch.manual_seed(0)
    model = ResNetClassifier("resnet18", 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, _ = _colour_patches(5, 0)
    feats = extract_features(model, images, size=32, batch_size=2)
    assert feats.shape == (5, 512) and feats.dtype == np.float32
    assert model.training  # mode restored
    for k, v in model.state_dict().items():  # BN statistics untouched: eval mode during extraction
        assert torch.equal(v, before[k])
    model.eval()
    with torch.no_grad():
        ref = model.features(prepare_batch(images, 32, (0.5,) * 3, (0.5,) * 3)).numpy()
    assert np.allclose(feats, ref, atol=1e-5)


def test_linear_eval_from_checkpoint_path(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "enc.pt", ResNetClassifier("resnet18", 0),
                           ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32,
                                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none"))
    tr_x, tr_y = _colour_patches(20, 1)
    te_x, te_y = _colour_patches(10, 2)
    res = linear_eval(path, tr_x, tr_y, te_x, te_y)
    assert res["accuracy"] >= 0.9 and set(res["classes"]) == {"blue", "red"}


def test_fine_tune_leaves_the_source_model_alone():
    torch.manual_seed(0)
    model = ResNetClassifier("resnet18", 0)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    tr_x, tr_y = _colour_patches(8, 1)
    te_x, te_y = _colour_patches(4, 2)
    res = fine_tune(model, tr_x, tr_y, te_x, te_y, size=32, epochs=1, batch_size=4)
    assert set(res) >= {"accuracy", "macro_f1", "predictions"} and len(res["predictions"]) == 4
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(LabelError):
        fine_tune(model, tr_x, ["a"] * len(tr_x), te_x, te_y, size=32, epochs=1)

"""The MIL task seam (issue 28 item 6): a task registered from this module trains and deploys
through the `mil` trainer and `mil-deploy`'s API without any edit to trainers/mil.py."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slidekit.base.errors import CheckpointError, ConfigError
from slidekit.models.mil import build_mil, load_mil_checkpoint, save_mil_checkpoint
from slidekit.slidelevel.mil_deploy import deploy
from slidekit.slidelevel.mil_tasks import (
    Classification,
    MILTask,
    available_mil_tasks,
    get_mil_task,
    register_mil_task,
    task_from_checkpoint,
)
from trainers.base import train

BATCHES: list[int] = []  # batch sizes the toy loss saw while training


@register_mil_task
class ToyRegression(MILTask):
    """A scalar per slide: MSE on one head output, R² and MAE, folds stratified by the target's half."""

    name = "toy-regression"
    target_columns = ("target",)
    headline_metric = "r2"

    def setup(self, rows, config):
        return np.array([float(r["target"]) for r in rows], dtype=np.float32)

    @property
    def out_dim(self):
        return 1

    def stratify(self, targets):
        return (targets > np.median(targets)).astype(np.int64)

    def make_loss(self, train_targets, device, config):
        def loss(outputs, targets):
            if torch.is_grad_enabled():
                BATCHES.append(len(outputs))
            return F.mse_loss(outputs[:, 0], targets.float())
        return loss

    @property
    def output_columns(self):
        return ["predicted_target"]

    def predict(self, outputs):
        return outputs[:, :1].detach().cpu().numpy()

    def metrics(self, targets, predictions):
        t, p = np.asarray(targets, float), np.asarray(predictions, float)[:, 0]
        return {"r2": float(1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum()),
                "mae": float(np.abs(t - p).mean())}

    def checkpoint_fields(self):
        return {"target": "target"}

    @classmethod
    def from_checkpoint(cls, mil):
        return cls()


def _cohort(tmp_path, n_slides=24, d=8, seed=0):
    """Bags whose every tile carries the slide's target along feature 0 (plus noise)."""
    rng = np.random.default_rng(seed)
    rows, targets = [], {}
    for i in range(n_slides):
        t = float(rng.uniform(-2, 2))
        n = 30 + i
        feats = rng.normal(0, 1, (n, d)).astype(np.float32)
        feats[:, 0] += t
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 64
        with h5py.File(tmp_path / f"r{i}.h5", "w") as f:
            f["features"] = feats
            f["coords"] = coords
            f["coords"].attrs["patch_size_level0"] = 64
        rows.append({"slide": f"r{i}.tif", "target": f"{t:.4f}", "patient": f"p{i // 2}", "features": f"r{i}.h5"})
        targets[f"r{i}"] = t
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table, targets


def test_toy_regression_trains_and_deploys_through_the_seam(tmp_path):
    assert "toy-regression" in available_mil_tasks() and "classification" in available_mil_tasks()
    table, targets = _cohort(tmp_path)
    out = tmp_path / "run"
    BATCHES.clear()
    cfg = {"slides": str(table), "task": "toy-regression", "arch": "meanpool", "folds": 3, "epochs": 15,
           "patience": 15, "lr": 1e-2, "hidden": 16, "bags_per_step": 4, "bootstrap": 20}
    ckpt = train("mil", None, out, cfg, device="cpu", progress=False)
    assert max(BATCHES) == 4  # the loss sees a batch of bags' outputs together
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "toy-regression" and "classes" not in m and m["target"] == "target"
    assert m["overall"]["r2"] > 0.6, m["overall"]
    assert set(m["ci95"]) == {"r2", "mae"} and len(m["folds"]) == 3
    with open(out / "oof.csv") as f:
        oof = list(csv.DictReader(f))
    assert list(oof[0]) == ["slide", "patient", "target", "fold", "predicted_target"] and len(oof) == 24
    model, mil = load_mil_checkpoint(ckpt)
    assert mil["task"] == "toy-regression" and mil["out_dim"] == 1 and "classes" not in mil
    assert isinstance(task_from_checkpoint(mil), ToyRegression)

    files = [tmp_path / f"r{i}.h5" for i in range(6)] + [tmp_path / "missing.h5"]
    scored = deploy(ckpt, files, tmp_path / "scored.csv", progress=False)
    with open(scored) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide", "status", "features", "tiles", "predicted_target", "error"]
    assert [r["status"] for r in rows] == ["done"] * 6 + ["failed"]
    pred = np.array([float(r["predicted_target"]) for r in rows[:6]])
    truth = np.array([targets[r["slide"]] for r in rows[:6]])
    assert np.corrcoef(pred, truth)[0, 1] > 0.8


def test_classification_is_the_default_and_old_checkpoints_read_as_it(tmp_path):
    torch.manual_seed(0)
    old = save_mil_checkpoint(tmp_path / "old.pt", build_mil("abmil", 8, 2),
                              {"arch": "abmil", "in_dim": 8, "classes": ["a", "b"], "hidden": 128})
    _, mil = load_mil_checkpoint(old)
    task = task_from_checkpoint(mil)
    assert isinstance(task, Classification) and task.classes == ["a", "b"]
    assert task.output_columns == ["p_a", "p_b"] and task.deploy_columns == ["p_a", "p_b", "predicted"]
    unknown = save_mil_checkpoint(tmp_path / "unknown.pt", build_mil("meanpool", 8, 3),
                                  {"arch": "meanpool", "in_dim": 8, "task": "survival-x", "out_dim": 3, "hidden": 128})
    _, mil = load_mil_checkpoint(unknown)  # the network loads from out_dim alone
    with pytest.raises(CheckpointError, match="survival-x"):
        task_from_checkpoint(mil, unknown)
    with pytest.raises(ConfigError, match="unknown MIL task 'nope'; known: .*classification"):
        get_mil_task("nope")


def test_config_refuses_unknown_task_and_clam_without_classes(tmp_path):
    table, _ = _cohort(tmp_path, n_slides=6)
    with pytest.raises(ConfigError, match="unknown MIL task 'nope'"):
        train("mil", None, tmp_path / "a", {"slides": str(table), "task": "nope"}, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="clam"):
        train("mil", None, tmp_path / "b", {"slides": str(table), "task": "toy-regression", "arch": "clam"},
              device="cpu", progress=False)


def test_class_weights_weigh_a_single_bag_step() -> None:
    """Inverse-frequency class weights act with one bag a step (the default): the minority class's bag
    counts more, the majority's less, and the weights average 1 over the training bags."""
    task = Classification()
    targets = task.setup([{"label": lab} for lab in ["a"] * 6 + ["b"] * 2], SimpleNamespace(classes=None))
    train = np.asarray(targets)
    weighted = task.make_loss(train, torch.device("cpu"), SimpleNamespace(class_weights=True))
    plain = task.make_loss(train, torch.device("cpu"), SimpleNamespace(class_weights=False))
    out = torch.tensor([[0.3, -0.2]])
    a, b = torch.tensor([0]), torch.tensor([1])
    # weights: 8 / (2 x 6) for a, 8 / (2 x 2) for b
    assert float(weighted(out, a)) == pytest.approx(float(plain(out, a)) * 8 / 12, rel=1e-6)
    assert float(weighted(out, b)) == pytest.approx(float(plain(out, b)) * 2.0, rel=1e-6)
    both = torch.tensor([[0.3, -0.2]] * 8)
    # over the training bags as a whole the weighted loss is the plain one when the outputs are equal
    # per class: the weights average 1
    assert float(weighted(both, torch.as_tensor(train))) == pytest.approx(
        (6 * 8 / 12 * float(plain(out, a)) + 2 * 2.0 * float(plain(out, b))) / 8, rel=1e-6)

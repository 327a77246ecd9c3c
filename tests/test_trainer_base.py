"""The trainer protocol: typed configs, registry errors, metrics log, resume after interruption."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import trainers
from slidekit.errors import ConfigError
from slidekit.models import ModelSpec, read_checkpoint


@dataclass
class ToyConfig(trainers.TrainerConfig):
    widths: tuple[int, ...] = (8, 16)
    note: str | None = None
    flag: bool = False


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 4\nlr: 0.01\nwidths: [1, 2, 3]\n")
    cfg = trainers.load_config(ToyConfig, path, ["lr=0.5", "flag=yes", "note=hello", "batch-size=3"])
    assert (cfg.epochs, cfg.lr, cfg.widths, cfg.flag, cfg.note, cfg.batch_size) == (4, 0.5, (1, 2, 3), True, "hello", 3)
    assert trainers.load_config(ToyConfig, None, {"widths": "4,5"}).widths == (4, 5)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*epochz"):
        trainers.load_config(ToyConfig, None, ["epochz=3"])
    with pytest.raises(ConfigError, match="'epochs': expected int"):
        trainers.load_config(ToyConfig, None, ["epochs=three"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: cannot parse"):
        trainers.load_config(ToyConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        trainers.load_config(ToyConfig, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="unknown trainer 'nope'"):
        trainers.get("nope")


class ToyTrainer(trainers.Trainer):
    name = "toy"
    consumes = frozenset({"images"})
    Config = ToyConfig

    def __init__(self, config=None, stop_at: int | None = None) -> None:
        super().__init__(config)
        self.stop_at = stop_at

    def fit(self, out_dir, device="cpu", progress=False):
        trainers.seed_everything(self.config.seed)
        spec = ModelSpec(patch_size=16)
        # A tiny network keeps the test fast; run_epochs saves whatever module it is given.
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=self.config.lr)

        def epoch(i):
            if self.stop_at is not None and i == self.stop_at:
                raise KeyboardInterrupt
            x = torch.randn(4, 3, 16, 16)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.item()}

        return trainers.run_epochs(self, out_dir, model, spec, epoch, optimizer=opt, progress=progress)


def test_run_epochs_resumes_to_the_same_result(tmp_path):
    cfg = ToyConfig(epochs=4, lr=0.1)
    straight = ToyTrainer(cfg).fit(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        ToyTrainer(cfg, stop_at=2).fit(tmp_path / "b")
    assert not (tmp_path / "b" / "done.json").exists()
    assert read_checkpoint(tmp_path / "b" / "checkpoint.pt")["extra"]["epoch"] == 2
    resumed = ToyTrainer(cfg).fit(tmp_path / "b")
    a, b = read_checkpoint(straight)["state_dict"], read_checkpoint(resumed)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    csv_lines = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "epoch,loss" and len(csv_lines) == 5
    spec = read_checkpoint(resumed)["spec"]
    assert spec["trainer"] == "toy" and spec["trainer_config"]["lr"] == 0.1
    # A finished run is skipped.
    mtime = resumed.stat().st_mtime_ns
    assert ToyTrainer(cfg).fit(tmp_path / "b") == resumed and resumed.stat().st_mtime_ns == mtime


def test_register_rejects_unknown_label_kinds():
    class Bad(trainers.Trainer):
        name = "bad"
        consumes = frozenset({"telepathy"})

    with pytest.raises(ConfigError, match="telepathy"):
        trainers.register(Bad)

"""The trainer protocol: typed configs, registry errors, metrics log, resume after interruption."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import trainers
from slidekit.base.errors import CheckpointError, ConfigError, TrainingError, TrainingWarning
from slidekit.models.checkpoint import read_checkpoint
from slidekit.models.spec import ModelSpec


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

    def __init__(self, config=None, stop_at: int | None = None, nan_at: int | None = None) -> None:
        super().__init__(config)
        self.stop_at, self.nan_at = stop_at, nan_at

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
            return {"loss": float("nan") if i == self.nan_at else loss.item()}

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
    assert csv_lines[0] == "epoch,loss,write,wall" and len(csv_lines) == 5  # + the epoch's write/wall seconds
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


# -- resume state is plain data ---------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a marker file: what a planted state.pt could do with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_state_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    out = tmp_path / "run"
    out.mkdir()
    cfg = ToyConfig(epochs=2)
    # a folder that looks like this very run, interrupted: only state.pt was tampered with
    (out / "config.json").write_text(json.dumps({"trainer": "toy", **dataclasses.asdict(cfg)}))
    torch.save({"epoch": 1, "model": {}, "extra": _Payload(marker)}, out / "state.pt")
    with pytest.raises(CheckpointError) as err:
        ToyTrainer(cfg).fit(out)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and "state.pt" in msg and "cannot resume" in msg
    with pytest.raises(CheckpointError):
        trainers.TrainState.load(out / "state.pt")
    assert not marker.exists()


def test_state_round_trips_with_weights_only(tmp_path):
    """Everything run_epochs saves (optimiser, scheduler, every RNG) loads with weights_only=True."""
    ToyTrainer(ToyConfig(epochs=1)).fit(tmp_path / "r")
    raw = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
    assert raw["epoch"] == 1 and set(raw["rng"]) == {"python", "numpy", "torch"}


# -- reruns -----------------------------------------------------------------------------------------

def test_finished_run_continues_to_more_epochs(tmp_path):
    straight = ToyTrainer(ToyConfig(epochs=4, lr=0.1)).fit(tmp_path / "a")
    ToyTrainer(ToyConfig(epochs=2, lr=0.1)).fit(tmp_path / "b")
    with pytest.warns(TrainingWarning, match="continuing a finished 2-epoch toy run to 4 epochs"):
        longer = ToyTrainer(ToyConfig(epochs=4, lr=0.1)).fit(tmp_path / "b")
    assert read_checkpoint(longer)["extra"]["epoch"] == 4
    assert json.loads((tmp_path / "b" / "done.json").read_text())["epochs"] == 4
    assert [r["epoch"] for r in json.loads((tmp_path / "b" / "metrics.json").read_text())] == [0, 1, 2, 3]
    # no schedule and the RNG state carried over: 2 + 2 epochs are exactly 4 epochs
    a, b = read_checkpoint(straight)["state_dict"], read_checkpoint(longer)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["epochs"] == 4


def test_rerun_refuses_fewer_epochs_other_options_and_other_trainers(tmp_path):
    out = tmp_path / "r"
    ToyTrainer(ToyConfig(epochs=3, lr=0.1)).fit(out)
    with pytest.raises(TrainingError, match="cannot shorten it to 2"):
        ToyTrainer(ToyConfig(epochs=2, lr=0.1)).fit(out)
    with pytest.raises(TrainingError, match=r"other options \(lr: 0.1 -> 0.2\).*--restart") as err:
        ToyTrainer(ToyConfig(epochs=3, lr=0.2)).fit(out)
    assert "\n" not in str(err.value) and str(out) in str(err.value)

    class OtherToy(ToyTrainer):
        name = "other-toy"

    with pytest.raises(TrainingError, match="holds a 'toy' run, not 'other-toy'"):
        OtherToy(ToyConfig(epochs=3, lr=0.1)).fit(out)
    # an interrupted run resumed with another lr is refused as well (it would keep the old schedule)
    with pytest.raises(KeyboardInterrupt):
        ToyTrainer(ToyConfig(epochs=4, lr=0.1), stop_at=1).fit(tmp_path / "i")
    with pytest.raises(TrainingError, match="lr: 0.1 -> 0.5"):
        ToyTrainer(ToyConfig(epochs=4, lr=0.5)).fit(tmp_path / "i")
    # restart: the old run's files go, anything else stays, and the new run starts from epoch 0
    (out / "notes.txt").write_text("mine")
    removed = trainers.restart_run(out, ToyTrainer)
    assert {p.name for p in removed} >= {"checkpoint.pt", "state.pt", "done.json", "config.json"}
    ckpt = ToyTrainer(ToyConfig(epochs=2, lr=0.2)).fit(out)
    assert read_checkpoint(ckpt)["spec"]["trainer_config"]["lr"] == 0.2
    assert (out / "notes.txt").read_text() == "mine"


def test_diverging_loss_stops_with_one_line_and_keeps_the_last_good_epoch(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match="diverged in epoch 3: loss is nan") as err:
        ToyTrainer(ToyConfig(epochs=4), nan_at=2).fit(out)
    assert "\n" not in str(err.value)
    assert not (out / "done.json").exists()
    assert read_checkpoint(out / "checkpoint.pt")["extra"]["epoch"] == 2
    with pytest.raises(TrainingError, match="diverged in epoch [12]: .*lr 1e\\+38 too high"):
        ToyTrainer(ToyConfig(epochs=3, lr=1e38)).fit(tmp_path / "huge")  # weights blow up to inf/NaN
    assert not (tmp_path / "huge" / "done.json").exists()


# -- config validation -----------------------------------------------------------------------------

def test_configs_refuse_out_of_range_values_and_repeated_keys(tmp_path):
    for bad, match in [("epochs=-1", "'epochs' must be an integer >= 1"), ("lr=inf", "'lr'.*finite"),
                       ("lr=nan", "'lr'.*finite"), ("lr=0", "'lr' must be a finite number > 0"),
                       ("batch_size=0", "batch_size"), ("epochs=true", "'epochs': expected int")]:
        with pytest.raises(ConfigError, match=match):
            trainers.load_config(ToyConfig, None, [bad])
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        trainers.load_config(ToyConfig, None, ["lr=0.1", "lr=0.2"])
    dup = tmp_path / "dup.yaml"
    dup.write_text("epochs: 3\nlr: 0.1\nepochs: 30\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 3: option 'epochs' is given twice \(first on line 1\)"):
        trainers.load_config(ToyConfig, dup)
    dup_json = tmp_path / "dup.json"
    dup_json.write_text('{"epochs": 3, "epochs": 4}')
    with pytest.raises(ConfigError, match="dup.json: option 'epochs' is given twice"):
        trainers.load_config(ToyConfig, dup_json)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [3\nlr: 1\n")
    with pytest.raises(ConfigError) as err:
        trainers.load_config(ToyConfig, broken)
    assert "\n" not in str(err.value) and "broken.yaml: cannot parse" in str(err.value)


@pytest.mark.parametrize("option, match", [("crop=0", "'crop' must be an integer 32..8192"),
                                           ("crop=100000", "'crop' must be an integer 32..8192"),
                                           ("samples_per_image=100000000", "'samples_per_image' must be an "
                                                                           "integer 1..100000"),
                                           ("scale=0", "'scale' must be a number > 0"),
                                           ("lr=inf", "'lr'.*finite"),
                                           ("epochs=-1", "'epochs' must be an integer >= 1"),
                                           ("classes=tumour", "'classes' must be two or more"),
                                           ("lr_schedule=linear", "lr_schedule")])
def test_cli_bad_options_are_one_line(tmp_path, option, match):
    import re

    from slidekit.cli import main

    res = CliRunner().invoke(main, ["train", "scribble", "--set", option, "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert re.search(match, res.output), res.output
    assert not (tmp_path / "o" / "done.json").exists()


class CosineToy(ToyTrainer):
    """The toy with a per-epoch cosine schedule over ``epochs``, as the scribble trainers use."""

    def fit(self, out_dir, device="cpu", progress=False):
        import math

        trainers.seed_everything(self.config.seed)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=self.config.lr)
        n = self.config.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, n) / n)))

        def epoch(i):
            lr = opt.param_groups[0]["lr"]
            loss = model(torch.randn(4, 2)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            return {"loss": loss.item(), "lr": lr}

        return trainers.run_epochs(self, out_dir, model, ModelSpec(patch_size=16), epoch, optimizer=opt,
                                   scheduler=sched, progress=progress)


def test_continued_run_follows_the_new_lengths_schedule(tmp_path):
    import math

    CosineToy(ToyConfig(epochs=2, lr=1.0)).fit(tmp_path / "r")
    with pytest.warns(TrainingWarning):
        CosineToy(ToyConfig(epochs=4, lr=1.0)).fit(tmp_path / "r")
    lrs = [row["lr"] for row in json.loads((tmp_path / "r" / "metrics.json").read_text())]
    # epochs 0-1 ran under the 2-epoch cosine; epoch 2 onwards under the 4-epoch one (not at lr 0)
    expected = [1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 2 / 4)), 0.5 * (1 + math.cos(math.pi * 3 / 4))]
    assert lrs == pytest.approx(expected)

"""``--init-bn`` (issue 34): BatchNorm statistics after ``--init`` kept (default) or re-estimated on
the training data; the re-estimation changes the running statistics only, never the weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slidekit.base.errors import ConfigError
from slidekit.models.weights import init_overrides, reestimate_batchnorm
from trainers.base import reestimate_init_bn
from trainers.mil import MILConfig
from trainers.scribble import ScribbleConfig


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4))


def _source_stats(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(-3.0)
            m.running_var.fill_(9.0)


def test_reestimate_sets_the_new_datas_statistics_and_leaves_weights():
    net = _net()
    _source_stats(net)
    params = {k: v.clone() for k, v in net.named_parameters()}
    momenta = [m.momentum for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.eval()
    g = torch.Generator().manual_seed(1)
    shift = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    data = [torch.randn(8, 3, 10, 10, generator=g) * 1.5 + shift for _ in range(4)]
    seen = reestimate_batchnorm(net, iter(data + [torch.randn(1, 3, 10, 10)]))  # the 1-sample batch is skipped
    assert seen == 32
    x = torch.cat(data)
    first = net[0]
    # the first layer sees the data itself: its running mean/var are the data's, not the source's -3/9
    assert torch.allclose(first.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-4)
    per_batch_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in data]).mean(0)
    assert torch.allclose(first.running_var, per_batch_var, atol=1e-3)
    assert all(not torch.allclose(m.running_mean, torch.full_like(m.running_mean, -3.0))
               for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for k, v in net.named_parameters():  # weights, biases and the BN affine parameters untouched
        assert torch.equal(v, params[k]), k
    assert [m.momentum for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    assert not net.training  # the mode it was in


def test_reestimate_without_a_usable_batch_is_refused_and_keeps_the_statistics():
    net = _net()
    _source_stats(net)
    with pytest.raises(ConfigError, match="no training batch"):
        reestimate_batchnorm(net, [torch.randn(1, 3, 10, 10)])
    assert torch.equal(net[0].running_mean, torch.full((3,), -3.0))
    assert torch.equal(net[0].running_var, torch.full((3,), 9.0))


def test_init_bn_option_checks(tmp_path):
    w = tmp_path / "enc.pt"
    assert ScribbleConfig().init_bn == "keep"  # the default: statistics copied with the weights
    assert ScribbleConfig(init=str(w), init_bn="reestimate").init_bn == "reestimate"
    with pytest.raises(ConfigError, match="init_bn"):
        ScribbleConfig(init=str(w), init_bn="refit")
    with pytest.raises(ConfigError, match="needs init"):
        ScribbleConfig(init_bn="reestimate")
    with pytest.raises(ConfigError, match="not supported by MILConfig"):
        MILConfig(init=str(w), init_bn="reestimate")
    assert init_overrides(str(w), None, "reestimate") == [f"init={w}", "init_bn=reestimate"]
    assert init_overrides(str(w), None) == [f"init={w}"]


def test_reestimate_init_bn_follows_the_config(tmp_path):
    calls = []

    def batches():
        calls.append(1)
        return [torch.randn(4, 3, 10, 10)]

    net = _net()
    _source_stats(net)
    assert reestimate_init_bn(net, ScribbleConfig(init=str(tmp_path / "w.pt")), batches) == 0
    assert not calls and torch.equal(net[0].running_mean, torch.full((3,), -3.0))  # keep: untouched
    assert reestimate_init_bn(net, ScribbleConfig(init=str(tmp_path / "w.pt"), init_bn="reestimate"), batches) == 4
    assert calls and not torch.equal(net[0].running_mean, torch.full((3,), -3.0))


def test_cli_train_scribble_with_init_bn(tmp_path):
    from click.testing import CliRunner

    from slidekit.cli import main
    from slidekit.models import load_checkpoint
    from tests.test_scribble_trainer import make_nuclei_folder

    root = make_nuclei_folder(tmp_path / "d", n_images=2, size=48)
    base = ["train", "scribble", "--device", "cpu", "--quiet", "--set", f"data={root}", "--set", "crop=32",
            "--set", "batch_size=2", "--set", "samples_per_image=2", "--set", "epochs=1", "--set", "lr=1e-9"]
    res = CliRunner().invoke(main, base + ["--out", str(tmp_path / "src")])
    assert res.exit_code == 0, res.output
    src = tmp_path / "src" / "checkpoint.pt"
    res = CliRunner().invoke(main, base + ["--out", str(tmp_path / "no"), "--init-bn", "reestimate"])
    assert res.exit_code != 0 and "needs init" in res.output and "Traceback" not in res.output
    runs = {}
    for bn in ("keep", "reestimate"):
        res = CliRunner().invoke(main, base + ["--out", str(tmp_path / bn), "--init", str(src), "--init-bn", bn])
        assert res.exit_code == 0, res.output
        runs[bn] = load_checkpoint(tmp_path / bn / "checkpoint.pt")
    assert runs["reestimate"].spec.trainer_config["init_bn"] == "reestimate"
    sd = {bn: ck.model.encoder.state_dict() for bn, ck in runs.items()}
    src_sd = load_checkpoint(src).model.encoder.state_dict()
    mean = "bn1.running_mean" if "bn1.running_mean" in src_sd else next(k for k in src_sd if k.endswith("running_mean"))
    # lr 1e-9: the weights stay the source's in both runs; only re-estimation moves the statistics far
    conv = next(k for k in src_sd if k.endswith("weight") and src_sd[k].ndim == 4)
    assert torch.allclose(sd["keep"][conv], src_sd[conv], atol=1e-6)
    assert torch.allclose(sd["reestimate"][conv], src_sd[conv], atol=1e-6)
    d_keep = (sd["keep"][mean] - src_sd[mean]).abs().mean()
    d_re = (sd["reestimate"][mean] - src_sd[mean]).abs().mean()
    assert d_re > d_keep

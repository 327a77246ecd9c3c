"""--device cuda:N wherever --device exists; a device that does not exist is one line naming those that do."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from slidekit.base.devices import available_devices, resolve_device
from slidekit.base.errors import ConfigError
from slidekit.cli import main


def _fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"FakeGPU{i}")


def test_cuda_index_is_accepted_when_it_exists(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert available_devices() == ["cpu", "cuda:0 (FakeGPU0)", "cuda:1 (FakeGPU1)"]


def test_missing_cuda_index_names_the_devices_that_exist(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"cuda:2.*cpu, cuda:0 \(FakeGPU0\), cuda:1 \(FakeGPU1\)"):
        resolve_device("cuda:2")


def test_cuda_without_gpu_and_unknown_names(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"devices here: cpu\)"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("command", [["heatmap", "--demo", "--out", "OUT"], ["train", "scribble", "--out", "OUT"],
                                     ["embed", "s.tif", "--model", "m.pt", "--out", "OUT"]])
def test_cli_device_error_is_one_line(monkeypatch, tmp_path, command):
    _fake_gpus(monkeypatch, 0)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command] + ["--device", "cuda:0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cuda:0" in lines[0] and "devices here: cpu" in lines[0], res.output
    assert not (tmp_path / "out").exists()  # refused before anything is written

"""Threads that fit the machine: the main process gets the CPUs the DataLoader workers leave."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import slidekit as sk
from slidekit.base import resources
from tests.conftest import synthetic_slide


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(resources, "_BUDGET", None)
    yield
    torch.set_num_threads(before)


def test_workers_get_one_cpu_each_and_the_main_process_the_rest(monkeypatch):
    assert resources.configure_threads(3, workers=1) == 2 and torch.get_num_threads() == 2
    assert resources.configure_threads(2, workers=5) == 1 and torch.get_num_threads() == 1
    with pytest.raises(sk.ConfigError):
        resources.configure_threads(0)


def test_default_budget_is_what_the_process_may_use_or_an_earlier_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources, "available_cpus", lambda: 3)
    torch.set_num_threads(7)
    assert resources.configure_threads(None, workers=1) == 2 and torch.get_num_threads() == 2
    resources.configure_threads(1)  # e.g. a cohort worker's share
    assert resources.configure_threads(None, workers=0) == 1


def test_a_users_omp_num_threads_caps_the_default_and_threads_overrides_it(monkeypatch):
    monkeypatch.setattr(resources, "available_cpus", lambda: 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resources.configure_threads(None, workers=0) == 1 and torch.get_num_threads() == 1
    assert resources.configure_threads(3, workers=0) == 3  # --threads is explicit: it wins
    monkeypatch.setattr(resources, "_BUDGET", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # a cap, never a raise past what the process may use
    assert resources.configure_threads(None, workers=1) == 2


def test_cli_lets_idle_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    import os
    import subprocess
    import sys

    code = "import os, slidekit.cli; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
    # torch already loaded: OpenMP has read its settings, so nothing is changed
    code = "import torch, os, slidekit.cli; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def _worker_state(_):
    import cv2

    return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])


def test_predictor_workers_run_one_thread_each(tmp_path):
    from slidekit.models.builtin import builtin_model

    net, spec = builtin_model("hematoxylin")
    path = synthetic_slide(tmp_path / "s.tif")
    slide = sk.open_slide(path)
    grid = sk.TileGrid.from_slide(slide, mpp=spec.mpp, size=spec.patch_size, min_tissue=0)
    loader = sk.Predictor(net, spec, device="cpu", workers=1).loader(slide, grid)
    assert loader.worker_init_fn is resources.worker_threads
    torch.set_num_threads(2)
    loader2 = torch.utils.data.DataLoader(_States(), batch_size=None, num_workers=1,
                                          worker_init_fn=resources.worker_threads)
    assert next(iter(loader2))[0].item() == 1


class _States(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        return _worker_state(i)


def test_heatmap_threads_set_the_main_process_pool(tmp_path):
    path = synthetic_slide(tmp_path / "s.tif", tissue_box=(256, 256, 1280, 1024))
    torch.set_num_threads(2)
    sk.heatmap_slide(path, tmp_path / "hm", workers=0, progress=False, device="cpu", threads=1)
    assert torch.get_num_threads() == 1


def test_cli_threads_option_validates_and_train_reads_num_workers(tmp_path):
    from slidekit.cli import main
    from slidekit.cli.train import _num_workers

    r = CliRunner().invoke(main, ["heatmap", "x.tif", "--out", str(tmp_path / "o"), "--threads", "0"])
    assert r.exit_code != 0 and "--threads" in r.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_workers: 3\nepochs: 1\n")
    assert _num_workers("scribble", cfg, []) == 3
    assert _num_workers("scribble", cfg, ["num_workers=1"]) == 1
    assert _num_workers("scribble", None, []) == 0


def test_cpu_budget_is_the_explicit_budget_else_what_the_process_may_use(monkeypatch):
    monkeypatch.setattr(resources, "available_cpus", lambda: 3)
    assert resources.cpu_budget() == 3
    resources.configure_threads(1)
    assert resources.cpu_budget() == 1


def test_overview_decode_pool_follows_the_budget_not_the_machine(tmp_path, monkeypatch):
    import tifffile

    import slidekit.slides.whole as whole

    rgb = np.random.default_rng(0).integers(120, 255, size=(1024, 1024, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    sizes = []
    real_pool = whole.ThreadPoolExecutor

    def recording_pool(max_workers):
        sizes.append(max_workers)
        return real_pool(max_workers=max_workers)

    monkeypatch.setattr(whole, "ThreadPoolExecutor", recording_pool)
    monkeypatch.setattr(resources, "available_cpus", lambda: 3)
    with sk.open_slide(path) as slide:
        slide.read_whole(8.0)
        resources.configure_threads(1)  # e.g. --threads 1
        slide.read_whole(4.0)
    assert sizes == [3, 1]


def test_threads_option_on_every_computing_command(tmp_path):
    from slidekit.cli import main
    from slidekit.slides.demo import write_demo_slide

    demo = write_demo_slide(tmp_path / "demo.tif")
    torch.set_num_threads(2)
    r = CliRunner().invoke(main, ["tissue", str(demo), "--out", str(tmp_path / "t"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    r = CliRunner().invoke(main, ["tile", str(demo), "--out", str(tmp_path / "g.npz"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1
    for cmd in (["tissue", str(demo), str(demo)], ["tile", str(demo), str(demo)], ["features", str(tmp_path)]):
        r = CliRunner().invoke(main, [*cmd, "--out", str(tmp_path / "c"), "--threads", "1", "--jobs", "1"])
        assert r.exit_code != 0 and "--threads is for one slide" in r.output, (cmd, r.output)


def test_cpu_budget_is_a_local_rank_share_like_the_thread_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources, "available_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks on this machine
    assert resources.cpu_budget() == 2 == resources.configure_threads(None, workers=0)

"""torch.distributed training (issue 10): sharded samplers, NT-Xent over ranks, global batch norm,
DDP trainers equal to one process on the global batch, rank-0-only writes, a dead rank.

Several-rank tests run 2 CPU processes with gloo (torch.multiprocessing spawn, one thread each).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from slidekit.base import distributed as sdist
from slidekit.data.sampling import (
    ClassBalancedSampler,
    FixedRatioSampler,
    HardNegativeSampler,
    PerSlideCapSampler,
    UniformSampler,
    WeightedSampler,
)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(barrier: object) -> None:
    try:
        barrier.wait(timeout=120)  # type: ignore[attr-defined]
    except threading.BrokenBarrierError:
        pass  # another rank failed; mp.spawn reports it


def _worker(rank: int, world: int, port: int, fn_name: str, args: tuple, together: object) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), SLIDEKIT_DIST_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sdist.init_from_env(torch.device("cpu"))
    try:
        globals()[fn_name](*args)
    finally:
        # Rank 0 hosts the TCP store: if it tears its group down (or exits) while another rank still
        # holds one, gloo's threads on that rank can abort ("terminate called without an active
        # exception"). Every rank finishes, then every rank destroys, then they leave together.
        _wait(together)
        torch.distributed.destroy_process_group()
        _wait(together)


def run_ranks(fn_name: str, *args: object, world: int = 2) -> None:
    """Run module-level function ``fn_name(*args)`` on ``world`` gloo ranks; fail if any rank fails."""
    together = mp.get_context("spawn").Barrier(world)
    mp.spawn(_worker, args=(world, _free_port(), fn_name, args, together), nprocs=world, join=True)


# -- samplers: disjoint, equally long shares of one seeded epoch -----------------------------------

def _samplers() -> dict:
    rng = np.random.default_rng(3)
    slides = rng.integers(0, 5, 103)
    labels = rng.integers(0, 3, 103)
    return {"uniform": UniformSampler(103, seed=1),
            "uniform_draws": UniformSampler(103, num_samples=250, seed=1),
            "per_slide_cap": PerSlideCapSampler(slides, max_per_slide=9, seed=2),
            "class_balanced": ClassBalancedSampler(labels, seed=3),
            "hard_negative": HardNegativeSampler(rng.random(103), seed=4),
            "weighted": WeightedSampler(rng.random(103) + 0.1, seed=5)}


@pytest.mark.parametrize("name", list(_samplers()))
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sampler_splits_the_single_process_epoch(name: str, world: int) -> None:
    sampler = _samplers()[name]
    sampler.set_epoch(4)
    epoch = list(sampler)
    shards = [sdist.ShardedSampler(sampler, rank=r, world=world) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    drawn = [list(s) for s in shards]
    keep = len(epoch) - len(epoch) % world
    assert {len(d) for d in drawn} == {keep // world} and all(len(s) == keep // world for s in shards)
    # positions: rank r holds draws r, r + world, ...: disjoint, together the epoch's first `keep` draws
    assert [d[k] for k in range(keep // world) for d in drawn] == epoch[:keep]
    assert shards[0].dropped == len(epoch) % world
    # batches of B on each rank are, together, the batches of world·B of one process
    b = 4
    for k in range(keep // (world * b)):
        together = sorted(i for d in drawn for i in d[k * b:(k + 1) * b])
        assert together == sorted(epoch[k * world * b:(k + 1) * world * b])
    # another epoch is another draw, still shared the same way
    for s in shards:
        s.set_epoch(5)
    assert [list(s) for s in shards] != drawn


def test_sharded_batch_sampler_splits_every_global_batch_at_the_ratio() -> None:
    sampler = FixedRatioSampler([20, 7, 60], [2, 1, 7], batch_size=20, num_batches=9, seed=0)
    sampler.set_epoch(2)
    batches = list(sampler)
    shards = [sdist.ShardedBatchSampler(sampler, rank=r, world=2) for r in range(2)]
    per_rank = [list(s) for s in shards]
    for k, batch in enumerate(batches):
        a, b = per_rank[0][k], per_rank[1][k]
        assert len(a) == len(b) == 10
        assert sorted(a + b) == sorted(batch)
    assert all(len(s) == len(sampler) for s in shards)
    with pytest.raises(Exception, match="does not split over 3 ranks"):
        list(sdist.ShardedBatchSampler(sampler, rank=0, world=3))


def test_one_process_is_untouched() -> None:
    sampler = UniformSampler(10, seed=0)
    assert sdist.shard(sampler) is sampler
    t = torch.randn(3, 2, requires_grad=True)
    assert sdist.all_gather_with_grad(t) is t
    assert sdist.world_size() == 1 and sdist.is_main()


def test_env_ranks_reads_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert sdist.env_ranks() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert sdist.env_ranks() == (0, 1, 0)  # srun without a rendezvous address: not a distributed run
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert sdist.env_ranks() == (5, 8, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert sdist.env_ranks() == (1, 2, 0)
    assert sdist.backend_for(torch.device("cpu")) == "gloo" and sdist.backend_for(torch.device("cuda", 0)) == "nccl"


# -- NT-Xent with negatives from all ranks, global batch norm ---------------------------------------

def _contrast_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)).double()


def _contrast_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)


def _ntxent_rank(out: str) -> None:
    from trainers.simclr_core import nt_xent_distributed

    r, w = sdist.rank(), sdist.world_size()
    x1, x2 = _contrast_data()
    n = len(x1) // w
    net = sdist.wrap(_contrast_net(), torch.device("cpu"), sync_batchnorm=True)
    z = net(torch.cat([x1[r * n:(r + 1) * n], x2[r * n:(r + 1) * n]]))
    loss = nt_xent_distributed(z[:n], z[n:], 0.2)
    loss.backward()
    mean_loss = sdist.all_reduce_mean({"loss": float(loss.detach())})["loss"]
    grads = {k: p.grad.clone() for k, p in sdist.unwrap(net).named_parameters()}
    torch.save({"loss": mean_loss, "grads": grads,
                "running_mean": sdist.unwrap(net)[1].running_mean.clone()}, f"{out}/rank{r}.pt")


def test_nt_xent_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    from trainers.simclr_core import nt_xent

    run_ranks("_ntxent_rank", str(tmp_path))
    x1, x2 = _contrast_data()
    net = _contrast_net()
    # one process: the concatenated batch in the ranks' order (views 1 of both ranks, then views 2)
    z = net(torch.cat([x1, x2]))
    loss = nt_xent(z[:8], z[8:], 0.2)
    loss.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["loss"] == pytest.approx(float(loss.detach()), abs=1e-5)
        for k, p in net.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["running_mean"], net[1].running_mean, atol=1e-6, rtol=0)


# -- a DDP trainer equals one process on the global batch ------------------------------------------

def _scribble_config(data: Path) -> dict:
    return {"data": str(data), "labels": "scribbles", "crop": 64, "samples_per_image": 2, "batch_size": 4,
            "epochs": 2, "augment": False, "lr": 1e-3, "sync_batchnorm": True, "seed": 0}


def _float64() -> None:
    """Train in float64 (this process only): the U-Net's float32 gradients differ by ~0.5% between
    any two summation orders (2×2 batches vs one of 4), which would hide the arithmetic tested."""
    from slidekit.models.spec import ModelSpec

    torch.set_default_dtype(torch.float64)
    if not getattr(ModelSpec.normalize, "_float64", False):
        normalize = ModelSpec.normalize

        def as_double(self, batch):  # noqa: ANN001, ANN202
            return normalize(self, batch).double()

        as_double._float64 = True
        ModelSpec.normalize = as_double


def _scribble_rank(data: str, out: str) -> None:
    from trainers.scribble import ScribbleConfig, ScribbleTrainer

    _float64()

    ScribbleTrainer(ScribbleConfig(**_scribble_config(Path(data)))).fit(out, device="cpu", progress=False)


@pytest.mark.slow
def test_two_rank_scribble_equals_one_rank_with_the_global_batch(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from slidekit.models.spec import ModelSpec

    monkeypatch.setattr(ModelSpec, "normalize", ModelSpec.normalize)  # restored afterwards
    _float64()
    try:
        _compare_scribble_runs(tmp_path)
    finally:
        torch.set_default_dtype(torch.float32)


def _compare_scribble_runs(tmp_path: Path) -> None:
    from test_scribble_trainer import make_nuclei_folder

    from trainers.scribble import ScribbleConfig, ScribbleTrainer


    data = make_nuclei_folder(tmp_path / "data", n_images=4, size=64)
    torch.set_num_threads(1)
    one = ScribbleTrainer(ScribbleConfig(**_scribble_config(data))).fit(tmp_path / "one", device="cpu",
                                                                         progress=False)
    run_ranks("_scribble_rank", str(data), str(tmp_path / "two"))
    a, b = torch.load(one, weights_only=False), torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert a["spec"] == b["spec"] and a["extra"] == b["extra"] and a["format"] == b["format"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-9, rtol=1e-7, msg=k)
    moved = max(float((a["state_dict"][k].float() - v.float()).abs().max())
                for k, v in torch.load(tmp_path / "one" / "state.pt")["model"].items() if k in a["state_dict"])
    assert moved == 0.0  # state.pt holds the final weights (sanity)
    rows = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    assert [r["epoch"] for r in rows[1]] == [0, 1]  # written once (rank 0), not once per rank
    assert rows[1][-1]["loss"] == pytest.approx(rows[0][-1]["loss"], rel=1e-3)
    assert (tmp_path / "two" / "done.json").exists()


# -- launching, a dead rank, resume ------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            out += [child, *_descendants(child)]
    return out


@pytest.mark.slow
def test_nproc_launch_dead_rank_ends_the_job_and_a_rerun_resumes(tmp_path: Path) -> None:
    from test_scribble_trainer import make_nuclei_folder

    data = make_nuclei_folder(tmp_path / "data", n_images=4, size=64)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slidekit", "train", "scribble", "--out", str(out), "--nproc", "2", "--quiet",
           "--device", "cpu", *sum((["--set", f"{k}={v}"] for k, v in
                                   {**_scribble_config(data), "epochs": 30}.items()), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIDEKIT_DIST_TIMEOUT_S": "30"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    workers = [p for p in _descendants(proc.pid)
               if "slidekit" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert len(workers) >= 2
    os.kill(workers[-1], 9)
    started = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - started < 60
    last = err.strip().splitlines()[-1]
    assert "distributed training failed: rank" in last and "SIGKILL" in last and "resume" in last
    # just that line: no torch traceback of the surviving rank or launcher log (51 lines with -q before)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (out / "done.json").exists()
    trained = torch.load(out / "state.pt", weights_only=True)["epoch"]
    assert trained >= 1
    # a rerun with fewer epochs to go (a larger length continues) resumes from the state reached
    cmd[cmd.index("epochs=30")] = f"epochs={trained + 1}"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(trained + 1))
    assert json.loads((out / "done.json").read_text())["epochs"] == trained + 1


# -- rank 0 decides reruns; progress per step; options added later -----------------------------------

def _refused_rank(data: str, out: str) -> None:
    from slidekit.base.errors import TrainingError
    from trainers.scribble import ScribbleConfig, ScribbleTrainer

    try:
        ScribbleTrainer(ScribbleConfig(**_scribble_config(Path(data)))).fit(out, device="cpu", progress=False)
    except TrainingError as e:
        Path(out, f"refused{sdist.rank()}.txt").write_text(str(e))


def test_a_refused_rerun_stops_every_rank(tmp_path: Path) -> None:
    from test_scribble_trainer import make_nuclei_folder

    data = make_nuclei_folder(tmp_path / "data", n_images=2, size=64)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"trainer": "s2l"}))
    (out / "metrics.json").write_text("[]")  # it trained: a run with progress owns its folder (trainers/runs.py)
    run_ranks("_refused_rank", str(data), str(out))  # no rank trains on alone, none hangs
    messages = [(out / f"refused{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and "holds a 's2l' run, not 'scribble'" in messages[0]
    assert (out / "config.json").read_text() == json.dumps({"trainer": "s2l"})  # nothing rewritten


def test_scribble_progress_moves_per_step_with_loss(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from test_scribble_trainer import make_nuclei_folder

    from trainers.scribble import ScribbleConfig, ScribbleTrainer

    data = make_nuclei_folder(tmp_path / "data", n_images=2, size=64)
    cfg = {**_scribble_config(data), "epochs": 1, "sync_batchnorm": False, "batch_size": 2}
    ScribbleTrainer(ScribbleConfig(**cfg)).fit(tmp_path / "run", device="cpu", progress=True)
    err = capfd.readouterr().err
    assert "epoch 1/1" in err and "step" in err and "loss=" in err


def test_a_run_recorded_before_a_new_option_resumes(tmp_path: Path) -> None:
    from test_scribble_trainer import make_nuclei_folder

    from trainers.runs import begin_run
    from trainers.scribble import ScribbleConfig, ScribbleTrainer

    data = make_nuclei_folder(tmp_path / "data", n_images=2, size=64)
    trainer = ScribbleTrainer(ScribbleConfig(**{**_scribble_config(data), "sync_batchnorm": False}))
    out = tmp_path / "run"
    assert begin_run(trainer, out, 2) == "fresh"
    record = json.loads((out / "config.json").read_text())
    del record["sync_batchnorm"]  # as written before the option existed
    (out / "config.json").write_text(json.dumps(record))
    assert begin_run(trainer, out, 2) == "fresh"  # no "other options" refusal
    (out / "metrics.json").write_text("[]")  # it trained: a run with progress owns its folder (trainers/runs.py)
    trainer.config.sync_batchnorm = True  # not the default: a real difference
    with pytest.raises(Exception, match="sync_batchnorm"):
        begin_run(trainer, out, 2)


# -- more trainers: 2 ranks equal 1 rank on the global batch (float64) --------------------------------

def _compare_checkpoints(one: Path, two: Path) -> None:
    a, b = torch.load(one / "checkpoint.pt", weights_only=False), torch.load(two / "checkpoint.pt", weights_only=False)
    assert a["spec"] == b["spec"] and a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-9, rtol=1e-7, msg=k)


def _topk_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 2, 32, 32, 3), generator=g, dtype=torch.uint8), torch.tensor([0., 1.] * 3)


def _topk_run(out: str) -> None:
    from trainers.stage2 import TopKMeanConfig, TopKMeanTrainer, fit_topk_mean

    _float64()
    # 6 slides in global batches of 4: the last batch (2 slides) splits over 2 ranks too
    cfg = TopKMeanConfig(k=2, mpp=8.0, patch_size=32, epochs=2, lr=1e-3, batch_slides=4, sync_batchnorm=True)
    fit_topk_mean(TopKMeanTrainer(cfg), out, *_topk_inputs(), device="cpu", progress=False)


@pytest.mark.slow
def test_two_rank_topk_mean_equals_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slidekit.models.spec import ModelSpec

    monkeypatch.setattr(ModelSpec, "normalize", ModelSpec.normalize)
    try:
        _topk_run(str(tmp_path / "one"))
    finally:
        torch.set_default_dtype(torch.float32)
    run_ranks("_topk_run", str(tmp_path / "two"))
    _compare_checkpoints(tmp_path / "one", tmp_path / "two")


def _s2l_run(data: str, out: str) -> None:
    from trainers.s2l import S2LConfig, S2LTrainer

    _float64()
    cfg = {**_scribble_config(Path(data)), "epochs": 3, "warmup_epochs": 1, "ema_start": 0, "threshold": 0.5}
    S2LTrainer(S2LConfig(**cfg)).fit(out, device="cpu", progress=False)


@pytest.mark.slow
def test_two_rank_s2l_keeps_the_same_averages_as_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_scribble_trainer import make_nuclei_folder

    from slidekit.models.spec import ModelSpec

    data = make_nuclei_folder(tmp_path / "data", n_images=3, size=64)  # 3 images: ranks predict 2 and 1
    monkeypatch.setattr(ModelSpec, "normalize", ModelSpec.normalize)
    try:
        _s2l_run(str(data), str(tmp_path / "one"))
    finally:
        torch.set_default_dtype(torch.float32)
    run_ranks("_s2l_run", str(data), str(tmp_path / "two"))
    _compare_checkpoints(tmp_path / "one", tmp_path / "two")
    ema = [torch.load(tmp_path / d / "state.pt", weights_only=True)["extra"]["ema"] for d in ("one", "two")]
    assert len(ema[0]) == len(ema[1]) == 3
    for a, b in zip(*ema):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-7, equal_nan=True)
    rows = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert rows[-1]["loss_up"] > 0  # the pseudo-label loss ran on both ranks


def _simclr_run(folder: str, out: str) -> None:
    from trainers.simclr import SimCLRConfig, SimCLRTrainer

    cfg = SimCLRConfig(folders=[folder], tile_size=32, crop_size=32, mpp=1.0, batch_size=8, epochs=2,
                       steps_per_epoch=3, optimizer="lars", warmup_epochs=0, seed=0, time_budget_s=600.0)
    SimCLRTrainer(cfg).fit(out, device="cpu", progress=False)


@pytest.mark.slow
def test_two_rank_simclr_trains_and_writes_once(tmp_path: Path) -> None:
    from PIL import Image

    from slidekit.models.checkpoint import load_checkpoint

    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    run_ranks("_simclr_run", str(folder), str(tmp_path / "run"))
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["steps"] == 3 and np.isfinite(r["loss"]) for r in rows)
    # LARS scales the learning rate by the global batch (8 pairs), not a rank's 4
    from trainers.simclr_core import scaled_lr, warmup_cosine

    assert rows[0]["lr"] == pytest.approx(scaled_lr(0.3, 8, "linear") * warmup_cosine(3, 6, 0))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt.spec.arch == "resnet-encoder" and (tmp_path / "run" / "done.json").exists()


def _mixed_em_run(table: str, out: str) -> None:
    from trainers.mixed_em import MixedEMConfig, MixedEMTrainer

    cfg = MixedEMConfig(slides=table, mpp=8.0, patch_size=32, rounds=1, init_steps=3, round_steps=2, batch_size=10,
                        predict_tile=128, min_tissue=0.1)
    MixedEMTrainer(cfg).fit(out, device="cpu", progress=False)


@pytest.mark.slow
def test_two_rank_mixed_em_splits_heatmaps_and_writes_once(tmp_path: Path) -> None:
    from conftest import mixed_em_slides

    table = mixed_em_slides(tmp_path)
    run_ranks("_mixed_em_run", str(table), str(tmp_path / "out"))
    out = tmp_path / "out"
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["n_pixel"] > 0
    assert json.loads((out / "selected.json").read_text())["selected_round"] in (0, 1)
    for r in (0, 1):  # every slide-labelled slide's heatmap, whichever rank predicted it
        assert len(list((out / "rounds" / f"r{r}" / "heatmaps").glob("*/heatmap.zarr"))) == 5
    assert (out / "rounds" / "r1" / "pseudo_labels.zarr").exists() and (out / "checkpoint.pt").exists()


def test_shard_warns_when_an_epoch_does_not_split_evenly(monkeypatch: pytest.MonkeyPatch) -> None:
    from slidekit.base.errors import TrainingWarning

    monkeypatch.setattr(sdist, "world_size", lambda: 2)
    monkeypatch.setattr(sdist, "rank", lambda: 0)
    monkeypatch.setattr(sdist, "_this_rank", lambda: 0)
    with pytest.warns(TrainingWarning, match="last 1 draw"):
        assert len(sdist.shard(UniformSampler(7, seed=0))) == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(sdist.shard(UniformSampler(8, seed=0))) == 4

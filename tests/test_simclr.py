"""SimCLR: NT-Xent, augmentations, LARS, patch sources and the per-slide cap, the trainer."""
from __future__ import annotations

import collections
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_slide
from PIL import Image
from torch import nn

from slidekit.base.errors import ConfigError
from slidekit.data.sampling import FixedRatioSampler
from slidekit.models.checkpoint import load_checkpoint, transfer_encoder
from slidekit.models.networks import ResNetUNet
from trainers.simclr_core import (
    LARS,
    AugmentConfig,
    HistologyAugment,
    color_jitter,
    gaussian_blur,
    nt_xent,
    split_decay_groups,
    warmup_cosine,
)
from trainers.simclr_data import PatchPool, build_sources


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The loss written out term by term, as in the SimCLR paper (Algorithm 1)."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2

    def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b) / (a.norm() * b.norm())

    total = z.new_zeros(())
    for i in range(n2):
        j = (i + n) % n2
        num = torch.exp(sim(z[i], z[j]) / t)
        den = sum(torch.exp(sim(z[i], z[k]) / t) for k in range(n2) if k != i)
        total = total - torch.log(num / den)
    return total / n2


def test_nt_xent_matches_reference_value_and_gradient():
    torch.manual_seed(0)
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    for t in (0.1, 0.5):
        fast = nt_xent(a, b, t)
        ref = nt_xent_reference(a, b, t)
        assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
        g_fast = torch.autograd.grad(fast, (a, b))
        g_ref = torch.autograd.grad(ref, (a, b))
        for gf, gr in zip(g_fast, g_ref):
            assert torch.allclose(gf.double(), gr, rtol=1e-4, atol=1e-6)


def test_nt_xent_stable_and_lowest_when_views_match():
    torch.manual_seed(1)
    z = torch.randn(16, 32)
    same = nt_xent(z, z.clone(), 0.1)
    noisy = nt_xent(z, z + 0.5 * torch.randn_like(z), 0.1)
    unrelated = nt_xent(z, torch.randn(16, 32), 0.1)
    assert same < noisy < unrelated
    tiny_t = nt_xent(z * 1e3, z * 1e3, 1e-3)  # huge logits: still finite
    assert torch.isfinite(tiny_t)
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))


def test_augment_shapes_dtypes_and_range():
    aug = HistologyAugment(AugmentConfig(size=32))
    img = torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8)
    g = aug.geometric(img)
    assert g.shape == (3, 32, 32) and g.dtype == torch.uint8
    views = aug.views([img, img, img])
    assert views.shape == (3, 3, 32, 32) and views.dtype == torch.float32
    assert views.min() >= -1 - 1e-5 and views.max() <= 1 + 1e-5  # mean = std = 0.5
    x = torch.rand(4, 3, 16, 16)
    assert color_jitter(x, 0.8, 0.8, 0.8, 0.4).shape == x.shape
    blurred = gaussian_blur(x, torch.tensor([0.1, 0.5, 1.0, 2.0]), 5)
    assert blurred.shape == x.shape
    assert torch.allclose(blurred[0], x[0], atol=1e-3)  # sigma 0.1 barely blurs
    assert blurred[3].std() < x[3].std()
    with pytest.raises(ValueError):
        AugmentConfig(jitter="extreme")
    with pytest.raises(ValueError):
        AugmentConfig(min_crop=0.0)


def test_rotation_flip_group_is_uniform():
    aug = HistologyAugment(AugmentConfig(size=8))
    dihedral = aug.geometric.transforms[1:]  # rotations and both flips, without the crop
    img = torch.arange(4, dtype=torch.uint8).view(1, 2, 2).repeat(3, 1, 1)
    torch.manual_seed(0)
    counts = collections.Counter()
    n = 4000
    for _ in range(n):
        out = img
        for t in dihedral:
            out = t(out)
        counts[tuple(out[0].flatten().tolist())] += 1
    assert len(counts) == 8  # all eight symmetries of the square
    expected = n / 8
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 24.3  # chi-square, 7 dof, p = 0.001
    k_counts = collections.Counter()
    for _ in range(2000):
        k_counts[dihedral[0].make_params([])["k"]] += 1
    assert set(k_counts) == {0, 1, 2, 3} and min(k_counts.values()) > 400


def test_lars_trust_ratio_by_hand():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    layer.weight.grad = torch.tensor([[0.0, 0.6], [0.8, 0.0]])  # ||g|| = 1
    layer.bias.grad = torch.tensor([0.5, 0.5])
    wd, eta, lr = 0.1, 0.01, 2.0
    q = LARS.trust_ratio(layer.weight, layer.weight.grad, wd, eta)
    assert q.item() == pytest.approx(eta * 5 / (1 + wd * 5))
    opt = LARS(split_decay_groups(layer), lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    g_w, g_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    opt.step()
    expected_w = w0 - lr * q * (g_w + wd * w0)
    assert torch.allclose(layer.weight, expected_w)
    assert torch.allclose(layer.bias, b0 - lr * g_b)  # bias: no trust ratio, no weight decay
    assert LARS.trust_ratio(torch.zeros(3), torch.ones(3), wd, eta).item() == 1.0


def test_bias_and_norm_parameters_are_excluded():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6),
                        nn.Linear(4 * 6 * 6, 2))
    adapt, plain = split_decay_groups(net)
    names = {id(p): n for n, p in net.named_parameters()}
    adapted = sorted(names[id(p)] for p in adapt["params"])
    excluded = sorted(names[id(p)] for p in plain["params"])
    assert adapted == ["0.weight", "4.weight"]
    assert excluded == ["0.bias", "1.bias", "1.weight", "3.bias", "3.weight", "4.bias"]
    assert adapt["lars"] and not plain["lars"] and plain["weight_decay"] == 0.0


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


@pytest.fixture(scope="module")
def three_slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("slides")
    return [synthetic_slide(root / f"s{i}.tif", width=1024, height=768, tissue_box=(128, 128, 768, 512),
                            seed=i) for i in range(3)]


def test_per_slide_cap_respected_by_the_sampler(three_slides, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    specs = [{"slides": [str(p) for p in three_slides], "cap": 5},
             {"folder": str(folder), "image_mpp": 0.25, "cap": 2}]
    sources = build_sources(specs, mpp=0.5, size=64, cap=100, seed=0)
    slides, images = sources
    assert all(v == 5 for v in slides.per_group.values()) and len(slides.per_group) == 3
    assert all(v == 2 for v in images.per_group.values())  # 64 px at 0.5 from 0.25 -> 128 px windows
    pool = PatchPool(sources)
    sampler = FixedRatioSampler(pool.sizes, pool.weights, batch_size=8, num_batches=50, seed=0)
    seen: dict[str, set] = collections.defaultdict(set)
    per_source = collections.Counter()
    for batch in sampler:
        for i in batch:
            item = pool.items[i]
            per_source[pool.source_of(i)] += 1
            key = item[0] if item[0].startswith("slide:") else item[1]
            seen[key].add(item[1:] if item[0].startswith("slide:") else item[2])
    assert per_source[0] == per_source[1]  # the sampler balances the two sources
    assert all(len(v) <= 5 for k, v in seen.items() if k.startswith("slide:"))
    assert sum(1 for k in seen if k.startswith("slide:")) == 3
    assert pool[0].shape == (3, 64, 64) and pool[0].dtype == torch.uint8
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(pool))[0], pool[0])  # worker-safe slide readers
    assert pool[len(pool) - 1].shape == (3, 64, 64)


def _corner(t: torch.Tensor) -> torch.Tensor:
    return t[:, :16, :16]


def test_zip_source_and_bad_sources(tmp_path):
    zpath = tmp_path / "tiles.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(zpath, "w") as zf:
        for split in ("train", "test"):
            for i in range(3):
                p = tmp_path / f"{split}{i}.png"
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(p)
                zf.write(p, f"set/{split}/{i}.png")
    (src,) = build_sources([{"zip": str(zpath), "pattern": "*/train/*"}], mpp=0.5, size=32, cap=None)
    assert len(src) == 3
    pool = PatchPool([src], transform=_corner, views=2)
    a, b = pool[1]
    assert a.shape == b.shape == (3, 16, 16)
    import pickle

    clone = pickle.loads(pickle.dumps(pool))  # what a DataLoader worker gets: reopens the archive
    assert torch.equal(clone[2][0], pool[2][0])
    with pytest.raises(ConfigError):
        build_sources([{"zip": str(zpath), "members": ["nope.png"]}], 0.5, 32, None)
    with pytest.raises(ConfigError):
        build_sources([{"folder": str(tmp_path / "missing")}], 0.5, 32, None)
    with pytest.raises(ConfigError):
        build_sources([{"zip": str(zpath), "folder": str(tmp_path)}], 0.5, 32, None)
    with pytest.raises(ConfigError):
        build_sources([], 0.5, 32, None)


def _tiny_config(folder: Path, **over):
    from trainers.simclr import SimCLRConfig

    cfg = dict(folders=[str(folder)], tile_size=32, crop_size=32, mpp=1.0, batch_size=8, epochs=3,
               steps_per_epoch=3, optimizer="adam", warmup_epochs=0, backbone="resnet18", seed=0)
    cfg.update(over)
    return SimCLRConfig(**cfg)


@pytest.fixture(scope="module")
def texture_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("textures")
    rng = np.random.default_rng(0)
    for i in range(12):  # distinct coloured stripes and blobs
        base = rng.integers(40, 220, size=3)
        img = np.tile(base, (32, 32, 1)).astype(np.int16)
        img[:, :: 2 + i % 5] += 30
        img[rng.integers(0, 32, 20), rng.integers(0, 32, 20)] = 0
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"t{i}.png")
    return folder


def test_trainer_registered_and_config_checks():
    import trainers
    from trainers.simclr import SimCLRConfig

    cls = trainers.get("simclr")
    assert cls.consumes == frozenset({"images"})
    assert SimCLRConfig().lr == 0.3 and SimCLRConfig(optimizer="adam").lr == 1e-3
    with pytest.raises(ConfigError):
        SimCLRConfig(optimizer="sgdx")
    with pytest.raises(ConfigError):
        SimCLRConfig(batch_size=1)
    cfg = trainers.load_config(cls.Config, None, ["zips=a.zip", "jitter=medium", "min_crop=0.08"])
    assert cfg.source_specs() == [{"zip": "a.zip"}] and cfg.augment().min_crop == 0.08


@pytest.mark.slow
def test_tiny_pretraining_lowers_loss(texture_folder, tmp_path):
    import json

    from trainers.simclr import SimCLRTrainer

    out = tmp_path / "run"
    SimCLRTrainer(_tiny_config(texture_folder, epochs=6, lr=2e-3)).fit(out, device="cpu", progress=False)
    losses = [r["loss"] for r in json.loads((out / "metrics.json").read_text())]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < np.mean(losses[:2])


def test_checkpoint_transfers_and_rerun_skips(texture_folder, tmp_path):
    from trainers.simclr import SimCLRTrainer

    out = tmp_path / "run"
    cfg = _tiny_config(texture_folder, epochs=1, steps_per_epoch=1)
    ckpt_path = SimCLRTrainer(cfg).fit(out, device="cpu", progress=False)
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.spec.arch == "resnet-encoder" and ckpt.spec.trainer == "simclr"
    assert ckpt.spec.mean == (0.5, 0.5, 0.5) and ckpt.spec.patch_size == 32
    assert ckpt.spec.extra["simclr"]["sources"][0]["patches"] == 12
    # the encoder initialises another trainer's network, weights equal
    unet = ResNetUNet("resnet18", 3)
    assert transfer_encoder(ckpt_path, unet)
    for k, v in ckpt.model.encoder.state_dict().items():
        assert torch.equal(unet.encoder.state_dict()[k], v)
    # a rerun of a finished run returns the checkpoint without training
    mtime = ckpt_path.stat().st_mtime_ns
    assert SimCLRTrainer(cfg).fit(out, device="cpu", progress=False) == ckpt_path
    assert ckpt_path.stat().st_mtime_ns == mtime


def test_lars_run_init_and_time_budget(texture_folder, tmp_path):
    import json

    from trainers.simclr import SimCLRTrainer

    first = tmp_path / "a" / "checkpoint.pt"
    first.parent.mkdir()
    from slidekit.models.checkpoint import save_checkpoint
    from slidekit.models.networks import ResNetClassifier
    from slidekit.models.spec import ModelSpec

    src = ResNetClassifier("resnet18", 0)
    save_checkpoint(first, src, ModelSpec(arch="resnet-encoder", classes=[], task="embedding"))
    cfg = _tiny_config(texture_folder, epochs=1, steps_per_epoch=50, optimizer="lars", init=str(first),
                       time_budget_s=1e-3)
    second = SimCLRTrainer(cfg).fit(tmp_path / "b", device="cpu", progress=False)
    assert load_checkpoint(second).spec.trainer_config["optimizer"] == "lars"
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert rows[0]["steps"] < 50  # the time budget stopped training early
    if rows[0]["steps"] == 0:  # nothing trained: the encoder is exactly the --init one
        got = load_checkpoint(second).model.encoder.state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.encoder.state_dict().items())

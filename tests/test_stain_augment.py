"""Stain augmentation (issue 11): hed_shift, HEDJitter, RandStainNA, augmenter_from_options."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from slidekit.base.errors import ConfigError, StainWarning
from slidekit.stain.augment import (
    DEFAULT_LAB_STATS,
    STAIN_AUGMENTS,
    HEDJitter,
    RandStainNA,
    augmenter_from_options,
    hed_shift,
)
from slidekit.stain.normalize import rgb_u8_to_lab

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the shared cores crawl otherwise


@pytest.fixture(scope="module")
def images(shared_data) -> list[np.ndarray]:
    files = sorted((shared_data / "nuclei_monuseg" / "images").glob("*.png"))
    assert len(files) >= 4, "MoNuSeg images missing from the shared data"
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


@pytest.fixture(scope="module")
def tiles(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([im[200:328, 300:428] for im in images[:6]]))


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hed_shift_identity_and_direction(tiles):
    same = hed_shift(tiles, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert float((same.float() - tiles.float()).abs().max()) <= 1.0   # 0 measured: no clipping of HED
    # More haematoxylin: skimage's own rgb2hed sees the H density go up by beta (OD, natural log;
    # skimage divides by -ln(1e-6)), E and D hardly move.
    from skimage.color import rgb2hed

    before = rgb2hed(tiles.numpy()) * -np.log(1e-6)
    after = rgb2hed(hed_shift(tiles, (1.0, 1.0, 1.0), (0.1, 0.0, 0.0)).numpy()) * -np.log(1e-6)
    stained = before[..., 0] > 0.05
    delta = np.median((after - before)[stained], axis=0)
    assert abs(delta[0] - 0.1) < 0.02 and abs(delta[1]) < 0.02 and abs(delta[2]) < 0.02
    # per-image parameters as a (B, 3) tensor: image i gets row i
    b = len(tiles)
    alpha = torch.ones(b, 3)
    alpha[1, 1] = 1.4
    out = hed_shift(tiles, alpha, torch.zeros(b, 3))
    assert torch.equal(out[0], same[0]) and not torch.equal(out[1], same[1])


def test_hed_shift_layout_and_errors(tiles):
    out = hed_shift(tiles, (1.2, 0.9, 1.0), (0.02, -0.02, 0.0))
    chw = hed_shift(tiles.permute(0, 3, 1, 2), (1.2, 0.9, 1.0), (0.02, -0.02, 0.0))
    assert chw.dtype == torch.uint8 and chw.shape == (len(tiles), 3, 128, 128)
    assert torch.equal(chw.permute(0, 2, 3, 1), out)
    with pytest.raises(ConfigError, match="alpha must be 3 finite numbers"):
        hed_shift(tiles, (1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ConfigError, match="beta"):
        hed_shift(tiles, (1.0, 1.0, 1.0), torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="uint8"):
        hed_shift(tiles.float(), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


@pytest.mark.parametrize("make", [lambda: HEDJitter(0.1), lambda: RandStainNA()], ids=["hed", "randstainna"])
def test_augmenters_seeded_varied_layout(tiles, make):
    aug = make()
    batch = tiles[:1].expand(4, -1, -1, -1).contiguous()   # one tile four times
    a, b = aug(batch, gen(3)), aug(batch, gen(3))
    assert torch.equal(a, b)                                   # reproducible from the generator
    assert not torch.equal(aug(batch, gen(4)), a)              # another seed, another draw
    assert a.dtype == torch.uint8 and a.shape == batch.shape and a.device == batch.device
    assert all(mad(a[i], a[j]) > 0.5 for i in range(4) for j in range(i))   # each image its own draw
    chw = aug(batch.permute(0, 3, 1, 2).contiguous(), gen(3))
    assert torch.equal(chw.permute(0, 2, 3, 1), a)


def test_hed_jitter_strength(tiles):
    assert torch.equal(HEDJitter(0.0)(tiles, gen(0)), tiles)   # strength 0: identity (0 levels measured)
    weak = mad(HEDJitter(0.02)(tiles, gen(1)), tiles)
    strong = mad(HEDJitter(0.2)(tiles, gen(1)), tiles)
    assert 0 < weak < strong
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="strength"):
            HEDJitter(bad)


def test_randstainna_defaults_are_the_monuseg_fit(images):
    """Where the default statistics come from: a fit on the 15 shared MoNuSeg images."""
    fitted = RandStainNA.fit(images).stats
    for key, values in DEFAULT_LAB_STATS.items():
        np.testing.assert_allclose(fitted[key], values, atol=2e-3, err_msg=key)


def test_randstainna_moves_images_to_templates(tiles):
    white = torch.full((1, 128, 128, 3), 250, dtype=torch.uint8)
    batch = torch.cat([tiles, white])
    # std_scale 0: every template is the mean template, so every tissue tile lands on its LAB mean
    out = RandStainNA(std_scale=0.0)(batch, gen(0))
    lab = rgb_u8_to_lab(out[:-1].reshape(len(tiles), -1, 3)).double()
    np.testing.assert_allclose(lab.mean(1).numpy(), np.tile(DEFAULT_LAB_STATS["mean_mean"], (len(tiles), 1)),
                               atol=1.5)
    assert torch.equal(out[-1], white[0])                      # glass is left alone
    fitted = RandStainNA.fit(tiles)
    assert fitted.to_dict()["std_scale"] == 1.0
    with pytest.raises(ConfigError, match="at least 2 stained images"):
        RandStainNA.fit([white[0].numpy()] * 3)
    with pytest.raises(ConfigError, match="stats need"):
        RandStainNA({"mean_mean": [1, 2, 3]})
    with pytest.raises(ConfigError, match="bad statistics std_std"):
        RandStainNA({**DEFAULT_LAB_STATS, "std_std": [1.0, -1.0, 1.0]})


def test_augmenter_from_options(tiles):
    assert STAIN_AUGMENTS == ("none", "hed", "randstainna")
    assert augmenter_from_options("none") is None
    hed = augmenter_from_options("hed", 0.1)
    assert isinstance(hed, HEDJitter) and hed.strength == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(augmenter_from_options("randstainna"), RandStainNA)
    fitted = augmenter_from_options("randstainna", images=tiles)
    assert fitted.stats == RandStainNA.fit(tiles).stats
    with pytest.warns(StainWarning, match="ignores strength 0.2"):
        augmenter_from_options("randstainna", 0.2)
    with pytest.raises(ConfigError, match="unknown stain augmentation 'gan'"):
        augmenter_from_options("gan")
    with pytest.raises(ConfigError, match="strength"):
        augmenter_from_options("hed", -1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batch_cpu_generator(tiles):
    for aug in (HEDJitter(0.1), RandStainNA()):
        gpu = aug(tiles.cuda(), gen(5))
        assert gpu.device.type == "cuda"
        assert (gpu.cpu().float() - aug(tiles, gen(5)).float()).abs().max() <= 1


def test_autocast_does_not_lower_precision(tiles):
    plain = [hed_shift(tiles, (1.1, 0.9, 1.0), (0.02, 0.0, 0.0)), RandStainNA()(tiles, gen(2))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(hed_shift(tiles, (1.1, 0.9, 1.0), (0.02, 0.0, 0.0)), plain[0])
        assert torch.equal(RandStainNA()(tiles, gen(2)), plain[1])

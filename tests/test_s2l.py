"""Scribble2Label: EMA update, consistency filtering, the extra loss, stored averages, resume."""
from __future__ import annotations

import math

import pytest
import torch
from test_scribble_trainer import make_nuclei_folder

import trainers
from slidekit.annotations.scribbles import IGNORE
from trainers.s2l import S2LTrainer, consistent_pseudo_labels, ema_update


def test_ema_update_by_hand():
    p0 = torch.tensor([[0.5, 1.0]])
    assert torch.equal(ema_update(None, p0, 0.2), p0)
    p1 = torch.tensor([[1.0, 0.0]])
    y = ema_update(p0, p1, 0.2)
    assert torch.allclose(y, torch.tensor([[0.6, 0.8]]))  # 0.2*p + 0.8*y_prev
    y2 = ema_update(y, p1, 0.2)
    assert torch.allclose(y2, torch.tensor([[0.68, 0.64]]))


def test_consistency_filtering_by_hand():
    fg = torch.tensor([[0.90, 0.10, 0.50, 0.85, float("nan"), 0.80, 0.19]])
    ema = torch.stack([1 - fg, fg])  # (C=2, 1, 7)
    scribbles = torch.tensor([[IGNORE, IGNORE, IGNORE, 1, IGNORE, IGNORE, IGNORE]])
    pseudo = consistent_pseudo_labels(ema, scribbles, threshold=0.8)
    # > τ -> 1; < 1-τ -> 0; in between, scribbled, NaN (padding) and exactly τ -> ignored.
    assert pseudo.tolist() == [[1, 0, IGNORE, IGNORE, IGNORE, IGNORE, 0]]
    batch = consistent_pseudo_labels(ema[None], scribbles[None], threshold=0.8)
    assert batch.shape == (1, 1, 7) and torch.equal(batch[0], pseudo)


def test_registered_with_paper_defaults():
    cls = trainers.get("s2l")
    assert cls is S2LTrainer and cls.consumes == {"images", "scribbles"}
    cfg = cls.Config()
    assert (cfg.ema_alpha, cfg.threshold, cfg.lambda_up) == (0.2, 0.8, 0.5)


def _cfg(root, **kw):
    opts = dict(data=str(root), labels="scribbles", classes=["background", "nucleus"], crop=32, epochs=3,
                batch_size=4, samples_per_image=4, lr=3e-3, seed=0, warmup_epochs=1, ema_every=1,
                threshold=0.6)
    opts.update(kw)
    return trainers.make_config(S2LTrainer.Config, opts)


@pytest.mark.slow
def test_s2l_run_trains_every_layer_and_stores_averages_at_image_size(tmp_path):
    root = make_nuclei_folder(tmp_path / "d", n_images=2, size=48)
    t = S2LTrainer(_cfg(root))
    from slidekit.models.networks import build_model

    torch.manual_seed(0)
    ckpt = t.fit(tmp_path / "run", device="cpu", progress=False)
    # Averages: one (C, H, W) map per training image, at the image's own size, valid probabilities.
    assert [tuple(e.shape) for e in t.ema] == [(2, 48, 48), (2, 48, 48)]
    e = torch.stack(t.ema)
    assert not torch.isnan(e).any() and torch.allclose(e.sum(1), torch.ones(2, 48, 48), atol=1e-4)
    rows = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    assert "loss_up" not in rows[0] and "ema_consistent" in rows[0]  # warm-up: scribbles only
    assert "loss_up" in rows[2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Every layer trained, the final 1x1 conv included (the official code freezes it).
    fresh = build_model(t.spec).state_dict()
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(fresh["head.weight"], trained["head.weight"])
    seed_model = build_model(t.spec)
    torch.manual_seed(0)
    assert all(p.requires_grad for p in seed_model.parameters())


def test_s2l_crops_carry_their_own_averages(tmp_path):
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=40)
    t = S2LTrainer(_cfg(root, epochs=2))
    t.fit(tmp_path / "run", device="cpu", progress=False)
    ds = t.dataset
    # Mark the average map with pixel coordinates: a crop's map must match the crop's image.
    h, w = t.ema[0].shape[1:]
    t.ema[0][0] = torch.arange(h * w, dtype=torch.float32).view(h, w)
    img_code = t.dataset.images[0].clone()
    t.dataset.images[0] = (torch.arange(h * w) % 251).view(1, h, w).repeat(3, 1, 1).to(torch.uint8)
    from slidekit.data.datasets import JointAugment

    ds.transform = JointAugment(color_jitter=None)
    torch.manual_seed(3)
    for i in range(6):
        s = ds[i % len(ds)]
        code = s["map:ema"][0]
        assert torch.equal((code.long() % 251).to(torch.uint8), s["image"][0])
    t.dataset.images[0] = img_code


class _Interrupted(Exception):
    pass


class _StopsAtEpoch1(S2LTrainer):
    """Dies during epoch 1, after epoch 0 was saved (not registered)."""

    def after_epoch(self, epoch):
        if epoch == 1:
            raise _Interrupted
        return super().after_epoch(epoch)


@pytest.mark.slow
def test_s2l_resume_restores_averages(tmp_path):
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=40)
    a = S2LTrainer(_cfg(root, epochs=2))
    a.fit(tmp_path / "a", device="cpu", progress=False)
    with pytest.raises(_Interrupted):
        _StopsAtEpoch1(_cfg(root, epochs=2)).fit(tmp_path / "b", device="cpu", progress=False)
    assert not (tmp_path / "b" / "done.json").exists()
    c = S2LTrainer(_cfg(root, epochs=2))
    c.fit(tmp_path / "b", device="cpu", progress=False)
    assert c.ema_ready
    assert torch.allclose(a.ema[0], c.ema[0], atol=1e-5)


def test_s2l_rejects_bad_options_and_slides(tmp_path):
    from slidekit.base.errors import ConfigError

    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=32)
    with pytest.raises(ConfigError, match="threshold"):
        S2LTrainer(_cfg(root, threshold=0.3)).fit(tmp_path / "r1", device="cpu", progress=False)
    with pytest.raises(ConfigError):
        S2LTrainer(_cfg(root, slides=["x.tif"], annotations=["x.geojson"])).fit(tmp_path / "r2", device="cpu",
                                                                                progress=False)


@pytest.mark.parametrize("opts, match", [
    (dict(warmup_epochs=3, epochs=3), r"warmup_epochs \(3\) >= epochs \(3\), so the pseudo-label loss never starts"),
    (dict(warmup_epochs=5, epochs=2), "warmup_epochs"),
    (dict(warmup_epochs=0, epochs=3, ema_start=2), "first prediction average"),
])
def test_s2l_refuses_schedules_where_s2l_never_starts(tmp_path, opts, match):
    from slidekit.base.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **opts)

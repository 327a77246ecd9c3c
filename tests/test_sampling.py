"""Samplers: seeded per epoch, caps, class balance, exact per-batch ratios, hard negatives."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from slidekit.data.sampling import (
    ClassBalancedSampler,
    FixedRatioSampler,
    HardNegativeSampler,
    PerSlideCapSampler,
    UniformSampler,
    WeightedSampler,
    as_torch_generator,
    ratio_counts,
)


def test_uniform_is_a_seeded_permutation_per_epoch():
    s = UniformSampler(50, seed=3)
    a = list(s)
    assert sorted(a) == list(range(50)) and len(s) == 50
    assert list(s) == a  # same epoch, same draw
    s.set_epoch(1)
    b = list(s)
    assert sorted(b) == list(range(50)) and b != a
    assert list(UniformSampler(50, seed=4)) != a
    draws = list(UniformSampler(5, num_samples=40, seed=0))
    assert len(draws) == 40 and set(draws) <= set(range(5))


def test_per_slide_cap():
    slides = ["a"] * 100 + ["b"] * 5 + ["c"] * 30
    s = PerSlideCapSampler(slides, max_per_slide=10, seed=0)
    idx = list(s)
    assert len(idx) == len(s) == 25 and len(set(idx)) == 25
    per = Counter(slides[i] for i in idx)
    assert per == {"a": 10, "b": 5, "c": 10}
    s.set_epoch(1)
    assert set(s) != set(idx)  # a fresh subset of the big slides each epoch
    with pytest.raises(ValueError):
        PerSlideCapSampler(slides, 0)


def test_class_balanced():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10 + [255] * 50)
    s = ClassBalancedSampler(labels, num_samples=30000, seed=0, ignore=255)
    counts = Counter(labels[list(s)].tolist())
    assert 255 not in counts
    for c in (0, 1, 2):
        assert counts[c] == pytest.approx(10000, rel=0.05)
    with pytest.raises(ValueError):
        ClassBalancedSampler([255, 255], ignore=255)


def test_hard_negatives_weighted_by_score():
    scores = np.linspace(0, 1, 100)
    s = HardNegativeSampler(scores, num_samples=20000, power=2.0, uniform_fraction=0.0, seed=0)
    idx = np.array(list(s))
    assert (idx >= 50).mean() > 0.8  # hard half is drawn far more often
    assert np.corrcoef(np.bincount(idx, minlength=100), scores ** 2)[0, 1] > 0.95
    mixed = np.array(list(HardNegativeSampler(scores, num_samples=20000, uniform_fraction=1.0, seed=0)))
    assert (mixed < 50).mean() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError):
        WeightedSampler([0, 0])


def test_fixed_ratio_exact_per_batch():
    sizes = [30, 7, 200]
    s = FixedRatioSampler(sizes, ratio=(2, 1, 7), batch_size=20, num_batches=25, seed=0)
    offsets = np.cumsum([0] + sizes[:-1])
    seen = []
    for batch in s:
        src = Counter(int(np.searchsorted(offsets, i, side="right") - 1) for i in batch)
        assert src == {0: 4, 1: 2, 2: 14}
        seen += batch
    # Each source is exhausted before it repeats: the small source is covered evenly.
    small = Counter(i for i in seen if offsets[1] <= i < offsets[2])
    assert max(small.values()) - min(small.values()) <= 1
    assert ratio_counts(10, (2, 1, 7)) == [2, 1, 7]
    assert sum(ratio_counts(13, (2, 1, 7))) == 13
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(sum(sizes))),
                                         batch_sampler=s)
    assert all(len(b[0]) == 20 for b in loader)


def test_torch_generator_helper():
    a = torch.randperm(10, generator=as_torch_generator(1, 2))
    assert torch.equal(a, torch.randperm(10, generator=as_torch_generator(1, 2)))
    assert not torch.equal(a, torch.randperm(10, generator=as_torch_generator(1, 3)))

"""Samplers: which patches an epoch visits.

All samplers are seeded and reproducible: the draw of epoch ``e`` depends only on ``seed`` and
``e`` (call ``set_epoch(e)`` before iterating, as with torch's DistributedSampler), so a resumed
run sees the same patches as an uninterrupted one.

* ``UniformSampler``: every patch equally likely (a shuffle, or a draw of ``num_samples``).
* ``PerSlideCapSampler``: at most ``max_per_slide`` patches of each slide per epoch.
* ``ClassBalancedSampler``: each class equally often, whatever its frequency.
* ``FixedRatioSampler``: batches with an exact number of patches from each label source, e.g.
  2:1:7 pixel labels : positive pseudo-labels : hard negatives (a ``batch_sampler``).
* ``HardNegativeSampler``: patches drawn with probability growing with a score (e.g. a false
  positive's predicted tumour probability), optionally mixed with uniform draws.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class _Seeded(Sampler[int]):
    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])


class UniformSampler(_Seeded):
    """A seeded shuffle of ``n`` indices, or ``num_samples`` uniform draws (with replacement)."""

    def __init__(self, n: int, num_samples: int | None = None, replacement: bool = False, seed: int = 0) -> None:
        super().__init__(seed)
        if n <= 0:
            raise ValueError("UniformSampler needs at least one sample")
        self.n = n
        self.replacement = replacement or (num_samples is not None and num_samples > n)
        self.num_samples = n if num_samples is None else int(num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        if self.replacement:
            idx = rng.integers(0, self.n, self.num_samples)
        else:
            idx = rng.permutation(self.n)[: self.num_samples]
        return iter(idx.tolist())


class PerSlideCapSampler(_Seeded):
    """At most ``max_per_slide`` patches of each slide per epoch (a fresh draw every epoch), shuffled.

    ``slide_ids`` gives the slide of every patch (any hashable values). Keeps large slides from
    dominating an epoch.
    """

    def __init__(self, slide_ids: Sequence, max_per_slide: int, seed: int = 0) -> None:
        super().__init__(seed)
        if max_per_slide < 1:
            raise ValueError("max_per_slide must be >= 1")
        _, inverse = np.unique(np.asarray(slide_ids, dtype=object).astype(str), return_inverse=True)
        self.groups = [np.flatnonzero(inverse == g) for g in range(inverse.max(initial=-1) + 1)]
        self.max_per_slide = int(max_per_slide)

    def __len__(self) -> int:
        return sum(min(len(g), self.max_per_slide) for g in self.groups)

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        picked = [rng.choice(g, size=min(len(g), self.max_per_slide), replace=False) for g in self.groups]
        idx = np.concatenate(picked) if picked else np.empty(0, int)
        return iter(rng.permutation(idx).tolist())


class WeightedSampler(_Seeded):
    """``num_samples`` draws with replacement, index ``i`` with probability ∝ ``weights[i]``."""

    def __init__(self, weights: Sequence[float] | np.ndarray, num_samples: int | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        self.p = w / w.sum()
        self.num_samples = len(w) if num_samples is None else int(num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self._rng().choice(len(self.p), size=self.num_samples, p=self.p).tolist())


class ClassBalancedSampler(WeightedSampler):
    """Each class drawn equally often: weight 1 / (size of the sample's class).

    Samples whose label equals ``ignore`` are never drawn.
    """

    def __init__(self, labels: Sequence[int], num_samples: int | None = None, seed: int = 0,
                 ignore: int | None = None) -> None:
        lab = np.asarray(labels)
        valid = np.ones(len(lab), bool) if ignore is None else lab != ignore
        if not valid.any():
            raise ValueError("no labelled samples to balance")
        classes, inverse, counts = np.unique(lab[valid], return_inverse=True, return_counts=True)
        w = np.zeros(len(lab))
        w[valid] = 1.0 / counts[inverse]
        self.classes = classes
        super().__init__(w, num_samples if num_samples is not None else int(valid.sum()), seed)


class HardNegativeSampler(WeightedSampler):
    """Draw hard examples more often: weight ``score ** power`` (+ ``floor``), mixed with uniform.

    ``scores`` are per-sample hardness values in [0, 1] (e.g. the model's tumour probability on a
    negative patch); ``uniform_fraction`` of the probability mass stays uniform, so easy samples
    are still seen.
    """

    def __init__(self, scores: Sequence[float], num_samples: int | None = None, power: float = 2.0,
                 uniform_fraction: float = 0.2, floor: float = 1e-6, seed: int = 0) -> None:
        s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
        if not 0.0 <= uniform_fraction <= 1.0:
            raise ValueError("uniform_fraction must be in [0, 1]")
        hard = s ** power + floor
        p = (1 - uniform_fraction) * hard / hard.sum() + uniform_fraction / len(s)
        super().__init__(p, num_samples, seed)


# ----------------------------------------------------------------------------------------------
# Fixed ratio between label sources (mixed supervision, e.g. pixel labels : positive
# pseudo-labels : hard negatives = 2:1:7). Written for issue 6 (trainers/mixed_em.py).
# ----------------------------------------------------------------------------------------------


def ratio_counts(batch_size: int, ratio: Sequence[float]) -> list[int]:
    """Split ``batch_size`` between sources in proportion to ``ratio`` (largest remainders),
    e.g. 10 with 2:1:7 -> [2, 1, 7], 20 -> [4, 2, 14]."""
    r = np.asarray(ratio, dtype=np.float64)
    if batch_size <= 0 or len(r) == 0 or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"need batch_size > 0 and non-negative ratios with a positive sum, got "
                         f"{batch_size} and {list(ratio)}")
    exact = batch_size * r / r.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: batch_size - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


class FixedRatioSampler(Sampler[list[int]]):
    """Batch sampler drawing every batch from several sources at a fixed ratio.

    The sources are laid end to end (as in ``torch.utils.data.ConcatDataset``): source ``i`` owns
    global indices ``offset_i .. offset_i + sizes[i] - 1``. Each batch takes ``ratio_counts(batch_size,
    ratio)`` items from the sources; within a source, items come from successive random
    permutations, so every item is seen before any repeats. A source with no items gives its
    share to the others in proportion to their ratios (e.g. a round without positive
    pseudo-labels). Deterministic for a given ``seed``; use as ``DataLoader(ds, batch_sampler=...)``.
    """

    def __init__(self, sizes: Sequence[int], ratio: Sequence[float], batch_size: int,
                 num_batches: int, seed: int = 0) -> None:
        if len(sizes) != len(ratio):
            raise ValueError(f"{len(sizes)} sources but {len(ratio)} ratios")
        self.sizes = [int(s) for s in sizes]
        if sum(self.sizes) == 0:
            raise ValueError("every source is empty; nothing to sample")
        self.ratio = [float(r) if s > 0 else 0.0 for r, s in zip(ratio, self.sizes)]
        if sum(self.ratio) == 0:
            raise ValueError("the sources with items all have ratio 0")
        self.batch_size, self.num_batches, self.seed = int(batch_size), int(num_batches), int(seed)
        self.counts = ratio_counts(self.batch_size, self.ratio)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int).tolist()
        self._epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Change the random stream (call once per epoch for different batches each epoch)."""
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self._epoch])
        pools: list[list[int]] = [[] for _ in self.sizes]
        for _ in range(self.num_batches):
            batch: list[int] = []
            for i, k in enumerate(self.counts):
                for _ in range(k):
                    if not pools[i]:
                        pools[i] = (rng.permutation(self.sizes[i]) + self.offsets[i]).tolist()
                    batch.append(pools[i].pop())
            yield batch

    def source_of(self, index: int) -> int:
        """Which source a global index belongs to."""
        return int(np.searchsorted(np.asarray(self.offsets), index, side="right") - 1)


def as_torch_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """A torch Generator for (seed, epoch), for torch's own samplers and DataLoader shuffling."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch]).integers(2**62)))

"""Samplers that decide which tiles (and which label sources) each training batch draws from."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

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

"""Multiple-instance learning networks over bags of patch features (one bag = one slide).

Every network takes a bag ``(N, D)`` of features and returns ``MILOutput``: slide ``logits``
``(C,)``, per-instance ``attention`` ``(N,)`` (summing to 1; None where the pooling has none),
per-instance class ``scores`` ``(N, C)`` where the network has an instance head, and an
auxiliary ``instance_loss`` (CLAM) when ``label`` is given.

- ``meanpool`` / ``maxpool``: a linear-ReLU embedding, mean (max) over instances, a linear head;
- ``topk_mean``: an instance classifier; the slide logits are the mean of the top-k instance
  logits per class (the feature-space form of slidekit's ``topk-mean`` CNN trainer);
- ``abmil``: gated attention (Ilse, Tomczak & Welling 2018);
- ``clam``: CLAM-SB (Lu et al. 2021): gated attention + an instance classifier trained on the
  top-k / bottom-k attended instances (the smooth-SVM loss of the paper replaced by cross-entropy);
- ``transmil``: TransMIL (Shao et al. 2021): class token + two transformer layers with a PPEG
  positional convolution on the square-padded sequence. Plain multi-head attention replaces the
  paper's Nyström approximation (exact, quadratic in N: fine for bags of thousands of tiles).

Networks with ``streamable = True`` (all but TransMIL) also score a bag chunk by chunk
(``forward_chunks``) with an online softmax, so a bag larger than memory is never held whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from slidekit.base.errors import CheckpointError
from slidekit.base.io import atomic_path
from slidekit.base.version import __version__
from slidekit.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint

MIL_ARCHS = ("meanpool", "maxpool", "topk_mean", "abmil", "clam", "transmil")
ABMIL_POOLINGS = ("attention", "attention+mean")  # what abmil's / clam's head sees (ABMIL)
ATTENTION_ARCHS = ("abmil", "clam", "transmil")  # the networks with per-tile attention


@dataclass
class MILOutput:
    logits: torch.Tensor  # (C,)
    attention: torch.Tensor | None = None  # (N,), sums to 1
    scores: torch.Tensor | None = None  # (N, C) per-instance class logits
    instance_loss: torch.Tensor | None = None


class _Embed(nn.Module):
    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PoolMIL(nn.Module):
    """Mean or max pooling of embedded instances; the head also scores each instance."""

    streamable = True

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.1,
                 mode: str = "mean") -> None:
        super().__init__()
        self.mode = mode
        self.embed = _Embed(in_dim, hidden, dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        h = self.embed(x)
        pooled = h.mean(0) if self.mode == "mean" else h.max(0).values
        return MILOutput(self.head(pooled), None, self.head(h))

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> MILOutput:
        total, n, scores = None, 0, []
        for x in chunks:
            h = self.embed(x)
            s = h.sum(0) if self.mode == "mean" else h.max(0).values
            total = s if total is None else (total + s if self.mode == "mean" else torch.maximum(total, s))
            n += len(x)
            scores.append(self.head(h))
        if total is None:
            raise ValueError("empty bag")
        pooled = total / n if self.mode == "mean" else total
        return MILOutput(self.head(pooled), None, torch.cat(scores))


class TopKMeanMIL(nn.Module):
    """Slide logit of each class = mean of its k highest instance logits."""

    streamable = True

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.1, k: int = 8) -> None:
        super().__init__()
        self.k = k
        self.embed = _Embed(in_dim, hidden, dropout)
        self.head = nn.Linear(hidden, n_classes)

    def _pool(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(min(self.k, len(scores)), dim=0).values.mean(0)

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        scores = self.head(self.embed(x))
        return MILOutput(self._pool(scores), None, scores)

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> MILOutput:
        scores = [self.head(self.embed(x)) for x in chunks]  # (N, C) logits: small beside the features
        if not scores:
            raise ValueError("empty bag")
        s = torch.cat(scores)
        return MILOutput(self._pool(s), None, s)


class GatedAttention(nn.Module):
    """a_i = w^T (tanh(V h_i) * sigmoid(U h_i)): one unnormalised attention logit per instance."""

    def __init__(self, hidden: int, attn: int, dropout: float) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(hidden, attn), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(hidden, attn), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.v(h) * self.u(h)).squeeze(-1)


class ABMIL(nn.Module):
    """Gated-attention MIL; ``instance_k > 0`` adds CLAM-SB's instance clustering loss.

    ``pooling``: ``"attention"`` (the paper's: the head sees the attention-weighted mean of the
    embedded tiles) or ``"attention+mean"`` (the head sees it beside the plain mean of the embedded
    tiles). A softmax attention sums to 1 whatever the bag holds, so its pooled vector says *what*
    the attended tiles are, not *how many* there are; the mean keeps the share of each kind of tile
    (a lesion burden). A tile scored alone is a bag of one (both halves are its embedding)."""

    streamable = True

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.1,
                 instance_k: int = 0, pooling: str = "attention") -> None:
        super().__init__()
        if pooling not in ABMIL_POOLINGS:
            raise ValueError(f"unknown ABMIL pooling {pooling!r}; known: {', '.join(ABMIL_POOLINGS)}")
        self.pooling = pooling
        self.embed = _Embed(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, max(hidden // 2, 8), dropout)
        self.head = nn.Linear(hidden * (2 if pooling == "attention+mean" else 1), n_classes)
        self.instance_k = instance_k
        # CLAM-SB: one binary in/out-of-class instance classifier per class
        self.instance_heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes)) if instance_k else None

    def _pooled(self, attended: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return torch.cat([attended, mean], -1) if self.pooling == "attention+mean" else attended

    def _scores(self, h: torch.Tensor) -> torch.Tensor:
        if self.instance_heads is not None:  # the in-class logit of each class's instance head
            return torch.stack([head(h)[:, 1] - head(h)[:, 0] for head in self.instance_heads], dim=1)
        return self.head(self._pooled(h, h))

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        h = self.embed(x)
        a = torch.softmax(self.attention(h), dim=0)
        logits = self.head(self._pooled(a @ h, h.mean(0)))
        loss = self._instance_loss(h, a, label) if (self.instance_heads is not None and label is not None) else None
        return MILOutput(logits, a, self._scores(h), loss)

    def _instance_loss(self, h: torch.Tensor, a: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM-SB: for the true class, the top-k attended instances are in-class, the bottom-k
        out-of-class; for every other class the top-k are out-of-class (mutually exclusive classes)."""
        k = min(self.instance_k, len(h) // 2 or 1)
        order = torch.argsort(a, descending=True)
        top, bottom = order[:k], order[-k:]
        losses = []
        assert self.instance_heads is not None  # forward asks for this loss only with instance heads
        for c, head in enumerate(self.instance_heads):
            if c == label:
                idx = torch.cat([top, bottom])
                target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
            else:
                idx, target = top, torch.zeros(k, dtype=torch.long)
            losses.append(F.cross_entropy(head(h[idx]), target.to(h.device)))
        return torch.stack(losses).mean()

    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> MILOutput:
        """The same slide logits with an online softmax over chunks (bag never held whole)."""
        m, z, acc, logits_a, scores = -math.inf, None, None, [], []
        total, n = None, 0
        for x in chunks:
            h = self.embed(x)
            total, n = (h.sum(0) if total is None else total + h.sum(0)), n + len(h)
            s = self.attention(h)
            m_new = max(m, float(s.max()))
            w = torch.exp(s - m_new)
            scale = math.exp(m - m_new) if m > -math.inf else 0.0
            z = w.sum() if z is None else z * scale + w.sum()
            acc = w @ h if acc is None else acc * scale + w @ h
            m = m_new
            logits_a.append(s)
            scores.append(self._scores(h))
        if acc is None or z is None or total is None:  # all are set by the first chunk
            raise ValueError("empty bag")
        s_all = torch.cat(logits_a)
        return MILOutput(self.head(self._pooled(acc / z, total / n)), torch.exp(s_all - m) / z, torch.cat(scores))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depth-wise 7/5/3 convolutions on the token square."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        cls, x = tokens[:1], tokens[1:]
        grid = x.T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.reshape(x.shape[1], -1).T])


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(x)[None]
        out, w = self.attn(y, y, y, need_weights=True, average_attn_weights=True)
        return x + out[0], w[0]


class TransMIL(nn.Module):
    """TransMIL with exact multi-head attention; attention = the class token's row of the last layer."""

    streamable = False

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.1, heads: int = 4) -> None:
        super().__init__()
        self.embed = _Embed(in_dim, hidden, dropout)
        self.cls = nn.Parameter(torch.zeros(1, hidden))
        nn.init.normal_(self.cls, std=0.02)
        self.layer1, self.layer2 = _Layer(hidden, heads, dropout), _Layer(hidden, heads, dropout)
        self.ppeg = PPEG(hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        h = self.embed(x)
        n = len(h)
        side = math.ceil(math.sqrt(n))
        pad = side * side - n  # square-pad by repeating the first instances, as the paper does
        hp = torch.cat([h, h[:pad]]) if pad else h
        t = torch.cat([self.cls, hp])
        t, _ = self.layer1(t)
        t = self.ppeg(t, side)
        t, w = self.layer2(t)
        out = self.norm(t)
        attention = w[0, 1:n + 1]
        attention = attention / attention.sum().clamp_min(1e-12)
        return MILOutput(self.head(out[0]), attention, self.head(out[1:n + 1]))


class MILEnsemble(nn.Module):
    """Networks of one architecture trained apart (different initialisations) whose outputs are
    averaged: slide logits, attention (still summing to 1), tile scores and instance losses. Each
    member sees the whole bag, so an ensemble scores a bag whole (``streamable`` False)."""

    streamable = False

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if not len(self.members):
            raise ValueError("an ensemble needs at least one member")

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        outs = [m(x, label=label) for m in self.members]

        def mean(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            kept = [v for v in values if v is not None]
            return torch.stack(kept).mean(0) if len(kept) == len(values) else None

        logits = mean([o.logits for o in outs])
        assert logits is not None  # every member has logits
        return MILOutput(logits, mean([o.attention for o in outs]), mean([o.scores for o in outs]),
                         mean([o.instance_loss for o in outs]))


def build_mil(arch: str, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.1,
              instance_k: int = 8, pooling: str = "attention", members: int = 1) -> nn.Module:
    """A freshly initialised MIL network by name (``MIL_ARCHS``); ``pooling`` (``ABMIL_POOLINGS``)
    is abmil's and clam's (ValueError for another network unless ``"attention"``); ``members`` > 1:
    a ``MILEnsemble`` of that many networks, each initialised in turn from the torch generator."""
    if members > 1:
        return MILEnsemble(build_mil(arch, in_dim, n_classes, hidden, dropout, instance_k, pooling)
                           for _ in range(members))
    if pooling != "attention" and arch not in ("abmil", "clam"):
        raise ValueError(f"pooling {pooling!r} is abmil's and clam's, not {arch!r}'s")
    if arch == "meanpool":
        return PoolMIL(in_dim, n_classes, hidden, dropout, "mean")
    if arch == "maxpool":
        return PoolMIL(in_dim, n_classes, hidden, dropout, "max")
    if arch == "topk_mean":
        return TopKMeanMIL(in_dim, n_classes, hidden, dropout, k=instance_k)
    if arch == "abmil":
        return ABMIL(in_dim, n_classes, hidden, dropout, pooling=pooling)
    if arch == "clam":
        return ABMIL(in_dim, n_classes, hidden, dropout, instance_k=instance_k, pooling=pooling)
    if arch == "transmil":
        return TransMIL(in_dim, n_classes, hidden, dropout)
    raise ValueError(f"unknown MIL architecture {arch!r}; known: {', '.join(MIL_ARCHS)}")


def shift_head_bias(model: nn.Module, offset) -> None:
    """Subtract ``offset`` (one number per output) from the slide head's bias: every slide's logits
    and every tile's scores move by ``-offset`` (all networks here end in one linear ``head``)."""
    if isinstance(model, MILEnsemble):  # the mean of the members' outputs moves by the same offset
        for member in model.members:
            shift_head_bias(member, offset)
        return
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError(f"{type(model).__name__} has no linear head with a bias to shift")
    with torch.no_grad():
        head.bias.sub_(torch.as_tensor(offset, dtype=head.bias.dtype, device=head.bias.device).reshape(-1))


class _Streamable(Protocol):
    def forward_chunks(self, chunks: Iterable[torch.Tensor]) -> MILOutput: ...


def score_bag(model: nn.Module, chunks: Iterator[torch.Tensor] | torch.Tensor) -> MILOutput:
    """Evaluate one bag (a tensor, or an iterator of chunks: streamed where the network allows)."""
    with torch.no_grad():
        if isinstance(chunks, torch.Tensor):
            return model(chunks)
        if getattr(model, "streamable", False):  # the flag promises forward_chunks
            return cast(_Streamable, model).forward_chunks(chunks)
        return model(torch.cat(list(chunks)))  # TransMIL needs the whole sequence at once


def save_mil_checkpoint(path, model: nn.Module, mil: dict, extra: dict | None = None):
    """Write a MIL network in slidekit's checkpoint format: ``mil`` describes it (arch, in_dim,
    the task's fields (``task``, ``out_dim``: the head size; classification: ``classes``), hidden,
    dropout, instance_k, encoder of the features, trainer config). A description without ``task``
    is a classifier of ``len(classes)`` outputs."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "mil",
               "mil": {**mil, "slidekit_version": __version__},
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "extra": extra or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_mil_checkpoint(path) -> tuple[nn.Module, dict]:
    """The MIL network of a checkpoint (eval mode) and its description; CheckpointError otherwise."""
    payload = read_checkpoint(path)
    mil = payload.get("mil")
    if payload.get("kind") != "mil" or not isinstance(mil, dict):
        raise CheckpointError("not a MIL checkpoint (train one with `slidekit train mil`)", path)
    try:
        out_dim = int(mil["out_dim"]) if mil.get("out_dim") is not None else len(mil["classes"])
        model = build_mil(mil["arch"], int(mil["in_dim"]), out_dim, int(mil.get("hidden", 128)),
                          float(mil.get("dropout", 0.1)), int(mil.get("instance_k", 8)),
                          str(mil.get("pooling", "attention")), int(mil.get("members", 1)))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"MIL weights do not match their description ({' '.join(str(e).split())[:200]})",
                              path) from None
    return model.eval(), mil

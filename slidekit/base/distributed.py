"""Training past one process with ``torch.distributed`` (torchrun, Slurm's srun, ``--nproc``).

slidekit never manages processes itself: ranks are started by torch's elastic launcher
(``torchrun`` / ``python -m torch.distributed.run``, which ``slidekit train --nproc N`` calls) or by
``srun``. Each rank reads its place from the environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
or Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) and joins the process group with
``init_from_env``: NCCL on CUDA, gloo on CPU, and a timeout on every collective
(``SLIDEKIT_DIST_TIMEOUT_S``, default 300 s) so that a dead rank ends the job instead of hanging it.

What is global and what is per rank:

* a trainer's ``batch_size`` is the **global** batch; each rank takes ``batch_size / world``
  (``local_batch_size``), so the same config trains the same thing on 1 or N ranks and a run can
  resume with another number of ranks; learning-rate scaling (LARS) uses the global batch;
* samplers draw the **same seeded epoch** on every rank; ``shard`` gives rank ``r`` every
  ``world``-th index from ``r`` (``shard_batches``: every ``world``-th item of each global batch),
  so N ranks with batch B see exactly the batches one process with batch N·B would;
* only rank 0 writes files and shows progress (``is_main``).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import sys
from collections.abc import Sized
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from slidekit.base.errors import ConfigError, SlidekitError, TrainingError, TrainingWarning

TIMEOUT_ENV = "SLIDEKIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
T = TypeVar("T")


# -- where this process stands -------------------------------------------------------------------

def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's or Slurm's environment (``(0, 1, 0)``
    when neither is set). torchrun's variables win over Slurm's (torchrun inside an allocation)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def is_distributed() -> bool:
    """True once this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


_this_rank = rank  # samplers take a ``rank`` argument that shadows the function


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def timeout_s() -> float:
    """The collective timeout in seconds (``SLIDEKIT_DIST_TIMEOUT_S``, default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be > 0")
    return value


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group described by the environment (no-op for a single process).

    Returns the device this rank trains on: ``cuda:LOCAL_RANK`` when ``device`` is an unindexed
    CUDA device, ``device`` otherwise. Idempotent.
    """
    device = torch.device(device)
    r, world, local = env_ranks()
    if world <= 1:
        return device
    if device.type == "cuda" and device.index is None:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible here")
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", "29500")  # srun sets the address in the batch script
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device  # lets NCCL set up eagerly and fail early
        dist.init_process_group(backend_for(device), init_method="env://", rank=r, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s()), **kwargs)
    elif dist.get_backend() != backend_for(device):
        raise ConfigError(f"the process group uses {dist.get_backend()}, but training on {device} needs "
                          f"{backend_for(device)}")
    return device


def local_batch_size(global_batch: int, what: str = "batch_size") -> int:
    """The per-rank share of a global batch; ConfigError unless it divides evenly."""
    world = world_size()
    if global_batch % world:
        raise ConfigError(f"option {what!r} ({global_batch}) is the global batch and must be a multiple of "
                          f"the {world} ranks")
    return global_batch // world


# -- collectives ---------------------------------------------------------------------------------

def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; an exception raised there
    (e.g. a refused rerun) is raised on every rank, so no rank goes on alone."""
    if not is_distributed():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            try:
                pickle.dumps(e)
                outcome = ("error", e)
            except Exception:  # noqa: BLE001 -- an unpicklable exception travels as its message
                outcome = ("error", TrainingError(f"rank 0: {type(e).__name__}: {e}"))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def _device_of_group() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average float metrics over ranks (rank 0's keys; a key missing on a rank counts as NaN)."""
    if not is_distributed():
        return values
    keys = broadcast_object(sorted(k for k, v in values.items() if isinstance(v, float)))
    t = torch.tensor([float(values.get(k, float("nan"))) for k in keys], dtype=torch.float64,
                     device=_device_of_group())
    dist.all_reduce(t)
    return {**values, **{k: float(v) / world_size() for k, v in zip(keys, t.tolist())}}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, no gradient)."""
    if not is_distributed():
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def broadcast_tensor_(t: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s values, in place (CPU tensors travel
    through the GPU under NCCL)."""
    if not is_distributed():
        return t
    dev = _device_of_group()
    buf = t if t.device == dev and t.is_contiguous() else t.to(dev).contiguous()
    dist.broadcast(buf, src=src)
    if buf is not t:
        t.copy_(buf)
    return t


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank. DDP sends them at the start of
    each forward, so after the last training step each rank still holds its own; call this before
    ranks predict with the model (eval-mode batch norm uses them)."""
    if is_distributed():
        for buf in unwrap(model).buffers():
            broadcast_tensor_(buf, src=0)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (e.g. a time budget spent: every rank stops together)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device_of_group())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the summed gradient of its own slice.

    Works on every backend (gloo has no reduce-scatter): the backward all-reduces the whole
    gradient and keeps the rank's rows. With DDP averaging the parameter gradients over ranks,
    the result is the gradient of the mean of the ranks' losses.
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.n = t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` from every rank, concatenated in rank order, keeping the autograd graph
    (every rank must pass the same shape). Returns ``t`` itself for one process."""
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)


# -- samplers ------------------------------------------------------------------------------------

class ShardedSampler(Sampler[int]):
    """Rank ``r``'s share of a seeded sampler's epoch: indices ``r, r + world, r + 2·world, ...``.

    Every rank draws the same epoch (same seed, same ``set_epoch``), so the shares are disjoint
    positions of one list, equally long: the last ``len % world`` draws of an epoch are left out
    (as ``DistributedSampler(drop_last=True)`` does; ``dropped`` says how many).
    """

    def __init__(self, sampler: Sampler[int], rank: int | None = None, world: int | None = None) -> None:
        self.sampler = sampler
        self.rank = _this_rank() if rank is None else int(rank)
        self.world = world_size() if world is None else int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside 0..{self.world - 1}")

    @property
    def dropped(self) -> int:
        """Draws of each epoch that no rank sees (fewer than ``world``)."""
        return _length(self.sampler) % self.world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return _length(self.sampler) // self.world

    def __iter__(self) -> Iterator[int]:
        idx = list(self.sampler)
        return iter(idx[self.rank: len(idx) - len(idx) % self.world: self.world])


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``r``'s part of every global batch of a batch sampler (e.g. ``FixedRatioSampler`` built
    with the global batch): items ``r, r + world, ...`` of each batch, so the ranks' batches
    together are exactly the global batch."""

    def __init__(self, batch_sampler: Sampler[list[int]], rank: int | None = None,
                 world: int | None = None) -> None:
        self.batch_sampler = batch_sampler
        self.rank = _this_rank() if rank is None else int(rank)
        self.world = world_size() if world is None else int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside 0..{self.world - 1}")

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return _length(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            if len(batch) % self.world:
                raise ConfigError(f"a global batch of {len(batch)} does not split over {self.world} ranks")
            yield list(batch)[self.rank::self.world]


def _length(sampler: Sampler) -> int:
    """``len(sampler)``: torch's ``Sampler`` does not declare ``__len__``; the samplers sharded here have it."""
    if not isinstance(sampler, Sized):
        raise TypeError(f"{type(sampler).__name__} has no len(): a sharded sampler needs a fixed length")
    return len(sampler)


def shard(sampler: Sampler, batches: bool = False) -> Sampler:
    """This rank's share of ``sampler`` (``batches=True``: of a batch sampler); the sampler itself
    for one process."""
    if world_size() == 1:
        return sampler
    if batches:
        return ShardedBatchSampler(sampler)
    sharded = ShardedSampler(sampler)
    if sharded.dropped and is_main():
        import warnings


        warnings.warn(TrainingWarning(f"an epoch of {_length(sampler)} draws does not split evenly over {world_size()} "
                                      f"ranks: the last {sharded.dropped} draw(s) of each epoch are left out"),
                      stacklevel=2)
    return sharded


# -- models --------------------------------------------------------------------------------------

class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics are those of the global batch, on any backend.

    torch's ``SyncBatchNorm`` runs on GPUs only; this one (used on CPU/gloo) all-reduces the
    per-channel sum, sum of squares and count with autograd, so the forward and backward equal
    one ``BatchNorm`` over the ranks' batches together. Same parameters and buffers as BatchNorm,
    so checkpoints do not change.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.tensor([float(x.numel() // c)], dtype=x.dtype, device=x.device)
        stats = _AllReduceWithGrad.apply(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        # two passes (mean, then squared deviations): E[x²] − E[x]² cancels badly in float32
        var = _AllReduceWithGrad.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if (self.track_running_stats and self.running_mean is not None and self.running_var is not None
                and self.num_batches_tracked is not None):
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` normalised over the global batch: torch's SyncBatchNorm on
    CUDA, ``GroupBatchNorm`` elsewhere. Parameters and buffers are kept."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GroupBatchNorm):
            like = next(iter([*child.parameters(), *child.buffers()]), None)  # keeps device and dtype
            new = GroupBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            if like is not None:
                new = new.to(like.device, like.dtype if like.is_floating_point() else None)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight, new.bias = child.weight, child.bias  # the same Parameters (optimiser-safe)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel (with global batch norm when asked); the model itself
    for one process. Wrap before building the optimiser only if the BatchNorms are converted."""
    if not is_distributed():
        return model
    if sync_batchnorm:
        convert_sync_batchnorm(model, device)
    ids = [device.index] if torch.device(device).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its state_dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- launching -----------------------------------------------------------------------------------

def _failure_line(error: Any) -> str:
    parts = []
    for local_rank, failure in sorted(getattr(error, "failures", {}).items()):
        code = failure.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                pass
        parts.append(f"rank {local_rank} ({how})")  # local rank: --nproc runs one node
    return ", ".join(parts) or str(error).splitlines()[0]


LAUNCHED_ENV = "SLIDEKIT_LAUNCHED_RANK"


@contextlib.contextmanager
def peer_lost() -> Iterator[None]:
    """In a rank ``launch`` started: a torch.distributed error (a peer rank died, the store went
    away) ends this rank with exit 1 and no traceback; ``launch`` reports the rank that failed first."""
    if os.environ.get(LAUNCHED_ENV) != "1":
        yield
        return
    try:
        yield
    except torch.distributed.DistError:
        sys.stderr.flush()
        os._exit(1)


def launch(nproc: int, module_args: Sequence[str]) -> None:
    """Run ``python -m slidekit <module_args>`` as ``nproc`` local ranks through torch's elastic
    launcher (what ``torchrun --standalone --nproc-per-node N -m slidekit ...`` does).

    A rank that fails makes the launcher stop the others; that is raised as one TrainingError
    naming the failed rank(s) and how they ended.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module",
                       "slidekit", *module_args])
    # The launcher logs each stopped rank and the failure summary (dozens of lines); the one-line
    # TrainingError below says it all. The ranks learn they were launched here (see peer_lost).
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_ENV] = "1"
    try:
        run(args)
    except ChildFailedError as e:
        raise TrainingError(f"distributed training failed: {_failure_line(e)}; the other ranks were stopped; "
                            "rerun the same command to resume from the last finished epoch") from None
    except SlidekitError:
        raise
    finally:
        elastic_log.setLevel(level)
        os.environ.pop(LAUNCHED_ENV, None)

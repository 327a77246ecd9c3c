"""The MIL tasks ``survival`` (``survival-efron``, ``survival-discrete``) and ``regression`` (with
``regression-l1`` and ``regression-mse``); docs/outcomes.md.

``survival``: the slide table's ``time`` and ``event`` columns (event read by ``parse_status``);
one head output, the *risk* (log relative hazard: higher = shorter survival); loss: the negative
Cox partial log-likelihood over the batch of bags, Breslow's handling of tied times (every patient
whose time is >= an event's time is in its risk set), averaged over the batch's events. A batch
without an event has no partial likelihood: its loss is 0 with zero gradient, and it is counted
(``eventless_batches``). When the training fold is larger than ``bags_per_step`` the events are dealt
out over the batches so that every batch holds at least one (batches then grow to fit); with
``bags_per_step`` >= the fold (e.g. 100000) every step sees the full risk set. Folds are stratified
by event and by time above/below the median. Metrics: Harrell's C (``c_index``), Uno's C, the
cumulative/dynamic AUC at the cohort's event-time quartiles and the integrated Brier score
(``slidekit.slidelevel.outcomes``). ``survival-efron``: the same with Efron's approximation for
tied event times (equal to Breslow's where no two events share a time). Each fold's checkpoint
records the Breslow baseline hazard of its training risks (``fold_state``), so ``mil-deploy``
writes ``risk`` and the survival probability at each horizon.

``regression``: the ``target`` column; targets standardised with the training fold's mean and sd
(recorded in the fold's checkpoint) and restored for every output; Huber loss (delta 1 sd);
``regression-l1`` / ``regression-mse``: L1 / squared error. Folds stratified by target quartile.
Metrics: R², MAE, RMSE, Pearson and Spearman r.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slidekit.base.errors import CheckpointError, ConfigError, LabelError
from slidekit.slidelevel.mil_tasks import MILTask, register_mil_task
from slidekit.slidelevel.outcomes import (
    breslow_baseline,
    default_horizons,
    linear_baseline,
    parse_status,
    parse_time,
    regression_metrics,
    survival_function,
    survival_metrics,
)


@register_mil_task
class Survival(MILTask):
    """Cox proportional-hazards MIL (Breslow ties); output ``risk``."""

    name = "survival"
    target_columns = ("time", "event")
    headline_metric = "c_index"
    needs_train_predictions = True
    ties = "breslow"

    def __init__(self, horizons: list[float] | None = None, baseline: dict | None = None) -> None:
        self.horizons = list(horizons or [])
        self.baseline = baseline  # {"time": [...], "cumulative_hazard": [...]} of a trained fold
        self.eventless_batches = 0
        self.source: Any = None

    def setup(self, rows, config):
        try:
            import sksurv  # noqa: F401
        except ImportError:
            raise ConfigError("task 'survival' needs scikit-survival (pip install 'slidekit[survival]')") from None
        self.source = getattr(config, "slides", None) or None
        if int(getattr(config, "bags_per_step", 2)) < 2:
            raise ConfigError("task 'survival' needs bags_per_step >= 2: a Cox loss compares patients within a batch "
                              "(e.g. --set bags_per_step=100000 for the whole training fold in each step)")
        t = np.array([parse_time(r["time"], self.source, i, "time") for i, r in enumerate(rows, start=2)])
        e = np.array([parse_status(r["event"], self.source, i, "event") for i, r in enumerate(rows, start=2)])
        if e.sum() == 0:
            raise LabelError("every patient is censored (no event): survival cannot be learned", self.source)
        self.horizons = default_horizons(t, e)
        return np.stack([t, e.astype(np.float64)], 1)

    @property
    def out_dim(self):
        return 1

    def targets_tensor(self, targets, device):
        return torch.as_tensor(np.asarray(targets, np.float32), device=device)

    def stratify(self, targets):
        t, e = targets[:, 0], targets[:, 1].astype(np.int64)
        return e * 2 + (t > np.median(t)).astype(np.int64)

    def batches(self, order, step, targets):
        if len(order) <= step:
            return [order]
        events = [i for i in order if targets[i, 1] > 0]
        censored = [i for i in order if targets[i, 1] <= 0]
        n = max(1, min(math.ceil(len(order) / step), len(events)))
        out: list[list[int]] = [[] for _ in range(n)]
        for j, i in enumerate(events + censored):  # events first, dealt round-robin: each batch gets one
            out[j % n].append(i)
        return [np.asarray(b) for b in out]

    def make_loss(self, train_targets, device, config):
        def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            risk, time, event = outputs[:, 0], targets[:, 0], targets[:, 1] > 0.5
            if not bool(event.any()):
                if torch.is_grad_enabled():
                    self.eventless_batches += 1
                return outputs.sum() * 0.0
            if self.ties == "efron":
                return _efron(risk, time, event)
            at_risk = time[None, :] >= time[event][:, None]  # Breslow: ties all in the risk set
            log_den = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
            return (log_den - risk[event]).mean()
        return loss

    has_linear_baseline = True

    def linear_baseline(self, mean_features, targets, fold, predictions, seed):
        return linear_baseline(mean_features, targets, fold=fold, mil_predictions=np.asarray(predictions)[:, 0],
                               seed=seed)

    def check_fold(self, targets, idx, role):
        idx = np.asarray(idx)
        if len(idx) and not (np.asarray(targets)[idx, 1] > 0).any():
            rows = ", ".join(str(int(i) + 2) for i in sorted(idx)[:8]) + (" ..." if len(idx) > 8 else "")
            raise LabelError(f"rows {rows}: a {role} fold holds only censored patients ({len(idx)}, no event): too "
                             "few events for this many folds (use fewer folds)", self.source)

    def evaluation_loss(self, loss, outputs, targets):
        if not bool((targets[:, 1] > 0.5).any()):
            raise LabelError(f"a validation or test fold holds only censored patients ({len(targets)}): too few "
                             "events for this many folds (use fewer folds)", self.source)
        return float(loss(outputs, targets))

    @property
    def output_columns(self):
        return ["risk"]

    def predict(self, outputs):
        return outputs[:, :1].detach().float().cpu().numpy()

    @property
    def deploy_columns(self):
        return ["risk", *[f"survival@{h:g}" for h in self.horizons]] if self.baseline else ["risk"]

    def deploy_row(self, prediction):
        row = {"risk": round(float(prediction[0]), 6)}
        if self.baseline:
            s = survival_function((self.baseline["time"], self.baseline["cumulative_hazard"]), [prediction[0]],
                                  self.horizons)[0]
            row.update({f"survival@{h:g}": round(float(v), 6) for h, v in zip(self.horizons, s)})
        return row

    def metrics(self, targets, predictions):
        t, e = np.asarray(targets)[:, 0], np.asarray(targets)[:, 1].astype(np.int64)
        return survival_metrics(t, e, np.asarray(predictions)[:, 0], self.horizons)

    def resample_ok(self, targets):
        return int(np.asarray(targets)[:, 1].sum()) >= 2

    def summary(self, overall, ci):
        lo, hi = ci.get("c_index", [float("nan")] * 2)
        text = (f"C-index {overall['c_index']:.3f} (95% CI {lo:.3f}-{hi:.3f}), Uno's C {overall['uno_c']:.3f}, "
                f"integrated Brier score {overall['ibs']:.3f}")
        if self.eventless_batches:
            text += f"; {self.eventless_batches} training batch(es) without an event (zero loss)"
        return text

    def output_offset(self, train_predictions):
        # the partial likelihood is unchanged by adding a constant to every risk: the head's bias is
        # never learned, so each fold's risks sit at an arbitrary level; centred on the fold's own
        # training patients (risk 0 = the training fold's mean), as lifelines centres its Cox models
        return np.asarray(train_predictions, np.float64)[:, :1].mean(0)

    def fold_state(self, train_targets, train_predictions):
        ts, H = breslow_baseline(train_targets[:, 0], train_targets[:, 1], np.asarray(train_predictions)[:, 0])
        return {"ties": self.ties, "baseline_hazard": {"time": [float(x) for x in ts],
                                                       "cumulative_hazard": [float(x) for x in H]}}

    def checkpoint_fields(self):
        return {"horizons": list(self.horizons), "ties": self.ties}

    @classmethod
    def from_checkpoint(cls, mil):
        state = mil.get("fold_state") or {}
        return cls(mil.get("horizons") or [], state.get("baseline_hazard"))


@register_mil_task
class SurvivalEfron(Survival):
    """Cox proportional-hazards MIL with Efron's handling of tied event times."""

    name = "survival-efron"
    ties = "efron"


@register_mil_task
class SurvivalDiscrete(Survival):
    """Discrete-time survival MIL: ``bins`` intervals cut at the training fold's event-time quantiles,
    one hazard logit per interval; negative log-likelihood (an event in interval j: survived the
    intervals before j and failed in j; censored in interval j: survived up to and including j).
    Outputs ``risk`` = -(sum of the survival probabilities at the intervals' ends) and each
    ``survival_bin<k>``; the cut points are recorded per fold (``fold_state``)."""

    name = "survival-discrete"
    needs_train_predictions = False
    ties = "discrete"
    bins = 4

    def __init__(self, horizons: list[float] | None = None, edges: list[float] | None = None) -> None:
        super().__init__(horizons)
        self.edges = list(edges or [])

    @property
    def out_dim(self):
        return self.bins

    def _bin(self, time: torch.Tensor) -> torch.Tensor:
        edges = torch.as_tensor(self.edges, dtype=time.dtype, device=time.device)
        return torch.bucketize(time, edges, right=True)

    def make_loss(self, train_targets, device, config):
        t = np.asarray(train_targets)[:, 0][np.asarray(train_targets)[:, 1] > 0]
        self.edges = [float(x) for x in np.quantile(t, np.arange(1, self.bins) / self.bins)] if len(t) else \
            [float("inf")] * (self.bins - 1)

        def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            j = self._bin(targets[:, 0])[:, None]
            event = targets[:, 1] > 0.5
            log_surv = torch.cumsum(F.logsigmoid(-outputs), 1)  # log S at each interval's end
            ll_cens = log_surv.gather(1, j)[:, 0]
            ll_event = (log_surv.gather(1, j) - F.logsigmoid(-outputs).gather(1, j) +
                        F.logsigmoid(outputs).gather(1, j))[:, 0]
            return -torch.where(event, ll_event, ll_cens).mean()
        return loss

    @property
    def output_columns(self):
        return ["risk", *[f"survival_bin{k + 1}" for k in range(self.bins)]]

    def predict(self, outputs):
        surv = torch.exp(torch.cumsum(F.logsigmoid(-outputs.detach().float()), 1))
        return torch.cat([-surv.sum(1, keepdim=True), surv], 1).cpu().numpy()

    @property
    def deploy_columns(self):
        return list(self.output_columns)

    def deploy_row(self, prediction):
        return MILTask.deploy_row(self, prediction)

    def tile_outputs(self, scores):
        return ["risk"], self.predict(scores)[:, :1]

    def output_offset(self, train_predictions):
        return None  # the discrete-time likelihood fixes the hazards' level

    def fold_state(self, train_targets, train_predictions):
        return {"bin_edges": list(self.edges)}

    @classmethod
    def from_checkpoint(cls, mil):
        state = mil.get("fold_state") or {}
        if "bin_edges" not in state:
            raise CheckpointError("a survival-discrete MIL checkpoint without its bin_edges (fold_state)")
        return cls(mil.get("horizons") or [], state["bin_edges"])


def _efron(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Efron's ties, averaged over the events: at an event
    time with d events D and risk set R, log sum_R e^r is replaced by the mean over l = 0..d-1 of
    log(sum_R e^r - l/d sum_D e^r)."""
    m = risk.detach().max()
    e = torch.exp(risk - m)
    uniq = torch.unique(time[event])
    at_risk = (time[None, :] >= uniq[:, None]).to(e.dtype)  # (U, B)
    tied = ((time[None, :] == uniq[:, None]) & event[None, :]).to(e.dtype)
    d = tied.sum(1)
    r_sum, d_sum = at_risk @ e, tied @ e
    steps = torch.arange(int(d.max()), device=risk.device, dtype=e.dtype)
    keep = steps[None, :] < d[:, None]
    inner = r_sum[:, None] - steps[None, :] / d[:, None] * d_sum[:, None]
    log_den = torch.where(keep, torch.log(inner.clamp_min(1e-30)), torch.zeros_like(inner)).sum() + m * d.sum()
    return (log_den - risk[event].sum()) / d.sum()


class _Regression(MILTask):
    """A continuous target, standardised on the training fold; output ``predicted`` in its units."""

    target_columns = ("target",)
    headline_metric = "r2"
    loss_name = "huber"
    has_linear_baseline = True

    def linear_baseline(self, mean_features, targets, fold, predictions, seed):
        return linear_baseline(mean_features, np.asarray(targets, float).reshape(-1), fold=fold,
                               mil_predictions=np.asarray(predictions)[:, 0], seed=seed)

    def __init__(self, mean: float = 0.0, sd: float = 1.0) -> None:
        self.mean, self.sd = float(mean), float(sd)

    def setup(self, rows, config):
        source = getattr(config, "slides", None) or None
        vals = []
        for i, r in enumerate(rows, start=2):
            try:
                v = float(r["target"])
            except ValueError:
                raise LabelError(f"row {i}: target value {r['target']!r} is not a number", source) from None
            if not math.isfinite(v):
                raise LabelError(f"row {i}: target value {r['target']!r} is not finite", source)
            vals.append(v)
        y = np.array(vals)
        if np.ptp(y) == 0:
            raise LabelError(f"every slide has the target {y[0]:g}: nothing to regress", source)
        self._standardise(y)
        return y

    def _standardise(self, y):
        sd = float(np.std(y))
        self.mean, self.sd = float(np.mean(y)), (sd if sd > 0 else 1.0)

    @property
    def out_dim(self):
        return 1

    def targets_tensor(self, targets, device):
        return torch.as_tensor(np.asarray(targets, np.float32), device=device)

    def stratify(self, targets):
        q = np.quantile(targets, [0.25, 0.5, 0.75])
        return np.digitize(targets, q).astype(np.int64)

    def make_loss(self, train_targets, device, config):
        self._standardise(np.asarray(train_targets, float))  # the fold's own mean and sd
        mean, sd = self.mean, self.sd
        fn = {"huber": lambda a, b: F.huber_loss(a, b, delta=1.0), "l1": F.l1_loss, "mse": F.mse_loss}[self.loss_name]

        def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return fn(outputs[:, 0], (targets - mean) / sd)
        return loss

    @property
    def output_columns(self):
        return ["predicted"]

    def predict(self, outputs):
        return outputs[:, :1].detach().float().cpu().numpy() * self.sd + self.mean

    def tile_outputs(self, scores):
        return ["predicted"], scores[:, :1].detach().float().cpu().numpy() * self.sd + self.mean

    def metrics(self, targets, predictions):
        return regression_metrics(targets, np.asarray(predictions)[:, 0])

    def resample_ok(self, targets):
        return len(set(np.asarray(targets).tolist())) >= 3

    def summary(self, overall, ci):
        lo, hi = ci.get("r2", [float("nan")] * 2)
        return (f"R² {overall['r2']:.3f} (95% CI {lo:.3f}-{hi:.3f}), MAE {overall['mae']:.3g}, "
                f"RMSE {overall['rmse']:.3g}, Pearson r {overall['pearson']:.3f}, Spearman {overall['spearman']:.3f}")

    def fold_state(self, train_targets, train_predictions):
        return {"target_mean": self.mean, "target_sd": self.sd}

    def checkpoint_fields(self):
        return {"loss": self.loss_name}

    @classmethod
    def from_checkpoint(cls, mil):
        state = mil.get("fold_state") or {}
        if "target_mean" not in state or "target_sd" not in state:
            raise CheckpointError(f"a {cls.name} MIL checkpoint without its target mean and sd (fold_state)")
        return cls(state["target_mean"], state["target_sd"])


@register_mil_task
class Regression(_Regression):
    name = "regression"
    loss_name = "huber"


@register_mil_task
class RegressionL1(_Regression):
    name = "regression-l1"
    loss_name = "l1"


@register_mil_task
class RegressionMSE(_Regression):
    name = "regression-mse"
    loss_name = "mse"


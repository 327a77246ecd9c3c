"""MIL tasks: what a slide-level MIL model predicts, and everything about it that is not the network.

The MIL networks (``slidekit.models.mil``) map a bag of tile features to a head of ``out_dim``
numbers; the ``mil`` trainer (``trainers/mil.py``) runs patient-level cross-validation; deploy and
attention (``slidekit.slidelevel.mil_deploy``) score new slides. None of them knows what the head
means. A ``MILTask`` says it, in one object:

- ``target_columns``: the slide-table columns holding the target (classification: ``label``);
- ``setup(rows, config)``: learn the task's state from the training table (the classes) and return
  the targets, one row per slide (``targets_tensor`` makes a batch of them a tensor);
- ``out_dim``: the head size;
- ``stratify(targets)``: the discrete key the patient-grouped folds are stratified by;
- ``make_loss(train_targets, device, config)``: a ``loss(outputs (B, out_dim), targets (B, ...))``
  over a *batch of bags* (a Cox partial likelihood needs the whole risk set, not one bag);
  ``evaluation_loss`` is the early-stopping criterion over a whole validation set;
- ``batches(order, step, targets)``: one epoch's batches of training bags (default: runs of ``step``);
- ``fold_state(train_targets, train_predictions)``: what a fold learned beyond its weights (a
  regression's target mean and sd, a Cox model's baseline hazard), recorded in its checkpoint;
- ``output_offset(train_predictions)``: a constant the loss leaves undetermined (a Cox model's
  risk offset), taken out of the head's bias after training (default: none);
- ``instance_label(target)``: the class CLAM's instance loss uses (None: the task has none);
- ``predict(outputs)`` -> ``(n, len(output_columns))`` numbers written as ``output_columns`` in
  ``oof.csv`` and ``scored.csv``; ``deploy_row`` adds what deploy writes beside them (``predicted``);
- ``metrics(targets, predictions)`` and ``bootstrap_ci`` (resamples where ``resample_ok``);
  ``summary(overall, ci)``: the trainer's closing line;
- ``checkpoint_fields()`` recorded in the MIL checkpoint (with ``task``: the name) and
  ``from_checkpoint(mil)``, which rebuilds the task for deploy; ``tile_outputs`` turns the
  network's per-tile scores into named per-tile columns for the attention outputs.

Tasks register by name (``@register_mil_task``); plug-in packages can also declare them in the
entry-point group ``slidekit.mil_tasks``. A checkpoint without ``task`` is ``classification``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from slidekit.base.errors import CheckpointError, ConfigError, LabelError, SlidekitWarning
from slidekit.slidelevel.staging import weighted_kappa

DEFAULT_TASK = "classification"
ENTRY_POINT_GROUP = "slidekit.mil_tasks"

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MILTask:
    """Base of MIL tasks (see the module docstring for what each member does). Subclasses set
    ``name`` and implement ``setup``, ``out_dim``, ``make_loss``, ``predict``, ``output_columns``,
    ``metrics`` and ``from_checkpoint``; the rest has defaults."""

    name: ClassVar[str] = ""
    target_columns: ClassVar[tuple[str, ...]] = ("label",)
    #: the metric of the trainer's closing line and the one benchmarks compare first
    headline_metric: ClassVar[str] = ""

    # -- training -------------------------------------------------------------------------------
    def setup(self, rows: Sequence[dict[str, str]], config: Any) -> np.ndarray:
        """Learn the task's state from the training table's rows (``target_columns`` values as
        strings) and return the targets, one per row. LabelError for a bad value."""
        raise NotImplementedError

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def targets_tensor(self, targets: np.ndarray, device: torch.device) -> torch.Tensor:
        """A batch of targets as the loss takes them."""
        return torch.as_tensor(targets, device=device)

    def stratify(self, targets: np.ndarray) -> np.ndarray:
        """A discrete key per slide for the stratified, patient-grouped folds (default: none)."""
        return np.zeros(len(targets), dtype=np.int64)

    def make_loss(self, train_targets: np.ndarray, device: torch.device, config: Any) -> Loss:
        """``loss(outputs (B, out_dim), targets (B, ...)) -> scalar`` for a batch of bags."""
        raise NotImplementedError

    def batches(self, order: np.ndarray, step: int, targets: np.ndarray) -> list[np.ndarray]:
        """One epoch's training batches from the shuffled training indices ``order`` (default:
        consecutive runs of ``bags_per_step``; survival deals the events out so each batch has one)."""
        return [order[b:b + step] for b in range(0, len(order), step)]

    #: whether ``fold_state`` needs the fold model's predictions of its own training bags
    needs_train_predictions: ClassVar[bool] = False

    def output_offset(self, train_predictions: np.ndarray) -> np.ndarray | None:
        """Per head output, a constant the loss cannot see (it is invariant to adding it) that the
        trainer subtracts from the fold model's head bias after training, given the model's
        ``predict`` rows of its own training bags (needs ``needs_train_predictions``). Default: none."""
        return None

    def fold_state(self, train_targets: np.ndarray, train_predictions: np.ndarray | None) -> dict[str, Any]:
        """What a fold learned beyond the weights, recorded as ``fold_state`` in its checkpoint (and in
        ``checkpoint.pt``); called after ``make_loss`` of the fold (default: nothing)."""
        return {}

    #: whether ``linear_baseline`` fits a model (the trainer then hands it the bags' mean features)
    has_linear_baseline: ClassVar[bool] = False

    def linear_baseline(self, mean_features: np.ndarray, targets: np.ndarray, fold: np.ndarray,
                        predictions: np.ndarray, seed: int) -> dict[str, Any] | None:
        """A linear model on the bags' mean features, fitted and scored on the MIL run's folds (``fold``:
        each bag's test fold) and compared with its out-of-fold ``predictions``: ``{"model", "overall",
        "folds", "predictions", "diff"}`` (default: none)."""
        return None

    def check_fold(self, targets: np.ndarray, idx: np.ndarray, role: str) -> None:
        """Refuse a fold's ``role`` set ("validation", "test") that this task cannot score, before any
        training (``idx``: rows of the slide table, 0 = its first data row; default: accept all)."""

    def evaluation_loss(self, loss: Loss, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The early-stopping criterion over a whole set (default: the loss of the set as one batch)."""
        return float(loss(outputs, targets))

    def instance_label(self, target: Any) -> int | None:
        """The class CLAM's instance loss trains towards (None: no instance loss)."""
        return None

    # -- predictions ----------------------------------------------------------------------------
    @property
    def output_columns(self) -> list[str]:
        """Names of ``predict``'s columns in ``oof.csv`` and ``scored.csv``."""
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> np.ndarray:
        """``(n, out_dim)`` head outputs -> ``(n, len(output_columns))`` numbers."""
        raise NotImplementedError

    @property
    def deploy_columns(self) -> list[str]:
        """The columns of a ``scored.csv`` row after ``slide, status, features, tiles``."""
        return list(self.output_columns)

    def deploy_row(self, prediction: np.ndarray) -> dict[str, Any]:
        """One slide's ``scored.csv`` values from its ``predict`` row."""
        return {c: round(float(v), 6) for c, v in zip(self.output_columns, prediction)}

    def tile_outputs(self, scores: torch.Tensor) -> tuple[list[str], np.ndarray]:
        """Per-tile column names and values from the network's per-tile head outputs ``(N, out_dim)``."""
        names = self.output_columns if len(self.output_columns) == scores.shape[1] else \
            [f"out_{i}" for i in range(scores.shape[1])]
        return list(names), scores.detach().cpu().numpy()

    # -- metrics --------------------------------------------------------------------------------
    def metrics(self, targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def resample_ok(self, targets: np.ndarray) -> bool:
        """Whether a bootstrap resample can be scored (default: always)."""
        return True

    def bootstrap_ci(self, targets: np.ndarray, predictions: np.ndarray, n: int, seed: int) -> dict[str, list[float]]:
        """Percentile 95% intervals of ``metrics`` over ``n`` resamples of the slides."""
        rng = np.random.default_rng(seed)
        draws: dict[str, list[float]] = {}
        for _ in range(n):
            idx = rng.integers(0, len(targets), len(targets))
            if not self.resample_ok(targets[idx]):
                continue
            for k, v in self.metrics(targets[idx], predictions[idx]).items():
                draws.setdefault(k, []).append(v)
        return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}

    def summary(self, overall: dict[str, float], ci: dict[str, list[float]]) -> str:
        """The trainer's closing line (after ``mil ARCH: ``)."""
        return ", ".join(f"{k} {v:.3f}" for k, v in overall.items())

    # -- checkpoint -----------------------------------------------------------------------------
    def checkpoint_fields(self) -> dict[str, Any]:
        """What the MIL checkpoint records to rebuild this task (``task`` and ``out_dim`` are added)."""
        return {}

    @classmethod
    def from_checkpoint(cls, mil: dict) -> MILTask:
        """The task of a MIL checkpoint's description; CheckpointError when a field is missing."""
        raise NotImplementedError


# -- the registry -------------------------------------------------------------------------------

_TASKS: dict[str, type[MILTask]] = {}


def register_mil_task(cls: type[MILTask]) -> type[MILTask]:
    """Class decorator: make a task available by its ``name`` (to ``task:`` and to checkpoints)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _TASKS[cls.name] = cls
    return cls


#: modules of slidekit's own tasks beyond classification, imported when a task is looked up
BUILTIN_TASK_MODULES = ("slidekit.slidelevel.outcome_tasks",)


def _entry_point_tasks() -> None:
    import importlib
    from importlib.metadata import entry_points

    for module in BUILTIN_TASK_MODULES:
        importlib.import_module(module)  # registers survival, regression (docs/outcomes.md)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _TASKS:
            try:
                register_mil_task(ep.load())
            except Exception as e:  # a broken plug-in must not hide the built-in tasks
                warnings.warn(f"MIL task plug-in {ep.name!r} failed to load: {e}", SlidekitWarning, stacklevel=3)


def available_mil_tasks() -> list[str]:
    _entry_point_tasks()
    return sorted(_TASKS)


def get_mil_task(name: str) -> type[MILTask]:
    """The task class registered as ``name``; ConfigError naming the known tasks."""
    if name not in _TASKS:
        _entry_point_tasks()
    if name not in _TASKS:
        raise ConfigError(f"unknown MIL task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_from_checkpoint(mil: dict, path: Any = None) -> MILTask:
    """The task a MIL checkpoint was trained for (``task``; none recorded: classification)."""
    name = str(mil.get("task") or DEFAULT_TASK)
    try:
        cls = get_mil_task(name)
    except ConfigError as e:
        raise CheckpointError(f"trained for a MIL task this installation does not have ({e})", path) from None
    return cls.from_checkpoint(mil)


# -- classification -----------------------------------------------------------------------------

@register_mil_task
class Classification(MILTask):
    """Slide classes: cross-entropy (class weights), folds stratified by class, AUC (one-vs-rest
    macro beyond two classes), balanced accuracy and quadratic weighted kappa over ``classes`` in
    their order, softmax probabilities ``p_<class>`` and the ``predicted`` class."""

    name = "classification"
    target_columns = ("label",)
    headline_metric = "auc"

    def __init__(self, classes: Sequence[str] | None = None) -> None:
        self.classes = list(classes) if classes else []

    def setup(self, rows, config):
        labels = [r["label"] for r in rows]
        source = getattr(config, "slides", None) or None
        self.classes = list(config.classes) if getattr(config, "classes", None) else sorted(set(labels))
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise LabelError(f"labels {unknown} are not in classes {self.classes}", source)
        present = sorted(set(labels))
        if len(present) < 2:
            raise LabelError(f"every slide has the label {present[0]!r}: a classifier needs at least two classes",
                             source)
        counts = {c: labels.count(c) for c in self.classes}
        single = [c for c, n in counts.items() if n == 1]
        if single:
            warnings.warn(f"{source}: class(es) {single} have one slide each: they cannot be in both a training and a "
                          "test fold, so their metrics mean little (a typo of another label?)", SlidekitWarning,
                          stacklevel=2)
        return np.array([self.classes.index(x) for x in labels])

    @property
    def out_dim(self) -> int:
        return len(self.classes)

    def stratify(self, targets):
        return np.asarray(targets)

    def make_loss(self, train_targets, device, config):
        n = len(self.classes)
        counts = np.bincount(np.asarray(train_targets), minlength=n).astype(np.float64)
        weights = (torch.tensor(counts.sum() / (n * np.maximum(counts, 1)), dtype=torch.float32, device=device)
                   if getattr(config, "class_weights", True) else None)

        # each bag's loss times its class's weight, averaged over the bags. Not cross_entropy(weight=),
        # whose weighted mean divides by the batch's own weights: with one bag a step (the default) the
        # weight cancels and the option did nothing. The weights average 1 over the training bags, so
        # the loss keeps its scale.
        def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            per_bag = F.cross_entropy(outputs, targets, reduction="none")
            return per_bag.mean() if weights is None else (per_bag * weights[targets]).mean()
        return loss

    def evaluation_loss(self, loss, outputs, targets):
        # the mean of the slides' own losses (as the trainer has always measured its validation loss)
        per_slide = [float(loss(outputs[i:i + 1], targets[i:i + 1])) for i in range(len(outputs))]
        return float(np.mean(per_slide)) if per_slide else float("nan")

    def instance_label(self, target):
        return int(target)

    @property
    def output_columns(self):
        return [f"p_{c}" for c in self.classes]

    def predict(self, outputs):
        if outputs.shape[-1] == 1:  # a single-logit head: sigmoid of the positive class
            p = torch.sigmoid(outputs)
            return torch.cat([1 - p, p], dim=-1).cpu().numpy()
        return torch.stack([torch.softmax(o, -1) for o in outputs]).cpu().numpy() if len(outputs) else \
            np.zeros((0, len(self.classes)), np.float32)

    @property
    def deploy_columns(self):
        return [*self.output_columns, "predicted"]

    def deploy_row(self, prediction):
        return {**super().deploy_row(prediction), "predicted": self.classes[int(np.argmax(prediction))]}

    def tile_outputs(self, scores):
        return list(self.classes), torch.softmax(scores, -1).cpu().numpy()

    def metrics(self, targets, predictions):
        y, probs = np.asarray(targets), np.asarray(predictions)
        pred = probs.argmax(1)
        classes = self.classes
        out = {"balanced_accuracy": float(balanced_accuracy_score(y, pred)),
               "kappa": float(weighted_kappa([classes[i] for i in y], [classes[i] for i in pred], classes))}
        if len(set(y.tolist())) < 2:
            out["auc"] = float("nan")
        elif len(classes) == 2:
            out["auc"] = float(roc_auc_score(y, probs[:, 1]))
        else:
            out["auc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro",
                                             labels=range(len(classes))))
        return out

    def resample_ok(self, targets):
        return len(set(np.asarray(targets).tolist())) >= 2

    def summary(self, overall, ci):
        lo, hi = ci.get("auc", [float("nan")] * 2)
        return (f"AUC {overall['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f}), balanced accuracy "
                f"{overall['balanced_accuracy']:.3f}, kappa {overall['kappa']:.3f}")

    def checkpoint_fields(self):
        return {"classes": list(self.classes)}

    @classmethod
    def from_checkpoint(cls, mil):
        classes = mil.get("classes")
        if not isinstance(classes, list) or not classes:
            raise CheckpointError("a classification MIL checkpoint without its 'classes'")
        return cls(classes)

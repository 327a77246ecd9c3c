"""Linear evaluation and fine-tuning of an encoder on labelled patches.

The standard test of a self-supervised representation: freeze the encoder, take the pooled
encoder output (the input of the classification layer, i.e. the features before the last
activation/projection that SimCLR calls ``h``), fit a linear classifier on the training patches,
and report accuracy and macro-F1 on held-out patches. ``fine_tune`` trains the whole network
instead, for comparison.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from slidekit.base.errors import LabelError
from slidekit.models.checkpoint import load_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from slidekit.regions.options import OptionGroups


def _as_model(model: Any) -> tuple[Any, ModelSpec | None]:
    """(network, its spec or None) of a network, a loaded checkpoint or a checkpoint path; the network
    is ``Any``: callers use the slidekit networks' ``.features`` and ``.encoder``."""
    if isinstance(model, (str, os.PathLike)):
        ckpt = load_checkpoint(model)
        return ckpt.model, ckpt.spec
    if hasattr(model, "model") and hasattr(model, "spec"):  # a loaded Checkpoint
        return model.model, model.spec
    return model, None


def prepare_batch(images: Sequence[np.ndarray], size: int | None, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> normalised float (B, 3, size, size), area-resized when needed."""
    import cv2

    arrs = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] < 3:
            raise LabelError(f"expected (H, W, 3) RGB images, got shape {im.shape}")
        im = im[..., :3]
        if size is not None and im.shape[:2] != (size, size):
            interp = cv2.INTER_AREA if im.shape[0] > size else cv2.INTER_LINEAR
            im = cv2.resize(np.ascontiguousarray(im), (size, size), interpolation=interp)
        arrs.append(im)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(model: nn.Module | str | os.PathLike, images: Sequence[np.ndarray],
                     size: int | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Frozen pooled encoder features (N, C) of uint8 images (eval mode, no gradients).

    ``model`` is a network with ``.features`` (any slidekit network), a loaded checkpoint or a
    checkpoint path; ``size``, ``mean`` and ``std`` default to the checkpoint's spec.
    """
    net, spec = _as_model(model)
    if not hasattr(net, "features"):
        raise TypeError("the model needs a .features(x) method (a slidekit network)")
    size = size if size is not None else (spec.patch_size if spec is not None else None)
    mean = mean if mean is not None else (spec.mean if spec is not None else (0.5, 0.5, 0.5))
    std = std if std is not None else (spec.std if spec is not None else (0.5, 0.5, 0.5))
    was_training = net.training
    net.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = prepare_batch(images[i:i + batch_size], size, mean, std).to(device)
        out.append(net.features(x).float().cpu().numpy())
    net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def scores(y_true: Sequence, y_pred: Sequence) -> dict:
    """Accuracy and macro-F1 (every class weighs the same)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro"))}


def linear_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence,
                 C: float = 1.0, max_iter: int = 5000) -> dict:
    """Standardise features, fit an L2 logistic regression on train, score on test.

    Returns accuracy, macro-F1, the predictions and the class names.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y)) < 2:
        raise LabelError("linear evaluation needs at least two classes in the training split")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(np.asarray(train_x), list(train_y))
    pred = clf.predict(np.asarray(test_x))
    return {**scores(test_y, pred), "C": C, "predictions": pred.tolist(),
            "classes": [str(c) for c in clf.classes_], "n_train": len(train_y), "n_test": len(test_y)}


@dataclass(frozen=True)
class PatchInput:
    """How patches are fed to the encoder (None: the checkpoint spec's value).

    Parameters
    ----------
    size
        Side in pixels the patches are resized to (None: the spec's ``patch_size``, else as they are).
    mean, std
        Per-channel normalisation (None: the spec's, else 0.5).
    """

    size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


@dataclass(frozen=True)
class EvalRun:
    """How an evaluation runs (never what it computes).

    Parameters
    ----------
    batch_size
        Patches per batch (fine-tuning: per training step).
    device
        Torch device.
    """

    batch_size: int = 64
    device: str | torch.device = "cpu"


@dataclass(frozen=True)
class ProbeOptions:
    """The linear probe (``linear_probe``): L2 logistic regression on standardised features.

    Parameters
    ----------
    C
        Inverse regularisation strength.
    max_iter
        Solver iterations.
    """

    C: float = 1.0
    max_iter: int = 5000


@dataclass(frozen=True)
class FineTuneTraining:
    """End-to-end training of ``fine_tune`` (Adam, cross-entropy).

    Parameters
    ----------
    epochs
        Passes over the training patches.
    lr
        Adam learning rate.
    augment
        Flip and rotate the training patches by multiples of 90 degrees.
    seed
        Seed of the initialisation, the order and the augmentation.
    """

    epochs: int = 10
    lr: float = 1e-4
    augment: bool = True
    seed: int = 0


@dataclass(frozen=True)
class LinearEvalOptions(OptionGroups):
    """Every option of ``linear_eval``, in groups; flat field names work too (``OptionGroups``)."""

    input: PatchInput = PatchInput()
    probe: ProbeOptions = ProbeOptions()
    run: EvalRun = EvalRun(batch_size=64)


@dataclass(frozen=True)
class FineTuneOptions(OptionGroups):
    """Every option of ``fine_tune``, in groups; flat field names work too (``OptionGroups``)."""

    input: PatchInput = PatchInput()
    training: FineTuneTraining = FineTuneTraining()
    run: EvalRun = EvalRun(batch_size=32)


def linear_eval(model: nn.Module | str | os.PathLike, train_images: Sequence[np.ndarray],
                train_labels: Sequence, test_images: Sequence[np.ndarray], test_labels: Sequence, *,
                options: LinearEvalOptions | None = None, **flat: Any) -> dict:
    """Frozen-encoder linear evaluation: features of both splits, then ``linear_probe``.

    ``options`` is a :class:`LinearEvalOptions` (input: ``size``, ``mean``, ``std``; probe: ``C``,
    ``max_iter``; run: ``batch_size``, ``device``); flat keywords (``size=224``, ``C=0.1``) set single fields.
    """
    o: LinearEvalOptions = LinearEvalOptions.of(options, **flat)
    inp, run = o.input, o.run
    norm = {k: v for k, v in (("mean", inp.mean), ("std", inp.std)) if v is not None}
    train_x = extract_features(model, train_images, inp.size, batch_size=run.batch_size, device=run.device, **norm)
    test_x = extract_features(model, test_images, inp.size, batch_size=run.batch_size, device=run.device, **norm)
    return linear_probe(train_x, train_labels, test_x, test_labels, C=o.probe.C, max_iter=o.probe.max_iter)


def fine_tune(model: nn.Module | str | os.PathLike, train_images: Sequence[np.ndarray],
              train_labels: Sequence, test_images: Sequence[np.ndarray], test_labels: Sequence, *,
              options: FineTuneOptions | None = None, **flat: Any) -> dict:
    """Train encoder and a new linear head end to end (Adam, cross-entropy), then score on test.

    The encoder is copied first, so ``model`` itself is left untouched. With ``augment`` the
    training patches are flipped and rotated by multiples of 90 degrees. ``options`` is a
    :class:`FineTuneOptions` (input: ``size``, ``mean``, ``std``; training: ``epochs``, ``lr``,
    ``augment``, ``seed``; run: ``batch_size``, ``device``); flat keywords set single fields.
    """
    import copy

    o: FineTuneOptions = FineTuneOptions.of(options, **flat)
    size, mean, std = o.input.size, o.input.mean, o.input.std
    epochs, lr, augment, seed = o.training.epochs, o.training.lr, o.training.augment, o.training.seed
    batch_size, device = o.run.batch_size, o.run.device
    net, spec = _as_model(model)
    size = size if size is not None else (spec.patch_size if spec is not None else None)
    mean = mean or (spec.mean if spec is not None else (0.5, 0.5, 0.5))
    std = std or (spec.std if spec is not None else (0.5, 0.5, 0.5))
    classes = sorted(set(map(str, train_labels)))
    if len(classes) < 2:
        raise LabelError("fine-tuning needs at least two classes in the training split")
    index = {c: i for i, c in enumerate(classes)}
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = ResNetClassifier(_backbone_of(net), len(classes))
    clf.encoder.load_state_dict(copy.deepcopy(net.encoder.state_dict()))
    clf.to(device).train()
    x_all = prepare_batch(train_images, size, mean, std)
    y_all = torch.tensor([index[str(y)] for y in train_labels])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            x, y = x_all[idx], y_all[idx]
            if augment:
                k = int(torch.randint(4, (), generator=gen))
                x = torch.rot90(x, k, dims=(2, 3))
                if torch.rand((), generator=gen) < 0.5:
                    x = x.flip(3)
            loss = nn.functional.cross_entropy(clf(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        xt = prepare_batch(test_images, size, mean, std)
        logits = torch.cat([clf(xt[i:i + 64].to(device)).cpu() for i in range(0, len(xt), 64)])
    pred = [classes[i] for i in logits.argmax(1).tolist()]
    return {**scores([str(y) for y in test_labels], pred), "predictions": pred, "classes": classes,
            "epochs": epochs, "n_train": len(train_labels), "n_test": len(test_labels)}


def _backbone_of(net: nn.Module) -> str:
    """The backbone name of a slidekit network (``timm:NAME`` or a torchvision ResNet)."""
    enc: Any = net.encoder  # a TimmEncoder, ResNetEncoder or a registry encoder: read by duck typing
    if isinstance(getattr(enc, "backbone", None), str):  # encoders record their name (slidekit.models.weights)
        return enc.backbone
    if enc.channels[-1] == 2048:
        return "resnet50"
    return "resnet34" if len(enc.layer1) == 3 else "resnet18"

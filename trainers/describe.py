"""What a trainer offers, for people: ``slidekit train NAME --show-config`` (``--list`` is in ``catalog``).

Each option's one-line help is the trailing comment of its field in the config dataclass (the
project writes a field's meaning there), else ``field(metadata={"help": ...})``, else the shared
help of the ``TrainerConfig`` options below. ``show_config`` prints a complete YAML config file —
every option at its default with its type and help as a comment — that loads as the trainer's
config, so its output is a starting point for ``--config``.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

import yaml

from trainers.registry import get

# Help for the options every trainer has (TrainerConfig), where its source has no comment.
COMMON_HELP = {
    "seed": "random seed (weights, sampling, augmentation)",
    "epochs": "training epochs; a rerun with more continues the run",
    "batch_size": "samples per optimiser step",
    "lr": "learning rate",
    "num_workers": "DataLoader worker processes (0: load in the main process)",
    "init": "a slidekit checkpoint whose encoder initialises the network",
}

# Help for built-in options whose field has no comment; a name alone applies to every trainer,
# (trainer, name) to one. A comment on the field, when one is added, wins.
BUILTIN_HELP: dict[str | tuple[str, str], str] = {
    "images": "image folders: sub-folder holding the images",
    "labels": "image folders: sub-folder holding the label masks",
    "annotations": "slides: one QuPath GeoJSON of scribbles per slide, in the order of `slides`",
    "classes": "class names; index i is label value i",
    "ignore_index": "label value meaning 'not labelled' (no loss)",
    "backbone": "encoder network (resnet18, resnet34, resnet50)",
    "augment": "flips, 90° rotations and colour jitter",
    "weight_decay": "optimiser weight decay",
    "mpp": "µm/px of the patches the network sees",
    "patch_size": "patch side in pixels at `mpp`",
    "slide_mpp": "µm/px for slides whose metadata has none (fallback only)",
    "min_tissue": "smallest tissue fraction of a patch",
    "tissue_mpp": "µm/px of the tissue detection",
    "slides": "CSV table of slides (slide, label, and what the trainer needs)",
    ("mixed-em", "slides"): "CSV table: slide, label (and mask: pixel annotations) per slide",
    ("topk-mean", "slides"): "CSV table: slide, label, heatmap (a `slidekit heatmap` folder) per slide",
    ("morph-lgbm", "slides"): "CSV table: slide, label, heatmap (a `slidekit heatmap` folder) per slide",
    "rounds": "EM rounds after the initial M-step; a rerun with more continues",
    "init_steps": "M-step iterations on pixel labels before the first E-step",
    "round_steps": "M-step iterations per EM round",
    "ratio": "patches per batch from pixel labels : pseudo-positives : hard negatives",
    ("mixed-em", "threshold"): "E-step probability above which a pixel becomes a pseudo-positive",
    ("mixed-em", "scale"): "E-step: the positive fraction kept is `scale` x the slide's expected tumour share",
    "floor": "E-step: smallest positive fraction kept per positive slide",
    "predict_batch": "E-step tiles per batch",
    "predict_overlap": "E-step tile overlap in pixels",
    "stage2_thresholds": "probability thresholds of the stage-2 morphology features",
    "stage2_work_mpp": "µm/px of the stage-2 feature maps (default: the heatmap's)",
    "max_crop": "largest crop, as a fraction of the source area",
    "rotate90": "random 90° rotations",
    "jitter_p": "probability of colour jitter",
    "grayscale_p": "probability of grey-scale",
    "blur_p": "probability of Gaussian blur",
    "blur_sigma": "range of the blur's sigma in pixels",
    "mean": "normalisation mean (RGB, 0..1)",
    "std": "normalisation standard deviation (RGB, 0..1)",
    "momentum": "optimiser momentum",
    "lars_eta": "LARS trust coefficient",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "temperature": "NT-Xent temperature",
    "proj_dim": "projection head output size",
    "sources": "patch sources: {kind: slides|folder|zip, paths, weight, cap, ...}",
    "tile_size": "tile side in pixels at `mpp` read from slides",
    "crop_size": "augmented crop side in pixels (the encoder's input)",
    "k": "tiles per slide whose mean is the slide probability",
    "batch_slides": "slides per optimiser step",
    "thresholds": "probability thresholds of the morphology features",
    "work_mpp": "µm/px of the morphology feature maps",
    "n_estimators": "LightGBM boosting rounds",
    "num_leaves": "LightGBM leaves per tree",
    "learning_rate": "LightGBM learning rate",
    "min_child_samples": "LightGBM smallest leaf",
    "cv_folds": "cross-validation folds of the selection loss",
}


def _field_comments(cls: type) -> dict[str, str]:
    """{field: trailing comment} from the class bodies of ``cls`` and its bases (nearest wins)."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (tokenize.TokenError, IndentationError):
            continue
        for tok in tokens:
            if tok.type != tokenize.COMMENT:
                continue
            code = lines[tok.start[0] - 1][:tok.start[1]].strip()
            name = code.split(":", 1)[0].strip()
            if code and ":" in code and name.isidentifier() and not code.startswith(("def ", "class ")):
                found[name] = tok.string.lstrip("#").strip()
    return found


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def config_options(name: str) -> list[dict]:
    """Every option of trainer ``name``: name, type, default and help, in declaration order."""
    cls = get(name).Config
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_ = (f.metadata.get("help") or comments.get(f.name) or COMMON_HELP.get(f.name)
                 or BUILTIN_HELP.get((name, f.name)) or BUILTIN_HELP.get(f.name, ""))
        rows.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default,
                     "help": help_})
    return rows


def _doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def show_config(name: str) -> str:
    """A complete YAML config for trainer ``name``: every option at its default, ``# type: help`` beside it."""
    trainer = get(name)
    rows = config_options(name)
    lines = [f"# {name}.yaml: {_doc_line(trainer)}", f"# every option of `slidekit train {name}`, at its default"]
    values = []
    for r in rows:
        text = yaml.safe_dump({r["name"]: r["default"]}, default_flow_style=True, width=10_000).strip()
        values.append(text[1:-1] if text.startswith("{") else text)  # {a: 1} -> a: 1
    width = max(len(v) for v in values) + 2
    for r, v in zip(rows, values):
        note = f"{r['type']}" + (f": {r['help']}" if r["help"] else "")
        lines.append(f"{v:<{width}}# {note}")
    return "\n".join(lines) + "\n"

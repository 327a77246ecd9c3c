"""The trainer plug-in protocol and the registry: ``Trainer``, ``@register``, ``available()``, ``get(name)``.

A trainer is a ``Trainer`` subclass with a ``name``, the labels it ``consumes`` and a ``Config``
dataclass. Built-in trainers are found by importing their modules; third-party trainers by the
entry-point group ``slidekit.trainers`` (``name = "package.module:TrainerClass"``). ``get(name)``
looks in both, so ``slidekit train NAME`` runs either the same way. This module loads no torch (the
trainers it finds do); ``trainers.catalog`` lists them without importing them at all.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from slidekit.base.errors import ConfigError
from trainers.config import TrainerConfig

BUILTIN_MODULES = ("trainers.scribble", "trainers.s2l", "trainers.simclr", "trainers.mixed_em",
                   "trainers.stage2", "trainers.mil")
ENTRY_POINT_GROUP = "slidekit.trainers"

LABEL_KINDS = frozenset({"images", "scribbles", "pixel_masks", "slide_labels"})


class Trainer:
    """Base class of every trainer: subclass, set the class attributes, implement ``fit``."""

    name: ClassVar[str] = ""
    consumes: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type] = TrainerConfig
    length_option: ClassVar[str] = "epochs"  # the option a rerun may raise to continue training
    rerun_free_options: ClassVar[frozenset[str]] = frozenset()  # options a rerun may change freely
    outputs: ClassVar[tuple[str, ...]] = ()  # files/folders written besides trainers.runs.RUN_FILES

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def fit(self, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> Path:
        """Train, writing checkpoints and metrics into ``out_dir``; return the checkpoint path."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Trainer]] = {}
_discovered = False


def register(cls: type[Trainer]) -> type[Trainer]:
    """Class decorator: add a trainer to the registry under ``cls.name``."""
    if not cls.name:
        raise ConfigError(f"trainer class {cls.__qualname__} has no name")
    unknown = set(cls.consumes) - LABEL_KINDS
    if unknown:
        raise ConfigError(f"trainer {cls.name!r} consumes unknown label kinds {sorted(unknown)}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but something it needs is missing
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break the others
            raise ConfigError(f"trainer plug-in {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Trainer)):
            raise ConfigError(f"trainer plug-in {ep.name!r} ({ep.value}) is not a Trainer subclass")
        if cls.name != ep.name:
            cls = type(cls.__name__, (cls,), {"name": ep.name})
        register(cls)


def available() -> list[str]:
    """Names of every registered trainer, built-in and plug-in."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> type[Trainer]:
    """The trainer class registered under ``name``."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown trainer {name!r}; available: {', '.join(available()) or 'none'}")
    return _REGISTRY[name]

"""Pluggable trainers. ``trainers.get(name)`` finds built-ins and entry-point plug-ins alike.

The names below load torch on first use (PEP 562), so ``import trainers`` and ``trainers.catalog`` (what
``slidekit train --list`` reads) stay light.
"""
from slidekit.base.lazy import lazy_exports

_EXPORTS = {name: ".registry" for name in ("LABEL_KINDS", "Trainer", "available", "get", "register")}
_EXPORTS.update({name: ".base" for name in ("MetricsLog", "TrainState", "init_encoder", "restart_run", "run_epochs",
                                            "seed_everything", "train")})
_EXPORTS.update({name: ".config" for name in ("TrainerConfig", "load_config", "make_config")})
_EXPORTS["resolve_device"] = "slidekit.base.devices"

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

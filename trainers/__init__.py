"""Pluggable trainers. ``trainers.get(name)`` finds built-ins and entry-point plug-ins alike."""
from slidekit.base.devices import resolve_device
from trainers.base import (LABEL_KINDS, MetricsLog, Trainer, TrainState, available, get, init_encoder, register,
                           restart_run, run_epochs, seed_everything, train)
from trainers.config import TrainerConfig, load_config, make_config

__all__ = ["LABEL_KINDS", "MetricsLog", "Trainer", "TrainerConfig", "TrainState", "available", "get",
           "init_encoder", "load_config", "make_config", "register", "resolve_device", "restart_run",
           "run_epochs", "seed_everything", "train"]

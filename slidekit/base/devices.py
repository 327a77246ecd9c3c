"""Where torch runs: the devices here, and a device name resolved against them (one-line errors)."""
from __future__ import annotations

import torch

from slidekit.base.errors import ConfigError


def available_devices() -> list[str]:
    """The devices torch can use here, e.g. ``["cpu", "cuda:0 (NVIDIA H200)"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N``.

    A device that does not exist here (CUDA without a GPU, ``cuda:3`` on a two-GPU machine, a
    misspelt name) is a ConfigError naming the devices that do exist.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N "
                          f"(devices here: {', '.join(available_devices())})")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigError(f"device {str(device)!r} was asked for but does not exist here "
                              f"(devices here: {', '.join(available_devices())})")
    return dev

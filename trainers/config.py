"""Trainer configs: typed dataclass options (``TrainerConfig``) read from YAML/JSON files and
``--set key=value`` items, each value coerced to its field's type and checked (one-line ConfigError)."""
from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from slidekit.base.errors import ConfigError

INIT_BN_CHOICES = ("keep", "reestimate")  # init_bn: slidekit.models.weights.reestimate_batchnorm does the second


def check_option(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise ConfigError ``option 'key' must be <rule>, got <value>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"option {key!r} must be {rule}, got {value!r}")


@dataclass
class TrainerConfig:
    """Options every trainer has. Subclass it (as a dataclass) to add a trainer's own.

    ``validate`` checks the ranges when the config is built; a subclass extends it (calling
    ``super().validate()``) rather than clamping bad values, so a typo never trains quietly.
    """

    seed: int = 0
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    num_workers: int = 0
    sync_batchnorm: bool = False  # several ranks: batch norm over the global batch, not each rank's share
    init: str | None = None  # weights for the encoder: slidekit checkpoint, torchvision or timm state dict
    init_bn: str = "keep"  # keep | reestimate: BatchNorm statistics after `init`: as copied, or fit to the train data
    # (reestimate: trainers whose config sets INIT_BN_REESTIMATE = True, e.g. scribble and s2l)

    INIT_BN_REESTIMATE: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for an option out of its range."""
        check_option(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_option(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_option(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr", self.lr,
                     "a finite number > 0")
        check_option(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check_option(self.init_bn in INIT_BN_CHOICES, "init_bn", self.init_bn, " or ".join(INIT_BN_CHOICES))
        if self.init_bn == "reestimate":
            if not self.init:
                raise ConfigError("init_bn=reestimate needs init (--init): there are no copied BatchNorm "
                                  "statistics to re-estimate")
            if not self.INIT_BN_REESTIMATE:
                raise ConfigError(f"init_bn=reestimate is not supported by {type(self).__name__} (it has no "
                                  "image batches to re-estimate on); use init_bn=keep")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # e.g. `float | None`: the float's own message is the clearer one
            raise errors[0]
        raise ConfigError(f"option {key!r}: cannot read {value!r} as {annotation}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(":", ",").split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {key!r}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {key!r}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        if annotation is not str and isinstance(value, (bool, list, tuple, dict)):
            raise ConfigError(f"option {key!r}: expected {annotation.__name__}, got {value!r}")
        if annotation is str and isinstance(value, (list, tuple, dict)):
            raise ConfigError(f"option {key!r}: expected a string, got {value!r}")
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"option {key!r}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is float and not math.isfinite(out):  # inf/nan never make a sensible option
            raise ConfigError(f"option {key!r}: expected a finite number, got {value!r}")
        return out
    return value


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """Build config dataclass ``cls`` from a dict, coercing strings to the declared field types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; "
                          f"{cls.__name__} has: {', '.join(sorted(names))}")
    try:
        return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ that raised something untyped
        raise ConfigError(f"{cls.__name__}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: option {key!r} is given twice (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"option {k!r} is given twice")
        out[k] = v
    return out


def parse_config_text(text: str, yaml_syntax: bool) -> Any:
    """Parse a YAML or JSON config text; ConfigError for a key given twice in one mapping."""
    if yaml_syntax:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    return json.loads(text, object_pairs_hook=_unique_json_object)


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> Any:
    """Config from a YAML/JSON file, then ``overrides`` (a dict, or ``["key=value", ...]``)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError("config file not found", path)
        try:
            text = path.read_text()
            loaded = parse_config_text(text, path.suffix.lower() in (".yaml", ".yml"))
            if loaded is None:  # an empty YAML file
                loaded = {}
        except ConfigError as e:
            raise ConfigError(str(e), path) from None
        except Exception as e:
            detail = " ".join(f"{type(e).__name__}: {e}".split())  # YAML errors span several lines
            raise ConfigError(f"cannot parse config ({detail})", path) from None
        if not isinstance(loaded, dict):
            raise ConfigError("config must be a mapping of option names to values", path)
        try:
            make_config(cls, loaded)  # errors in the file name the file
        except ConfigError as e:
            raise ConfigError(str(e), path) from None
        values.update(loaded)
    if isinstance(overrides, list):
        given: set[str] = set()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            k, v = item.split("=", 1)
            k = k.strip().replace("-", "_")
            if k in given:
                raise ConfigError(f"override {k!r} is given twice")
            given.add(k)
            values[k] = v
    elif overrides:
        values.update(overrides)
    return make_config(cls, values)

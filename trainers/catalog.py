"""Which trainers exist, without importing them: the answer of ``slidekit train --list``.

Importing a trainer loads torch and whatever the trainer needs (LightGBM, timm, ...), seconds of start-up
for a one-screen list. The built-in trainers are therefore read from their modules' source: each class
decorated with ``@register`` gives its ``name``, ``consumes`` and the first line of its docstring. A
built-in whose attributes are not plain literals there (set by a base class, computed) is imported
instead, so the list is never wrong, only slower. Plug-ins (``slidekit.trainers`` entry points) are
loaded through the registry, as training would load them: a plug-in's import is its own affair.
``tests/test_train_cli.py`` checks the catalogue against the imported classes.
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from trainers.registry import BUILTIN_MODULES, ENTRY_POINT_GROUP, Trainer, available, get


@dataclass(frozen=True)
class TrainerEntry:
    """One line of the list: a trainer's name, what it does, the labels it consumes, where it lives."""

    name: str
    summary: str
    consumes: frozenset[str]
    module: str
    plugin: bool = False


def _literal_attrs(cls: ast.ClassDef) -> dict[str, object]:
    """``name`` and ``consumes`` of a class body where they are literals (``frozenset({...})`` included)."""
    found: dict[str, object] = {}
    for stmt in cls.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            continue
        key, value = stmt.targets[0].id, stmt.value
        if key not in ("name", "consumes"):
            continue
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "frozenset"
                and len(value.args) <= 1 and not value.keywords):
            value = value.args[0] if value.args else ast.Set(elts=[])
        try:
            found[key] = ast.literal_eval(value)
        except ValueError:
            continue
    return found


def _registered_classes(module: str) -> list[TrainerEntry] | None:
    """The ``@register`` classes of a built-in module read from its source; None where that is not enough."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return []  # an optional built-in that is not installed: the registry skips it the same way
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    entries = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        if not any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list):
            continue
        attrs = _literal_attrs(node)
        name, consumes = attrs.get("name"), attrs.get("consumes")
        if not isinstance(name, str) or not isinstance(consumes, (set, frozenset)):
            return None
        doc = (ast.get_docstring(node) or "").strip()
        entries.append(TrainerEntry(name, doc.splitlines()[0] if doc else "", frozenset(consumes), module))
    return entries


def _imported(module: str) -> list[TrainerEntry]:
    importlib.import_module(module)  # loads torch: only for a built-in whose source did not say enough
    return [entry_of(get(name)) for name in available() if get(name).__module__ == module]


def entry_of(cls: type[Trainer]) -> TrainerEntry:
    """The catalogue entry of an imported trainer class."""
    doc = (cls.__doc__ or "").strip()
    return TrainerEntry(cls.name, doc.splitlines()[0] if doc else "", frozenset(cls.consumes), cls.__module__,
                        plugin=cls.__module__ not in BUILTIN_MODULES)


def builtin_entries() -> list[TrainerEntry]:
    """Every built-in trainer, read from source (imported only where the source does not say)."""
    out: list[TrainerEntry] = []
    for module in BUILTIN_MODULES:
        found = _registered_classes(module)
        out.extend(found if found is not None else _imported(module))
    return out


def all_entries() -> list[TrainerEntry]:
    """Built-ins and plug-ins, sorted by name; plug-ins are loaded (and checked) by the registry."""
    entries = {e.name: e for e in builtin_entries()}
    plugin_names = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in entries]
    for name in plugin_names:  # loaded and checked by the registry, as training would
        entries[name] = entry_of(get(name))
    return [entries[n] for n in sorted(entries)]


def list_trainers() -> list[str]:
    """One line per registered trainer, built-in and plug-in: name, what it does, the labels it consumes."""
    entries = all_entries()
    width = max((len(e.name) for e in entries), default=0) + 2
    return [f"{e.name:<{width}}{e.summary} (labels: {', '.join(sorted(e.consumes)) or '-'})"
            + (f" [plug-in: {e.module}]" if e.plugin else "") for e in entries]

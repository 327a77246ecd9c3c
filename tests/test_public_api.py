"""The stated public API (issue 28 item 5).

- ``slidekit`` (the common names, every error and warning class) and ``slidekit.<stage>`` (everything
  public of that stage) are the stable import paths: every name of each ``__all__`` resolves, and
  the lazy ones (PEP 562) are what the type stubs (``__init__.pyi``) say they are.
- ``import slidekit`` and the light stages never load torch.
- ``slidekit.errors`` is a kept old path (a plain re-export of ``slidekit.base.errors``).
- The docs import only from those levels (or ``trainers``, ``trainers.<module>`` for the plug-in
  trainers), and every name they import resolves.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import slidekit
from slidekit.base import errors

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["base", "slides", "annotations", "regions", "stain", "models", "data", "infer", "slidelevel", "cohort",
          "view"]
PACKAGES = ["slidekit", *(f"slidekit.{s}" for s in STAGES)]
LIGHT = ["slidekit", "slidekit.base", "slidekit.slides", "slidekit.annotations", "slidekit.regions", "slidekit.infer",
         "slidekit.slidelevel", "slidekit.cohort", "slidekit.errors"]


def _error_classes() -> list[type]:
    """Every exception and warning class that slidekit.base.errors defines."""
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if c.__module__ == errors.__name__ and issubclass(c, (errors.SlidekitError, errors.SlidekitWarning))]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_of_all_resolves(package: str) -> None:
    mod = importlib.import_module(package)
    names = mod.__all__
    assert len(names) == len(set(names)), f"{package}.__all__ repeats {sorted(n for n in names if names.count(n) > 1)}"
    missing = []
    for name in names:
        try:
            getattr(mod, name)
        except AttributeError as e:
            missing.append(f"{name} ({e})")
    assert not missing, f"{package}.__all__ names what it cannot give: {missing}"
    assert set(names) <= set(dir(mod)), f"dir({package}) misses {sorted(set(names) - set(dir(mod)))}"


@pytest.mark.parametrize("package", PACKAGES)
def test_an_unknown_name_is_an_attribute_error(package: str) -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = importlib.import_module(package).no_such_name


def test_every_error_and_warning_class_is_reachable_from_the_top_level() -> None:
    classes = _error_classes()
    assert errors.FeatureError in classes and issubclass(errors.FeatureError, errors.GridError)
    for cls in classes:
        assert getattr(slidekit, cls.__name__, None) is cls, f"slidekit.{cls.__name__} is missing"
        assert cls.__name__ in slidekit.__all__, f"{cls.__name__} is not in slidekit.__all__"
        assert getattr(slidekit.base, cls.__name__, None) is cls, f"slidekit.base.{cls.__name__} is missing"


def test_the_old_errors_path_is_kept_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shim = importlib.reload(importlib.import_module("slidekit.errors"))
    for cls in _error_classes():
        assert getattr(shim, cls.__name__, None) is cls, f"slidekit.errors.{cls.__name__} is missing"
        assert cls.__name__ in shim.__all__
    from slidekit.errors import GridError, SlideError  # the old spelling
    assert SlideError is errors.SlideError and GridError is errors.GridError


def _stub_imports(stub: Path) -> dict[str, str]:
    """name -> module for every ``from M import X as X`` of a stub."""
    out = {}
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                assert a.asname == a.name, f"{stub}: {a.name} must be re-exported as itself ('as {a.name}')"
                out[a.name] = node.module or ""
    return out


def _stub_all(stub: Path) -> list[str]:
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{stub} has no __all__")


def _stubs() -> list[Path]:
    return sorted((ROOT / "slidekit").glob("**/__init__.pyi"))


@pytest.mark.parametrize("stub", _stubs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_stub_names_what_the_package_gives(stub: Path) -> None:
    package = ".".join(stub.parent.relative_to(ROOT).parts)
    mod = importlib.import_module(package)
    imported = _stub_imports(stub)
    assert set(_stub_all(stub)) == set(mod.__all__), f"{stub.name} and {package}.__all__ differ"
    assert set(imported) == set(mod.__all__), (f"{stub.name} imports {sorted(set(imported) - set(mod.__all__))}, "
                                               f"lacks {sorted(set(mod.__all__) - set(imported))}")
    for name, source in imported.items():
        assert getattr(mod, name) is getattr(importlib.import_module(source), name), f"{package}.{name} is not {source}"


def test_packages_with_lazy_names_have_stubs() -> None:
    """A package whose ``__init__`` resolves names on first use has a stub, so type checkers see them."""
    have = {".".join(p.parent.relative_to(ROOT).parts) for p in _stubs()}
    lazy = {p for p in PACKAGES if "__getattr__" in vars(importlib.import_module(p))}
    assert lazy <= have, f"lazy names without a stub: {sorted(lazy - have)}"


def test_the_package_is_typed() -> None:
    assert (ROOT / "slidekit" / "py.typed").is_file()
    data = re.search(r'^"slidekit"\s*=\s*\[([^\]]*)\]', (ROOT / "pyproject.toml").read_text(), re.M)
    assert data and "py.typed" in data.group(1) and "*.pyi" in data.group(1), \
        "pyproject's package-data must ship py.typed and the stubs"


@pytest.mark.parametrize("package", LIGHT)
def test_light_packages_do_not_load_torch(package: str) -> None:
    code = f"import sys, {package}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, f"import {package} loads torch"


# --- the docs import only from the public levels ---------------------------------------------------------------------

def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, text) of every ```python block."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang, start, body = m.group(1), m.group(2), m.group(3).lower(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if lang in ("python", "py", "pycon"):
            out.append((start, "\n".join(body)))
    return out


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """Lines outside fenced blocks."""
    out, fence = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m and fence is None:
            fence = m.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append((n, line))
    return out


def _imports_of(code: str) -> list[tuple[str, list[str], str | None]]:
    """(module, imported names, alias of a plain ``import module as alias``) of every import in ``code``."""
    try:
        tree = ast.parse(code)
    except SyntaxError:  # a fragment: its import statements one by one
        stmts = [s for s in code.splitlines() if re.match(r"\s*(from\s+\S+\s+import|import)\s", s)]
        tree = ast.Module(body=[n for s in stmts for n in _parse_or_empty(s.strip())], type_ignores=[])
    out: list[tuple[str, list[str], str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, [], a.asname) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], None))
    return out


def _parse_or_empty(stmt: str) -> list[ast.stmt]:
    try:
        return ast.parse(stmt).body
    except SyntaxError:
        return []


def _doc_imports() -> list[tuple[str, str, list[str], str | None, str]]:
    """(where, module, names, alias, code) of every slidekit/trainers import in the docs: ```python blocks
    and inline code spans such as `from slidekit import open_slide`."""
    found = []
    for path in _doc_files():
        rel = path.relative_to(ROOT)
        for line, code in _python_blocks(path):
            for module, names, alias in _imports_of(code):
                found.append((f"{rel}:{line}", module, names, alias, code))
        for line, text in _prose_lines(path):
            for span in re.findall(r"`([^`]+)`", text):
                for stmt in span.split(";"):
                    if re.match(r"\s*(from\s+\S+\s+import|import)\s", stmt):
                        for module, names, alias in _imports_of(stmt.strip()):
                            found.append((f"{rel}:{line}", module, names, alias, span))
    return [f for f in found if f[1].split(".")[0] in ("slidekit", "trainers")]


def _public_path(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "slidekit":
        return len(parts) == 1 or (len(parts) == 2 and parts[1] in STAGES)
    return parts[0] == "trainers" and len(parts) <= 2


def test_the_docs_import_only_public_paths() -> None:
    imports = _doc_imports()
    assert len(imports) > 20, "the scan found too few imports in the docs: is it still reading them?"
    bad = [f"{where}: {module}" for where, module, *_ in imports if not _public_path(module)]
    assert not bad, ("docs import from internal modules; use `slidekit` or `slidekit.<stage>` "
                     "(trainers: `trainers` or `trainers.<module>`):\n" + "\n".join(bad))


def test_every_name_the_docs_import_resolves() -> None:
    bad = []
    for where, module, names, alias, code in _doc_imports():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            bad.append(f"{where}: import {module}: {e}")
            continue
        for name in names:
            if name != "*" and not hasattr(mod, name):
                try:  # a submodule (``from slidekit.base import distributed``)
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    bad.append(f"{where}: {module} has no {name}")
        if alias and module == "slidekit":  # `import slidekit as sk`: every sk.NAME the block uses
            for name in set(re.findall(rf"\b{re.escape(alias)}\.(\w+)", code)):
                if not hasattr(mod, name):
                    bad.append(f"{where}: slidekit has no {name} ({alias}.{name})")
    assert not bad, "\n".join(bad)


def test_the_path_rule() -> None:
    assert _public_path("slidekit") and _public_path("slidekit.infer") and _public_path("trainers.s2l")
    assert not _public_path("slidekit.infer.predictor") and not _public_path("slidekit.errors")
    assert not _public_path("trainers.s2l.inner")

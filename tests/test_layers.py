"""The layout's rules, read from the code's own imports (module level and inside functions):

- no import cycles among slidekit's and the trainers' modules;
- layers import downward only, in the order of ``LAYERS`` (also the map in docs/architecture.md);
- an import inside a function names a slidekit module only to keep torch out of a light module
  (one that slide reading or the CLI's start loads): the importer must be light and the target heavy.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the longest entry that prefixes its dotted name.
LAYERS = [
    "slidekit.base",         # errors, atomic I/O, output ownership, locks, resources, timing, distributed, data paths
    "slidekit.slides",       # Slide, backends, stored tiles, overviews, the demo slide
    "slidekit.annotations",  # objects, QuPath/ASAP files, geometry, scribbles
    "slidekit.regions",      # tissue, tile grids, ROI, patch export
    "slidekit.stain",        # normalisation, augmentation
    "slidekit.models",       # networks, checkpoints, encoders, export, built-in models
    "slidekit.data",         # samplers, torch datasets
    "slidekit.infer",        # Predictor, GPU decode, heatmaps
    "slidekit.slidelevel",   # embeddings, top-K, features, staging, MIL inputs
    "trainers",              # the plug-in trainers
    "slidekit.cohort",       # one command over many slides
    "slidekit.view",         # the local web viewer (starlette, uvicorn)
    "slidekit",              # the public API (the package's __init__)
    "slidekit.cli",          # the command line
    "slidekit.__main__",
]
HEAVY_THIRD_PARTY = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "lightgbm", "ray",
                     "starlette", "uvicorn",  # the viewer's server: only `slidekit view` loads it
                     "spatialdata")  # scverse stores (dask, xarray, anndata...): only export-spatialdata loads it
MAX_TOP_LEVEL_ENTRIES = 12
# Files at the top that are not code of a stage: the PEP 561 marker, the type stub of __init__, and
# slidekit/errors.py, kept only as the old import path `from slidekit.errors import ...` (a re-export).
NOT_STAGES = ("__init__.py", "__init__.pyi", "__main__.py", "__pycache__", "py.typed", "errors.py")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted([*ROOT.glob("slidekit/**/*.py"), *ROOT.glob("trainers/**/*.py")]):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The slidekit module an import of ``name`` loads (``slidekit.x.y.Name`` -> ``slidekit.x.y``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import of ``mod``."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inside, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                found.append((base, inside, child.lineno))
                found.extend((f"{base}.{a.name}", inside, child.lineno) for a in child.names)
            visit(child, inside)

    visit(tree, False)
    return found


def _edges() -> dict[str, dict[str, tuple[bool, int]]]:
    """module -> {slidekit module it imports: (only inside functions?, first line)}."""
    edges: dict[str, dict[str, tuple[bool, int]]] = {}
    for mod in MODULES:
        out: dict[str, tuple[bool, int]] = {}
        for name, inside, line in _imports(mod):
            if not name.startswith(("slidekit", "trainers")):
                continue
            target = _resolve(name)
            if target is None or target == mod:
                continue
            if target not in out or (out[target][0] and not inside):
                out[target] = (inside, line)
        edges[mod] = out
    return edges


EDGES = _edges()


def _layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{mod} is in no layer of LAYERS"
    return LAYERS.index(best)


def _heavy() -> set[str]:
    """Modules that load torch (or another heavy library) when imported."""
    direct = {mod for mod in MODULES
              if any(not inside and name.split(".")[0] in HEAVY_THIRD_PARTY for name, inside, _ in _imports(mod))}
    heavy = set(direct)
    changed = True
    while changed:
        changed = False
        for mod, out in EDGES.items():
            if mod not in heavy and any(not inside and t in heavy for t, (inside, _) in out.items()):
                heavy.add(mod)
                changed = True
    return heavy


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_no_import_cycles():
    # Tarjan's strongly connected components over every import, inside functions included.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in EDGES[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_downward_only():
    upward = [f"{mod} (line {line}) imports {target}: {LAYERS[_layer(mod)]} is below {LAYERS[_layer(target)]}"
              for mod, out in EDGES.items() for target, (_, line) in out.items() if _layer(target) > _layer(mod)]
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_only_keep_torch_out_of_light_modules():
    heavy = _heavy()
    bad = []
    for mod, out in EDGES.items():
        for target, (inside, line) in out.items():
            if inside and not (target in heavy and mod not in heavy):
                why = "the importer loads torch anyway" if mod in heavy else f"{target} is light"
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line}: imports {target} inside a function ({why})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("light", ["slidekit", "slidekit.slides.slide", "slidekit.regions.tiling",
                                   "slidekit.regions.tissue", "slidekit.annotations.formats", "slidekit.cli",
                                   "slidekit.cohort.run"])
def test_slide_reading_and_the_cli_do_not_load_torch(light):
    assert light not in _heavy()


def test_the_package_top_level_stays_small():
    entries = [p.name for p in (ROOT / "slidekit").iterdir()
               if p.name not in NOT_STAGES and not p.name.startswith(".")]
    assert len(entries) <= MAX_TOP_LEVEL_ENTRIES, sorted(entries)
    for p in (ROOT / "slidekit").iterdir():
        if p.is_dir() and p.name != "__pycache__":
            init = p / "__init__.py"
            assert init.exists(), f"{p.name}/ is not a package"
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and "import" in doc.lower(), \
                f"{p.name}/__init__.py must say what it holds and what it may import"


def test_the_layer_order_is_the_one_docs_architecture_md_shows():
    text = (ROOT / "docs" / "architecture.md").read_text()
    positions = [text.find(f"`{layer}`") for layer in LAYERS]
    assert all(p >= 0 for p in positions), [layer for layer, p in zip(LAYERS, positions) if p < 0]
    assert positions == sorted(positions), "docs/architecture.md lists the layers in another order"

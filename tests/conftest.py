"""Shared fixtures: the real data (skipped when absent) and synthetic slides.

Real data is found by ``slidekit.base.datapaths``: ``pytest --data DIR``, else ``$SLIDEKIT_DATA``, else
``../shared/data`` beside the checkout. Tests needing it take the ``shared_data`` fixture (or skip
with a reason containing ``REAL_DATA_SKIP``); the terminal summary counts those skips.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from slidekit.base.datapaths import ENV_VAR, data_dir, data_missing_reason

# tests/ is a package (tests/__init__.py: torchstain installs a top-level `tests` that would shadow
# it); test modules that import helpers as `from conftest import ...` / `from test_x import ...`
# find them through this path entry.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Every skip for want of real data says this, so the summary can count them.
REAL_DATA_SKIP = "real data not found"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--data", default=None, metavar="DIR",
                     help="real-data folder (default: $SLIDEKIT_DATA, else ../shared/data beside the checkout)")


def pytest_configure(config: pytest.Config) -> None:
    # `--data DIR` becomes $SLIDEKIT_DATA, so that fixtures, module-level checks and the subprocesses
    # of tests (CLI runs, docs blocks) all resolve the same folder through slidekit.base.datapaths.
    if config.getoption("--data"):
        os.environ[ENV_VAR] = str(Path(config.getoption("--data")).resolve())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder, or skip the test with the reason."""
    reason = data_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return data_dir()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say how many tests were skipped and why, also without ``-rs``: those skipped for want of real
    data on one line per reason (``real data: N tests skipped: ...``), every other reason (no GPU,
    an optional package missing, ...) on one line each (``skipped: N tests: reason``)."""
    real: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if REAL_DATA_SKIP in reason:  # grouped by the reason proper, without any " — detail"
            real[reason.split(" — ")[0]] += 1
        else:
            other[" ".join(reason.split())[:200]] += 1
    for reason, n in real.items():
        terminalreporter.write_line(f"real data: {n} test{'s' if n != 1 else ''} skipped: {reason}",
                                    yellow=True)
    for reason, n in sorted(other.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"skipped: {n} test{'s' if n != 1 else ''}: {reason}", yellow=True)


@pytest.fixture(scope="session")
def demo_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo slide (real IHC tissue on glass), written once per session."""
    from slidekit.slides.demo import write_demo_slide

    return write_demo_slide(tmp_path_factory.mktemp("demo") / "demo.tif")


def synthetic_slide(path: Path, width: int = 2048, height: int = 1536, mpp: float = 0.5,
                    tissue_box: tuple[int, int, int, int] | None = (512, 256, 1024, 768),
                    tile: int = 256, compression: str = "jpeg", seed: int = 0) -> Path:
    """A pyramidal TIFF: white glass with a pink noisy 'tissue' rectangle at a known level-0 box."""
    from slidekit.slides.demo import write_pyramid

    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 245, np.uint8)
    if tissue_box is not None:
        x, y, w, h = tissue_box
        base = np.array([200, 110, 160], np.int16)
        noise = rng.integers(-25, 25, size=(h, w, 3), dtype=np.int16)
        rgb[y:y + h, x:x + w] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return write_pyramid(path, rgb, mpp, tile=tile, compression=compression)


@pytest.fixture
def one_torch_thread():
    """One torch thread: the test machine's cores are shared, and oversubscribed threads crawl."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mixed_em_slides(root: Path) -> Path:
    """Six small synthetic slides for mixed-em runs (macro/micro circles of tumour colour, one slide
    with a pixel mask) and their slides.csv; returns the CSV's path."""
    import cv2

    from slidekit.slides.demo import write_pyramid

    rng = np.random.default_rng(0)
    rows = ["slide,label,mask"]
    for i, label in enumerate(["macro", "macro", "negative", "micro", "negative", "macro"]):
        rgb = np.full((256, 256, 3), 244, np.uint8)
        rgb[16:240, 16:240] = (rng.integers(0, 30, (224, 224, 3)) + [200, 120, 170]).astype(np.uint8)
        m = np.zeros((256, 256), np.uint8)
        if label != "negative":
            cv2.circle(m, (128, 128), 60 if label == "macro" else 20, 1, -1)
            rgb[m > 0] = [90, 40, 140]
        write_pyramid(root / f"s{i}.tif", rgb, 4.0, tile=128, min_size=128)
        mask = ""
        if i == 0:
            cv2.imwrite(str(root / "m0.png"), m * 255)
            mask = "m0.png"
        rows.append(f"s{i}.tif,{label},{mask}")
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    return root / "slides.csv"


def install_trainer_plugin(tmp_path: Path, monkeypatch, package: str, source: str, entry_point: str) -> None:
    """Install a third-party trainer package (``source`` is its __init__.py) with a ``slidekit.trainers``
    entry point (``NAME = package:Class``) on sys.path, and make the registry look for it afresh."""
    import textwrap

    from trainers import registry

    pkg = tmp_path / "site"
    (pkg / package).mkdir(parents=True)
    (pkg / package / "__init__.py").write_text(textwrap.dedent(source))
    dist = pkg / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[slidekit.trainers]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_discovered", False)

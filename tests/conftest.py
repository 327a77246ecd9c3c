"""Shared fixtures: the real data in ../shared/data (skipped when absent) and synthetic slides."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test with the reason."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo slide (real IHC tissue on glass), written once per session."""
    from slidekit.demo import write_demo_slide

    return write_demo_slide(tmp_path_factory.mktemp("demo") / "demo.tif")


def synthetic_slide(path: Path, width: int = 2048, height: int = 1536, mpp: float = 0.5,
                    tissue_box: tuple[int, int, int, int] | None = (512, 256, 1024, 768),
                    tile: int = 256, compression: str = "jpeg", seed: int = 0) -> Path:
    """A pyramidal TIFF: white glass with a pink noisy 'tissue' rectangle at a known level-0 box."""
    from slidekit.demo import write_pyramid

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

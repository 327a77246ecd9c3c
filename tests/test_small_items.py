"""Small things a user meets: `info`'s backend line, the truncated-weights error, overlay glass left
untinted, a "done earlier" cohort row's seconds, and pytest's skip reasons."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_slide
from PIL import Image

from slidekit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return synthetic_slide(tmp_path_factory.mktemp("small") / "s.tif")


def test_info_names_no_vendor_as_unknown_not_none(slide):
    res = CliRunner().invoke(main, ["info", str(slide), "--backend", "tiffslide"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.strip().startswith("backend"))
    assert "None" not in line and "tiffslide" in line, line


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_weights_error_is_whole_and_says_truncated(tmp_path, slide, suffix):
    torch = pytest.importorskip("torch")
    import torchvision

    sd = torchvision.models.resnet18().state_dict()
    full = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save(sd, full)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(full))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    res = CliRunner().invoke(main, ["embed", str(slide), "--model", "resnet18", "--weights", str(cut),
                                    "--out", str(tmp_path / "e"), "-q"])
    assert res.exit_code != 0
    err = [x for x in res.output.splitlines() if x.startswith("slidekit: error")]
    assert len(err) == 1 and str(cut.name) in err[0] and "truncated" in err[0], res.output
    assert err[0].rstrip().endswith(")") and "If you are seeing" not in err[0], err[0]


def test_overlay_leaves_glass_inside_covered_tiles_untinted(tmp_path, slide):
    from slidekit import open_slide

    out = tmp_path / "h"
    res = CliRunner().invoke(main, ["heatmap", str(slide), "--out", str(out), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    with open_slide(slide) as s:  # 2048 x 1536 at 0.5 µm/px: overlay.png's image is level 0 itself
        thumb = s.read_whole(0.5)
    over = np.asarray(Image.open(out / "overlay.png").convert("RGB"))[: thumb.shape[0]]
    assert over.shape == thumb.shape
    # Glass: the slide's own glass colour, away from the tissue box (512, 256, 1024 x 768) by 16 px;
    # the tiles at the box's edges cover glass (256 px tiles on a 512-aligned box: the ring inside them).
    glass = np.ones(thumb.shape[:2], bool)
    glass[256 - 16:256 + 768 + 16, 512 - 16:512 + 1024 + 16] = False
    glass &= thumb.min(2) >= 235
    from slidekit.infer.heatmap import Heatmap

    h = Heatmap(out / "heatmap.zarr")
    _, cov = h.view(1)
    sy, sx = h.scale
    covered = np.kron(cov > 0, np.ones((int(sy), int(sx)), bool))[: thumb.shape[0], : thumb.shape[1]]
    inside = glass[: covered.shape[0], : covered.shape[1]] & covered
    assert inside.sum() > 1000, "the test needs glass inside covered tiles"
    np.testing.assert_array_equal(over[: covered.shape[0], : covered.shape[1]][inside],
                                  thumb[: covered.shape[0], : covered.shape[1]][inside])
    tissue = over[300:900, 600:1400].astype(int) - thumb[300:900, 600:1400].astype(int)
    assert np.abs(tissue).mean() > 5  # the map itself is drawn


def test_done_earlier_row_keeps_its_seconds(tmp_path, slide):
    other = synthetic_slide(tmp_path / "t.tif", seed=1)
    out = tmp_path / "OUT"
    for _ in range(2):
        res = CliRunner().invoke(main, ["tissue", str(slide), str(other), "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["note"] for r in rows] == ["done earlier"] * 2
    assert all(r["seconds"] and float(r["seconds"]) >= 0 for r in rows), rows


def test_pytest_says_why_tests_were_skipped(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "def test_gpu():\n    pytest.skip('no CUDA GPU here')\n\n"
        "def test_opt():\n    pytest.importorskip('no_such_module_for_slidekit')\n\n"
        "def test_ok():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "2 skipped" in proc.stdout, proc.stdout
    assert "skipped: 1 test: no CUDA GPU here" in proc.stdout, proc.stdout
    assert "no_such_module_for_slidekit" in proc.stdout, proc.stdout


def test_readme_gives_a_user_install_and_the_cpu_wheels_at_the_pinned_versions():
    import re

    import tomllib

    readme = (ROOT / "README.md").read_text()
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith(("torch==", "torchvision=="))]
    blocks = re.findall(r"```(\w*)\n(.*?)```", readme, re.S)
    user = [text for lang, text in blocks if "pip install ." in text and "[dev]" not in text]
    assert user and all(lang == "text" for lang, text in blocks if text in user)  # shown, not run by the docs test
    cpu = next(text for lang, text in blocks if "download.pytorch.org/whl/cpu" in text)
    assert all(pin in cpu for pin in pins) and len(pins) == 2
    dev = [text for lang, text in blocks if lang == "bash" and "install -e .[dev]" in text]
    assert dev == ["python3 -m venv .venv && .venv/bin/pip install -e .[dev]    # install\n"
                   ".venv/bin/python -m pytest -q                                # run the tests\n"]


def test_cells_roi_areas_are_clipped_to_the_slide_and_invalid_rois_repaired(tmp_path, slide):
    """A ROI drawn past the slide's edge measures only the slide's part; a self-intersecting
    (figure-eight) ROI measures what QuPath fills, not the zero of its cancelling lobes."""
    import json

    mpp = 0.5  # the synthetic slide: 2048 x 1536 px, tissue box (512, 256) 1024 x 768
    beyond = [[1024, 512], [40000, 512], [40000, 40000], [1024, 40000], [1024, 512]]
    bowtie = [[600, 300], [1000, 700], [1000, 300], [600, 700], [600, 300]]
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "name": name}}
        for name, ring in (("beyond", beyond), ("bowtie", bowtie))]}))
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["cells", str(slide), "--roi", str(roi), "--out", str(out), "--device", "cpu",
                                    "-q"])
    assert res.exit_code == 0, res.output
    with open(out / "regions.csv", newline="") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    px = mpp * mpp / 1e6
    assert float(rows["beyond"]["area_mm2"]) == pytest.approx(1024 * 1024 * px, rel=1e-6)
    assert float(rows["bowtie"]["area_mm2"]) == pytest.approx(2 * 400 * 200 / 2 * px, rel=1e-6)
    for r in rows.values():
        dens = float(r["nuclei_per_mm2"])
        assert dens == pytest.approx(int(r["nuclei"]) / float(r["area_mm2"]), rel=1e-3)
        assert 0 < float(r["tissue_mm2"]) <= float(r["area_mm2"]) + 1e-9
    assert float(rows["beyond"]["tissue_mm2"]) == pytest.approx(512 * 512 * px, rel=0.15)

"""DICOM WSI (issue 11): a series built from the shared CMU-1 slide opens as a file or a folder."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from slidekit.base.errors import SlideError
from slidekit.slides.slide import open_slide

CMU = "wsi/CMU-1-Small-Region.svs"


def dicomize(src: Path, out: Path) -> Path:
    """Convert a slide to a DICOM WSI series with wsidicomizer; return the folder.

    The single-level source is first written as a TIFF pyramid of its own pixels (2x levels),
    which wsidicomizer copies level by level: its own ``add_missing_levels`` writes partial edge
    frames that the DICOM standard does not allow (and OpenSlide rightly refuses).
    """
    pytest.importorskip("wsidicomizer")
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    from slidekit.slides.demo import write_pyramid

    with open_slide(src) as s:
        pyramid = write_pyramid(out.parent / f"{out.name}-source.tif", s.read_region((0, 0), 0, s.dimensions),
                                s.mpp[0], tile=256, min_size=256, quality=95)
    # tiffslide as the source: the opentile source needs libturbojpeg, which may be absent
    WsiDicomizer.convert(pyramid, out, tile_size=256, workers=1, include_label=False, include_overview=False,
                         include_thumbnail=False, preferred_source=SourceIdentifier.TIFFSLIDE)
    return out


@pytest.fixture(scope="module")
def cmu_dicom(tmp_path_factory) -> tuple[Path, Path]:
    from slidekit.base.datapaths import data_dir, data_missing_reason

    reason = data_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    src = data_dir() / CMU
    return src, dicomize(src, tmp_path_factory.mktemp("dicom") / "CMU-1-dicom")


def test_folder_and_file_open_with_source_geometry_mpp_and_pixels(cmu_dicom):
    src, folder = cmu_dicom
    with open_slide(src) as ref, open_slide(folder) as dcm:
        assert dcm.dimensions == ref.dimensions and dcm.name == "CMU-1-dicom"
        assert dcm.mpp == pytest.approx(ref.mpp, rel=1e-3) and dcm.mpp_source == "metadata"
        assert dcm.level_count >= 4  # the pyramid the converter built
        for lvl in range(dcm.level_count):
            w, h = dcm.level_dimensions[lvl]
            assert w == pytest.approx(ref.dimensions[0] / dcm.level_downsamples[lvl], abs=1)
        a = ref.read_region((0, 0), 0, ref.dimensions).astype(np.int16)
        b = dcm.read_region((0, 0), 0, dcm.dimensions).astype(np.int16)
        err = np.abs(a - b).mean()
        shifted = np.abs(a[:, 8:] - b[:, :-8]).mean()  # the same tissue 8 px off
        assert err < 5 and err < shifted / 3  # JPEG re-encoding only
        # one file of the series opens the same slide
        one = sorted(folder.glob("*.dcm"))[0]
        with open_slide(one) as f:
            assert f.dimensions == dcm.dimensions and f.level_count == dcm.level_count
        # reads at another MPP through the pyramid
        s = dcm.read_scaled((0, 0), (200, 150), 2.0)
        r = ref.read_scaled((0, 0), (200, 150), 2.0)
        assert s.shape == r.shape and np.abs(s.astype(int) - r).mean() < 5


def test_dicom_folder_pickles_tiles_and_fingerprints(cmu_dicom):
    from slidekit.regions.tiling import TileGrid, read_tiles

    _, folder = cmu_dicom
    slide = open_slide(folder)
    clone = pickle.loads(pickle.dumps(slide))  # as DataLoader workers get it
    grid = TileGrid.from_slide(slide, mpp=1.0, size=128, min_tissue=0)
    assert grid.slide_id
    tiles = [t for _, t in read_tiles(clone, grid)]
    assert len(tiles) == len(grid) and tiles[0].shape == (128, 128, 3)
    grid.check_slide(open_slide(folder))
    slide.close()


def test_cohort_counts_a_dicom_folder_as_one_slide(cmu_dicom, tmp_path):
    from click.testing import CliRunner

    from slidekit.cli import main
    from slidekit.cohort.manifest import read_slides

    src, folder = cmu_dicom
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copytree(folder, cohort / "case1")
    (cohort / "case2.svs").symlink_to(src)
    slides = read_slides([str(cohort)])
    assert sorted(s.slide.name for s in slides) == ["case1", "case2.svs"]
    assert [s.slide.name for s in read_slides(str(cohort / "case1"))] == ["case1"]
    res = CliRunner().invoke(main, ["info", str(cohort / "case1")])
    assert res.exit_code == 0 and "openslide (dicom)" in res.output, res.output


def test_folders_that_are_not_one_dicom_series(cmu_dicom, tmp_path):
    _, folder = cmu_dicom
    with pytest.raises(SlideError, match="is a directory, not a slide file"):
        open_slide(tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    for i, f in enumerate(sorted(folder.glob("*.dcm"))[:1]):
        shutil.copy(f, two / f"a{i}.dcm")
    src = dicomize(Path(cmu_dicom[0]), tmp_path / "other")
    shutil.copy(sorted(src.glob("*.dcm"))[0], two / "b.dcm")
    with pytest.raises(SlideError, match="holds 2 DICOM WSI series"):
        open_slide(two)


def test_stored_frames_take_the_native_fast_path(cmu_dicom):
    from slidekit.regions.tiling import TileGrid, native_tiles_for, read_tiles
    from slidekit.slides.dicom import DicomStoredTiles

    _, folder = cmu_dicom
    with open_slide(folder) as slide:
        assert isinstance(slide.stored_tiles(0), DicomStoredTiles)
        for size in (256, 200):  # aligned with the 256² frames, and cut across them
            grid = TileGrid.from_slide(slide, mpp=slide.mpp[0], size=size, min_tissue=0)
            native = native_tiles_for(slide, grid)
            assert native is not None
            for (x, y), tile in read_tiles(slide, grid):
                ref = slide.read_region((x, y), 0, (size, size), verify=False)
                assert np.array_equal(tile, ref)

"""Stain normalisation in the inference path: Predictor, heatmap, embed, checkpoints, CLI, export."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from slidekit.base.errors import CheckpointError, StainWarning
from slidekit.cli import main
from slidekit.infer.heatmap import Heatmap
from slidekit.infer.predictor import heatmap_slide
from slidekit.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec
from slidekit.regions.tiling import TileGrid, TileReader
from slidekit.stain.normalize import StainNormalizer

SPEC = dict(arch="resnet-classifier", backbone="resnet18", classes=["a", "b"], patch_size=64, mpp=0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small stained slide, a reference image of other colours, and a tiny classifier checkpoint."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    from slidekit.slides.demo import write_pyramid

    root = tmp_path_factory.mktemp("stain")
    rgb = immunohistochemistry()[:256, :256]
    slide = write_pyramid(root / "s.tif", rgb, 0.5, tile=128, min_size=128)
    # The reference: the same tissue with its stains shifted (bluer, paler), so normalising changes tiles.
    ref = np.clip(rgb.astype(float) * [0.8, 0.9, 1.15] + [20, 10, 0], 0, 255).astype(np.uint8)
    Image.fromarray(ref).save(root / "ref.png")
    torch.manual_seed(0)
    net = ResNetClassifier("resnet18", 2).eval()
    ckpt = save_checkpoint(root / "plain.pt", net, ModelSpec(**SPEC))
    norm = StainNormalizer.load(root / "ref.png", method="macenko")
    stained = save_checkpoint(root / "stained.pt", net, ModelSpec(**SPEC, stain=norm.to_dict()))
    return {"root": root, "slide": slide, "ref": root / "ref.png", "ckpt": ckpt, "stained": stained, "net": net}


@pytest.fixture(scope="module")
def runs(files: dict) -> dict:
    """Heatmaps of the plain checkpoint without and with --stain-norm macenko (made once)."""
    return {"plain": _run(files, files["root"] / "plain"),
            "norm": _run(files, files["root"] / "norm", stain_norm="macenko", stain_ref=files["ref"])}


def _values(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return Heatmap(out / "heatmap.zarr").tiles


def _run(files: dict, out: Path, model: str = "ckpt", **kw) -> dict:
    return heatmap_slide(files["slide"], out, model=files[model], workers=0, device="cpu", progress=False,
                         min_tissue=0.0, batch_size=16, tissue={"mpp": 2.0, "min_area_um2": 100.0}, **kw)


def test_heatmap_stain_norm_is_the_normaliser_then_the_model(files: dict, runs: dict) -> None:
    plain, s = runs["plain"], runs["norm"]
    assert plain["stain"]["method"] is None and s["stain"]["source"] == "option"
    assert s["stain"]["method"] == "macenko" and isinstance(s["stain"]["unchanged_tiles"], int)
    coords, got = _values(files["root"] / "norm")
    _, without = _values(files["root"] / "plain")
    assert np.abs(got - without).max() > 1e-4  # normalising changed what the model saw
    # By hand: the grid's tiles, the normaliser, then the model.
    from slidekit.slides.slide import open_slide

    ck = load_checkpoint(files["ckpt"])
    with open_slide(files["slide"]) as slide:
        grid = TileGrid.from_slide(slide, mpp=0.5, size=64, mask=None, min_tissue=0.0)
        order = {tuple(c): i for i, c in enumerate(grid.coords.tolist())}
        _, tiles = TileReader(slide, grid).read_batch(np.array([order[tuple(c)] for c in coords.tolist()]))
    x = StainNormalizer.load(files["ref"], method="macenko")(torch.from_numpy(tiles))
    with torch.inference_mode():
        want = ck.spec.activate(ck.model(ck.spec.normalize(x))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_checkpoint_stain_applies_by_default_and_none_turns_it_off(files: dict, runs: dict,
                                                                   tmp_path: Path) -> None:
    from slidekit.infer.predictor import resolve_stain

    spec = load_checkpoint(files["stained"]).spec
    with warnings.catch_warnings():
        warnings.simplefilter("error", StainWarning)  # the checkpoint's own reference: nothing to say
        s = _run(files, tmp_path / "ckpt", model="stained")
        ref_json = StainNormalizer.load(files["ref"]).save(tmp_path / "ref.json")
        norm, info = resolve_stain(spec, "macenko", ref_json)
    assert norm.to_dict() == spec.stain and info["source"] == "option"
    assert s["stain"]["source"] == "checkpoint" and s["stain"]["method"] == "macenko"
    np.testing.assert_allclose(_values(tmp_path / "ckpt")[1], _values(files["root"] / "norm")[1], atol=1e-6)
    out = tmp_path / "ckpt"  # the same folder: turning it off must recompute, not reuse
    with pytest.warns(StainWarning, match="instead of the checkpoint's macenko") as rec:
        off = _run(files, out, model="stained", stain_norm="none")
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert not off.get("skipped") and off["stain"] == {"method": None, "source": "option", "unchanged_tiles": None,
                                                         "remark": None}
    np.testing.assert_allclose(_values(out)[1], _values(files["root"] / "plain")[1], atol=1e-6)
    with pytest.warns(StainWarning, match="reinhard normalisation"):
        resolve_stain(spec, "reinhard", files["ref"])


def test_a_rerun_with_another_normalisation_is_not_reused(files: dict, tmp_path: Path) -> None:
    out = tmp_path / "hm"
    first = _run(files, out)
    assert _run(files, out).get("skipped")  # same options: the finished slide is skipped
    second = _run(files, out, stain_norm="reinhard", stain_ref=files["ref"])
    assert not second.get("skipped") and second["config_key"] != first["config_key"]
    assert json.loads((out / "summary.json").read_text())["stain"]["method"] == "reinhard"
    assert _run(files, out, stain_norm="reinhard", stain_ref=files["ref"]).get("skipped")
    from slidekit.infer.predictor import resolve_stain

    keys = {m: resolve_stain(load_checkpoint(files["ckpt"]).spec, m, files["ref"])[1]["key"]
            for m in ("macenko", "reinhard")}
    assert len(set(keys.values())) == 2  # each reference enters the configuration key


def test_embed_applies_the_normalisation_and_records_it(files: dict, tmp_path: Path) -> None:
    from slidekit.slidelevel.embed import embed_slide, open_embeddings

    kw = dict(workers=0, device="cpu", progress=False, min_tissue=0.0)
    plain = open_embeddings(embed_slide(files["slide"], tmp_path / "e.zarr", model=files["ckpt"], **kw))
    f0 = np.asarray(plain.features[:])
    norm = open_embeddings(embed_slide(files["slide"], tmp_path / "e.zarr", model=files["ckpt"], stain_norm="macenko",
                                       stain_ref=files["ref"], **kw))  # same store: recomputed, not reused
    assert norm.attrs["stain"]["method"] == "macenko" and "stain_unchanged_tiles" in norm.attrs
    assert np.abs(np.asarray(norm.features[:]) - f0).max() > 1e-4
    ck = open_embeddings(embed_slide(files["slide"], tmp_path / "c.zarr", model=files["stained"], **kw))
    np.testing.assert_allclose(np.asarray(ck.features[:]), np.asarray(norm.features[:]), atol=1e-5)


def test_old_checkpoints_load_and_a_bad_stain_is_a_checkpoint_error(files: dict, tmp_path: Path) -> None:
    payload = read_checkpoint(files["ckpt"])
    payload["spec"].pop("stain", None)  # as written before the field existed
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").spec.stain is None
    assert load_checkpoint(files["stained"]).spec.stain["method"] == "macenko"
    for bad in ({"method": "vahadane"}, {"method": "macenko", "version": 1}, "macenko"):
        payload["spec"]["stain"] = bad
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="stain") as e:
            load_checkpoint(tmp_path / "bad.pt")
        assert "bad.pt" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--stain-norm", "macenko"], "--stain-ref"),
    (["--stain-ref", "REF"], "--stain-norm"),
    (["--stain-norm", "reinhard", "--stain-ref", "missing.png"], "not found"),
])
def test_cli_stain_options_fail_in_one_line(files: dict, tmp_path: Path, args: list, message: str) -> None:
    args = [a.replace("REF", str(files["ref"])) for a in args]
    for cmd in (["heatmap", str(files["slide"]), "--out", str(tmp_path / "o")],
                ["embed", str(files["slide"]), "--model", str(files["ckpt"]), "--out", str(tmp_path / "e.zarr")]):
        r = CliRunner().invoke(main, cmd + args)
        assert r.exit_code != 0
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "e.zarr").exists()


def test_cli_heatmap_with_stain_norm_writes_it_in_the_summary(files: dict, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["heatmap", str(files["slide"]), "--out", str(tmp_path / "o"), "--model",
                                  str(files["stained"]), "--workers", "0", "--device", "cpu", "--min-tissue", "0",
                                  "--tissue-mpp", "2", "--tissue-min-area", "100", "-q", "--stain-norm", "none"])
    assert r.exit_code == 0, r.output
    warns = [line for line in r.output.splitlines() if line.startswith("slidekit: warning:")]
    assert len(warns) == 1 and "checkpoint's macenko" in warns[0]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["stain"]["source"] == "option"


def test_export_of_a_stained_checkpoint_warns_and_writes_the_reference(files: dict, tmp_path: Path) -> None:
    from slidekit.models.export import export_model

    with pytest.warns(StainWarning, match="normalised tiles") as rec:
        export_model(files["stained"], "wsinfer", tmp_path / "ws")
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    ref = tmp_path / "ws" / "stain_reference.json"
    assert str(ref) in str(rec[0].message)
    assert StainNormalizer.load(ref).to_dict() == load_checkpoint(files["stained"]).spec.stain
    r = CliRunner().invoke(main, ["export", str(files["stained"]), "--to", "torchscript", str(tmp_path / "m.pt")])
    assert r.exit_code == 0 and r.output.count("slidekit: warning:") == 1
    assert (tmp_path / "m.pt.stain_reference.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StainWarning)  # a checkpoint without stain: nothing said or written
        export_model(files["ckpt"], "torchscript", tmp_path / "p.pt")
    assert not (tmp_path / "p.pt.stain_reference.json").exists()


def test_cohort_runs_pass_the_stain_options_and_redo_slides_when_they_change(files: dict, tmp_path: Path) -> None:
    import shutil

    for name in ("a.tif", "b.tif"):
        shutil.copy(files["slide"], tmp_path / name)
    args = ["heatmap", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(tmp_path / "o"), "--model",
            str(files["ckpt"]), "--device", "cpu", "--min-tissue", "0", "--tissue-mpp", "2", "--tissue-min-area",
            "100", "-q", "--stain-ref", str(files["ref"]), "--stain-norm"]
    for method in ("macenko", "reinhard"):
        r = CliRunner().invoke(main, args + [method])
        assert r.exit_code == 0 and "2 done" in r.output, r.output
        summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "o").glob("*/summary.json"))]
        assert [s["stain"]["method"] for s in summaries] == [method, method]


def test_he_normalisation_of_an_ihc_slide_is_remarked(files: dict, shared_data: Path, tmp_path: Path) -> None:
    """Macenko to an H&E reference applied to the real Ki67/DAB slide (OS-2) says so, in a StainWarning
    and in the summary; on the real H&E slides (CMU-1, the TCGA frozen section) nothing is said."""
    import warnings

    from PIL import Image

    import slidekit
    from slidekit.base.errors import StainWarning
    from slidekit.infer.predictor import check_slide_stains

    wsi = shared_data / "wsi"
    with slidekit.open_slide(wsi / "CMU-1-Small-Region.svs") as he:
        Image.fromarray(he.read_region((600, 600), 0, (512, 512))).save(tmp_path / "he_ref.png")
    norm = StainNormalizer.load(tmp_path / "he_ref.png", method="macenko")
    for name, mpp in (("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)):
        with slidekit.open_slide(wsi / name, mpp=mpp) as s, warnings.catch_warnings():
            warnings.simplefilter("error", StainWarning)
            assert check_slide_stains(s, norm) is None
    with slidekit.open_slide(wsi / "OS-2-ndpi.ome.tif") as s:
        assert check_slide_stains(s, None) is None  # nothing applied, nothing read or said
        with pytest.warns(StainWarning, match="OS-2-ndpi.ome.tif: its tissue shows no eosin"):
            assert "macenko normalisation to an H&E reference" in check_slide_stains(s, norm)
    ckpt = save_checkpoint(tmp_path / "m.pt", files["net"], ModelSpec(**{**SPEC, "mpp": 2.0}))
    with pytest.warns(StainWarning, match="shows no eosin"):
        s = heatmap_slide(wsi / "OS-2-ndpi.ome.tif", tmp_path / "ihc", model=ckpt, workers=0, device="cpu",
                          progress=False, stain_norm="macenko", stain_ref=tmp_path / "he_ref.png")
    assert "shows no eosin" in s["stain"]["remark"]

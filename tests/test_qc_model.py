"""QC by example (slidekit.regions.qc_model): a pixel classifier trained from QuPath scribbles over one
yellow smudge (an artefact the built-in rules miss) and over good tissue finds the other, unscribbled
smudges through ``qc_labels(models=...)`` and leaves clean tissue alone; it saves and loads; bad input
is refused in one line."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import LineString

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import ConfigError
from slidekit.regions.qc_detect import LABELS, qc_labels
from slidekit.regions.qc_model import QcModel, train_qc_model
from slidekit.slides.demo import write_pyramid
from slidekit.slides.slide import open_slide

N = 2048  # px at 1 µm/px; the QC raster is 8 µm/px (256 px)
SMUDGES = [(500, 500, 160), (1500, 600, 140), (600, 1500, 150), (1450, 1450, 170)]


@pytest.fixture(scope="module")
def smudged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (N, N)).astype(np.float32), (0, 0), 1.5)
    noise /= noise.std()
    rgb = np.clip(np.array([215, 140, 185], np.float32) + noise[..., None] * [12, 20, 14], 0, 255).astype(np.uint8)
    rgb[:, :100] = 242  # a strip of glass
    truth = np.zeros((N, N), np.uint8)
    for x, y, r in SMUDGES:
        cv2.circle(truth, (x, y), r, 1, -1)
    smudge = np.clip(np.array([225, 205, 95], np.float32) + noise[..., None] * [6, 6, 6], 0, 255).astype(np.uint8)
    rgb[truth > 0] = smudge[truth > 0]
    root = tmp_path_factory.mktemp("qcmodel")
    slide = write_pyramid(root / "smudged.tif", rgb, 1.0)
    # scribbles: one line across the first smudge, two over clean tissue, one over the glass
    x, y, r = SMUDGES[0]
    anns = [Annotation(LineString([(x - r * 0.7, y), (x + r * 0.7, y + 20)]), label="Smudge"),
            Annotation(LineString([(300, 1000), (1000, 1050), (1900, 1000)]), label="Tissue"),
            Annotation(LineString([(1000, 200), (1050, 1900)]), label="Tissue"),
            Annotation(LineString([(50, 100), (50, 1900)]), label="Tissue")]  # "good" covers glass too
    scribbles = write_geojson(anns, root / "scribbles.geojson")
    return {"slide": slide, "truth": truth > 0, "scribbles": scribbles, "root": root}


def _on(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask.astype(np.float32), shape[::-1], interpolation=cv2.INTER_AREA) > 0.5


def test_scribbles_teach_an_artefact_the_rules_miss(smudged: dict) -> None:
    with open_slide(smudged["slide"]) as s:
        plain, mpp, _ = qc_labels(s)
        model = train_qc_model(s, smudged["scribbles"], artefact="Smudge", label="Dark debris")
        labels, _, _ = qc_labels(s, models=[model])
    truth = _on(smudged["truth"], labels.shape)
    others = truth.copy()
    x, y, r = SMUDGES[0]
    others[: (y + r) // 8 + 2, : (x + r) // 8 + 2] = False  # the scribbled smudge left out
    assert (plain[truth] == LABELS["Dark debris"]).mean() < 0.05  # the built-in rules miss it
    found = labels == LABELS["Dark debris"]
    assert found[others].mean() > 0.9
    clean = ~cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert found[clean].mean() < 0.02
    assert model.trained_on["artefact_pixels"] > 0 and model.trained_on["good_pixels"] > 0


def test_a_model_for_out_of_focus_keeps_its_calls(smudged: dict) -> None:
    """A model may name any QC class, "Out of focus" too: its calls stand beside the focus rule's own (such
    a model used to stop QC with a KeyError)."""
    with open_slide(smudged["slide"]) as s:
        model = train_qc_model(s, smudged["scribbles"], artefact="Smudge", label="Out of focus")
        labels, _, not_measured = qc_labels(s, models=[model])
    truth = _on(smudged["truth"], labels.shape)
    assert not_measured == [] and (labels[truth] == LABELS["Out of focus"]).mean() > 0.9


def test_save_and_load_predict_the_same(smudged: dict, tmp_path: Path) -> None:
    with open_slide(smudged["slide"]) as s:
        model = train_qc_model(s, smudged["scribbles"], artefact="Smudge", label="Fold")
        rgb = s.read_whole(8.0, progress=False)
    path = model.save(tmp_path / "smudge.qcmodel")
    again = QcModel.load(path)
    assert again.label == "Fold" and again.mpp == model.mpp
    assert np.array_equal(again.predict(rgb, 8.0), model.predict(rgb, 8.0))
    with pytest.raises(ConfigError, match="within 1.5x"):
        model.predict(rgb, 32.0)


def test_bad_input_is_refused(smudged: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a QC class"):
        train_qc_model(smudged["slide"], smudged["scribbles"], artefact="Smudge", label="Smudge")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the label that matches no scribble is also warned about
        with pytest.raises(ConfigError, match="no scribbled pixels of class 'Bubble'"):
            train_qc_model(smudged["slide"], smudged["scribbles"], artefact="Bubble", label="Fold")
    junk = tmp_path / "junk.qcmodel"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="junk.qcmodel"):
        QcModel.load(junk)


def test_cli_qc_train_then_qc_with_the_model(smudged: dict, tmp_path: Path) -> None:
    """`slidekit qc-train` writes a model from the scribbles; `slidekit qc --qc-model` counts what it finds in
    its class, records the model file in the configuration (another model: redone), and a file that is not a
    model is one line before any work."""
    import json

    from click.testing import CliRunner

    from slidekit.cli import main

    model = tmp_path / "smudge.qcmodel"
    r = CliRunner().invoke(main, ["qc-train", str(smudged["slide"]), "--scribbles", str(smudged["scribbles"]),
                                  "--artefact-class", "Smudge", "--qc-class", "Dark debris", "--out", str(model)])
    assert r.exit_code == 0 and "Dark debris model from" in r.output and model.exists(), r.output
    plain = CliRunner().invoke(main, ["qc", str(smudged["slide"]), "--out", str(tmp_path / "plain"), "-q"])
    r = CliRunner().invoke(main, ["qc", str(smudged["slide"]), "--qc-model", str(model), "--out",
                                  str(tmp_path / "qc"), "-q"])
    assert plain.exit_code in (0, 1) and r.exit_code in (0, 1), r.output  # 1: the verdict may fail
    before = json.loads((tmp_path / "plain" / "qc.json").read_text())["classes"]["Dark debris"]["fraction_of_tissue"]
    after = json.loads((tmp_path / "qc" / "qc.json").read_text())["classes"]["Dark debris"]["fraction_of_tissue"]
    assert before < 0.01 < after
    summary = json.loads((tmp_path / "qc" / "summary.json").read_text())
    assert summary["config"]["qc"]["models"][0].startswith(str(model))
    junk = tmp_path / "junk.qcmodel"
    junk.write_bytes(b"not a model")
    r = CliRunner().invoke(main, ["qc", str(smudged["slide"]), "--qc-model", str(junk), "--out", str(tmp_path / "j")])
    assert r.exit_code != 0 and "junk.qcmodel: not a readable QC model" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "j").exists()

"""Cohort -> MIL in one step (issue 29 item 5): `embed` over a manifest with label/patient columns writes
OUT/cohort.csv and OUT/<id>/features.h5; `train mil --cohort OUT` and `mil-deploy --cohort OUT` find each
slide's features by its id, and a slide whose embed row is not done is one line (a warning in training, a
failed row in deploy)."""
from __future__ import annotations

import csv

import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_slide

from slidekit.cli import main
from slidekit.models.checkpoint import save_checkpoint
from slidekit.models.networks import ResNetClassifier
from slidekit.models.spec import ModelSpec


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("milcohort")
    rows = []
    for i in range(8):
        slide = synthetic_slide(root / f"s{i}.tif", width=768, height=512, tissue_box=(128, 128, 512, 256), seed=i)
        rows.append({"slide": slide.name, "label": "ab"[i % 2], "patient": f"p{i // 2}"})
    blank = synthetic_slide(root / "blank.tif", width=768, height=512, tissue_box=None)  # no tissue: embed fails
    rows.append({"slide": blank.name, "label": "a", "patient": "p9"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-encoder", task="embedding", classes=[], patch_size=32, mpp=4.0,
                     mean=(0.5,) * 3, std=(0.5,) * 3, activation="none", trainer="simclr")
    model = save_checkpoint(root / "enc.pt", ResNetClassifier("resnet18", 0), spec)
    r = CliRunner().invoke(main, ["embed", "--manifest", str(root / "manifest.csv"), "--model", str(model),
                                  "--out", str(root / "E"), "--device", "cpu", "--quiet"])
    status = {x["id"]: x["status"] for x in _csv(root / "E" / "cohort.csv")}
    assert status["blank"] == "failed" and sum(s == "done" for s in status.values()) == 8, r.output
    return root


def test_train_and_deploy_a_cohort_by_its_ids(embedded):
    root = embedded
    E = root / "E"
    r = CliRunner().invoke(main, ["train", "mil", "--cohort", str(E), "--out", str(root / "run"), "--set", "folds=2",
                                  "--set", "epochs=2", "--set", "bootstrap=0", "--set", "hidden=16",
                                  "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if "left out of training" in ln]
    assert len(warned) == 1 and "blank: its embed row is failed" in warned[0], r.output
    oof = {x["slide"]: x for x in _csv(root / "run" / "oof.csv")}
    assert sorted(oof) == [f"s{i}" for i in range(8)]
    assert [oof[f"s{i}"]["label"] for i in range(4)] == ["a", "b", "a", "b"] and oof["s3"]["patient"] == "p1"

    r = CliRunner().invoke(main, ["mil-deploy", "--cohort", str(E), "--model", str(root / "run" / "checkpoint.pt"),
                                  "--out", str(root / "scored.csv"), "--quiet"])
    assert r.exit_code == 1 and "9 slide(s) scored (1 failed)" in r.output, r.output
    scored = {x["slide"]: x for x in _csv(root / "scored.csv")}
    assert sorted(scored) == ["blank"] + [f"s{i}" for i in range(8)]
    assert all(scored[f"s{i}"]["status"] == "done" and scored[f"s{i}"]["label"] == "ab"[i % 2] for i in range(8))
    assert scored["blank"]["status"] == "failed" and "blank: its embed row is failed" in scored["blank"]["error"]

    # slides and cohort together are one line; a folder that is not an embed cohort too
    r = CliRunner().invoke(main, ["train", "mil", "--cohort", str(E), "--set", "slides=x.csv", "--out",
                                  str(root / "run2"), "--quiet"])
    assert r.exit_code != 0 and "cohort" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["mil-deploy", "--cohort", str(root), "--model", str(root / "run" / "checkpoint.pt"),
                                  "--out", str(root / "s2.csv"), "--quiet"])
    assert r.exit_code != 0 and "no cohort.csv" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_damaged_cohort_table_is_one_line(tmp_path):
    """cohort.csv that is binary, or a CSV of something else: one line naming the file, through the CLI."""
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "cohort.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    other = tmp_path / "other"
    other.mkdir()
    (other / "cohort.csv").write_text("slide,label\na.svs,x\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cohort.csv").write_text("")
    for folder, why in ((bad, "not UTF-8 text"), (other, "no 'id' and 'status' columns"),
                        (empty, "no 'id' and 'status' columns")):
        r = CliRunner().invoke(main, ["train", "mil", "--cohort", str(folder), "--out", str(tmp_path / "run"),
                                      "--quiet"])
        assert r.exit_code != 0 and why in r.output and str(folder / "cohort.csv") in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_a_changed_cohort_is_refused_before_its_table_is_rewritten(embedded, tmp_path):
    """A finished `train mil --cohort` run whose cohort has other done slides now is refused in one line,
    and its cohort_slides.csv (the record of what it trained on) is left as it was."""
    import shutil

    E = tmp_path / "E"
    shutil.copytree(embedded / "E", E)
    args = ["train", "mil", "--cohort", str(E), "--out", str(tmp_path / "run"), "--set", "folds=2", "--set",
            "epochs=1", "--set", "bootstrap=0", "--set", "hidden=16", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    table = (tmp_path / "run" / "cohort_slides.csv").read_bytes()
    assert CliRunner().invoke(main, args).exit_code == 0  # the same cohort: finished, nothing rewritten
    rows = _csv(E / "cohort.csv")
    for r in rows:
        if r["id"] == "s7":
            r["status"] = "failed"  # one slide fewer done since the run
    with open(E / "cohort.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "another slide table" in r.output and "--restart" in r.output, r.output
    assert "Traceback" not in r.output
    assert (tmp_path / "run" / "cohort_slides.csv").read_bytes() == table

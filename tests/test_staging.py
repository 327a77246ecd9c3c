"""pN staging (CAMELYON17 rules), ordered quadratic weighted kappa, CSV handling, `slidekit stage`."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from sklearn.metrics import cohen_kappa_score

from slidekit import LabelError, pn_stage, weighted_kappa
from slidekit.base.datapaths import data_dir, data_missing_reason
from slidekit.cli import main
from slidekit.slidelevel.staging import PN_STAGES, read_label_csv, stage_csv, stage_table

CAMELYON = data_dir() / "camelyon" / "stage_labels.csv"
needs_camelyon = pytest.mark.skipif(not CAMELYON.exists(),
                                    reason=data_missing_reason() or f"real data not found: {CAMELYON}")


@pytest.mark.parametrize("labels,stage", [
    (["negative"] * 5, "pN0"),
    (["negative", "itc", "negative", "itc", "negative"], "pN0(i+)"),
    (["itc", "micro", "negative", "negative", "itc"], "pN1mi"),
    (["micro"] * 5, "pN1mi"),
    (["macro", "negative", "negative", "negative", "negative"], "pN1"),
    (["negative", "itc", "macro", "macro", "micro"], "pN1"),      # patient_017: ITC does not count
    (["itc", "itc", "macro", "micro", "macro"], "pN1"),           # 3 metastatic nodes + 2 ITC
    (["itc", "micro", "macro", "micro", "macro"], "pN2"),         # patient_026: 4 metastatic nodes
    (["macro"] * 5, "pN2"),
    ([" Macro ", "MICRO", "Negative"], "pN1"),                    # case and spaces ignored
])
def test_pn_stage_rules(labels, stage):
    assert pn_stage(labels) == stage


def test_pn_stage_rejects_unknown_and_empty():
    with pytest.raises(LabelError, match="unknown node label"):
        pn_stage(["negative", "tumour"])
    with pytest.raises(LabelError):
        pn_stage([])


@needs_camelyon
def test_all_100_camelyon17_patients_staged_right():
    table = read_label_csv(CAMELYON)
    assert len(table.patients) == 100 and len(table.nodes) == 500
    stages = stage_table(table.nodes)
    wrong = {p: (stages[p], s) for p, s in table.patients.items() if stages[p] != s}
    assert wrong == {}


def test_kappa_equals_sklearn_with_ordered_labels():
    rng = random.Random(0)
    for n in (5, 30, 100):
        ref = [rng.choice(PN_STAGES) for _ in range(n)]
        # predictions near the reference, so kappa is informative (not ~0)
        pred = [PN_STAGES[min(4, max(0, PN_STAGES.index(r) + rng.choice([-1, 0, 0, 1])))] for r in ref]
        ours = weighted_kappa(ref, pred)
        theirs = cohen_kappa_score(ref, pred, labels=list(PN_STAGES), weights="quadratic")
        assert ours == pytest.approx(theirs, abs=1e-12)
        # alphabetical order ("pN0", "pN0(i+)", "pN1", "pN1mi", "pN2") gives another number
        alpha = cohen_kappa_score(ref, pred, weights="quadratic")
        assert ours != pytest.approx(alpha, abs=1e-6)


def test_kappa_perfect_and_undefined():
    assert weighted_kappa(["pN1", "pN2", "pN0"], ["pN1", "pN2", "pN0"]) == 1.0
    assert weighted_kappa(["pN0"] * 3, ["pN0"] * 3) == 1.0
    with pytest.raises(LabelError):
        weighted_kappa(["pN0", "pN3"], ["pN0", "pN0"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


NODES = """patient,stage
patient_000.zip,
patient_000_node_0.tif,negative
patient_000_node_1.tif,negative
patient_000_node_2.tif,itc
patient_000_node_3.tif,negative
patient_000_node_4.tif,negative
patient_001_node_0.tif,macro
patient_001_node_1.tif,micro
patient_001_node_2.tif,negative
patient_001_node_3.tif,negative
patient_001_node_4.tif,negative
"""


def test_stage_csv_writes_submission(tmp_path):
    nodes = _write(tmp_path / "nodes.csv", NODES)
    ref = _write(tmp_path / "ref.csv", "patient,stage\npatient_000.zip,pN0(i+)\npatient_001.zip,pN2\n")
    r = stage_csv(nodes, tmp_path / "out.csv", reference=ref)
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "patient,stage"
    assert lines[1] == "patient_000.zip,pN0(i+)" and lines[2] == "patient_000_node_0.tif,negative"
    assert lines[7] == "patient_001.zip,pN1" and len(lines) == 13
    expected = cohen_kappa_score(["pN0(i+)", "pN2"], ["pN0(i+)", "pN1"], labels=list(PN_STAGES),
                                 weights="quadratic")
    assert r["kappa"] == pytest.approx(expected)
    # the written submission reads back and stages the same
    back = read_label_csv(tmp_path / "out.csv")
    assert back.patients == {"patient_000": "pN0(i+)", "patient_001": "pN1"}


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("name,label\npatient_000_node_0.tif,negative\n", "header"),
    ("patient_000_node_0.tif,negative\n", "header"),
    ("patient,stage\npatient_000_node_0.tif,negative,extra\n", "line 2: expected 2 columns"),
    ("patient,stage\npatient_000_node_0.tif,tumor\n", "line 2: unknown node label"),
    ("patient,stage\nslide_7.tif,negative\n", "neither"),
    ("patient,stage\npatient_000_node_0.tif,negative\npatient_000_node_0.tif,itc\n", "twice"),
    ("patient,stage\npatient_000.zip,pN0\n", "no node rows"),
])
def test_bad_node_csvs(tmp_path, text, match):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(LabelError, match=match) as e:
        stage_csv(path, tmp_path / "out.csv")
    assert "bad.csv" in str(e.value)
    assert not (tmp_path / "out.csv").exists()


def test_reference_problems(tmp_path):
    nodes = _write(tmp_path / "nodes.csv", NODES)
    missing = _write(tmp_path / "ref.csv", "patient,stage\npatient_000.zip,pN0\n")
    with pytest.raises(LabelError, match="not in the reference.*patient_001"):
        stage_csv(nodes, tmp_path / "out.csv", reference=missing)
    extra = _write(tmp_path / "ref2.csv",
                   "patient,stage\npatient_000.zip,pN0\npatient_001.zip,pN1\npatient_002.zip,pN2\n")
    with pytest.raises(LabelError, match="no prediction.*patient_002"):
        stage_csv(nodes, tmp_path / "out.csv", reference=extra)
    bad = _write(tmp_path / "ref3.csv", "patient,stage\npatient_000.zip,pN3\n")
    with pytest.raises(LabelError, match="unknown pN stage"):
        stage_csv(nodes, tmp_path / "out.csv", reference=bad)
    with pytest.raises(LabelError, match="not found"):
        stage_csv(nodes, tmp_path / "out.csv", reference=tmp_path / "nope.csv")
    assert not (tmp_path / "out.csv").exists()


@needs_camelyon
def test_cli_stage_camelyon17(tmp_path):
    out = tmp_path / "patients.csv"
    res = CliRunner().invoke(main, ["stage", str(CAMELYON), "--out", str(out), "--reference", str(CAMELYON)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == "kappa: 1.0000"
    assert out.read_text() == CAMELYON.read_text()


def test_cli_stage_bad_csv_one_line(tmp_path):
    bad = _write(tmp_path / "bad.csv", "patient,stage\npatient_000_node_0.tif,tumor\n")
    res = CliRunner().invoke(main, ["stage", str(bad), "--out", str(tmp_path / "o.csv")])
    assert res.exit_code != 0
    assert "bad.csv" in res.output and "unknown node label" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("rows, match", [
    ("patient_000_node_0.tif,macro\npatient_000_node_0.svs,macro\n",
     r"line 3: node 'patient_000_node_0.svs' is the same node as 'patient_000_node_0.tif' "
     r"\(node 0 of patient_000, line 2\)"),
    ("patient_000_node_2.tif,macro\npatient_000_node_1.tif,negative\npatient_000_node_02.tif,micro\n",
     r"'patient_000_node_02.tif' is the same node as 'patient_000_node_2.tif'"),
])
def test_a_node_spelt_two_ways_is_refused(tmp_path, rows, match):
    nodes = _write(tmp_path / "nodes.csv", "patient,stage\n" + rows)
    with pytest.raises(LabelError, match=match) as err:
        stage_csv(nodes, tmp_path / "out.csv")
    assert "nodes.csv" in str(err.value) and not (tmp_path / "out.csv").exists()
    res = CliRunner().invoke(main, ["stage", str(nodes), "--out", str(tmp_path / "o.csv")])
    assert res.exit_code != 0 and "same node" in res.output and len(res.output.strip().splitlines()) == 1


def test_stage_table_refuses_the_same_node_twice():
    # a pN1 patient (one macro node) must not become pN2 by counting node_1 as four
    nodes = {"p_node_1.tif": "macro", "p_node_01.tif": "macro", "p_node_001.svs": "macro", "p_node_1.svs": "macro"}
    with pytest.raises(LabelError, match="same node"):
        stage_table(nodes)
    assert stage_table({"p_node_1.tif": "macro", "p_node_2.tif": "negative"}) == {"p": "pN1"}

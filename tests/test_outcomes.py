"""Outcomes (issue 32): status parsing, the clinical table, survival and regression statistics
(orientation, censoring, hand-computed values), and the `survival` / `regression` MIL tasks trained
at patient level on synthetic bags whose outcome depends on a known feature direction."""
from __future__ import annotations

import csv
import json
import math
import re

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from slidekit.base.errors import ConfigError, LabelError
from slidekit.cli import main as cli
from slidekit.models.mil import load_mil_checkpoint
from slidekit.slidelevel.mil_deploy import deploy
from slidekit.slidelevel.mil_tasks import available_mil_tasks, get_mil_task, task_from_checkpoint
from slidekit.slidelevel.outcome_tasks import Regression, Survival
from slidekit.slidelevel.outcomes import (
    breslow_baseline,
    harrell_c,
    integrated_brier,
    km_plot,
    parse_status,
    patient_bags,
    read_clinical,
    regression_metrics,
    survival_function,
    survival_metrics,
    time_auc,
    uno_c,
)
from trainers.base import train

pytest.importorskip("sksurv")


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _synthetic_survival(n=300, seed=0, censor_scale=3.0):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-risk))
    t_cens = rng.exponential(censor_scale, size=n)
    return np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int), risk, rng


# -- status, clinical table ---------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("1", 1), ("0", 0), ("Dead", 1), ("alive", 0), ("EVENT", 1),
                                            ("censored", 0), ("yes", 1), ("no", 0), ("True", 1), ("false", 0),
                                            ("deceased", 1), ("Living ", 0), ("1.0", 1), (0, 0)])
def test_parse_status_words(value, expected):
    assert parse_status(value) == expected


def test_parse_status_refuses_anything_else_naming_file_row_and_value(tmp_path):
    with pytest.raises(LabelError, match=r"clin\.csv.*row 7: os_event value 'relapsed' is not a status"):
        parse_status("relapsed", tmp_path / "clin.csv", 7, "os_event")
    for bad in ("2", "", "maybe", "-1"):
        with pytest.raises(LabelError):
            parse_status(bad)


def test_read_clinical_endpoints_and_errors(tmp_path):
    rows = [{"PATIENT": f"p{i}", "os_time": str(10 + i), "os_status": ["dead", "alive"][i % 2],
             "pfs_time": str(5 + i), "pfs_event": str(i % 2), "ki67": str(0.1 * i)} for i in range(6)]
    path = _write_csv(tmp_path / "clin.csv", rows)
    eps = read_clinical(path, regression=["ki67"])
    assert [(e.name, e.kind) for e in eps] == [("os", "survival"), ("pfs", "survival"), ("ki67", "regression")]
    assert eps[0].event.tolist() == [1, 0, 1, 0, 1, 0] and eps[1].event.tolist() == [0, 1, 0, 1, 0, 1]
    assert eps[2].target[3] == pytest.approx(0.3)

    def bad(change, match, **kw):
        broken = [dict(r) for r in rows]
        broken[2].update(change)
        p = _write_csv(tmp_path / "bad.csv", broken)
        with pytest.raises(LabelError, match=match):
            read_clinical(p, **kw)

    bad({"os_time": "-3"}, r"bad\.csv.*row 4: os_time value '-3' is negative")
    bad({"os_time": ""}, r"row 4: os_time is missing")
    bad({"os_time": "ten"}, r"row 4: os_time value 'ten' is not a number")
    bad({"pfs_event": "progressed"}, r"row 4: pfs_event value 'progressed' is not a status")
    bad({"PATIENT": "p0"}, r"row 4: patient 'p0' is listed twice \(first on row 2\)")
    bad({"ki67": "n/a"}, r"row 4: ki67 value 'n/a' is not a number", regression=["ki67"])
    censored = [dict(r, os_status="alive") for r in rows]
    with pytest.raises(LabelError, match="every patient is censored"):
        read_clinical(_write_csv(tmp_path / "c.csv", censored))
    with pytest.raises(LabelError, match="no column"):
        read_clinical(path, regression=["grade"])


# -- statistics: hand-computed values, orientation, censoring -------------------------------------

def test_harrell_c_hand_computed_and_orientation():
    t, e = [1, 2, 3, 4], [1, 1, 0, 1]  # comparable pairs: (1,2) (1,3) (1,4) (2,3) (2,4)
    assert harrell_c(t, e, [4, 3, 2, 1]) == 1.0  # higher risk = shorter survival
    assert harrell_c(t, e, [1, 2, 3, 4]) == 0.0
    assert harrell_c(t, e, [4, 1, 2, 3]) == pytest.approx(3 / 5)
    assert harrell_c(t, e, [4, 2, 2, 1]) == pytest.approx(4.5 / 5)  # a tie in risk counts one half
    # a censored patient is never an event: patient 1 (censored first, lowest risk) makes no pair
    assert harrell_c([1, 2, 3], [0, 1, 1], [0, 2, 1]) == 1.0
    assert harrell_c([1, 2, 3], [1, 1, 1], [0, 2, 1]) == pytest.approx(1 / 3)
    assert math.isnan(harrell_c([1, 2, 3], [0, 0, 0], [3, 2, 1]))  # all censored: no pair
    assert harrell_c([1, 2], [1, 0], [2, 1]) == 1.0  # one event
    # tied times: two events at the same time make no pair; an event and a censoring at the same
    # time do (the censored patient outlived the event: Harrell's convention, scikit-survival's)
    assert harrell_c([1, 1, 2], [1, 1, 1], [3, 1, 2]) == pytest.approx(1 / 2)
    assert harrell_c([1, 1, 2], [1, 0, 1], [3, 1, 2]) == 1.0
    assert harrell_c([1, 1, 2], [1, 0, 1], [1, 3, 2]) == 0.0


def test_survival_metrics_known_risk_truth_negation_noise():
    t, e, risk, rng = _synthetic_survival()
    assert 0.4 < e.mean() < 0.9
    truth, neg = survival_metrics(t, e, risk), survival_metrics(t, e, -risk)
    noise = survival_metrics(t, e, rng.normal(size=len(t)))
    assert truth["c_index"] > 0.7 and neg["c_index"] == pytest.approx(1 - truth["c_index"], abs=1e-9)
    assert abs(noise["c_index"] - 0.5) < 0.07
    assert truth["uno_c"] > 0.7 and neg["uno_c"] < 0.3 and abs(noise["uno_c"] - 0.5) < 0.08
    assert truth["auc_mean"] > 0.7 and neg["auc_mean"] < 0.3
    assert truth["ibs"] < noise["ibs"] < neg["ibs"]
    # a deterministic risk (no noise in time): C = 1 exactly for the truth, 0 for its negation
    tt = np.exp(-risk)
    assert harrell_c(tt, np.ones_like(tt), risk) == 1.0 and harrell_c(tt, np.ones_like(tt), -risk) == 0.0


def test_time_auc_and_uno_against_library_on_small_case():
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.util import Surv

    t, e, risk, _ = _synthetic_survival(n=80, seed=3)
    s = Surv.from_arrays(e.astype(bool), t)
    h = [float(np.quantile(t[e == 1], 0.5))]
    assert time_auc(t, e, risk, h)[f"auc@{h[0]:g}"] == pytest.approx(cumulative_dynamic_auc(s, s, risk, h)[0][0])
    tau = float(np.quantile(t[e == 1], 0.8))
    assert uno_c(t, e, risk) == pytest.approx(concordance_index_ipcw(s, s, risk, tau=tau)[0])


def test_breslow_baseline_hand_computed_and_against_sksurv():
    # times 1, 2, 2, 3; events 1, 1, 1, 0; risks 0: H0(1) = 1/4, H0(2) = 1/4 + 2/3
    ts, H = breslow_baseline([1, 2, 2, 3], [1, 1, 1, 0], [0, 0, 0, 0])
    assert ts.tolist() == [1, 2] and H == pytest.approx([0.25, 0.25 + 2 / 3])
    s = survival_function((ts, H), [0.0, math.log(2)], [0.5, 1, 2.5])
    assert s[0] == pytest.approx([1, math.exp(-0.25), math.exp(-(0.25 + 2 / 3))])
    assert s[1] == pytest.approx(s[0] ** 2)  # twice the hazard
    from sksurv.linear_model.coxph import BreslowEstimator

    t, e, risk, _ = _synthetic_survival(n=60, seed=4)
    ours = breslow_baseline(t, e, risk)
    ref = BreslowEstimator().fit(risk, e, t).cum_baseline_hazard_
    assert ours[1] == pytest.approx(ref.y[np.isin(ref.x, ours[0])])
    assert integrated_brier(t, e, risk, t, e, risk) < integrated_brier(t, e, -risk, t, e, risk)


def test_regression_metrics_hand_computed():
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 5])
    assert m["r2"] == pytest.approx(0.8) and m["mae"] == pytest.approx(0.25) and m["rmse"] == pytest.approx(0.5)
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] == pytest.approx(0.9827076, abs=1e-6)
    assert regression_metrics([1, 2, 3], [3, 2, 1])["pearson"] == pytest.approx(-1)


def test_km_plot_groups_logrank_and_png(tmp_path):
    t, e, risk, _ = _synthetic_survival()
    km = km_plot(t, e, risk, tmp_path / "km.png")
    low, high = km["groups"]
    assert (low["name"], high["name"]) == ("low risk", "high risk") and low["n"] == high["n"] == 150
    assert high["events"] > low["events"] and km["p"] < 1e-6
    assert low["at_risk"][0] == 150 and high["at_risk"][1] < low["at_risk"][1]
    from PIL import Image

    assert km["png"] == str(tmp_path / "km.png")  # matplotlib is in [dev]: the PNG is drawn
    with Image.open(tmp_path / "km.png") as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 400
        px = np.asarray(im.convert("RGB"))
    assert (px.std(axis=(0, 1)) > 10).all() and len(np.unique(px.reshape(-1, 3), axis=0)) > 20  # drawn, in colour
    assert not list(tmp_path.glob("*.partial*"))
    three = km_plot(t, e, risk, cutoffs=[-0.5, 0.5])
    assert [g["name"] for g in three["groups"]] == ["risk group 1", "risk group 2", "risk group 3"]
    assert km_plot(t, e, -risk)["p"] == pytest.approx(km["p"])


# -- the Cox loss -----------------------------------------------------------------------------------

def test_cox_loss_hand_computed_breslow_ties_and_eventless_batch():
    task = Survival()
    loss = task.make_loss(None, torch.device("cpu"), None)
    r = torch.tensor([[0.0], [math.log(2)]])
    assert float(loss(r, torch.tensor([[1.0, 1], [2.0, 1]]))) == pytest.approx(math.log(3) / 2)
    assert float(loss(torch.zeros(2, 1), torch.tensor([[1.0, 1], [1.0, 1]]))) == pytest.approx(math.log(2))
    # a censored patient is only ever in risk sets: its risk's gradient is >= 0 (a denominator)
    x = torch.tensor([[0.3], [1.0], [-0.2]], requires_grad=True)
    loss(x, torch.tensor([[1.0, 0], [2.0, 1], [3.0, 1]])).backward()
    assert x.grad[0, 0] >= 0 and x.grad[1, 0] < 0
    y = torch.tensor([[0.3], [1.0]], requires_grad=True)
    value = loss(y, torch.tensor([[1.0, 0], [2.0, 0]]))  # no event: zero loss, zero gradient, counted
    value.backward()
    assert float(value) == 0 and y.grad.abs().sum() == 0 and task.eventless_batches == 1


def test_efron_ties_hand_computed_and_equal_to_breslow_without_ties():
    efron = get_mil_task("survival-efron")().make_loss(None, torch.device("cpu"), None)
    breslow = Survival().make_loss(None, torch.device("cpu"), None)
    # two events at one time, equal risks: Efron log(2) + log(2 - 1) over 2 events; Breslow log 2 each
    tied = torch.tensor([[1.0, 1], [1.0, 1]])
    assert float(efron(torch.zeros(2, 1), tied)) == pytest.approx(math.log(2) / 2)
    assert float(breslow(torch.zeros(2, 1), tied)) == pytest.approx(math.log(2))
    # d = 2 of a risk set of 3 (risks 0, log 2, log 3; the third outlives them):
    # -[0 + log 2 - log 6 - log(6 - 3/2)] / 2
    r = torch.tensor([[0.0], [math.log(2)], [math.log(3)]])
    t = torch.tensor([[1.0, 1], [1.0, 1], [2.0, 0]])
    assert float(efron(r, t)) == pytest.approx(-(math.log(2) - math.log(6) - math.log(4.5)) / 2)
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(12, 1)), dtype=torch.float32)
    y = torch.tensor(np.stack([rng.permutation(12) + 1.0, rng.integers(0, 2, 12)], 1), dtype=torch.float32)
    y[0, 1] = 1
    assert float(efron(x, y)) == pytest.approx(float(breslow(x, y)), rel=1e-5)  # no tied times
    assert task_from_checkpoint({"task": "survival-efron", "horizons": [1.0]}).ties == "efron"


def test_survival_batches_each_hold_an_event():
    targets = np.array([[i, 1.0 if i % 5 == 0 else 0.0] for i in range(40)])
    order = np.random.default_rng(0).permutation(40)
    batches = Survival().batches(order, 6, targets)
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))
    assert len(batches) == 7 and all(targets[b, 1].sum() >= 1 for b in batches)
    few = np.array([[i, 1.0 if i in (3, 9) else 0.0] for i in range(40)])
    assert len(Survival().batches(order, 6, few)) == 2  # fewer events than batches: fewer, larger batches
    assert [b.tolist() for b in Survival().batches(order, 64, targets)] == [order.tolist()]


# -- patient level: training, folds, checkpoints, deploy --------------------------------------------

def _cohort(tmp_path, n_patients=60, d=8, seed=0):
    """Patients of 1-3 slides; every tile carries the patient's latent x along (feature 0 + feature 1);
    log survival time = -x + small noise, censoring ~30%; ki67 = 2 + x (+ noise)."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(d)
    direction[:2] = 1 / np.sqrt(2)
    clinical, slides, truth = [], [], {}
    statuses = [("dead", "alive"), ("1", "0"), ("event", "censored"), ("yes", "no")]
    for p in range(n_patients):
        x = float(rng.normal())
        t_event = math.exp(-x + 0.25 * rng.normal())
        t_cens = float(rng.uniform(0.3, 6))
        event = t_event <= t_cens
        words = statuses[p % len(statuses)]
        clinical.append({"patient": f"P{p:03d}", "os_time": f"{min(t_event, t_cens):.4f}",
                         "os_event": words[0] if event else words[1], "ki67": f"{2 + x + 0.2 * rng.normal():.4f}"})
        truth[f"P{p:03d}"] = x
        for s in range(1 + p % 3):
            n = int(rng.integers(15, 30))
            feats = rng.normal(0, 1, (n, d)).astype(np.float32) + (x * direction).astype(np.float32)
            coords = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1).astype(np.int64) * 64
            with h5py.File(tmp_path / f"P{p:03d}_{s}.h5", "w") as f:
                f["features"] = feats
                f["coords"] = coords
                f["coords"].attrs["patch_size_level0"] = 64
            slides.append({"patient": f"P{p:03d}", "slide": f"P{p:03d}_{s}.svs", "features": f"P{p:03d}_{s}.h5"})
    return _write_csv(tmp_path / "clinical.csv", clinical), _write_csv(tmp_path / "slides.csv", slides), truth


def test_patient_bags_pool_slides_and_refuse_unknown_patients(tmp_path):
    clinical, slides, _ = _cohort(tmp_path, n_patients=6)
    tables = patient_bags(clinical, slides, tmp_path / "pt", regression=["ki67"])
    assert set(tables) == {"os", "ki67"}
    with open(tables["os"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide", "patient", "time", "event", "features"] and len(rows) == 6
    with h5py.File(tmp_path / "pt" / rows[2]["features"]) as f:  # P002: three slides concatenated
        n = sum(h5py.File(tmp_path / f"P002_{s}.h5")["features"].shape[0] for s in range(3))
        assert f["features"].shape[0] == n and sorted(set(f["slide_index"][:].tolist())) == [0, 1, 2]
        assert len(json.loads(f.attrs["pooled_from"])) == 3
    with open(slides) as f:
        srows = list(csv.DictReader(f))
    _write_csv(tmp_path / "extra.csv", [*srows, {"patient": "P999", "slide": "x", "features": "P000_0.h5"}])
    with pytest.raises(LabelError, match=r"extra\.csv.*'P999'.*not in the clinical table"):
        patient_bags(clinical, tmp_path / "extra.csv", tmp_path / "pt2")
    _write_csv(tmp_path / "fewer.csv", [r for r in srows if r["patient"] != "P004"])
    with pytest.raises(LabelError, match=r"clinical\.csv.*row 6: patient 'P004' has no slides"):
        patient_bags(clinical, tmp_path / "fewer.csv", tmp_path / "pt3")


def test_survival_and_regression_train_at_patient_level_and_deploy(tmp_path, capsys):
    assert {"survival", "regression", "regression-l1", "regression-mse"} <= set(available_mil_tasks())
    clinical, slides, truth = _cohort(tmp_path, n_patients=48)
    tables = patient_bags(clinical, slides, tmp_path / "pt", regression=["ki67"])
    common = {"arch": "meanpool", "folds": 3, "epochs": 20, "patience": 6, "lr": 1e-2, "hidden": 16,
              "bootstrap": 30}
    ckpt = train("mil", None, tmp_path / "os", {**common, "slides": str(tables["os"]), "task": "survival",
                                                "bags_per_step": 16}, device="cpu", progress=False)
    m = m_os = json.loads((tmp_path / "os" / "metrics.json").read_text())
    print("survival OOF", m["overall"], m["ci95"]["c_index"])
    assert m["task"] == "survival" and m["patients"] == 48 and m["ties"] == "breslow"
    assert m["overall"]["c_index"] > 0.7 and m["ci95"]["c_index"][0] < m["overall"]["c_index"]
    assert {"c_index", "uno_c", "auc_mean", "ibs"} <= set(m["overall"]) and len(m["horizons"]) == 3
    with open(tmp_path / "os" / "oof.csv") as f:
        oof = list(csv.DictReader(f))
    assert list(oof[0]) == ["slide", "patient", "time", "event", "fold", "risk"]
    risk = np.array([float(r["risk"]) for r in oof])
    x = np.array([truth[r["patient"]] for r in oof])
    assert np.corrcoef(risk, x)[0, 1] > 0.5  # higher latent x = shorter survival = higher risk
    _, mil = load_mil_checkpoint(ckpt)
    base = mil["fold_state"]["baseline_hazard"]
    assert mil["task"] == "survival" and len(base["time"]) == len(base["cumulative_hazard"]) > 5
    task = task_from_checkpoint(mil)
    assert task.deploy_columns[0] == "risk" and len(task.deploy_columns) == 4
    bags = sorted((tmp_path / "pt" / "bags").glob("*.h5"))[:8]
    with open(deploy(ckpt, bags, tmp_path / "scored.csv", progress=False)) as f:
        scored = list(csv.DictReader(f))
    assert all(r["status"] == "done" for r in scored)
    h = task.deploy_columns[1]
    hi, lo = max(scored, key=lambda r: float(r["risk"])), min(scored, key=lambda r: float(r["risk"]))
    assert 0 <= float(hi[h]) < float(lo[h]) <= 1  # the higher risk survives less

    # the mean-pooled CoxNet ran inside the same command, on the same folds
    base = m_os["baseline"]
    assert base["model"] == "mean-pooled CoxNet" and len(base["folds"]) == 3 and base["overall"]["c_index"] > 0.7
    assert base["diff"]["c_index"] == pytest.approx(m_os["overall"]["c_index"] - base["overall"]["c_index"])
    with open(tmp_path / "os" / "baseline_oof.csv") as f:
        brows = list(csv.DictReader(f))
    assert [(r["slide"], r["fold"]) for r in brows] == [(r["slide"], r["fold"]) for r in oof]
    assert harrell_c(np.array([float(r["time"]) for r in oof]), np.array([int(r["event"]) for r in oof]),
                     np.array([float(r["risk"]) for r in brows])) == pytest.approx(base["overall"]["c_index"])

    capsys.readouterr()
    ckpt = train("mil", None, tmp_path / "ki67", {**common, "slides": str(tables["ki67"]), "task": "regression",
                                                  "bags_per_step": 8}, device="cpu", progress=True)
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing.startswith("mil meanpool: R² ") and "; mean-pooled ridge r2 " in closing, closing
    m = json.loads((tmp_path / "ki67" / "metrics.json").read_text())
    assert m["baseline"]["model"] == "mean-pooled ridge" and m["baseline"]["overall"]["r2"] > 0.5
    assert f"(MIL - baseline {m['baseline']['diff']['r2']:+.3f})" in closing
    print("regression OOF", m["overall"], m["ci95"]["r2"])
    assert m["overall"]["r2"] > 0.5 and m["overall"]["pearson"] > 0.7
    _, mil = load_mil_checkpoint(ckpt)
    assert 1.5 < mil["fold_state"]["target_mean"] < 2.5 and mil["fold_state"]["target_sd"] > 0.5
    with open(deploy(ckpt, bags, tmp_path / "scored_ki67.csv", progress=False)) as f:
        pred = np.array([float(r["predicted"]) for r in csv.DictReader(f)])
    xs = np.array([truth[p.stem] for p in bags])
    assert np.abs(pred - (2 + xs)).mean() < 0.6  # restored to the target's units

    # the mean-pooled linear baseline on the same folds, and the command-line steps
    run = CliRunner().invoke
    r = run(cli, ["outcomes", "baseline", str(tables["os"]), str(tmp_path / "os" / "oof.csv"), "--json",
                  "--out", str(tmp_path / "b.csv")])
    assert r.exit_code == 0, r.output
    b = json.loads(r.output)
    print("baseline", b["overall"]["c_index"], b["diff"])
    assert b["overall"]["c_index"] == pytest.approx(base["overall"]["c_index"])  # the same folds, the same model
    assert b["kind"] == "survival" and b["overall"]["c_index"] > 0.7 and len(b["folds"]) == 3
    assert b["mil_overall"]["c_index"] == pytest.approx(m_os["overall"]["c_index"])
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == 48
    r = run(cli, ["outcomes", "baseline", str(tables["ki67"]), str(tmp_path / "ki67" / "oof.csv")])
    assert r.exit_code == 0 and "mean-pooled ridge r2" in r.output
    r = run(cli, ["outcomes", "km", str(tmp_path / "os" / "oof.csv"), "--out", str(tmp_path / "km.png")])
    assert r.exit_code == 0 and "log-rank p = " in r.output and "high risk: 24 patients" in r.output
    assert (tmp_path / "km.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run(cli, ["outcomes", "km", str(tmp_path / "ki67" / "oof.csv")])  # not a survival run: one line
    assert r.exit_code != 0 and "needs time, event and risk" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_patients_errors_are_one_line_naming_file_row_and_problem(tmp_path):
    clinical, slides, _ = _cohort(tmp_path, n_patients=6)
    run = CliRunner().invoke
    r = run(cli, ["outcomes", "patients", str(clinical), str(slides), "--out", str(tmp_path / "pt"),
                  "--regression", "ki67", "--survival", "os_time:os_event"])
    assert r.exit_code == 0, r.output
    assert r.output.split() == ["os:", str(tmp_path / "pt" / "os.csv"), "ki67:", str(tmp_path / "pt" / "ki67.csv")]
    with open(clinical) as f:
        crows = list(csv.DictReader(f))
    with open(slides) as f:
        srows = list(csv.DictReader(f))

    def refused(clin, slide_rows, match, *extra):
        c = _write_csv(tmp_path / "bad_clinical.csv", clin)
        s = _write_csv(tmp_path / "bad_slides.csv", slide_rows)
        out = tmp_path / "refused"
        r = run(cli, ["outcomes", "patients", str(c), str(s), "--out", str(out), *extra])
        lines = r.output.strip().splitlines()
        assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("slidekit: error: "), r.output
        assert re.search(match, lines[0]), lines[0]
        assert not (out / "os.csv").exists()  # nothing half-written

    def changed(i, **kw):
        return [dict(r, **kw) if j == i else r for j, r in enumerate(crows)]

    refused(crows, [*srows, {"patient": "P999", "slide": "x.svs", "features": "P000_0.h5"}],
            rf"bad_slides\.csv: row {len(srows) + 2}: patient 'P999' is not in the clinical table")
    refused(changed(3, os_time=""), srows, r"bad_clinical\.csv: row 5: os_time is missing")
    refused(changed(3, os_time="-2.5"), srows, r"bad_clinical\.csv: row 5: os_time value '-2.5' is negative")
    refused(changed(1, os_event="relapsed"), srows,
            r"bad_clinical\.csv: row 3: os_event value 'relapsed' is not a status")
    refused([dict(r, os_event="alive") for r in crows], srows, r"bad_clinical\.csv: .*every patient is censored")
    r = run(cli, ["outcomes", "patients", str(clinical), str(slides), "--out", str(tmp_path / "u"),
                  "--survival", "os_time"])
    assert r.exit_code == 2 and "Invalid value for --survival: 'os_time' is not TIME:EVENT" in r.output
    refused(crows, [r for r in srows if r["patient"] != "P005"],
            r"bad_clinical\.csv: row 7: patient 'P005' has no slides")


def test_survival_refusals(tmp_path):
    rows = [{"slide": f"s{i}", "patient": f"p{i}", "time": str(i + 1), "event": "1" if i in (0, 1) else "0",
             "features": f"s{i}.h5"} for i in range(9)]
    for i in range(9):
        with h5py.File(tmp_path / f"s{i}.h5", "w") as f:
            f["features"] = np.random.default_rng(i).normal(size=(5, 4)).astype(np.float32)
            f["coords"] = np.zeros((5, 2), np.int64)
            f["coords"].attrs["patch_size_level0"] = 64
    table = _write_csv(tmp_path / "t.csv", rows)
    cfg = {"slides": str(table), "task": "survival", "arch": "meanpool", "folds": 3, "epochs": 2, "bootstrap": 0}
    with pytest.raises(ConfigError, match="bags_per_step >= 2"):
        train("mil", None, tmp_path / "a", cfg, device="cpu", progress=False)
    with pytest.raises(LabelError, match=r"t\.csv: rows [0-9, ]+: a (validation|test) fold holds only censored "
                                         r"patients \(\d+, no event\)"):  # 2 events, 3 folds: before training
        train("mil", None, tmp_path / "b", {**cfg, "bags_per_step": 4}, device="cpu", progress=False)
    _write_csv(tmp_path / "u.csv", [dict(r, event="relapse") if r["slide"] == "s4" else r for r in rows])
    with pytest.raises(LabelError, match=r"u\.csv.*row 6: event value 'relapse' is not a status"):
        train("mil", None, tmp_path / "c", {**cfg, "slides": str(tmp_path / "u.csv"), "bags_per_step": 4},
              device="cpu", progress=False)
    assert get_mil_task("regression") is Regression


def test_mil_attention_writes_the_tasks_per_tile_scores(tmp_path):
    """mil-attention for a survival and a regression checkpoint: QuPath tiles with attention and the
    task's per-tile score (risk; the predicted value in the target's units)."""
    from slidekit.models.mil import build_mil, save_mil_checkpoint
    from slidekit.slidelevel.mil_deploy import attention_outputs
    from slidekit.slides import open_slide
    from slidekit.slides.demo import write_pyramid

    rng = np.random.default_rng(0)
    slide = write_pyramid(tmp_path / "a.tif", rng.integers(0, 255, (640, 640, 3), dtype=np.uint8), mpp=1.0)
    n = 100
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = rng.normal(size=(n, 8)).astype(np.float32)
        f["coords"] = np.stack([np.arange(n) % 10, np.arange(n) // 10], 1).astype(np.int64) * 64
        f["coords"].attrs["patch_size_level0"] = 64
    torch.manual_seed(0)
    tasks = {"survival": {"horizons": [1.0], "fold_state": {"baseline_hazard": {"time": [0.5], "cumulative_hazard":
                                                                                [0.1]}}},
             "regression": {"loss": "huber", "fold_state": {"target_mean": 20.0, "target_sd": 5.0}}}
    for task, extra in tasks.items():
        ckpt = save_mil_checkpoint(tmp_path / f"{task}.pt", build_mil("abmil", 8, 1).eval(),
                                   {"arch": "abmil", "in_dim": 8, "task": task, "out_dim": 1, "hidden": 128, **extra})
        with pytest.warns(Warning, match="without slidekit's records"):
            out = attention_outputs(ckpt, tmp_path / "f.h5", open_slide(slide), tmp_path / task)
        tiles = json.loads(out["geojson"].read_text())["features"]
        assert len(tiles) == n
        key = "score_risk" if task == "survival" else "score_predicted"
        values = np.array([t["properties"]["measurements"][key] for t in tiles])
        assert np.isfinite(values).all()
        if task == "regression":
            assert 5 < values.mean() < 35  # restored around the target mean of 20


def test_discrete_time_survival_nll_by_hand_and_trained(tmp_path):
    task = get_mil_task("survival-discrete")()
    loss = task.make_loss(np.array([[1.0, 1], [2.0, 1], [3.0, 1], [4.0, 1]]), torch.device("cpu"), None)
    task.edges = [1.0, 2.0, 3.0]  # intervals [0,1) [1,2) [2,3) [3,inf)
    half = math.log(2)  # every hazard 1/2 (zero logits)
    cases = [([0.5, 1], half), ([1.5, 0], 2 * half), ([2.5, 1], 3 * half), ([3.5, 0], 4 * half)]
    for target, expected in cases:
        assert float(loss(torch.zeros(1, 4), torch.tensor([target]))) == pytest.approx(expected)
    p = task.predict(torch.tensor([[0.0, 0, 0, 0], [3.0, 3, 3, 3]]))
    assert p[0, 1:] == pytest.approx([0.5, 0.25, 0.125, 0.0625]) and p[1, 0] > p[0, 0]  # higher hazard, higher risk

    clinical, slides, _ = _cohort(tmp_path, n_patients=48)
    tables = patient_bags(clinical, slides, tmp_path / "pt")
    ckpt = train("mil", None, tmp_path / "run", {"slides": str(tables["os"]), "task": "survival-discrete",
                                                 "arch": "meanpool", "folds": 3, "epochs": 20, "patience": 6,
                                                 "lr": 1e-2, "hidden": 16, "bootstrap": 0, "bags_per_step": 16,
                                                 "baseline": False},
                 device="cpu", progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["overall"]["c_index"] > 0.7, m["overall"]
    assert "baseline" not in m and not (tmp_path / "run" / "baseline_oof.csv").exists()  # switched off
    _, mil = load_mil_checkpoint(ckpt)
    assert len(mil["fold_state"]["bin_edges"]) == 3 and mil["out_dim"] == 4
    assert task_from_checkpoint(mil).deploy_columns == ["risk", "survival_bin1", "survival_bin2", "survival_bin3",
                                                        "survival_bin4"]


def test_cox_risk_centred_on_each_training_fold(tmp_path):
    """The partial likelihood cannot see a constant added to every risk: each fold's model is shifted so
    that its training patients' mean risk is 0 (centre_outputs); without it the folds' levels differ."""
    from types import SimpleNamespace

    from trainers.mil import _splits, read_mil_table

    clinical, slides, _ = _cohort(tmp_path, n_patients=36)
    tables = patient_bags(clinical, slides, tmp_path / "pt")
    cfg = {"arch": "abmil", "folds": 3, "epochs": 3, "patience": 3, "lr": 1e-2, "hidden": 8, "bootstrap": 0,
           "baseline": False, "slides": str(tables["os"]), "task": "survival", "bags_per_step": 8}
    rows = read_mil_table(tables["os"], None, ("time", "event"))
    task = Survival()
    targets = task.setup([r.values for r in rows], SimpleNamespace(slides=str(tables["os"]), bags_per_step=8))
    splits = list(_splits(task.stratify(targets), np.array([r.patient for r in rows]), 3, 0))
    bags = [torch.as_tensor(h5py.File(r.features)["features"][:]) for r in rows]
    level, oof = {}, {}
    for centre in (True, False):
        out = tmp_path / f"run_{centre}"
        train("mil", None, out, {**cfg, "centre_outputs": centre}, device="cpu", progress=False)
        means = []
        for k, (tr, _va, _te) in enumerate(splits):
            model, mil = load_mil_checkpoint(out / f"fold_{k}.pt")
            with torch.no_grad():
                means.append(float(np.mean([float(model(bags[i]).logits[0]) for i in tr])))
        level[centre] = np.array(means)
        with open(out / "oof.csv") as f:
            oof[centre] = {r["patient"]: (int(r["fold"]), float(r["risk"])) for r in csv.DictReader(f)}
    assert np.abs(level[True]).max() < 1e-4  # each fold's training patients average risk 0
    assert np.abs(level[False]).max() > 1e-3  # the head's bias is left where training left it
    for k in range(3):  # the same training, each fold's test risks moved by one constant
        d = [oof[True][p][1] - oof[False][p][1] for p in oof[True] if oof[True][p][0] == k]
        assert np.ptp(d) < 1e-4 and abs(np.mean(d) + level[False][k]) < 1e-3
        record = json.loads((tmp_path / "run_True" / f"fold_{k}.json").read_text())
        assert record["output_offset"][0] == pytest.approx(level[False][k], abs=1e-4)  # what was taken out


def test_rotating_ensemble_members_each_stop_on_their_own_split(tmp_path):
    """``ensemble_validation: rotate``: member j learns from the fold's training patients less its own
    patient-grouped inner split and stops early on that split; the splits cover the training part once
    each, never touch the test fold, and the regression target is standardised on the whole training part."""
    from types import SimpleNamespace

    from trainers.mil import _inner_splits, _splits, read_mil_table

    clinical, slides, _ = _cohort(tmp_path, n_patients=30)
    tables = patient_bags(clinical, slides, tmp_path / "pt", regression=["ki67"])
    rows = read_mil_table(tables["ki67"], None, ("target",))
    task = Regression()
    targets = task.setup([r.values for r in rows], SimpleNamespace(slides=str(tables["ki67"]), bags_per_step=4))
    groups = np.array([r.patient for r in rows])
    strata = task.stratify(targets)
    splits = list(_splits(strata, groups, 3, 0))
    for tr, va, te in splits:
        rest = np.sort(np.concatenate([tr, va]))
        members = _inner_splits(strata, groups, rest, 3, 0)
        assert len(members) == 3
        vals = np.concatenate([v for _, v in members])
        assert sorted(vals.tolist()) == rest.tolist()  # each training patient validates exactly one member
        for mtr, mva in members:
            assert sorted(np.concatenate([mtr, mva]).tolist()) == rest.tolist()
            assert not set(groups[mtr]) & set(groups[mva]) and not set(groups[mva]) & set(groups[te])

    cfg = {"arch": "abmil", "folds": 3, "epochs": 3, "patience": 3, "lr": 1e-2, "hidden": 8, "bootstrap": 0,
           "baseline": False, "slides": str(tables["ki67"]), "task": "regression", "bags_per_step": 4,
           "ensemble": 3, "ensemble_validation": "rotate"}
    train("mil", None, tmp_path / "rot", cfg, device="cpu", progress=False)
    y = np.array([float(r.values["target"]) for r in rows])
    for k, (tr, va, _te) in enumerate(splits):
        record = json.loads((tmp_path / "rot" / f"fold_{k}.json").read_text())
        members = _inner_splits(strata, groups, np.sort(np.concatenate([tr, va])), 3, 0)
        assert [m["validation"] for m in record["members"]] == [len(v) for _, v in members]
        assert record["val_loss"] == pytest.approx(np.mean([m["val_loss"] for m in record["members"]]))
        _, mil = load_mil_checkpoint(tmp_path / "rot" / f"fold_{k}.pt")
        fit = np.concatenate([tr, va])
        assert mil["members"] == 3
        assert mil["fold_state"]["target_mean"] == pytest.approx(y[fit].mean())  # not the shared split's train part
        assert mil["fold_state"]["target_mean"] != pytest.approx(y[tr].mean())
    with pytest.raises(ConfigError, match="ensemble_validation"):
        train("mil", None, tmp_path / "one", {**cfg, "ensemble": 1}, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="needs at least 40 patients"):
        train("mil", None, tmp_path / "many", {**cfg, "ensemble": 40}, device="cpu", progress=False)

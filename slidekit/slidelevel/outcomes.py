"""Outcomes: survival and continuous targets per patient, and the statistics a paper reports.

- ``parse_status``: an event column's value as 1 (event) or 0 (censored); anything unreadable is
  one LabelError naming the file, row and value.
- ``read_clinical``: a clinical table (one row per patient) -> ``Endpoint`` objects, one per
  survival endpoint (a time and an event column) or regression target (a numeric column). Several
  endpoints in one table are several tasks.
- ``patient_bags``: a patient's slides pooled into one bag (their feature files concatenated, tile
  by tile, into ``bags/<patient>.h5``) and one MIL table per endpoint, which ``slidekit train mil``
  reads with ``task=survival`` or ``task=regression``.
- Survival statistics (scikit-survival): Harrell's and Uno's C, time-dependent AUC at horizons,
  the integrated Brier score (survival functions from a Breslow baseline hazard fitted on the
  training risk scores), bootstrap CIs; a Kaplan–Meier plot by predicted risk group with the
  log-rank p.
- Regression statistics: R², MAE, RMSE, Pearson and Spearman r with bootstrap CIs.

Orientation, everywhere: a *risk* is higher for a patient expected to die (or relapse) sooner.
A censored patient (event 0) is never counted as an event.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidekit.base.errors import LabelError
from slidekit.slidelevel.feature_store import read_features

EVENT_WORDS = {"1": 1, "0": 0, "dead": 1, "alive": 0, "event": 1, "censored": 0, "yes": 1, "no": 0,
               "true": 1, "false": 0, "deceased": 1, "living": 0}
PATIENT_COLUMNS = ("patient", "PATIENT", "patient_id", "case_id", "case")


# -- status and the clinical table ---------------------------------------------------------------

def parse_status(value: Any, path: str | os.PathLike | None = None, row: int | None = None,
                 column: str = "event") -> int:
    """1 for an event (1, dead, event, yes, true, deceased), 0 for censored (0, alive, censored, no,
    false, living), case and surrounding space ignored; LabelError naming file, row and value otherwise."""
    s = str(value).strip().lower()
    if s in ("1.0", "0.0"):
        s = s[0]
    if s in EVENT_WORDS:
        return EVENT_WORDS[s]
    where = f"row {row}: " if row is not None else ""
    raise LabelError(f"{where}{column} value {str(value)!r} is not a status (event: 1, dead, event, yes, true, "
                     "deceased; censored: 0, alive, censored, no, false, living)", path)


def parse_time(value: Any, path: str | os.PathLike | None = None, row: int | None = None,
               column: str = "time") -> float:
    """A follow-up time: a finite number >= 0; LabelError naming file, row and value otherwise."""
    where = f"row {row}: " if row is not None else ""
    s = str(value).strip()
    if not s:
        raise LabelError(f"{where}{column} is missing", path)
    try:
        t = float(s)
    except ValueError:
        raise LabelError(f"{where}{column} value {s!r} is not a number", path) from None
    if not math.isfinite(t) or t < 0:
        raise LabelError(f"{where}{column} value {s!r} is {'negative' if t < 0 else 'not finite'}", path)
    return t


@dataclass
class Endpoint:
    """One task of a clinical table: ``kind`` survival (``time``, ``event``) or regression (``target``),
    values per patient in ``patients`` order."""

    name: str
    kind: str  # "survival" or "regression"
    patients: list[str]
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    target: np.ndarray | None = None
    columns: tuple[str, ...] = ()
    rows: list[int] = field(default_factory=list)  # the table row of each patient


def _survival_pairs(cols: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, time column, event column) found by name: ``time``+``event``/``status``, and
    ``<name>_time``+``<name>_event``/``<name>_status`` (e.g. os_time, os_event)."""
    out = []
    low = {c.lower(): c for c in cols}
    for ev in ("event", "status"):
        if "time" in low and ev in low:
            out.append(("survival", low["time"], low[ev]))
            break
    for c in cols:
        m = re.fullmatch(r"(.+)_time", c, flags=re.I)
        if m:
            for ev in ("event", "status"):
                partner = low.get(f"{m.group(1).lower()}_{ev}")
                if partner:
                    out.append((m.group(1), c, partner))
                    break
    return out


def read_clinical(path: str | os.PathLike, survival: Sequence[tuple[str, str]] | None = None,
                  regression: Sequence[str] = (), patient_column: str | None = None) -> list[Endpoint]:
    """The endpoints of a clinical table (CSV, one row per patient).

    ``survival``: (time column, event column) pairs; default: found by name (``time`` with ``event``
    or ``status``; ``<name>_time`` with ``<name>_event`` or ``<name>_status``). ``regression``: the
    numeric target columns (never guessed). The patient column is ``patient_column`` or the first of
    patient, PATIENT, patient_id, case_id, case. A missing, negative or unreadable time, an
    unreadable event value, a missing or non-numeric target, a patient listed twice, a survival
    endpoint without any event: one LabelError naming the file, row and problem.
    """
    path = Path(path)
    if not path.exists():
        raise LabelError("clinical table not found", path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    pcol = patient_column or next((c for c in PATIENT_COLUMNS if c in cols), None)
    if not pcol or pcol not in cols:
        raise LabelError(f"clinical table needs a patient column ({patient_column or ' or '.join(PATIENT_COLUMNS)}), "
                         f"has {cols}", path)
    pairs = ([(f"{t}" if t != "time" else "survival", t, e) for t, e in survival] if survival is not None
             else _survival_pairs(cols))
    pairs = [(re.sub(r"_time$", "", n, flags=re.I) if n != "survival" else n, t, e) for n, t, e in pairs]
    missing = [c for _, t, e in pairs for c in (t, e) if c not in cols] + [c for c in regression if c not in cols]
    if missing:
        raise LabelError(f"clinical table has no column(s) {missing}; has {cols}", path)
    if not pairs and not regression:
        raise LabelError(f"clinical table has no endpoint: no time/event columns found and no regression target "
                         f"named; has {cols}", path)
    if not rows:
        raise LabelError("clinical table has no rows", path)
    patients: list[str] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(rows, start=2):
        p = r.get(pcol, "")
        if not p:
            raise LabelError(f"row {i}: empty {pcol}", path)
        if p in seen:
            raise LabelError(f"row {i}: patient {p!r} is listed twice (first on row {seen[p]})", path)
        seen[p] = i
        patients.append(p)
    line = list(range(2, len(rows) + 2))
    out = []
    for name, tcol, ecol in pairs:
        t = np.array([parse_time(r[tcol], path, i, tcol) for r, i in zip(rows, line)])
        e = np.array([parse_status(r[ecol], path, i, ecol) for r, i in zip(rows, line)], dtype=np.int64)
        if e.sum() == 0:
            raise LabelError(f"column {ecol!r}: every patient is censored (no event): survival cannot be learned "
                             "or measured", path)
        out.append(Endpoint(name, "survival", patients, time=t, event=e, columns=(tcol, ecol), rows=line))
    for col in regression:
        vals = []
        for r, i in zip(rows, line):
            s = r[col]
            try:
                v = float(s)
            except ValueError:
                raise LabelError(f"row {i}: {col} value {s!r} is {'missing' if not s else 'not a number'}",
                                 path) from None
            if not math.isfinite(v):
                raise LabelError(f"row {i}: {col} value {s!r} is not finite", path)
            vals.append(v)
        out.append(Endpoint(col, "regression", patients, target=np.array(vals), columns=(col,), rows=line))
    return out


def read_slide_table(path: str | os.PathLike) -> dict[str, list[Path]]:
    """``patient,features[,slide]`` rows -> each patient's feature files (relative paths are read
    from the table's folder); LabelError naming the row for a missing file or value."""
    return _slide_table(Path(path))[0]


def _slide_table(path: Path) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """``read_slide_table`` and each patient's first row."""
    if not path.exists():
        raise LabelError("slide table not found", path)
    out: dict[str, list[Path]] = {}
    first_row: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        pcol = next((c for c in PATIENT_COLUMNS if c in cols), None)
        if pcol is None or "features" not in cols:
            raise LabelError(f"slide table needs a patient column and 'features', has {cols}", path)
        for i, r in enumerate(reader, start=2):
            r = {(k or "").strip(): (v or "").strip() for k, v in r.items() if k}
            if not r[pcol] or not r["features"]:
                raise LabelError(f"row {i}: empty {pcol} or features", path)
            feat = Path(r["features"])
            feat = feat if feat.is_absolute() else path.parent / feat
            if not feat.exists():
                raise LabelError(f"row {i}: feature file {feat} not found", path)
            out.setdefault(r[pcol], []).append(feat)
            first_row.setdefault(r[pcol], i)
    if not out:
        raise LabelError("slide table has no rows", path)
    return out, first_row


def pool_features(files: Sequence[Path], out: Path) -> Path:
    """Concatenate slides' feature files into one bag (TRIDENT layout: ``features``, ``coords``;
    ``slide_index`` says which source file each tile came from; root attributes ``pooled_from``
    (JSON list of the files) and ``encoder`` (the sources' encoder name)). Written atomically."""
    import h5py

    bags = [read_features(p) for p in files]
    widths = {b.features.shape[1] for b in bags}
    if len(widths) > 1:
        raise LabelError(f"the patient's feature files have different widths {sorted(widths)}", files[0])
    names = {str(b.encoder.get("name", "")) for b in bags}
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f["features"] = np.concatenate([b.features for b in bags]).astype(np.float32)
        f["coords"] = np.concatenate([b.coords for b in bags]).astype(np.int64)
        f["coords"].attrs["patch_size_level0"] = int(max(b.patch_size_level0 for b in bags))
        f["slide_index"] = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(bags)])
        f.attrs["pooled_from"] = json.dumps([str(p) for p in files])
        if len(names) == 1 and next(iter(names)):
            f.attrs["encoder"] = next(iter(names))
    os.replace(tmp, out)
    return out


def patient_bags(clinical: str | os.PathLike, slides: str | os.PathLike, out_dir: str | os.PathLike,
                 survival: Sequence[tuple[str, str]] | None = None, regression: Sequence[str] = (),
                 patient_column: str | None = None) -> dict[str, Path]:
    """Pool each patient's slides into one bag and write one MIL table per endpoint.

    ``out_dir/bags/<patient>.h5``: the patient's feature files concatenated (``pool_features``);
    ``out_dir/<endpoint>.csv``: ``slide,patient,time,event,features`` (survival) or
    ``slide,patient,target,features`` (regression), one row per patient (``slide`` = the patient).
    A clinical patient without slides, or a slide-table patient not in the clinical table, is a
    LabelError naming the file and row. Returns endpoint name -> table path.
    """
    endpoints = read_clinical(clinical, survival, regression, patient_column)
    files, slide_rows = _slide_table(Path(slides))
    ep0 = endpoints[0]
    for p, row in zip(ep0.patients, ep0.rows):
        if p not in files:
            raise LabelError(f"row {row}: patient {p!r} has no slides in {slides}", clinical)
    unknown = sorted(set(files) - set(ep0.patients))
    if unknown:
        unknown.sort(key=lambda p: slide_rows[p])
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise LabelError(f"row {slide_rows[unknown[0]]}: patient {unknown[0]!r} is not in the clinical table "
                         f"{clinical}{more}", slides)
    out = Path(out_dir)
    bag_of = {}
    for p in ep0.patients:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", p)
        bag_of[p] = pool_features(files[p], out / "bags" / f"{safe}.h5")
    tables = {}
    for ep in endpoints:
        rows = []
        for i, p in enumerate(ep.patients):
            if ep.time is not None and ep.event is not None:
                vals = [f"{ep.time[i]:g}", str(int(ep.event[i]))]
            else:
                vals = [repr(float(np.asarray(ep.target)[i]))]
            rows.append([p, p, *vals, str(bag_of[p].relative_to(out))])
        head = ["slide", "patient", *(["time", "event"] if ep.kind == "survival" else ["target"]), "features"]
        path = out / f"{ep.name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(head)
            w.writerows(rows)
        tables[ep.name] = path
    return tables


# -- survival statistics ---------------------------------------------------------------------------

def _surv(time, event):
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, float))


def harrell_c(time, event, risk) -> float:
    """Harrell's C: among comparable pairs (the shorter time is an event), the share where the
    shorter-lived patient has the higher risk (ties in risk count 1/2). nan without a comparable pair."""
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event).astype(bool)
    if event.sum() == 0:
        return float("nan")
    try:
        return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(risk, float))[0])
    except (ValueError, ZeroDivisionError):
        return float("nan")


def _tau(time, event, q: float = 0.8) -> float:
    """A truncation time for IPCW statistics: the ``q`` quantile of the event times (the censoring
    distribution must not reach 0 before it)."""
    t = np.asarray(time, float)[np.asarray(event).astype(bool)]
    return float(np.quantile(t, q)) if len(t) else float("nan")


def uno_c(time, event, risk, train_time=None, train_event=None, tau: float | None = None) -> float:
    """Uno's C (IPCW, censoring distribution from the training set, default the same patients),
    truncated at ``tau`` (default: 80% quantile of the event times)."""
    from sksurv.metrics import concordance_index_ipcw

    train_time = time if train_time is None else train_time
    train_event = event if train_event is None else train_event
    if np.asarray(event).sum() == 0:
        return float("nan")
    tau = _tau(time, event) if tau is None else tau
    try:
        return float(concordance_index_ipcw(_surv(train_time, train_event), _surv(time, event),
                                            np.asarray(risk, float), tau=tau)[0])
    except (ValueError, ZeroDivisionError):
        return float("nan")


def default_horizons(time, event) -> list[float]:
    """25%, 50% and 75% quantiles of the event times."""
    t = np.asarray(time, float)[np.asarray(event).astype(bool)]
    return [float(x) for x in np.quantile(t, [0.25, 0.5, 0.75])] if len(t) else []


def time_auc(time, event, risk, horizons: Sequence[float], train_time=None, train_event=None) -> dict[str, float]:
    """Cumulative/dynamic AUC at each horizon t (cases: event by t; controls: alive after t; IPCW),
    keyed ``auc@<t>``, and ``auc_mean`` (their survival-weighted mean); nan where not computable."""
    from sksurv.metrics import cumulative_dynamic_auc

    train_time = time if train_time is None else train_time
    train_event = event if train_event is None else train_event
    keys = {f"auc@{h:g}": float("nan") for h in horizons}
    if not len(horizons):
        return {**keys, "auc_mean": float("nan")}
    try:
        auc, mean = cumulative_dynamic_auc(_surv(train_time, train_event), _surv(time, event),
                                           np.asarray(risk, float), np.asarray(horizons, float))
    except (ValueError, ZeroDivisionError):
        return {**keys, "auc_mean": float("nan")}
    return {**{f"auc@{h:g}": float(a) for h, a in zip(horizons, auc)}, "auc_mean": float(mean)}


def breslow_baseline(time, event, risk) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's cumulative baseline hazard from training risk scores (``risk`` = log relative hazard):
    H0(t) = sum over distinct event times s <= t of d(s) / sum_{j: t_j >= s} exp(risk_j).
    Returns (distinct event times, H0 at them)."""
    t, e = np.asarray(time, float), np.asarray(event).astype(bool)
    r = np.asarray(risk, float)
    r = r - r.max()  # numerically safe; S(t|x) below uses the same shift
    ts = np.unique(t[e])
    w = np.exp(r)
    h = np.array([e[t == s].sum() / w[t >= s].sum() for s in ts])
    return ts, np.cumsum(h) * np.exp(-float(np.asarray(risk, float).max()))


def survival_function(baseline: tuple[np.ndarray, np.ndarray], risk, times) -> np.ndarray:
    """S(t | risk) = exp(-H0(t) exp(risk)) at ``times``: (n patients, len(times))."""
    ts, H = (np.asarray(b, float) for b in baseline)
    idx = np.searchsorted(ts, np.asarray(times, float), side="right") - 1
    H0 = np.where(idx >= 0, H[np.clip(idx, 0, None)] if len(H) else 0.0, 0.0)
    return np.exp(-np.outer(np.exp(np.asarray(risk, float)), H0))


def integrated_brier(time, event, risk, train_time, train_event, train_risk,
                     times: Sequence[float] | None = None) -> float:
    """Integrated Brier score (IPCW) of survival functions from a Breslow baseline fitted on the
    training risks; ``times`` default: 30 points between the 10% and 80% quantiles of the test times."""
    from sksurv.metrics import integrated_brier_score

    t = np.asarray(time, float)
    if times is None:
        lo, hi = np.quantile(t, [0.1, 0.8])
        grid = np.linspace(lo, hi, 30)
    else:
        grid = np.asarray(times, float)
    if len(grid) < 2 or np.asarray(event).sum() == 0:
        return float("nan")
    base = breslow_baseline(train_time, train_event, train_risk)
    est = survival_function(base, risk, grid)
    try:
        return float(integrated_brier_score(_surv(train_time, train_event), _surv(time, event), est, grid))
    except (ValueError, ZeroDivisionError):
        return float("nan")


def bootstrap(fn: Callable[..., dict[str, float]], arrays: Sequence[np.ndarray], n: int = 1000, seed: int = 0,
              ok: Callable[..., bool] | None = None) -> dict[str, list[float]]:
    """Percentile 95% intervals of each value of ``fn(*arrays[idx])`` over ``n`` resamples of the rows
    (resamples that ``ok`` refuses, or whose value is nan, are left out)."""
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, m, m)
        sub = [np.asarray(a)[idx] for a in arrays]
        if ok is not None and not ok(*sub):
            continue
        for k, v in fn(*sub).items():
            if np.isfinite(v):
                draws.setdefault(k, []).append(v)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items() if v}


def survival_metrics(time, event, risk, horizons: Sequence[float] | None = None,
                     train: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Harrell's C, Uno's C, time-dependent AUC at ``horizons`` (default: quartiles of the event
    times) and the integrated Brier score. ``train``: (time, event, risk) of the training set (the
    censoring distribution and the Breslow baseline); default the same patients."""
    time, event, risk = np.asarray(time, float), np.asarray(event, int), np.asarray(risk, float)
    tt, te, tr = train if train is not None else (time, event, risk)
    horizons = default_horizons(time, event) if horizons is None else list(horizons)
    return {"c_index": harrell_c(time, event, risk), "uno_c": uno_c(time, event, risk, tt, te),
            **time_auc(time, event, risk, horizons, tt, te),
            "ibs": integrated_brier(time, event, risk, tt, te, tr)}


# -- regression statistics -------------------------------------------------------------------------

def regression_metrics(target, predicted) -> dict[str, float]:
    """R² (1 - SSres/SStot), MAE, RMSE, Pearson r, Spearman rho."""
    from scipy.stats import pearsonr, spearmanr

    y, p = np.asarray(target, float), np.asarray(predicted, float)
    ss = ((y - y.mean()) ** 2).sum()
    const = len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0
    return {"r2": float(1 - ((y - p) ** 2).sum() / ss) if ss > 0 else float("nan"),
            "mae": float(np.abs(y - p).mean()), "rmse": float(np.sqrt(((y - p) ** 2).mean())),
            "pearson": float("nan") if const else float(pearsonr(y, p)[0]),
            "spearman": float("nan") if const else float(spearmanr(y, p)[0])}


# -- Kaplan–Meier by predicted risk group ----------------------------------------------------------

def risk_groups(risk, cutoffs: Sequence[float] | None = None) -> np.ndarray:
    """Group 0 (lowest risk) .. len(cutoffs); default one cut-off at the median risk (above it: high)."""
    r = np.asarray(risk, float)
    cuts = [float(np.median(r))] if cutoffs is None else sorted(cutoffs)
    return np.searchsorted(np.asarray(cuts), r, side="right")


def logrank(time, event, groups) -> tuple[float, float]:
    """Log-rank test across groups: (chi², p)."""
    from sksurv.compare import compare_survival

    g = np.asarray(groups)
    if len(set(g.tolist())) < 2:
        return float("nan"), float("nan")
    chisq, p = compare_survival(_surv(time, event), g)
    return float(chisq), float(p)


def km_plot(time, event, risk, out: str | os.PathLike | None = None, cutoffs: Sequence[float] | None = None,
            at_risk_times: Sequence[float] | None = None, title: str = "") -> dict:
    """Kaplan–Meier curves of the predicted risk groups (median split or ``cutoffs``), numbers at
    risk at ``at_risk_times`` (default 5 points over the follow-up) and the log-rank p.

    Returns ``{"groups": [{name, n, events, at_risk}], "at_risk_times", "chisq", "p", "png"}``;
    ``png`` is the written file (matplotlib's Agg canvas: no display needed; censored patients are
    ticks on the curves), or None with ``png_skipped`` saying why (no matplotlib)."""
    from sksurv.nonparametric import kaplan_meier_estimator

    t, e = np.asarray(time, float), np.asarray(event).astype(bool)
    g = risk_groups(risk, cutoffs)
    k = int(g.max()) + 1 if len(g) else 0
    names = ["low risk", "high risk"] if k == 2 else [f"risk group {i + 1}" for i in range(k)]
    at = np.linspace(0, t.max(), 5) if at_risk_times is None else np.asarray(at_risk_times, float)
    chisq, p = logrank(t, e, g)
    result: dict[str, Any] = {"groups": [], "at_risk_times": [float(x) for x in at], "chisq": chisq, "p": p,
                              "png": None}
    curves: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i in range(k):
        m = g == i
        if not m.any():
            result["groups"].append({"name": names[i], "n": 0, "events": 0, "at_risk": [0] * len(at)})
            curves.append(None)
            continue
        x, s = kaplan_meier_estimator(e[m], t[m])
        curves.append((x, s))
        result["groups"].append({"name": names[i], "n": int(m.sum()), "events": int(e[m].sum()),
                                 "at_risk": [int((t[m] >= a).sum()) for a in at]})
    if out is None:
        return result
    try:  # a Figure on the Agg canvas: no pyplot, no display, no global backend switched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        result["png_skipped"] = "matplotlib is not installed: no PNG written"
        return result
    fig = Figure(figsize=(6.4, 5.2))
    FigureCanvasAgg(fig)
    ax, tab = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4, 1 + 0.35 * k]}, sharex=True)
    colours = [f"C{i}" for i in range(k)]
    for i, c in enumerate(curves):
        if c is None:
            continue
        x, s = np.r_[0, c[0]], np.r_[1, c[1]]
        ax.step(x, s, where="post", color=colours[i], label=f"{names[i]} (n={result['groups'][i]['n']}, "
                                                            f"{result['groups'][i]['events']} events)")
        m = (g == i) & ~e  # censored patients: a tick on the curve at their time
        ax.plot(t[m], s[np.searchsorted(x, t[m], side="right") - 1], "|", color=colours[i], markersize=6)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, float(t.max()) * 1.02 if len(t) else 1)
    ax.tick_params(labelbottom=True)
    ax.set_xlabel("time")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"{title + ': ' if title else ''}log-rank p = {p:.3g}")
    tab.set_yticks([])
    for side in ("top", "right", "left", "bottom"):
        tab.spines[side].set_visible(False)
    tab.tick_params(bottom=False, labelbottom=False)
    tab.set_ylim(-0.5, k - 0.5)
    for i, grp in enumerate(result["groups"]):
        y = k - 1 - i
        tab.text(-0.05, y, grp["name"], transform=tab.get_yaxis_transform(), ha="right", va="center", fontsize=8,
                 color=colours[i])
        for a, n in zip(at, grp["at_risk"]):
            tab.text(a, y, str(n), ha="center", va="center", fontsize=8)
    tab.set_title("numbers at risk", fontsize=8, loc="left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    result["png"] = str(out)
    return result


# -- the linear baseline on the same folds ---------------------------------------------------------

def _read_endpoint_table(table: Path) -> tuple[list[str], list[Path], np.ndarray, str]:
    """A MIL table of ``patient_bags`` (or any slide,time,event|target,features table): slide names,
    feature files, targets ((n, 2) time/event or (n,) target) and the kind."""
    with open(table, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or "features" not in rows[0] or "slide" not in rows[0]:
        raise LabelError("a MIL table needs slide and features columns", table)
    names = [r["slide"] for r in rows]
    files = [Path(r["features"]) if Path(r["features"]).is_absolute() else table.parent / r["features"] for r in rows]
    if {"time", "event"} <= set(rows[0]):
        y = np.array([[parse_time(r["time"], table, i), parse_status(r["event"], table, i)]
                      for i, r in enumerate(rows, start=2)])
        return names, files, y, "survival"
    if "target" in rows[0]:
        return names, files, np.array([float(r["target"]) for r in rows]), "regression"
    raise LabelError("a MIL table needs time and event, or target, columns", table)


def meanpool_baseline(table: str | os.PathLike, oof: str | os.PathLike, out: str | os.PathLike | None = None,
                      seed: int = 0) -> dict:
    """A linear model on each bag's mean feature, on the folds of a trained MIL run (``oof.csv``'s
    ``fold``), so the two are compared on the same test patients (``linear_baseline`` on the files).

    Returns ``{"kind", "model", "overall", "folds", "mil_overall", "diff"}`` (diff: the MIL run's
    headline metric minus the baseline's, pooled out of fold); ``out``: the baseline's own
    ``oof.csv``-like table.
    """
    table, oof = Path(table), Path(oof)
    for path, what in ((table, "MIL table"), (oof, "oof.csv")):
        if not path.is_file():
            raise LabelError(f"{what} not found", path)
    names, files, y, kind = _read_endpoint_table(table)
    with open(oof, newline="") as f:
        orows = {r["slide"]: r for r in csv.DictReader(f)}
    missing = [n for n in names if n not in orows]
    if missing:
        raise LabelError(f"slide(s) {missing[:3]} of {table} are not in this oof.csv (another run's table?)", oof)
    fold = np.array([int(orows[n]["fold"]) for n in names])
    mil = np.array([float(orows[n]["risk" if kind == "survival" else "predicted"]) for n in names])
    x = np.stack([read_features(p).features.mean(0) for p in files]).astype(np.float64)
    res = linear_baseline(x, y, fold=fold, mil_predictions=mil, seed=seed)
    if out is not None:
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide", "fold", "risk" if kind == "survival" else "predicted"])
            w.writerows([n, int(k), round(float(v), 6)] for n, k, v in zip(names, fold, res.pop("predictions")))
    else:
        res.pop("predictions")
    return res


def linear_baseline(x: np.ndarray, targets: np.ndarray, *, fold: np.ndarray, mil_predictions: np.ndarray | None = None,
                    seed: int = 0) -> dict:
    """The mean-pooled linear baseline on given folds.

    Features are standardised on the training folds. Survival (``targets`` (n, 2): time, event):
    CoxNet (scikit-survival's ``CoxnetSurvivalAnalysis``, elastic net with l1_ratio 0.5, the penalty
    chosen by an inner 3-fold CV of Harrell's C over its path); regression (``targets`` (n,)):
    ``RidgeCV`` (alphas 10^-3..10^3).

    Parameters
    ----------
    x
        (n, d) each bag's mean feature.
    targets
        (n, 2) time and event, or (n,) a continuous target.
    fold
        (n,) each bag's test fold (each fold is scored by a model fitted on the others).
    mil_predictions
        (n,) the MIL run's out-of-fold risk or predicted value on the same bags (for ``diff``).
    seed
        Seed of the inner CV split.

    Returns
    -------
    dict
        ``kind``, ``model``, ``overall`` (pooled out-of-fold metrics), ``folds`` (per fold),
        ``predictions`` (out of fold) and, with ``mil_predictions``, ``mil_overall`` and ``diff``
        (MIL - baseline of the headline metric: ``c_index`` or ``r2``).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(targets, float)
    kind = "survival" if y.ndim == 2 else "regression"
    fold = np.asarray(fold)
    pred = np.full(len(y), np.nan)
    folds = []
    for k in sorted(set(fold.tolist())):
        tr, te = fold != k, fold == k
        sc = StandardScaler().fit(x[tr])
        xtr, xte = sc.transform(x[tr]), sc.transform(x[te])
        if kind == "survival":
            pred[te] = _coxnet(xtr, y[tr], xte, seed)
            folds.append({"fold": int(k), **survival_metrics(y[te, 0], y[te, 1], pred[te])})
        else:
            model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(xtr, y[tr])
            pred[te] = model.predict(xte)
            folds.append({"fold": int(k), **regression_metrics(y[te], pred[te])})
    if kind == "survival":
        score: Callable[[np.ndarray], dict] = lambda p: survival_metrics(y[:, 0], y[:, 1], p)  # noqa: E731
        head, model_name = "c_index", "mean-pooled CoxNet"
    else:
        score, head, model_name = (lambda p: regression_metrics(y, p)), "r2", "mean-pooled ridge"
    res: dict[str, Any] = {"kind": kind, "model": model_name, "overall": score(pred), "folds": folds,
                           "predictions": pred}
    if mil_predictions is not None:
        mil = score(np.asarray(mil_predictions, float))
        res.update(mil_overall=mil, diff={head: float(mil[head] - res["overall"][head])})
    return res


def _coxnet(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, seed: int) -> np.ndarray:
    """CoxNet risks of ``xte``: elastic-net Cox (l1_ratio 0.5) fitted along its penalty path (warm
    starts: stable where a lone small penalty overflows), the penalty chosen by an inner 3-fold CV
    of Harrell's C over the path; with fewer than 6 events, the path's least penalised end."""
    import warnings

    from sklearn.model_selection import StratifiedKFold
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    def path(x: np.ndarray, y: np.ndarray, alphas=None) -> CoxnetSurvivalAnalysis:
        for ratio in (0.01, 0.05, 0.2):  # a path that overflows at its small end is cut shorter
            try:
                kw = {"alphas": alphas} if alphas is not None else {"alpha_min_ratio": ratio, "n_alphas": 20}
                return CoxnetSurvivalAnalysis(l1_ratio=0.5, **kw).fit(x, _surv(y[:, 0], y[:, 1]))
            except ArithmeticError:
                if alphas is not None:
                    alphas = alphas[: max(1, len(alphas) // 2)]
        raise ArithmeticError("CoxNet overflowed at every penalty tried")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = path(xtr, ytr)
        alphas = list(full.alphas_)
        events = int(ytr[:, 1].sum())
        if events < 6 or len(ytr) - events < 3:
            return np.asarray(full.predict(xte, alpha=alphas[-1]), float)
        scores = np.full((3, len(alphas)), np.nan)
        for k, (a, b) in enumerate(StratifiedKFold(3, shuffle=True, random_state=seed).split(
                xtr, ytr[:, 1].astype(int))):
            try:
                inner = path(xtr[a], ytr[a], alphas)
            except ArithmeticError:
                continue
            for j, alpha in enumerate(alphas):
                if alpha in set(inner.alphas_):
                    scores[k, j] = harrell_c(ytr[b, 0], ytr[b, 1], inner.predict(xtr[b], alpha=alpha))
        mean = np.nanmean(np.where(np.isnan(scores), 0.5, scores), axis=0)
        best = alphas[int(np.argmax(mean))]
    return np.asarray(full.predict(xte, alpha=best), float)


# -- from a trained run's oof.csv ------------------------------------------------------------------

def km_from_oof(oof: str | os.PathLike, out: str | os.PathLike | None = None, *,
                cutoffs: Sequence[float] | None = None, title: str = "") -> dict:
    """``km_plot`` of a survival run's out-of-fold predictions.

    Parameters
    ----------
    oof
        The run's ``oof.csv`` (columns ``time``, ``event``, ``risk``).
    out
        The PNG to write (None: only the groups, numbers at risk and the log-rank test).
    cutoffs
        Risk cut-offs between the groups (default: the median risk).
    title
        Put before the log-rank p in the plot's title.
    """
    oof = Path(oof)
    if not oof.is_file():
        raise LabelError("oof.csv not found", oof)
    with open(oof, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"time", "event", "risk"} <= set(rows[0]):
        raise LabelError("not the oof.csv of a survival run (needs time, event and risk columns)", oof)
    t = np.array([parse_time(r["time"], oof, i) for i, r in enumerate(rows, start=2)])
    e = np.array([parse_status(r["event"], oof, i) for i, r in enumerate(rows, start=2)])
    return km_plot(t, e, np.array([float(r["risk"]) for r in rows]), out, cutoffs, title=title)

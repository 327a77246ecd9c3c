"""pN stage of a patient from its lymph-node (slide) labels, CAMELYON17 rules, and the
quadratic weighted kappa used to score stages.

Node labels are ``negative``, ``itc``, ``micro``, ``macro``. The patient stage is one of
``pN0, pN0(i+), pN1mi, pN1, pN2`` (in that order for the kappa): isolated tumour cells never count
as a metastatic node when telling pN1 (1-3 nodes) from pN2 (4 or more).

CSV files are CAMELYON17-style: header ``patient,stage``; patient rows ``patient_XXX.zip,<stage>``;
node rows ``patient_XXX_node_N.tif,<label>``. A node is identified by its patient and number,
so ``node_2`` / ``node_02`` and ``node_0.tif`` / ``node_0.svs`` are one node, and a node given
twice is refused rather than counted twice.
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from slidekit.base.errors import LabelError
from slidekit.base.io import atomic_path

NODE_LABELS: tuple[str, ...] = ("negative", "itc", "micro", "macro")
PN_STAGES: tuple[str, ...] = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")

_NODE_RE = re.compile(r"^(?P<patient>.+)_node_(?P<node>\d+)\.[A-Za-z0-9]+$")
_PATIENT_RE = re.compile(r"^(?P<patient>.+)\.zip$")
_STAGE_BY_LOWER = {s.lower(): s for s in PN_STAGES}


def normalise_node_label(label: str) -> str:
    """``label`` as one of NODE_LABELS (case and surrounding spaces ignored); LabelError otherwise."""
    key = str(label).strip().lower()
    if key not in NODE_LABELS:
        raise LabelError(f"unknown node label {label!r}; expected one of {', '.join(NODE_LABELS)}")
    return key


def normalise_stage(stage: str) -> str:
    """``stage`` as one of PN_STAGES (case and surrounding spaces ignored); LabelError otherwise."""
    key = str(stage).strip().lower()
    if key not in _STAGE_BY_LOWER:
        raise LabelError(f"unknown pN stage {stage!r}; expected one of {', '.join(PN_STAGES)}")
    return _STAGE_BY_LOWER[key]


def pn_stage(labels: Iterable[str]) -> str:
    """The pN stage of a patient from the labels of its nodes (CAMELYON17 rules).

    >>> pn_stage(["negative", "itc", "macro", "macro", "micro"])
    'pN1'
    """
    counts = Counter(normalise_node_label(lab) for lab in labels)
    if not counts:
        raise LabelError("a patient needs at least one node label to be staged")
    metastatic = counts["micro"] + counts["macro"]  # ITC never counts as a metastatic node
    if counts["macro"]:
        return "pN2" if metastatic >= 4 else "pN1"
    if counts["micro"]:
        return "pN1mi"
    if counts["itc"]:
        return "pN0(i+)"
    return "pN0"


def confusion(ref: Sequence[str], pred: Sequence[str],
              classes: Sequence[str] = PN_STAGES) -> np.ndarray:
    """Confusion matrix (rows: reference, columns: prediction) over ``classes`` in their order."""
    if len(ref) != len(pred):
        raise ValueError(f"ref and pred differ in length ({len(ref)} vs {len(pred)})")
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r, p in zip(ref, pred):
        if r not in index or p not in index:
            bad = r if r not in index else p
            raise LabelError(f"label {bad!r} is not one of the classes {list(classes)}")
        m[index[r], index[p]] += 1
    return m


def weighted_kappa(ref: Sequence[str], pred: Sequence[str],
                   classes: Sequence[str] = PN_STAGES, weights: str = "quadratic") -> float:
    """Cohen's kappa with quadratic (or linear) weights over ``classes`` in the given order.

    The order matters: the weight of a disagreement grows with the distance between the two
    classes in ``classes`` (pN0 < pN0(i+) < pN1mi < pN1 < pN2 by default), so sorting the class
    names alphabetically would silently change the score. Equal to
    ``sklearn.metrics.cohen_kappa_score(ref, pred, labels=classes, weights=weights)``, except that
    where that is undefined (both raters use one and the same class throughout) this returns 1.0.
    """
    if weights not in ("quadratic", "linear"):
        raise ValueError(f"weights must be 'quadratic' or 'linear', not {weights!r}")
    if len(ref) == 0:
        raise LabelError("no rows to score")
    m = confusion(ref, pred, classes).astype(np.float64)
    k = len(classes)
    dist = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]).astype(np.float64)
    w = dist ** 2 if weights == "quadratic" else dist
    expected = np.outer(m.sum(axis=1), m.sum(axis=0)) / m.sum()
    denom = float((w * expected).sum())
    if denom == 0.0:
        return 1.0
    return float(1.0 - (w * m).sum() / denom)


# ----------------------------------------------------------------------------------------- CSV

@dataclass
class LabelTable:
    """The content of a CAMELYON17-style CSV: node labels by node file name, stages by patient."""

    nodes: dict[str, str] = field(default_factory=dict)     # "patient_000_node_0.tif" -> "itc"
    patients: dict[str, str] = field(default_factory=dict)  # "patient_000" -> "pN0"
    path: Path | None = None

    def nodes_by_patient(self) -> dict[str, dict[str, str]]:
        """{patient: {node file: label}}, node files in natural (node number) order."""
        out: dict[str, dict[str, str]] = {}
        for name in sorted(self.nodes, key=_node_sort_key):
            out.setdefault(patient_of(name), {})[name] = self.nodes[name]
        return out


def patient_of(node_name: str) -> str:
    """``patient_017`` from ``patient_017_node_3.tif``; LabelError for other names."""
    m = _NODE_RE.match(node_name)
    if not m:
        raise LabelError(f"node name {node_name!r} is not of the form <patient>_node_<N>.<ext>")
    return m.group("patient")


def _node_sort_key(name: str) -> tuple[str, int]:
    m = _NODE_RE.match(name)
    return (m.group("patient"), int(m.group("node"))) if m else (name, -1)


def node_identity(node_name: str) -> tuple[str, int]:
    """``(patient, node number)`` of a node file name: ``patient_0_node_2.tif``,
    ``patient_0_node_02.tif`` and ``patient_0_node_2.svs`` are one node. LabelError for other names."""
    m = _NODE_RE.match(node_name)
    if not m:
        raise LabelError(f"node name {node_name!r} is not of the form <patient>_node_<N>.<ext>")
    return m.group("patient"), int(m.group("node"))


def check_unique_nodes(names: Iterable[str], path: str | os.PathLike | None = None) -> None:
    """LabelError when two names are one node spelt two ways (a node counted twice can raise the stage)."""
    seen: dict[tuple[str, int], str] = {}
    for name in names:
        key = node_identity(name)
        if key in seen:
            raise LabelError(f"{name!r} and {seen[key]!r} are the same node (node {key[1]} of {key[0]}); "
                             "give each node once", path)
        seen[key] = name


def read_label_csv(path: str | os.PathLike, want: str = "both") -> LabelTable:
    """Read a CAMELYON17-style CSV (``patient,stage`` header; ``.zip`` patient rows, node rows).

    ``want`` is ``"nodes"`` (patient rows are ignored, as in a node-label input), ``"patients"``
    (node rows ignored, as for a reference) or ``"both"``. Raises LabelError naming the file and
    line for a missing file or header, a malformed or duplicated row or an unknown label.
    """
    path = Path(path)
    if want not in ("nodes", "patients", "both"):
        raise ValueError(f"want must be 'nodes', 'patients' or 'both', not {want!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"cannot read label CSV ({e})", path) from None
    rows = [(i, r) for i, r in enumerate(csv.reader(io.StringIO(text)), start=1)
            if any(cell.strip() for cell in r)]
    if not rows:
        raise LabelError("empty label CSV (expected header 'patient,stage')", path)
    line, header = rows[0]
    if [c.strip().lower() for c in header] != ["patient", "stage"]:
        raise LabelError(f"line {line}: header must be 'patient,stage', found {','.join(header)!r}", path)
    table = LabelTable(path=path)
    node_lines: dict[tuple[str, int], tuple[int, str]] = {}
    for line, row in rows[1:]:
        if len(row) != 2:
            raise LabelError(f"line {line}: expected 2 columns (name,label), found {len(row)}: "
                             f"{','.join(row)!r}", path)
        name, label = row[0].strip(), row[1].strip()
        try:
            if m := _PATIENT_RE.match(name):
                if want == "nodes":
                    continue
                patient = m.group("patient")
                if patient in table.patients:
                    raise LabelError(f"patient {name!r} listed twice")
                table.patients[patient] = normalise_stage(label)
            elif _NODE_RE.match(name):
                if want == "patients":
                    continue
                key = node_identity(name)
                if key in node_lines:
                    first_line, first = node_lines[key]
                    same = "listed twice" if first == name else f"the same node as {first!r}"
                    raise LabelError(f"node {name!r} is {same} (node {key[1]} of {key[0]}, line {first_line})")
                node_lines[key] = (line, name)
                table.nodes[name] = normalise_node_label(label)
            else:
                raise LabelError(f"row name {name!r} is neither <patient>.zip nor <patient>_node_<N>.tif")
        except LabelError as e:
            raise LabelError(f"line {line}: {e}", path) from None
    if want == "nodes" and not table.nodes:
        raise LabelError("no node rows (<patient>_node_<N>.tif,<label>) found", path)
    if want == "patients" and not table.patients:
        raise LabelError("no patient rows (<patient>.zip,<pN stage>) found", path)
    return table


def stage_table(nodes: Mapping[str, str]) -> dict[str, str]:
    """{patient: pN stage} from {node file name: node label}; LabelError when a node is given twice
    under two spellings (``node_2`` / ``node_02``, ``.tif`` / ``.svs``)."""
    check_unique_nodes(nodes)
    table = LabelTable(nodes={k: normalise_node_label(v) for k, v in nodes.items()})
    return {p: pn_stage(n.values()) for p, n in table.nodes_by_patient().items()}


def write_submission(path: str | os.PathLike, nodes: Mapping[str, str],
                     stages: Mapping[str, str] | None = None) -> Path:
    """Write a CAMELYON17 submission CSV atomically: each ``patient.zip,stage`` row, then its nodes."""
    check_unique_nodes(nodes)
    table = LabelTable(nodes=dict(nodes))
    stages = dict(stages) if stages is not None else stage_table(nodes)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient", "stage"])
    for patient, node_rows in sorted(table.nodes_by_patient().items()):
        w.writerow([f"{patient}.zip", stages[patient]])
        for name, label in node_rows.items():
            w.writerow([name, label])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)


def score_against(reference: Mapping[str, str], predicted: Mapping[str, str],
                  reference_path: str | os.PathLike | None = None) -> float:
    """Quadratic weighted kappa of predicted vs reference patient stages; every patient must be in
    both (LabelError naming the missing patients otherwise)."""
    missing_pred = sorted(set(reference) - set(predicted))
    missing_ref = sorted(set(predicted) - set(reference))
    if missing_pred or missing_ref:
        parts = []
        if missing_pred:
            parts.append(f"{len(missing_pred)} reference patient(s) have no prediction "
                         f"({', '.join(missing_pred[:5])}{', ...' if len(missing_pred) > 5 else ''})")
        if missing_ref:
            parts.append(f"{len(missing_ref)} predicted patient(s) are not in the reference "
                         f"({', '.join(missing_ref[:5])}{', ...' if len(missing_ref) > 5 else ''})")
        raise LabelError("; ".join(parts), reference_path)
    keys = sorted(reference)
    return weighted_kappa([reference[k] for k in keys], [predicted[k] for k in keys])


def stage_csv(nodes_csv: str | os.PathLike, out: str | os.PathLike,
              reference: str | os.PathLike | None = None) -> dict:
    """Stage every patient of a node-label CSV, write the submission CSV to ``out``, and score it
    against a reference CSV's patient rows when given.

    Returns ``{"patients", "nodes", "stages": {stage: count}, "out", "kappa"}`` (kappa None
    without a reference). The reference is read before anything is written, so a bad reference
    leaves no output behind.
    """
    table = read_label_csv(nodes_csv, want="nodes")
    stages = stage_table(table.nodes)
    kappa = None
    if reference is not None:
        ref = read_label_csv(reference, want="patients")
        kappa = score_against(ref.patients, stages, reference)
    write_submission(out, table.nodes, stages)
    counts = Counter(stages.values())
    return {"patients": len(stages), "nodes": len(table.nodes),
            "stages": {s: counts.get(s, 0) for s in PN_STAGES}, "out": str(out), "kappa": kappa}

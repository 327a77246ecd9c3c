"""Multi-seed runs of the learning benchmarks, paired by seed (issue 22).

A benchmark adds ``--seeds`` with :func:`add_seeds_argument`; when it is given, the benchmark hands
its own ``main`` to :func:`run_seeds`, which re-runs it once per seed (``--seed S``, each run's JSON
written next to ``--json OUT`` as ``OUT.seedS.json``), and :func:`summarise` writes

* the first seed's result unchanged (existing ``--json`` keys keep their meaning for outside checks),
* ``<metric>_per_seed`` (a list in seed order), ``<metric>_mean`` and ``<metric>_sd`` (sample sd,
  ``ddof=1``; ``None`` with one seed) for each metric named,
* for a pair ``(a, b)``: ``diff_per_seed`` (``a - b`` seed by seed), ``diff_mean``, ``diff_sd`` and
  ``diff_wins`` (seeds where ``a >= b``), with ``diff_of`` naming the pair,
* ``seeds`` and ``runs`` (each seed's whole result).

Seeds run as separate processes (each ``--seed S --json OUT.seedS.json``, a variant's
``OUT.seedS.PREFIX.json``) are summarised the same way by :func:`combine_seed_files`.

Variants (e.g. a baseline method run on the same seeds) are extra argument lists; a variant's
metrics are stored under its prefix (``baseline_iou``), so they pair with the main run's by seed.
:func:`add_baseline_argument` + :func:`run_with_baseline` are the ``--baseline`` wiring the
benchmarks share: ``--baseline B`` with ``--seeds`` also runs ``OPTION B`` on every seed and pairs
the main run's first metric against it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slidekit.base.io import write_text_atomic  # noqa: E402

# options whose value(s) the harness sets per seed run; they are removed from the user's argv first
_OWN = {"--seeds": "+", "--seed": 1, "--json": 1}


def add_seeds_argument(ap: argparse.ArgumentParser) -> None:
    """``--seeds S [S ...]``: run every method once per seed and pair the results by seed."""
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                    help="run once per seed and write per-seed values, mean, sd and the paired "
                         "difference (benchmarks/seeds.py); the plain keys stay the first seed's")


def strip_options(argv: Sequence[str], own: Mapping[str, object] = _OWN) -> list[str]:
    """``argv`` without the options the harness sets itself (``--seeds``, ``--seed``, ``--json``)."""
    out, i, argv = [], 0, list(argv)
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in own:
            i += 1
            if "=" not in a:
                if own[name] == "+":  # every value up to the next option
                    while i < len(argv) and not argv[i].startswith("--"):
                        i += 1
                else:
                    i += int(own[name])
            continue
        out.append(a)
        i += 1
    return out


def with_seed_dirs(argv: Sequence[str], options: Sequence[str], sub: str) -> list[str]:
    """``argv`` with each folder option in ``options`` pointing at its ``sub`` subfolder."""
    out, argv = [], list(argv)
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in options and eq:
            a = f"{name}={Path(value) / sub}"
        elif i > 0 and argv[i - 1] in options:
            a = str(Path(a) / sub)
        out.append(a)
    return out


def _get(result: Mapping, key: str):
    """A value by dotted path (``topk_mean.kappa``)."""
    value = result
    for part in key.split("."):
        value = value[part]
    return value


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``); sd is ``None`` for one value."""
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def summarise(runs: Sequence[Mapping], seeds: Sequence[int], metrics: Sequence[str],
              pair: tuple[str, str] | None = None, pairs: Mapping[str, tuple[str, str]] | None = None) -> dict:
    """First seed's result plus ``*_per_seed``/``*_mean``/``*_sd`` and the paired ``diff_*``.

    ``pairs`` names further pairs: ``{"vs_full": (a, b)}`` writes ``diff_vs_full_per_seed``,
    ``_mean``, ``_sd``, ``_wins`` and ``_of`` the same way (``pair`` keeps the plain ``diff_*``).

    ``runs[i]`` is seed ``seeds[i]``'s result; a metric is a (dotted) key of each run. A dotted
    metric's summary keys use ``_`` for the dots (``topk_mean.kappa`` -> ``topk_mean_kappa_mean``).
    """
    if len(runs) != len(seeds) or not runs:
        raise ValueError(f"{len(runs)} results for {len(seeds)} seeds")
    out = dict(runs[0])
    per = {}
    for m in metrics:
        name = m.replace(".", "_")
        per[m] = [float(_get(r, m)) for r in runs]
        out[f"{name}_per_seed"] = per[m]
        out[f"{name}_mean"], out[f"{name}_sd"] = mean_sd(per[m])
    named = {"": pair} if pair is not None else {}
    for name, (a, b) in {**named, **(pairs or {})}.items():
        av = per.get(a) or [float(_get(r, a)) for r in runs]
        bv = per.get(b) or [float(_get(r, b)) for r in runs]
        diff = [x - y for x, y in zip(av, bv)]
        key = f"diff_{name}_" if name else "diff_"
        out[f"{key}of"] = f"{a} - {b}"
        out[f"{key}per_seed"] = diff
        out[f"{key}mean"], out[f"{key}sd"] = mean_sd(diff)
        out[f"{key}wins"] = sum(d >= 0 for d in diff)
    out["seeds"] = list(seeds)
    out["runs"] = [dict(r) for r in runs]
    return out


def run_seeds(main: Callable[[list[str]], object], argv: Sequence[str] | None, seeds: Sequence[int],
              metrics: Sequence[str], *, pair: tuple[str, str] | None = None,
              variants: Mapping[str, Sequence[str]] | None = None, json_out: Path | None = None,
              seed_dirs: Sequence[str] = (), drop: Sequence[str] = (),
              pairs: Mapping[str, tuple[str, str]] | None = None) -> dict:
    """Run ``main`` once per seed (and per variant), pair by seed, write ``json_out``; returns the summary.

    ``main`` is the benchmark's own entry point taking an argv list; each call gets the user's
    arguments less ``--seeds/--seed/--json``, plus ``--seed S --json FILE`` and the variant's
    arguments (appended: argparse keeps the last value, so a variant's ``--method pce`` wins). The
    main run's metrics keep their names; a variant ``prefix``'s are stored as ``prefix + metric``
    in each seed's result before summarising. A work-folder option named in ``seed_dirs``
    (``--work DIR``) becomes ``DIR/seedS`` (``DIR/seedS_prefix`` for a variant), so seeds never
    share (or resume from) one another's cached runs. Options in ``drop`` (one value each, such as
    ``--baseline``) belong to the multi-seed run and are not handed down. ``pairs``: further
    named pairs (see :func:`summarise`).
    """
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: each seed once (got {list(seeds)})")
    base = strip_options(sys.argv[1:] if argv is None else argv, {**_OWN, **{d: 1 for d in drop}})
    variants = {"": [], **(variants or {})}
    with tempfile.TemporaryDirectory(prefix="seeds_") as tmp:
        files = json_out if json_out is not None else Path(tmp) / "seeds.json"
        for seed in seeds:
            for prefix, extra in variants.items():
                path = seed_result_path(files, seed, prefix)
                print(f"[seeds] seed {seed}{' ' + prefix.rstrip('_') if prefix else ''}: "
                      f"{' '.join(base + list(extra))}", flush=True)
                main([*with_seed_dirs(base, seed_dirs, f"seed{seed}" + (f"_{prefix.rstrip('_')}" if prefix else "")),
                      *extra, "--seed", str(seed), "--json", str(path)])
                if not path.is_file():  # e.g. the data was missing and the benchmark skipped itself
                    raise SystemExit(f"seed {seed}: the run wrote no result ({path}); see its output above")
        return combine_seed_files(files, seeds, metrics, [p for p in variants if p], pair, pairs,
                                  write=json_out is not None)


def seed_result_path(json_out: Path, seed: int, prefix: str = "") -> Path:
    """Where one seed's run writes its result: ``OUT.seedS.json``, a variant's ``OUT.seedS.PREFIX.json``."""
    stem = json_out.name.removesuffix(".json")
    tag = f".{prefix.rstrip('_')}" if prefix else ""
    return json_out.with_name(f"{stem}.seed{seed}{tag}.json")


def merge_variants(main_result: Mapping, variant_results: Mapping[str, Mapping], metrics: Sequence[str]) -> dict:
    """One seed's record: the main run's result, each variant's metrics as ``prefix + metric`` and
    its whole result under ``prefix`` less its trailing ``_`` (``baseline``)."""
    merged = dict(main_result)
    for prefix, result in variant_results.items():
        merged.update({prefix + m: _get(result, m) for m in metrics})
        merged[prefix.rstrip("_")] = dict(result)
    return merged


def combine_seed_files(json_out: Path, seeds: Sequence[int], metrics: Sequence[str], prefixes: Sequence[str] = (),
                       pair: tuple[str, str] | None = None, pairs: Mapping[str, tuple[str, str]] | None = None,
                       write: bool = True) -> dict:
    """The multi-seed summary from the per-seed files (:func:`seed_result_path`), written to ``json_out``.

    :func:`run_seeds` ends with it; called alone, it summarises seeds that were run as separate
    processes (``--seed S --json OUT.seedS[.PREFIX].json`` each). A missing file is an error.
    """
    runs = []
    for seed in seeds:
        paths = {p: seed_result_path(json_out, seed, p) for p in ["", *prefixes]}
        missing = [str(q) for q in paths.values() if not q.is_file()]
        if missing:
            raise SystemExit(f"seed {seed}: no result at {', '.join(missing)}")
        loaded = {p: json.loads(q.read_text()) for p, q in paths.items()}
        runs.append(merge_variants(loaded.pop(""), loaded, metrics))
    all_metrics = [*metrics, *(p + m for p in prefixes for m in metrics)]
    out = summarise(runs, seeds, all_metrics, pair, pairs)
    text = json.dumps(out, indent=1, default=float)
    print(json.dumps({k: v for k, v in out.items() if k.endswith(("_per_seed", "_mean", "_sd"))
                      or k.startswith("diff")}, indent=1, default=float))
    if write:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_out, text + "\n")
    return out


def add_baseline_argument(ap: argparse.ArgumentParser, option: str, choices: Sequence[str], metric: str) -> None:
    """``--baseline B``: with ``--seeds``, also run ``OPTION B`` per seed and pair against it."""
    ap.add_argument("--baseline", default=None, choices=sorted(choices),
                    help=f"with --seeds: also run this {option} on each seed and pair {option} against it "
                         f"(diff_* = {option.lstrip('-')} - baseline {metric}; its values as "
                         f"baseline_{metric}_per_seed ...)")


def run_with_baseline(ap: argparse.ArgumentParser, args: argparse.Namespace, main: Callable[[list[str]], object],
                      argv: Sequence[str] | None, option: str, metrics: Sequence[str],
                      seed_dirs: Sequence[str] = ()) -> dict | None:
    """The multi-seed run of a benchmark with ``--seeds``/``--baseline``; ``None`` for a plain run.

    ``--baseline`` without ``--seeds`` is refused (``ap.error``). With a baseline, the variant
    ``baseline_`` re-runs ``main`` with ``option args.baseline`` and ``metrics[0]`` is paired
    (``diff_* = metric - baseline_metric``). ``args.json`` is the summary's path.
    """
    if args.baseline and not args.seeds:
        ap.error(f"--baseline pairs {option} values over --seeds; give --seeds too")
    if not args.seeds:
        return None
    first = metrics[0]
    return run_seeds(main, argv, args.seeds, metrics, pair=(first, f"baseline_{first}") if args.baseline else None,
                     variants={"baseline_": [option, args.baseline]} if args.baseline else None,
                     json_out=args.json, drop=("--baseline",), seed_dirs=seed_dirs)


def finish_report(out: dict, runs: list[dict], *, t0: float, json_path: str | None, note: str | None = None) -> dict:
    """The common tail of a seeded benchmark's report: each seed's seconds, wall time, date, CPUs and
    load at the end, the note, the runs; print it (without the runs) and write it to ``json_path``."""
    import os
    import time

    from slidekit.base.resources import available_cpus

    out["seconds_per_seed"] = [r.get("seconds") for r in runs]  # each seed's own run (a reused seed: its first)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    out["cpus"] = available_cpus()
    out["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if note:
        out["note"] = note
    out["runs"] = runs
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    if json_path:
        write_text_atomic(json_path, json.dumps(out, indent=1))
    return out

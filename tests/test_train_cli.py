"""`slidekit train --list` (one line per trainer, plug-ins included) and `slidekit train NAME --show-config`."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import yaml
from click.testing import CliRunner
from conftest import install_trainer_plugin

import trainers
from slidekit.cli import main

BUILTINS = ["mil", "mixed-em", "morph-lgbm", "s2l", "scribble", "simclr", "topk-mean"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("name", BUILTINS)
def test_show_config_lists_every_field_with_type_default_and_help(tmp_path, name):
    res = run("train", name, "--show-config")
    assert res.exit_code == 0, res.output
    cls = trainers.get(name).Config
    lines = {ln.split(":", 1)[0]: ln for ln in res.output.splitlines() if not ln.startswith("#")}
    defaults = cls()
    for f in dataclasses.fields(cls):
        assert f.name in lines, f"{name}: option {f.name} not shown"
        value, _, note = lines[f.name].partition("# ")
        type_name, _, help_ = note.partition(": ")
        assert type_name.strip() and help_.strip(), f"{name}.{f.name}: no type or help in {lines[f.name]!r}"
        shown = yaml.safe_load(value)[f.name]
        # the declared default (None may mean "worked out from other options", e.g. simclr's lr)
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert shown == (list(want) if isinstance(want, tuple) else want), f"{name}.{f.name}"
    # The output is a complete config file that loads as the trainer's config, unchanged.
    path = tmp_path / f"{name}.yaml"
    path.write_text(res.output)
    loaded = trainers.load_config(cls, path)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(defaults)


def test_list_one_line_per_trainer_with_what_it_does():
    res = run("train", "--list")
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == BUILTINS
    for ln in lines:
        assert "labels:" in ln and len(ln.split()) > 3  # a description, not only the name


def test_list_includes_plugins(tmp_path, monkeypatch):
    install_trainer_plugin(tmp_path, monkeypatch, "my_lister", '''
        from dataclasses import dataclass
        from trainers.base import Trainer
        from trainers.config import TrainerConfig

        @dataclass
        class Cfg(TrainerConfig):
            depth: int = 3  # how deep the thing goes

        class Lister(Trainer):
            """A third-party trainer for the listing test."""
            name = "lister"
            consumes = frozenset({"images"})
            Config = Cfg
    ''', "lister = my_lister:Lister")
    try:
        res = run("train", "--list")
        line = next(ln for ln in res.output.splitlines() if ln.startswith("lister"))
        assert "A third-party trainer for the listing test." in line and "plug-in: my_lister" in line
        shown = run("train", "lister", "--show-config").output
        assert "depth: 3" in shown and "how deep the thing goes" in shown
    finally:
        sys.modules.pop("my_lister", None)


def test_show_config_of_unknown_trainer_is_one_line():
    res = CliRunner().invoke(main, ["train", "nope", "--show-config"])
    assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "available: " in res.output


def test_the_catalogue_read_from_source_matches_the_imported_trainers():
    from trainers import catalog

    from_source = {e.name: e for e in catalog.builtin_entries()}
    imported = {n: catalog.entry_of(trainers.get(n)) for n in trainers.available()
                if trainers.get(n).__module__ in catalog.BUILTIN_MODULES}
    assert from_source == imported


def test_a_builtin_whose_source_says_too_little_is_imported(tmp_path, monkeypatch):
    from trainers import catalog

    (tmp_path / "computed_trainer.py").write_text(
        "from trainers.base import Trainer, register\n\n"
        "@register\nclass Computed(Trainer):\n    \"\"\"Its name is computed.\"\"\"\n"
        "    name = 'comp' + 'uted'\n    consumes = frozenset({'images'})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert catalog._registered_classes("computed_trainer") is None
    monkeypatch.setattr(catalog, "BUILTIN_MODULES", ("computed_trainer",))
    try:
        (entry,) = catalog.builtin_entries()
        assert entry.name == "computed" and entry.summary == "Its name is computed."
    finally:
        from trainers import registry

        registry._REGISTRY.pop("computed", None)
        sys.modules.pop("computed_trainer", None)


def test_train_list_loads_neither_torch_nor_a_trainer(tmp_path):
    import subprocess

    code = ("import sys\nfrom click.testing import CliRunner\nfrom slidekit.cli import main\n"
            "res = CliRunner().invoke(main, ['train', '--list'])\nassert res.exit_code == 0, res.output\n"
            "print(sorted(m for m in ('torch', 'lightgbm', 'timm', 'sklearn', 'trainers.base', 'trainers.scribble')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- run folders and their inputs (issue 29 items 6 and 12), through `slidekit train mil` ------------------------

def _mil_cohort(tmp_path, n=8):
    import csv

    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        with h5py.File(tmp_path / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(0, 1, (20, 4)).astype(np.float32)
            f["coords"] = np.arange(40).reshape(20, 2) * 64
            f["coords"].attrs["patch_size_level0"] = 64
        rows.append({"slide": f"s{i}.tif", "label": "ab"[i % 2], "patient": f"p{i // 2}", "features": f"s{i}.h5"})
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table


def _mil(table, out, *extra):
    return CliRunner().invoke(main, ["train", "mil", "--out", str(out), "--set", f"slides={table}", "--set", "folds=2",
                                     "--set", "epochs=1", "--set", "bootstrap=0", "--set", "arch=meanpool",
                                     "--device", "cpu", "--quiet", *extra])


def test_a_run_that_failed_checking_its_inputs_does_not_own_its_folder(tmp_path):
    table = _mil_cohort(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(table.read_text().replace("s3.h5", "missing.h5"))
    res = _mil(bad, tmp_path / "run")
    assert res.exit_code != 0 and "missing.h5 not found" in res.output
    res = _mil(table, tmp_path / "run")  # the corrected rerun: other options (slides), not refused
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    # a run with progress still owns its folder
    res = _mil(bad, tmp_path / "run")
    assert res.exit_code != 0 and "other options" in res.output and "--restart" in res.output


def test_a_rerun_over_changed_inputs_is_refused_naming_them(tmp_path):
    import h5py
    import numpy as np

    table = _mil_cohort(tmp_path)
    assert _mil(table, tmp_path / "run").exit_code == 0
    oof = (tmp_path / "run" / "oof.csv").read_text()
    assert _mil(table, tmp_path / "run").exit_code == 0  # unchanged: the finished run
    assert (tmp_path / "run" / "oof.csv").read_text() == oof

    # the labels CSV edited in place (same path, same size)
    table.write_text(table.read_text().replace("s0.tif,a", "s0.tif,b").replace("s1.tif,b", "s1.tif,a"))
    res = _mil(table, tmp_path / "run")
    assert res.exit_code != 0 and "other inputs" in res.output and "slide table (slides.csv) changed" in res.output
    assert "--restart" in res.output and len(res.output.strip().splitlines()) == 1
    res = _mil(table, tmp_path / "run", "--restart")
    assert res.exit_code == 0, res.output
    assert "s0.tif,p0,b" in (tmp_path / "run" / "oof.csv").read_text()

    # a feature file replaced by another of the same size
    with h5py.File(tmp_path / "new.h5", "w") as f:
        f["features"] = np.zeros((20, 4), np.float32)
        f["coords"] = np.arange(40).reshape(20, 2) * 64
        f["coords"].attrs["patch_size_level0"] = 64
    (tmp_path / "new.h5").replace(tmp_path / "s5.h5")
    res = _mil(table, tmp_path / "run")
    assert res.exit_code != 0 and "feature file of s5.tif (s5.h5) changed" in res.output, res.output
    # --restart clears every fold of the old run
    res = _mil(table, tmp_path / "run", "--restart")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "fold_0.json").read_text())

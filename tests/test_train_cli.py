"""`slidekit train --list` (one line per trainer, plug-ins included) and `slidekit train NAME --show-config`."""
from __future__ import annotations

import dataclasses
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

"""One CLI vocabulary (issue 28, item 4): every option of every command comes from slidekit/cli/common.py,
one spelling and one meaning per idea; old spellings are hidden aliases that warn once.

The test walks every command of ``slidekit.cli:main`` (subcommands included) and fails when a flag has two
meanings or two defaults (outside ``DIFFERENT_DEFAULTS``), when an idea has two names (``SYNONYMS``), when a
command lacks ``--quiet``, when a slide-reading command lacks the shared slide-reading options, or when an
option was written inline instead of by a factory of common.py."""
from __future__ import annotations

from collections import defaultdict

import click
import pytest
from click.testing import CliRunner

from slidekit.cli import main
from slidekit.cli.common import VOCABULARY, AliasOption, VocabOption


def _walk(cmd: click.Command, path: tuple[str, ...]):
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], path + (name,))


COMMANDS = dict(_walk(main, ("slidekit",)))
UNSET = object()


def _options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option)]


def _visible(cmd: click.Command) -> list[VocabOption]:
    return [p for p in _options(cmd) if isinstance(p, VocabOption)]


def _flags(p: click.Option) -> list[str]:
    return [f for f in p.opts + p.secondary_opts if f.startswith("--")]


def _default(p: click.Option):
    d = p.default
    return None if d is None or type(d).__name__ == "Sentinel" else d  # click's UNSET: no default


# Flags whose default legitimately differs by command, and why (each command's help says so: "[X here: ...]").
DIFFERENT_DEFAULTS = {
    # what a tile is for: 0.5 for tiles kept for training or features (tile, embed), 0.1 for heatmaps (edge tiles
    # are predicted too), 0.05 for cells (nuclei at the tissue edge count)
    "--min-tissue": {0.5, 0.1, 0.05},
    # the objects kept: tumour-region polygons (heatmap, 1000 µm²) or nuclei (cells, 10 µm²)
    "--min-area": {1000.0, 10.0},
    # the API call's own default (heatmap_slide 32, embed_slide 64, cells_slide 16)
    "--batch-size": {32, 64, 16},
    # the API call's own default: heatmap_slide reads with 2 DataLoader processes, embed_slide and cells_slide in
    # the main process
    "--workers": {2, 0},
    # tile has no model to take the geometry from; heatmap, cells and embed default to the model's
    "--tile-mpp": {0.5, None},
    "--tile-size": {256, None},
    "--overlap": {0, None},
}

# Names an idea must not be spelled by on any command (visible), each with the one spelling to use instead.
SYNONYMS = {
    "--mask-mpp": "--tissue-mpp",     # tissue resolution
    "--mpp": "--tile-mpp",            # tile geometry (features: --work-mpp)
    "--size": "--tile-size",
    "--patch-size": "--tile-size",
    "--checkpoint": "--model",        # the trained model a command runs
    "--encoder": "--model",
    "--ckpt": "--model",
    "--silent": "--quiet",
    "--verbose": "--quiet",
    "--threads-per-worker": "--threads",
}

# Every old spelling that stays, as (command, old flag) -> the flag it now is. Hidden, and warns once.
OLD_SPELLINGS = {
    ("slidekit tissue", "--mask-mpp"): "--tissue-mpp",
    ("slidekit tissue", "--min-area"): "--tissue-min-area",
    ("slidekit tile", "--mpp"): "--tile-mpp",
    ("slidekit tile", "--size"): "--tile-size",
    ("slidekit tile", "--workers"): "--reader-threads",
    ("slidekit heatmap", "--mpp"): "--tile-mpp",
    ("slidekit heatmap", "--size"): "--tile-size",
    ("slidekit cells", "--mpp"): "--tile-mpp",
    ("slidekit cells", "--size"): "--tile-size",
    ("slidekit embed", "--patch-size"): "--tile-size",
    ("slidekit embed", "--encoder"): "--model",
    ("slidekit features", "--mpp"): "--work-mpp",
    ("slidekit mil-deploy", "--checkpoint"): "--model",
    ("slidekit mil-attention", "--checkpoint"): "--model",
}

# Old spellings that are also a current flag of other commands, kept for compatibility only on the command that
# had them (each a known wart, not a model for new options).
ALIAS_SHADOWS = {
    "--workers": "tile's old name of its reading threads; elsewhere DataLoader worker processes",
    "--min-area": "tissue's old name of --tissue-min-area; elsewhere the smallest output object",
}

# Commands that read slides, and which of the shared slide-reading options each takes.
READS_SLIDES = {"slidekit info", "slidekit tissue", "slidekit tile", "slidekit heatmap", "slidekit embed",
                "slidekit cells", "slidekit mil-attention", "slidekit view", "slidekit qc",
                "slidekit export-spatialdata", "slidekit qc-train"}
NO_MPP_OPTIONS = {"slidekit view": "serve() shows slides as their metadata says; it takes no MPP"}
NO_BACKEND = {  # the API call opens the slide with the automatic reader and takes no backend= (yet)
    "slidekit embed"}


def test_every_option_is_made_by_a_common_factory():
    inline = [f"{name} {p.opts}" for name, cmd in COMMANDS.items() for p in _options(cmd)
              if not isinstance(p, (VocabOption, AliasOption))]
    assert not inline, f"options written inline instead of by slidekit/cli/common.py: {inline}"
    for name, cmd in COMMANDS.items():
        for p in _visible(cmd):
            assert p.vocab_key in VOCABULARY and p.idea == VOCABULARY[p.vocab_key][1]
            assert (p.help or "").startswith(p.idea), (name, p.opts)


def test_one_flag_one_meaning():
    meanings = defaultdict(set)
    for cmd in COMMANDS.values():
        for p in _visible(cmd):
            for flag in _flags(p):
                meanings[flag].add((p.vocab_key, type(p.type).__name__, p.is_flag, p.multiple))
    two = {f: m for f, m in meanings.items() if len(m) > 1}
    assert not two, f"one flag, two meanings: {two}"


def test_one_flag_one_default_outside_the_allow_list():
    defaults = defaultdict(dict)
    for name, cmd in COMMANDS.items():
        for p in _visible(cmd):
            defaults[_flags(p)[0]][name] = _default(p)
    for flag, by_command in defaults.items():
        values = set(by_command.values())
        if flag in DIFFERENT_DEFAULTS:
            assert values <= DIFFERENT_DEFAULTS[flag], (flag, by_command)
        else:
            assert len(values) == 1, f"{flag} has different defaults {by_command}: add a reason to DIFFERENT_DEFAULTS"
    for flag in DIFFERENT_DEFAULTS:  # each command whose default is not the vocabulary's says why in its help
        for name, cmd in COMMANDS.items():
            for p in _visible(cmd):
                spec_default = VOCABULARY[p.vocab_key][2].get("default")
                if _flags(p)[0] == flag and _default(p) != spec_default:
                    assert " here: " in (p.help or ""), f"{name} {flag}: say why its default is {p.default}"


def test_one_idea_one_name():
    names = defaultdict(set)
    for name, cmd in COMMANDS.items():
        for p in _visible(cmd):
            names[p.vocab_key].add(tuple(_flags(p)))
            assert not set(_flags(p)) & set(SYNONYMS), \
                f"{name}: {_flags(p)} is a synonym; spell it {[SYNONYMS[f] for f in _flags(p) if f in SYNONYMS]}"
    assert all(len(n) == 1 for n in names.values()), {k: n for k, n in names.items() if len(n) > 1}


def test_old_spellings_are_hidden_aliases_listed_here():
    canonical = {f for cmd in COMMANDS.values() for p in _visible(cmd) for f in _flags(p)}
    found = {}
    for name, cmd in COMMANDS.items():
        own = {p.name: p for p in _visible(cmd)}
        for p in _options(cmd):
            if isinstance(p, AliasOption):
                assert p.hidden and not p.expose_value
                assert p.alias_of in own, (name, p.alias, p.alias_of)
                assert p.canonical == _flags(own[p.alias_of])[0]
                assert p.alias not in {f for q in _visible(cmd) for f in _flags(q)}
                found[(name, p.alias)] = p.canonical
                if p.alias in canonical:
                    assert p.alias in ALIAS_SHADOWS, f"{name}: old spelling {p.alias} is a current flag elsewhere"
    assert found == OLD_SPELLINGS


def test_every_command_has_quiet():
    for name, cmd in COMMANDS.items():
        quiet = [p for p in _visible(cmd) if p.vocab_key == "quiet"]
        assert quiet and {"--quiet", "-q"} <= set(quiet[0].opts), f"{name} has no --quiet/-q"


def test_slide_reading_commands_take_the_shared_reading_options():
    for name, cmd in COMMANDS.items():
        keys = {p.vocab_key for p in _visible(cmd)}
        args = {p.name for p in cmd.params if isinstance(p, click.Argument)}
        if args & {"slide", "slides"} or "slide" in keys:
            assert name in READS_SLIDES, f"{name} reads slides: list it in READS_SLIDES"
    for name in READS_SLIDES:
        keys = {p.vocab_key for p in _visible(COMMANDS[name])}
        if name not in NO_MPP_OPTIONS:
            assert {"slide_mpp", "override_mpp"} <= keys, name
        assert ("backend" in keys) == (name not in NO_BACKEND), name


def test_workers_means_dataloader_processes():
    for name, cmd in COMMANDS.items():
        for p in _visible(cmd):
            if "--workers" in p.opts:
                assert "DataLoader worker processes" in p.help, name


@pytest.fixture()
def demo_slide(tmp_path):
    from slidekit.slides.demo import write_demo_slide

    return write_demo_slide(tmp_path / "demo.tif")


def test_an_old_spelling_works_and_warns_once(tmp_path, demo_slide):
    res = CliRunner().invoke(main, ["tile", str(demo_slide), "--mpp", "4", "--size", "64", "--out",
                                    str(tmp_path / "g.npz"), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.count("slidekit: warning: --mpp is now --tile-mpp") == 1
    assert res.output.count("slidekit: warning: --size is now --tile-size") == 1
    new = CliRunner().invoke(main, ["tile", str(demo_slide), "--tile-mpp", "4", "--tile-size", "64", "--out",
                                    str(tmp_path / "h.npz"), "-q"])
    assert new.exit_code == 0 and new.output == ""
    assert (tmp_path / "g.npz").read_bytes() == (tmp_path / "h.npz").read_bytes()


def test_old_and_new_spelling_together_are_refused(tmp_path, demo_slide):
    for args in (["--mpp", "4", "--tile-mpp", "4"], ["--tile-mpp", "4", "--mpp", "4"]):
        res = CliRunner().invoke(main, ["tile", str(demo_slide), "--out", str(tmp_path / "g.npz"), *args])
        assert res.exit_code == 2 and "--mpp is the old spelling of --tile-mpp" in res.output


def test_an_old_spelling_counts_as_given(tmp_path, demo_slide):
    """tile refuses --reader-threads without --export; given as --workers, it is refused the same way."""
    res = CliRunner().invoke(main, ["tile", str(demo_slide), "--out", str(tmp_path / "g.npz"), "--workers", "2"])
    assert res.exit_code == 2 and "--reader-threads applies only with --export" in res.output
    assert "slidekit: warning: --workers is now --reader-threads" in res.output


def test_quiet_on_the_command_and_the_group(demo_slide, tmp_path):
    for args in (["-q", "info", str(demo_slide)], ["info", str(demo_slide), "-q"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0 and "dimensions" in res.output
    res = CliRunner().invoke(main, ["tissue", str(demo_slide), "--out", str(tmp_path / "t"),
                                    "--mask-mpp", "16", "--quiet"])
    assert res.exit_code == 0 and "--mask-mpp is now --tissue-mpp" in res.output
    import json

    assert json.loads((tmp_path / "t" / "tissue.json").read_text())["mask_mpp"] == 16


def test_cells_and_heatmap_take_the_shared_slide_reading_options(demo_slide, tmp_path):
    import json

    for cmd in ("cells", "heatmap"):
        out = tmp_path / cmd
        res = CliRunner().invoke(main, [cmd, str(demo_slide), "--out", str(out), "--override-mpp", "0.5",
                                        "--backend", "tiffslide", "--device", "cpu", "--workers", "0", "--quiet"])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "summary.json").read_text())["config"]["override_mpp"] == 0.5

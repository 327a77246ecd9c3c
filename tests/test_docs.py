"""Every Python and shell block of README.md and docs/**/*.md runs (issue 13: docs are tested).

Which blocks run, and how:

- ```python blocks of one Markdown file run in order in one namespace, with the working directory
  set to that file's temporary folder.
- ```bash / ```sh / ```shell blocks run as one bash script (``set -eo pipefail``) in the same folder.
  ```console blocks run their ``$ `` lines (``\\`` continues a line); the lines after a command are
  its shown output, and each of them (except ``...``) must appear in the real output, whitespace
  collapsed.
- ```yaml blocks must parse. A yaml block whose first line is a comment naming a file
  (``# nuclei.yaml`` or ``# nuclei.yaml: what it is``) is a config file the docs refer to: it is
  written under that name into the folder before the following blocks run. This is the one
  convention for showing config files in the docs. When the page runs ``slidekit train T --config
  NAME`` (in any block, run or not), the file must also load as trainer T's config.
- Untagged blocks (diagrams, file layouts, sample output) are text and are not run.
- Blocks too heavy for the default run (a full benchmark) are listed in ``SLOW`` (a substring of
  the block -> why): they are marked ``slow`` and run only with ``pytest -m slow``, and no later
  block may depend on them. Give such a block a small-settings variant beside it that runs by
  default where one fits (seconds, not minutes).
- Every block is its own test, with the id ``FILE:LINE``. Blocks of a file depend on the earlier
  ones (files they wrote, names they defined), so a test first runs any earlier block of its file
  that has not run yet; when one of those failed, this one fails too and says which.
- The folder holds links to the checkout's ``.venv``, ``benchmarks`` and ``examples`` so that
  commands written for the repository root work; the venv's ``bin`` is first on PATH (``slidekit``,
  ``python``) and ``SLIDEKIT_DATA`` points at the real-data folder (slidekit.base.datapaths).

New Markdown files under docs/ are picked up automatically.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from slidekit.base.datapaths import data_dir, data_missing_reason
from slidekit.base.errors import SlidekitWarning

ROOT = Path(__file__).resolve().parents[1]

# Placeholders in the docs and what the test uses for them. A placeholder is replaced where it stands
# as a whole path (not inside a longer name). Each maps to a file under the real-data folder
# ($SLIDEKIT_DATA, else ../shared/data) and, where any slide will do, to a fallback written by the
# test when the real data is absent (see _fallback; "demo" is the embedded demo slide). A block
# whose placeholder has no fallback is skipped without the real data (counted in the summary as a
# real-data skip), and so are the later blocks of its file, which may depend on it.
SUBSTITUTIONS: dict[str, tuple[str, str | None]] = {
    "slide.svs": ("wsi/CMU-1-Small-Region.svs", "demo"),          # any small slide
    "a.svs": ("wsi/CMU-1-Small-Region.svs", "demo"),              # two different slides
    "b.svs": ("wsi/OS-2-vsi.ome.tif", "demo-copy"),
    "no_mpp.svs": ("wsi/TCGA-CR-7395-01A-01-TS1.svs", "demo-no-mpp"),   # a slide without MPP
    "export.geojson": ("qupath_geojson/03012023_JN.geojson", None),   # a real QuPath export
    "tumor_036.xml": ("camelyon/asap_xml/tumor_036.xml", None),   # a real CAMELYON16 ASAP file
    "stage_labels.csv": ("camelyon/stage_labels.csv", None),      # the CAMELYON17 node labels
    "../shared/data": ("", None),                                 # the data folder itself
}

# Commands that change for the test, each with the reason. Only text that cannot run as it stands
# inside a test belongs here.
COMMAND_SUBSTITUTIONS: dict[str, tuple[str, str]] = {
    # Running the whole suite from inside the suite would recurse: check that it collects.
    ".venv/bin/python -m pytest -q": (".venv/bin/python -m pytest -q --collect-only {root}/tests",
                                      "the suite cannot run inside itself; it must collect"),
}

# Lines that are not run at all: exactly the install command (the test runs inside that install;
# reinstalling would rewrite the shared venv).
SKIP_LINES: dict[str, str] = {
    "python3 -m venv .venv && .venv/bin/pip install -e .[dev]": "installs the package",
}

# Blocks too heavy for the default run (they must not be needed by later blocks): a substring of
# the block -> why. They run with `pytest -m slow`.
SLOW: dict[str, str] = {
    "benchmarks/nuclei_scribbles.py": "a full MoNuSeg benchmark run (about 20 minutes on 2 cores)",
    "benchmarks/pn_cohort.py --seed 0": "the full pN-staging benchmark (about 14 minutes on 2 cores)",
    "benchmarks/pn_cohort.py --small": "the pN benchmark's smoke cohort still takes about 100 s on 2 "
                                       "shared cores (cohort construction, fixed topk-mean epochs)",
    "--init simclr --seed 0 --json simclr.json": "the SimCLR benchmark at its defaults (about 10 minutes)",
    "benchmarks/stain.py --json stain.json": "the full stain benchmark (four trainings, 8 minutes on 2 idle cores)",
    "benchmarks/mil.py --seeds":
        "the MIL benchmark (three seeds, five MIL trainings each: about 10 minutes on 2 shared cores)",
}

SHELL_LANGS = {"bash", "sh", "shell"}
BLOCK_TIMEOUT_S = 900


@dataclass
class Block:
    path: Path
    line: int          # line of the opening fence, 1-based
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks (```lang ... ```), with the line of their opening fence."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        blocks.append(Block(path, start, lang, "\n".join(body) + "\n"))
    return blocks


def runnable(block: Block) -> bool:
    return block.lang in {"python", "console", "yaml", "yml"} | SHELL_LANGS


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse_blocks(p) if runnable(b)]


def config_file_name(block: Block) -> str | None:
    """The file a yaml block stands for (first line ``# NAME.yaml``), or None."""
    m = re.match(r"#\s*([\w./-]+\.ya?ml)\b", block.text.lstrip())
    return m.group(1) if m else None


def slow_reason(block: Block) -> str | None:
    return next((why for key, why in SLOW.items() if key in block.text), None)


def _params() -> list:
    out = []
    for b in all_blocks():
        why = slow_reason(b)
        out.append(pytest.param(b, id=b.id, marks=[pytest.mark.slow] if why else []))
    return out


# --- placeholders ----------------------------------------------------------------------------------

def _fallback(kind: str, cache: Path) -> Path:
    """"demo": the demo slide; "demo-copy": a second one (another file name); "demo-no-mpp": its
    pixels as a one-level tiled TIFF without resolution tags, i.e. without an MPP."""
    import tifffile

    from slidekit.slides.demo import demo_image, write_demo_slide

    path = cache / f"{kind}.tif"
    if not path.exists():
        if kind == "demo-no-mpp":
            tifffile.imwrite(path, demo_image()[0], tile=(256, 256), compression="jpeg", photometric="rgb")
        else:
            write_demo_slide(path)
    return path


class MissingData(Exception):
    """A placeholder needs the real data, which is absent."""


def substitute(text: str, cache: Path) -> str:
    """Replace placeholders and the few adapted commands (tables above) in a block's text."""
    for line, _why in SKIP_LINES.items():
        text = "\n".join(": # not run by the docs test: " + s if s.split("#")[0].strip() == line else s
                         for s in text.split("\n"))
    for old, (new, _why) in COMMAND_SUBSTITUTIONS.items():
        text = text.replace(old, new.format(root=ROOT))
    for name, (rel, fallback) in SUBSTITUTIONS.items():
        pattern = re.compile(r"(?<![\w./-])" + re.escape(name) + r"(?![\w-]|\.\w)")
        if not pattern.search(text):
            continue
        if data_missing_reason() is None and (data_dir() / rel).exists():
            target = (data_dir() / rel).resolve()
        elif fallback is not None:
            target = _fallback(fallback, cache)
        else:
            raise MissingData(data_missing_reason() or f"real data not found: {data_dir() / rel}")
        text = pattern.sub(lambda _m, t=str(target): t, text)
    return text


# --- running ------------------------------------------------------------------------------------------

@dataclass
class DocRun:
    """The state of one Markdown file's blocks: folder, Python namespace, results so far."""
    path: Path
    workdir: Path
    cache: Path
    blocks: list[Block]
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    results: dict[int, str] = field(default_factory=dict)   # block index -> "ok" | "failed" | "skipped: why"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["SLIDEKIT_DATA"] = str(data_dir())
        env["PYTHONPATH"] = str(ROOT)
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def run_until(self, index: int) -> None:
        """Run block ``index``, first running the earlier blocks of the file that have not run."""
        for j in range(index):
            if j not in self.results and slow_reason(self.blocks[j]) is None:
                self._record(j)
        for j in range(index):
            res = self.results.get(j, "")
            if res.startswith("skipped: "):
                pytest.skip(f"{res[len('skipped: '):]} — needed by the earlier block {self.blocks[j].id}")
            if res.startswith("failed"):
                pytest.fail(f"the earlier block {self.blocks[j].id} of this file failed", pytrace=False)
        self.results[index] = "failed"
        try:
            self._run(self.blocks[index])
        except MissingData as e:
            self.results[index] = f"skipped: {e}"
            pytest.skip(str(e))
        self.results[index] = "ok"

    def _record(self, j: int) -> None:
        try:
            self._run(self.blocks[j])
            self.results[j] = "ok"
        except MissingData as e:
            self.results[j] = f"skipped: {e}"
        except BaseException:  # noqa: BLE001 - recorded; its own test reports it
            self.results[j] = "failed"

    def _run(self, block: Block) -> None:
        text = substitute(block.text, self.cache)
        if block.lang in {"yaml", "yml"}:
            yaml.safe_load(text)  # must parse, named or not
            name = config_file_name(block)
            if name:
                target = self.workdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                check_config_file(self.path, name, target)
        elif block.lang == "python":
            cwd = os.getcwd()
            os.chdir(self.workdir)
            try:
                with warnings.catch_warnings():
                    # A slidekit warning means the example shows a mistake; a block that means to
                    # show one catches it itself.
                    warnings.simplefilter("error", SlidekitWarning)
                    # Padded so that tracebacks give the line in the Markdown file.
                    code = compile("\n" * block.line + text, str(block.path), "exec")
                    exec(code, self.namespace)  # noqa: S102 - the docs' own code
            finally:
                os.chdir(cwd)
        elif block.lang == "console":
            for cmd, shown in console_commands(text):
                out = self._shell(cmd, block)
                check_shown_output(out, shown, cmd, block)
        else:
            self._shell(text, block)

    def _shell(self, script: str, block: Block) -> str:
        proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], cwd=self.workdir, env=self.env(),
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        if proc.returncode != 0:
            pytest.fail(f"{block.id}: exit {proc.returncode}\n--- script\n{script}\n--- stdout\n"
                        f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}", pytrace=False)
        return proc.stdout + proc.stderr


def check_config_file(doc: Path, name: str, path: Path) -> None:
    """A config file that the page trains with (``slidekit train T --config NAME``, in any block,
    run or not) must load as trainer T's config: no unknown keys, every value valid."""
    import trainers

    used = re.findall(r"slidekit train ([\w-]+)\b[^\n]*--config\s+" + re.escape(name) + r"\b",
                      doc.read_text(encoding="utf-8"))
    for trainer in sorted(set(used)):
        trainers.load_config(trainers.get(trainer).Config, path, [])


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for each ``$ `` line of a console block."""
    cmds: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        s = lines[i]
        if s.startswith("$ "):
            cmd = s[2:]
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            cmds.append((cmd, []))
        elif cmds and s.strip():
            cmds[-1][1].append(s)
        i += 1
    return cmds


def _squash(s: str) -> str:
    return " ".join(s.split())


def check_shown_output(out: str, shown: list[str], cmd: str, block: Block) -> None:
    """Each line the docs show as output (except ``...``) is part of the real output."""
    real = _squash(out)
    for line in shown:
        if line.strip() in {"...", "…"}:
            continue
        if _squash(line) not in real:
            pytest.fail(f"{block.id}: `{cmd}` does not print the line the docs show:\n  {line.strip()}\n"
                        f"--- real output\n{out[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, DocRun]:
    cache = tmp_path_factory.mktemp("docs_placeholders")
    runs: dict[Path, DocRun] = {}
    for path in doc_files():
        work = tmp_path_factory.mktemp("docs_" + re.sub(r"\W", "_", str(path.relative_to(ROOT))))
        for name in (".venv", "benchmarks", "examples"):
            if (ROOT / name).exists():
                (work / name).symlink_to(ROOT / name)
        runs[path] = DocRun(path, work, cache, [b for b in parse_blocks(path) if runnable(b)])
    return runs


@pytest.mark.parametrize("block", _params())
def test_doc_block(block: Block, doc_runs: dict[Path, DocRun]) -> None:
    run = doc_runs[block.path]
    index = next(i for i, b in enumerate(run.blocks) if b.line == block.line)
    if all(s.split("#")[0].strip() in SKIP_LINES or not s.strip() for s in block.text.splitlines()):
        pytest.skip("install command, not run by the docs test (see SKIP_LINES)")
    run.run_until(index)


# --- the machinery itself -----------------------------------------------------------------------------

def test_every_doc_file_is_found_and_blocks_have_ids(tmp_path: Path) -> None:
    """New pages are picked up; ids are FILE:LINE of the opening fence."""
    assert ROOT / "README.md" in doc_files()
    assert ROOT / "docs" / "quickstart.md" in doc_files()
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```\nnot run\n```\n\n```yaml\n# a.yaml\nk: 1\n```\n")
    blocks = [b for b in parse_blocks(page) if runnable(b)]
    assert [(b.lang, b.line) for b in blocks] == [("python", 3), ("yaml", 11)]
    assert config_file_name(blocks[1]) == "a.yaml"


def test_substitution_replaces_whole_paths_only(tmp_path: Path) -> None:
    if data_missing_reason() is not None:
        pytest.skip(data_missing_reason())
    text = substitute("slidekit info slide.svs; cat myslide.svs slide.svs.bak x/slide.svs\n", tmp_path)
    assert text.startswith(f"slidekit info {(data_dir() / 'wsi/CMU-1-Small-Region.svs').resolve()};")
    assert "myslide.svs slide.svs.bak x/slide.svs" in text


def test_install_line_is_the_only_line_skipped(tmp_path: Path) -> None:
    text = substitute("python3 -m venv .venv && .venv/bin/pip install -e .[dev]    # install\necho hi\n",
                      tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith(": # not run") and lines[1] == "echo hi"


def test_console_output_is_checked() -> None:
    cmds = console_commands("$ echo a \\\n  b\na b\n...\n$ true\n")
    assert cmds == [("echo a  b", ["a b", "..."]), ("true", [])]
    blk = Block(ROOT / "README.md", 1, "console", "")
    check_shown_output("a   b\n", ["a b", "..."], "echo", blk)
    with pytest.raises(pytest.fail.Exception):
        check_shown_output("a c\n", ["a b"], "echo", blk)


def test_config_file_is_checked_against_its_trainer(tmp_path: Path) -> None:
    from slidekit.base.errors import ConfigError

    doc = tmp_path / "p.md"
    doc.write_text("```\nslidekit train scribble --config a.yaml --out runs/a\n```\n")
    (tmp_path / "a.yaml").write_text("epochs: 2\ncrop: 64\n")
    check_config_file(doc, "a.yaml", tmp_path / "a.yaml")
    (tmp_path / "a.yaml").write_text("epochs: 2\ncrops: 64\n")   # a misspelt key
    with pytest.raises(ConfigError):
        check_config_file(doc, "a.yaml", tmp_path / "a.yaml")


if __name__ == "__main__":  # list the blocks: python tests/test_docs.py
    for b in all_blocks():
        print(b.id, b.lang, textwrap.shorten(b.text, 70))
    sys.exit(0)

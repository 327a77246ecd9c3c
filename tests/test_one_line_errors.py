"""One-line errors that name the file and the problem (issue 30 item 10), through the CLI: a binary
slide table for `train mil`. (A weights path that is a link to /dev/zero: tests/test_encoder_names.py. A slide
whose metadata MPP is 1e-7 is not tested here: ``write_pyramid`` cannot write it, the TIFF resolution tag
being a 32-bit rational.)"""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from slidekit.cli import main


def _one_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    return lines[0]


def _train_mil(table, out):
    return CliRunner().invoke(main, ["train", "mil", "--out", str(out), "--set", f"slides={table}", "--set",
                                     "folds=2", "--set", "epochs=1", "--device", "cpu", "--quiet"])


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"PK\x03\x04\x14\x00\x06\x00" + b"\xff\xfe" * 500,
                                     "slide,label\nA,b\n".encode("utf-16")])
def test_train_mil_on_a_binary_table_names_it(tmp_path, content):
    table = tmp_path / "slides.xlsx"
    table.write_bytes(content)
    line = _one_line(_train_mil(table, tmp_path / "run"))
    assert "slides.xlsx" in line and "is not a text CSV table" in line
    assert "UnicodeDecodeError" not in line and "codec" not in line


def test_train_mil_on_a_table_that_is_not_a_regular_file(tmp_path):
    link = tmp_path / "slides.csv"
    os.symlink("/dev/zero", link)
    line = _one_line(_train_mil(link, tmp_path / "run"))
    assert "slides.csv" in line and "not a regular file" in line

"""Where the real data is found (slidekit.base.datapaths), and the test summary's line about it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slidekit.base.datapaths import DEFAULT_DATA, ENV_VAR, data_dir, data_missing_reason, require_data_dir
from slidekit.base.errors import SlidekitError

ROOT = Path(__file__).resolve().parents[1]


def test_explicit_beats_environment_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert data_dir() == DEFAULT_DATA == ROOT.parent / "shared" / "data"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "opt") == tmp_path / "opt"


def test_missing_folder_is_one_line_naming_it_and_the_remedy(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert data_missing_reason(tmp_path) is None
    reason = data_missing_reason(tmp_path / "nope")
    assert reason is not None and str(tmp_path / "nope") in reason and "\n" not in reason
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope2"))
    with pytest.raises(SlidekitError, match=re.escape(str(tmp_path / "nope2"))):
        require_data_dir()


def test_summary_counts_real_data_skips(tmp_path: Path) -> None:
    """Without the data, pytest's summary says how many tests were skipped for it and why (no -rs)."""
    env = dict(os.environ, **{ENV_VAR: str(tmp_path / "absent")})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_slide.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    m = re.search(r"real data: (\d+) tests? skipped: real data not found at (\S+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    skipped = int(re.search(r"(\d+) skipped", proc.stdout).group(1))
    assert int(m.group(1)) == skipped > 0 and m.group(2) == str(tmp_path / "absent")

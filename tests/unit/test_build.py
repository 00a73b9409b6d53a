"""A builder's output goes to a log file; the terminal gets one line per step, and the tail on failure."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from serving.models.build import BuildError, run_quietly

SCRIPT = "import sys; print('noise ' * 50); print('progress: calibrating awq'); " + (
    "print('(1/2): Calibrating: 50%', flush=True); print('\\r(1/2): Calibrating: 100%\\r(2/2): Calibrating'); "
    "sys.exit({code})"
)


def test_progress_reaches_the_terminal_and_the_rest_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "build.log"
    run_quietly([sys.executable, "-c", SCRIPT.format(code=0)], dict(os.environ), log, "awq")
    printed = capsys.readouterr().out
    assert [re.sub(r" \(\d+ s\)$", "", line) for line in printed.splitlines()] == [
        "      awq: calibrating awq",
        "      awq: calibrating stage 1/2",
        "      awq: calibrating stage 2/2",
    ]
    assert all(re.search(r"\(\d+ s\)$", line) for line in printed.splitlines())  # each with the time so far
    assert not log.exists()  # a build that worked leaves no log behind


def test_a_failed_build_shows_the_end_of_its_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    with pytest.raises(BuildError, match=r"building awq failed \(exit 3\)") as failed:
        run_quietly([sys.executable, "-c", SCRIPT.format(code=3)], dict(os.environ), log, "awq")
    assert "noise noise" in str(failed.value)
    assert log.exists()  # kept for the operator

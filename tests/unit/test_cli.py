from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving.ops import cli


def test_the_module_entry_point_runs_a_command_and_returns_its_status(tmp_path: Path) -> None:
    # `python -m serving.ops.cli` (what `serving` and the Makefile run) reaches the command and exits with its status.
    command = [sys.executable, "-m", "serving.ops.cli", "models", "show", "--family", "tiny", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    assert f"fp16: not built in {tmp_path}" in done.stderr


def test_models_show_on_an_empty_folder_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "show", "--family", "tiny", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"fp16: not built in {tmp_path} (build it: serving models build --family tiny)" in err
    (tmp_path / "fp16").mkdir()
    assert cli.main(["models", "show", "--out", str(tmp_path)]) == 1
    assert "no provenance.json" in capsys.readouterr().err


def test_unknown_variant_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["models", "build", "--variant", "fp8"])
    assert exited.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err

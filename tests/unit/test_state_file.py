"""A damaged rollout state file at startup: refused with what to do, never silently reset; the way out
(`serving rollout reset-state`) keeps the damaged file and starts every candidate at weight 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config import ConfigError
from serving.ops import cli
from serving.ops.launch import check_state_file, serve
from serving.rollout.controller import Rollout
from tests.clock import Clock
from tests.unit.test_rollout import demo_config

REPO = Path(__file__).resolve().parents[2]


def config_file(tmp_path: Path) -> Path:
    """deploy/tiny.yaml with its state file in tmp_path (its model folders need not exist: nothing starts)."""
    raw = yaml.safe_load((REPO / "deploy" / "tiny.yaml").read_text())
    raw.setdefault("rollback", {})["state_file"] = str(tmp_path / "state.json")
    for variant in raw["variants"].values():  # relative paths resolve beside the copied file
        if "path" in variant:
            variant["path"] = str((REPO / "deploy" / variant["path"]).resolve())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rolled_back_state(tmp_path: Path) -> Path:
    """A real state file recording a rollback of batch's candidate."""
    config = demo_config(tmp_path)
    rollout = Rollout(config, Clock())
    rollout.operate("batch", "abort", "test")
    assert rollout.weights()["batch"] == 0.0
    return config.rollback.state_file


def test_serve_refuses_a_damaged_state_file_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = rolled_back_state(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    # `serve` returns before Ray is imported for starting: anything past the check would fail here instead.
    monkeypatch.setattr("serving.ops.launch.quiet_terminal", lambda: pytest.fail("serve went past the check"))
    with pytest.raises(ConfigError) as refused:
        serve(config_file(tmp_path))
    message = str(refused.value)
    assert f"the rollout state file {path} is damaged (JSONDecodeError" in message
    assert f"serving rollout reset-state --state {path}" in message
    assert "rolled-back candidate" in message
    assert path.read_bytes() == good[: len(good) // 2]  # refused, not moved or reset
    assert not list(tmp_path.glob("state.json.damaged-*"))


@pytest.mark.parametrize("damage", [b"", b"[1, 2]", b"\xff\xfe\x00", b'{"tiers": {"batch": {"phase": "wizard"}}}'])
def test_every_kind_of_damage_is_refused(tmp_path: Path, damage: bytes) -> None:
    config = demo_config(tmp_path)
    config.rollback.state_file.write_bytes(damage)
    with pytest.raises(ConfigError, match="is damaged"):
        check_state_file(config)


def test_a_missing_or_good_state_file_is_not_refused(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    check_state_file(config)  # none yet: a first start
    rolled_back_state(tmp_path)
    check_state_file(config)


def test_check_reads_the_state_file_and_reset_state_is_the_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rolled_back_state(tmp_path)
    config_path = config_file(tmp_path)
    assert cli.main(["check", str(config_path)]) == 0
    assert f"rollout state {path}: reads fine" in capsys.readouterr().out
    # A good record of rollbacks is never reset.
    assert cli.main(["rollout", "reset-state", "--state", str(path)]) == 1
    assert "reads fine; it is not reset" in capsys.readouterr().err

    path.write_text('{"tiers": {"batch": ')
    assert cli.main(["check", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the rollout state file {path} is damaged")
    assert "reset-state" in err

    assert cli.main(["rollout", "reset-state", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("state.json.damaged-*")
    assert aside.read_text() == '{"tiers": {"batch": '  # kept, byte for byte
    assert f"kept as {aside}" in out
    assert cli.main(["check", str(config_path)]) == 0  # starts now ...
    capsys.readouterr()
    # ... fail-safe: the rolled-back candidate does not come back, nor does any other, until an apply.
    started = Rollout(demo_config(tmp_path), Clock())
    assert started.weights() == {"premium": 0.0, "standard": 0.0, "batch": 0.0}
    assert "reset by" in (started.status().fail_safe or "")
    assert str(aside) in (started.status().fail_safe or "")
    started.apply(demo_config(tmp_path))
    assert started.weights()["batch"] == 50.0
    assert cli.main(["rollout", "reset-state", "--state", str(tmp_path / "none.json")]) == 1
    assert "nothing to reset" in capsys.readouterr().err


def test_a_controller_restarted_at_runtime_on_a_damaged_file_still_starts_fail_safe(tmp_path: Path) -> None:
    path = rolled_back_state(tmp_path)
    path.write_text("{")
    restarted = Rollout(demo_config(tmp_path), Clock(), restarted=True)  # Ray restarts it; it must not raise
    assert restarted.weights()["batch"] == 0.0
    assert "could not be read" in (restarted.status().fail_safe or "")


def test_the_serve_command_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    path = rolled_back_state(tmp_path)
    path.write_text("{")
    config_path = config_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "serving.ops.cli", "serve", "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"error: the rollout state file {path} is damaged" in done.stderr
    assert "starting Ray" not in done.stdout  # refused before Ray

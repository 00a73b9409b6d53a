"""The rollout state file: what was rolled back, why, and for which tier config; read at controller start,
so a rollback outlives every restart.

Written durably: a temporary file, flushed to disk, renamed over the old one, then the folder flushed,
so a crash leaves either the old state or the new one, never half of one.

A file that cannot be read (truncated, edited by hand, a disk error) is never silently reset: a
rolled-back candidate must not come back because a file was damaged. At startup (`serving serve`,
`serving check`) it is refused (`refusal` says what to do; `reset` is the documented way out). A
controller that finds it damaged later (Ray restarting it) cannot refuse without taking the whole rollout
down with it, so it moves the file aside, never deleting it, and starts fail-safe: every candidate at
weight 0 until an operator applies a config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.rollout.phases import Phase

logger = logging.getLogger("serving.rollout")


class TierRecord(BaseModel):
    """One tier's rollout record in the state file. Extra fields are kept: a file written by newer code
    is read by older code during a redeploy."""

    model_config = ConfigDict(extra="allow")

    phase: Phase
    history: list[dict[str, Any]] = Field(default_factory=list, description="rollbacks, steps, promotions, ...")
    candidate: str | None = None
    tier_hash: str | None = Field(None, description="the tier config the phase was reached under")
    since: float | None = Field(None, description="judging counts signals from this unix time on")
    step_at: float | None = Field(None, description="when a progression last stepped")
    live_weight: float | None = Field(None, ge=0, le=100, description="a progression's current weight")
    paused: dict[str, Any] | None = Field(None, description="who paused the tier, and when")


class StateFile(BaseModel):
    """The state file's shape, checked on every read: a file that does not have it is damaged (moved
    aside, fail-safe start), never half used."""

    model_config = ConfigDict(extra="allow")

    tiers: dict[str, TierRecord] = Field(default_factory=dict)
    secret: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="keys the sticky split; signs ids")
    config: str | None = Field(None, description="the last applied config, as JSON")
    version: int | None = Field(None, ge=1, description="the last applied config's version")
    fail_safe: str | None = None


class DamagedState(Exception):
    """The state file exists but is not a rollout state; `problem` says what is wrong with it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def read_state(path: Path) -> dict[str, Any]:
    """The saved state, or a fresh one if there is no file; raises `DamagedState` for a damaged one."""
    if not path.is_file():
        return {"tiers": {}}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("it is not a rollout state (an object with a `tiers` object)")
        StateFile.model_validate(state)  # checked, not converted: the controller keeps the file's own dict
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DamagedState(path, f"it is not a rollout state: {first['loc']} {first['msg']}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise DamagedState(path, f"{type(exc).__name__}: {exc}") from None
    state.setdefault("tiers", {})
    return state


def load_state(path: Path) -> dict[str, Any]:
    """The saved state, or a fresh one. A damaged file gives a state marked `fail_safe` with the reason
    (the controller's way: it may not refuse to start, see the module's docstring)."""
    try:
        return read_state(path)
    except DamagedState as exc:
        return quarantine(path, exc.problem)


def refusal(damaged: DamagedState) -> str:
    """What `serving serve` and `serving check` say about a damaged state file: what, why, what to do."""
    return (
        f"the rollout state file {damaged.path} is damaged ({damaged.problem}). Refusing to start: the file "
        "records which candidates were rolled back, and starting without it could give a rolled-back candidate "
        "traffic again. Either put back a good copy of the file (`serving check CONFIG` reads it), or run "
        f"`serving rollout reset-state --state {damaged.path}`: it keeps the damaged file beside it and starts "
        "every candidate at weight 0 until you apply a config (`serving apply CONFIG`)."
    )


def reset(path: Path, by: str) -> Path:
    """An operator's way out of a damaged state file: keeps it aside and writes a fail-safe state (every
    candidate at weight 0 until a config is applied). Returns where the damaged file went. Raises
    `ValueError` for a file that is missing or reads fine: a good record of rollbacks is never reset."""
    if not path.is_file():
        raise ValueError(f"there is no state file at {path}; nothing to reset (a first start needs none)")
    try:
        read_state(path)
    except DamagedState as exc:
        problem = exc.problem
    else:
        raise ValueError(f"the state file {path} reads fine; it is not reset (it records the rollbacks)")
    aside = move_aside(path)
    reason = (
        f"the rollout state file {path} was damaged ({problem}) and reset by {by} at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; the damaged file is kept as {aside}. "
        "Every candidate is at weight 0 until a config is applied (`serving apply`)."
    )
    save_state(path, {"tiers": {}, "fail_safe": reason})
    return aside


def move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    return aside


def quarantine(path: Path, error: str) -> dict[str, Any]:
    """Moves a damaged state file aside and returns a fail-safe state that says why."""
    try:
        aside = move_aside(path)
    except OSError as exc:
        aside = path
        logger.error("could not move the damaged state file %s aside: %s", path, exc)
    reason = (
        f"the rollout state file {path} could not be read ({error}); it was kept as {aside}. "
        "Every candidate is at weight 0 until a config is applied (`serving apply`)."
    )
    logger.error("FAIL-SAFE START: %s", reason)
    return {"tiers": {}, "fail_safe": reason}


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_durably(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())


def window_path(state_file: Path) -> Path:
    """Where the controller keeps its window of signals: next to the state file, apart from it, because it
    is large, rewritten often and may be lost (a restart then judges a fresh window, nothing worse)."""
    return state_file.with_name(state_file.name + ".window")


def save_window(path: Path, window: dict[str, Any]) -> None:
    write_durably(path, json.dumps(window, separators=(",", ":")).encode())


def load_window(path: Path) -> dict[str, Any]:
    """The saved window, or an empty one if there is none or it cannot be read (logged, never fatal)."""
    if not path.is_file():
        return {}
    try:
        window = json.loads(path.read_text())
        if not isinstance(window, dict):
            raise ValueError("not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("the saved window of signals %s could not be read (%s); judging a fresh window", path, exc)
        return {}
    return window


def write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(path.suffix + ".tmp")
    # 0600: the state holds the secret that keys the sticky split.
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(scratch, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

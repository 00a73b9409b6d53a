"""The rollout state file: what was rolled back, why, and for which tier config; read at controller start,
so a rollback outlives every restart.

Written durably: a temporary file, flushed to disk, renamed over the old one, then the folder flushed,
so a crash leaves either the old state or the new one, never half of one. A file that cannot be read
(truncated, edited by hand, a disk error) is moved aside, never deleted, and the controller starts
fail-safe instead of not at all: every candidate at weight 0 until an operator applies a config.
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


def load_state(path: Path) -> dict[str, Any]:
    """The saved state, or a fresh one. A damaged file gives a state marked `fail_safe` with the reason."""
    if not path.is_file():
        return {"tiers": {}}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("it is not a rollout state (an object with a `tiers` object)")
        StateFile.model_validate(state)  # checked, not converted: the controller keeps the file's own dict
    except ValidationError as exc:
        return quarantine(path, f"it is not a rollout state: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        return quarantine(path, f"{type(exc).__name__}: {exc}")
    state.setdefault("tiers", {})
    return state


def quarantine(path: Path, error: str) -> dict[str, Any]:
    """Moves a damaged state file aside and returns a fail-safe state that says why."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        os.replace(path, aside)
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

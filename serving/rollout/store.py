"""The rollout state file: what was rolled back, why, and for which tier config. Written atomically
(write a temporary file, then rename), read at controller start, so a rollback outlives every restart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"tiers": {}}
    state: dict[str, Any] = json.loads(path.read_text())
    state.setdefault("tiers", {})
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(path.suffix + ".tmp")
    scratch.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(scratch, path)

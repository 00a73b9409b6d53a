"""Builds the demo model family into one folder, skipping what is already built and up to date.

fp16 is built in this process (serving environment); each quantized variant is built by
`serving.models.quantize` in the quantization environment, as a child process whose progress
streams to the terminal.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from serving.models import family, manifest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "models" / "demo"


class BuildError(RuntimeError):
    """A variant could not be built; the message says which and why."""


def quant_python() -> Path:
    """The interpreter of the quantization environment (override with SERVING_QUANT_PYTHON)."""
    configured = os.environ.get("SERVING_QUANT_PYTHON")
    path = Path(configured) if configured else REPO_ROOT / ".venv-quant" / "bin" / "python"
    if not path.exists():
        raise BuildError(
            f"the quantization environment is missing ({path}); create it with `scripts/install.sh quant` "
            "(make does this for you)"
        )
    return path


def is_current(folder: Path, base_sha: str | None) -> bool:
    """A variant is current when its manifest matches its weights and, if quantized, the present base."""
    try:
        found = manifest.read_manifest(folder, verify_weights=True)
    except manifest.ManifestError:
        return False
    return base_sha is None or found["base_model"].get("weights_sha256") == base_sha


def build_variant(variant: family.Variant, out: Path) -> None:
    """Builds one variant into a scratch folder, then moves it into place, so a half-built variant
    never looks finished."""
    target = out / variant.folder
    scratch = out / f".{variant.folder}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    if variant is family.FP16:
        from serving.models import tiny

        tiny.build_fp16(scratch)
    else:
        command = [
            str(quant_python()),
            "-m",
            "serving.models.quantize",
            "--variant",
            variant.name,
            "--base",
            str(out / family.FP16.folder),
            "--out",
            str(scratch),
        ]
        # TQDM_MININTERVAL: llmcompressor draws a progress bar per layer; redraw each every few seconds only.
        env = {"TQDM_MININTERVAL": "5", **os.environ, "PYTHONPATH": str(REPO_ROOT)}
        run_quietly(command, env, out / f".{variant.folder}.build.log", variant.name)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)


# llmcompressor's sequential pipeline announces each stage of the model as "(3/5): Calibrating".
STAGE = re.compile(r"\((\d+)/(\d+)\): Calibrating")


def run_quietly(command: list[str], env: dict[str, str], log_path: Path, name: str) -> None:
    """Runs a quantizer with its (long, library-level) output in a log file; the terminal gets one
    progress line per stage of the model, and the log's tail if it fails."""
    seen: set[str] = set()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            for stage in STAGE.findall(line.replace("\r", "\n")):
                key = "/".join(stage)
                if key not in seen:
                    seen.add(key)
                    print(f"      {name}: calibrating stage {key}", flush=True)
        code = process.wait()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise BuildError(f"quantizing {name} failed (exit {code}); the end of {log_path}:\n{tail}")
    log_path.unlink()


def build_family(
    out: Path = DEFAULT_OUT, *, force: bool = False, names: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Builds the requested variants (all by default) and returns every built variant's manifest."""
    wanted = [family.variant(n) for n in names] if names else list(family.VARIANTS)
    if any(v is not family.FP16 for v in wanted) and family.FP16 not in wanted:
        wanted.insert(0, family.FP16)  # quantized variants are made from the fp16 base
    out.mkdir(parents=True, exist_ok=True)
    total = len(wanted)
    base_sha: str | None = None
    for step, variant in enumerate(wanted, start=1):
        folder = out / variant.folder
        if not force and is_current(folder, None if variant is family.FP16 else base_sha):
            print(f"[{step}/{total}] {variant.name}: up to date in {folder}", flush=True)
        else:
            what = (
                "training tokenizer, initialising weights"
                if variant is family.FP16
                else (f"{variant.method} {variant.scheme} with llmcompressor")
            )
            print(f"[{step}/{total}] {variant.name}: building ({what}) ...", flush=True)
            started = time.monotonic()
            build_variant(variant, out)
            print(f"[{step}/{total}] {variant.name}: built in {time.monotonic() - started:.0f} s", flush=True)
        if variant is family.FP16:
            base_sha = manifest.read_manifest(folder)["weights_sha256"]
    return {v.name: manifest.read_manifest(out / v.folder) for v in family.VARIANTS if (out / v.folder).is_dir()}

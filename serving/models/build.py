"""Builds a demo model family (`smol` or `tiny`) into one folder, skipping what is already built and up
to date.

The tiny fp16 base is generated in this process (serving environment). The smol fp16 base
(`serving.models.smol`: fetch the wheel, dequantize the GGUF) and every quantized variant
(`serving.models.quantize`) are built in the quantization environment, as child processes whose
output goes to a log file; the terminal gets one progress line per step, with the elapsed time.
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


def default_out(models: family.Family) -> Path:
    return REPO_ROOT / "models" / models.name


def source_cache() -> Path:
    """Where downloaded source wheels are kept (override with SERVING_MODEL_CACHE): shared by every
    build on this checkout, so a rebuild downloads nothing."""
    configured = os.environ.get("SERVING_MODEL_CACHE")
    return Path(configured) if configured else REPO_ROOT / "models" / ".cache"


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


def is_current(models: family.Family, variant: family.Variant, folder: Path, base_sha: str | None) -> bool:
    """A variant is current when its manifest matches its weights and what the family now says it is:
    the same source (for a base) or the same base, method and group size (for a quantized variant)."""
    try:
        found = manifest.read_manifest(folder, verify_weights=True)
    except manifest.ManifestError:
        return False
    if variant.is_base:
        pinned = models.source.wheel_sha256 if models.source else None
        return bool(
            found["base_model"].get("source", {}).get("wheel_sha256") == pinned
            and found.get("sampling_defaults", {}) == dict(models.sampling)
        )
    quant = found["quantization"] or {}
    return (
        found["base_model"].get("weights_sha256") == base_sha
        and same_file(folder / "generation_config.json", folder.parent / models.base.folder / "generation_config.json")
        and quant.get("method") == variant.method
        and quant.get("group_size") == variant.group_size
        and (quant.get("activations") == "asymmetric dynamic per token") == variant.asymmetric_activations
    )


def same_file(one: Path, other: Path) -> bool:
    try:
        return one.read_bytes() == other.read_bytes()
    except OSError:
        return False


def build_command(models: family.Family, variant: family.Variant, out: Path, scratch: Path) -> list[str] | None:
    """The child process that builds a variant, or None when it is built in this process (the tiny base)."""
    if variant.is_base and models.source is None:
        return None
    if variant.is_base:
        module = ["serving.models.smol", "--cache", str(source_cache())]
    else:
        base = out / models.base.folder
        module = ["serving.models.quantize", "--family", models.name, "--variant", variant.name, "--base", str(base)]
    return [str(quant_python()), "-m", *module, "--out", str(scratch)]


def build_variant(models: family.Family, variant: family.Variant, out: Path) -> None:
    """Builds one variant into a scratch folder, then moves it into place, so a half-built variant
    never looks finished."""
    target = out / variant.folder
    scratch = out / f".{variant.folder}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    command = build_command(models, variant, out, scratch)
    if command is None:
        from serving.models import tiny

        tiny.build_fp16(scratch)
    else:
        # TQDM_MININTERVAL: llmcompressor draws a progress bar per layer; redraw each every few seconds only.
        env = {"TQDM_MININTERVAL": "5", **os.environ, "PYTHONPATH": str(REPO_ROOT)}
        run_quietly(command, env, out / f".{variant.folder}.build.log", variant.name)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)


# llmcompressor's sequential pipeline announces each stage of the model as "(3/5): Calibrating";
# the project's own builders log their steps as "progress: ...".
STAGE = re.compile(r"\((\d+)/(\d+)\): Calibrating")
STEP = re.compile(r"^progress: (.+)$", re.MULTILINE)


def progress_lines(text: str) -> list[str]:
    """The steps a chunk of a builder's output announces, in order."""
    return [f"calibrating stage {'/'.join(s)}" for s in STAGE.findall(text)] + STEP.findall(text)


def run_quietly(command: list[str], env: dict[str, str], log_path: Path, name: str) -> None:
    """Runs a builder with its (long, library-level) output in a log file; the terminal gets one
    progress line per step with the elapsed time, and the log's tail if it fails."""
    seen: set[str] = set()
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            for step in progress_lines(line.replace("\r", "\n")):
                if step not in seen:
                    seen.add(step)
                    print(f"      {name}: {step} ({time.monotonic() - started:.0f} s)", flush=True)
        code = process.wait()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise BuildError(f"building {name} failed (exit {code}); the end of {log_path}:\n{tail}")
    log_path.unlink()


def describe(models: family.Family, variant: family.Variant) -> str:
    if variant.is_base and models.source:
        return f"{models.source.package}=={models.source.version} from the package registry, dequantized to float16"
    if variant.is_base:
        return "training tokenizer, initialising weights"
    group = f", group size {variant.group_size}" if variant.group_size else ""
    asym = ", asymmetric activations" if variant.asymmetric_activations else ""
    return f"{variant.method} {variant.scheme}{group}{asym} with llmcompressor"


def build_family(
    models: family.Family = family.DEFAULT,
    out: Path | None = None,
    *,
    force: bool = False,
    names: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Builds the requested variants of a family (all by default) and returns every built variant's manifest."""
    out = out or default_out(models)
    wanted = [models.variant(n) for n in names] if names else list(models.variants)
    if models.base not in wanted:
        wanted.insert(0, models.base)  # quantized variants are made from the fp16 base
    out.mkdir(parents=True, exist_ok=True)
    total = len(wanted)
    base_sha: str | None = None
    for step, variant in enumerate(wanted, start=1):
        folder = out / variant.folder
        if not force and is_current(models, variant, folder, base_sha):
            print(f"[{step}/{total}] {models.name} {variant.name}: up to date in {folder}", flush=True)
        else:
            print(
                f"[{step}/{total}] {models.name} {variant.name}: building ({describe(models, variant)}) ...", flush=True
            )
            started = time.monotonic()
            build_variant(models, variant, out)
            took = time.monotonic() - started
            manifest.record_build_time(folder, took)
            print(f"[{step}/{total}] {models.name} {variant.name}: built in {took:.0f} s", flush=True)
        if variant.is_base:
            base_sha = manifest.read_manifest(folder)["weights_sha256"]
    return {v.name: manifest.read_manifest(out / v.folder) for v in models.variants if (out / v.folder).is_dir()}

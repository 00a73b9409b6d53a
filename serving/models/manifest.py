"""Provenance manifests: what a variant folder is, where it came from, and a hash of its weights.

Standard library only: this module is imported by the quantization environment (no pydantic
guarantees, no vLLM) as well as by the serving environment.

A hash says what was built, on the machine that built it. Building twice on one machine gives the same
hashes; GPTQ and AWQ on a different CPU (other SIMD kernels, other rounding) give different quantized
weights, so every manifest records the machine (`built_on`) and library versions (`tools`) it was built
with, and hashes are compared only against a manifest, never against constants.

The weight hash is taken over the tensors, not the files: for every tensor in every
`*.safetensors` file, sorted by name, it hashes the name, dtype, shape and raw bytes. File-level
metadata (which some writers stamp with versions or dates) therefore never changes the hash.
"""

from __future__ import annotations

import hashlib
import json
import platform
import struct
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from serving.engine.hardware import host

MANIFEST_NAME = "provenance.json"
SCHEMA_VERSION = 2  # 2: `built_on` (the build machine) replaces `hardware_target`


class ManifestError(ValueError):
    """A variant folder has no manifest, or a manifest that does not describe the folder."""


def _safetensors_entries(path: Path) -> tuple[dict[str, Any], int]:
    """Returns the header of a safetensors file and the offset where its data starts."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def weights_sha256(folder: Path) -> str:
    """A hash of every tensor in the folder's safetensors files, independent of file layout."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ManifestError(f"no *.safetensors weights in {folder}")
    tensors: list[tuple[str, Path, dict[str, Any], int]] = []
    for path in files:
        header, data_start = _safetensors_entries(path)
        tensors.extend((name, path, info, data_start) for name, info in header.items())
    digest = hashlib.sha256()
    for name, path, info, data_start in sorted(tensors, key=lambda t: t[0]):
        begin, end = info["data_offsets"]
        with path.open("rb") as f:
            f.seek(data_start + begin)
            data = f.read(end - begin)
        digest.update(f"{name}|{info['dtype']}|{info['shape']}|{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB pieces (source wheels are about 100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tool_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the named distributions; a missing one is recorded as such."""
    versions = {"python": platform.python_version()}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Writes the manifest for a finished variant folder, hashing its weights now."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **fields,
        "built_on": host(),
        "weights_sha256": weights_sha256(folder),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def record_build_time(folder: Path, seconds: float) -> None:
    """Adds how long the build took, on the machine in `built_on`, to a finished variant's manifest."""
    path = folder / MANIFEST_NAME
    found = json.loads(path.read_text())
    found["build_seconds"] = round(seconds, 1)
    path.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")


REQUIRED_FIELDS = (
    "schema_version",
    "variant",
    "precision",
    "base_model",
    "quantization",
    "calibration",
    "tools",
    "built_on",
    "weights_sha256",
    "created_at",
)


def read_manifest(folder: Path, *, verify_weights: bool = False) -> dict[str, Any]:
    """Reads and checks a variant's manifest; with verify_weights, also re-hashes the weights."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: the variant has no recorded provenance")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    missing = [key for key in REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks the fields: {', '.join(missing)}")
    if verify_weights and weights_sha256(folder) != manifest["weights_sha256"]:
        raise ManifestError(f"the weights in {folder} do not match the hash in its manifest")
    return manifest


# The release gate (serving.release): a candidate's verdicts against each baseline it was evaluated
# against, keyed by that baseline's weights hash, so a rebuilt baseline needs a new evaluation. The build
# writes a fresh manifest, so a rebuilt candidate starts with no gates at all.
GATES = "gates"


def _rewrite(folder: Path, change: Any) -> dict[str, Any]:
    """Reads the checked manifest, lets `change` edit it, and replaces the file in one rename."""
    found = read_manifest(folder)
    change(found)
    path = folder / MANIFEST_NAME
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    scratch.replace(path)
    return found


def record_gate(folder: Path, baseline_sha256: str, gate: dict[str, Any]) -> dict[str, Any]:
    """Records an evaluation's verdict against one baseline; it replaces any earlier one and its sign-offs."""

    def change(found: dict[str, Any]) -> None:
        found.setdefault(GATES, {})[baseline_sha256] = {**gate, "sign_offs": []}

    return _rewrite(folder, change)


def gate_for(found: dict[str, Any], baseline_sha256: str) -> dict[str, Any] | None:
    gate: dict[str, Any] | None = found.get(GATES, {}).get(baseline_sha256)
    return gate


def record_sign_off(folder: Path, baseline_sha256: str, by: str) -> dict[str, Any]:
    """Adds a named sign-off to the passed gate against that baseline; refuses a missing or failed gate."""

    def change(found: dict[str, Any]) -> None:
        gate = gate_for(found, baseline_sha256)
        if gate is None:
            raise ManifestError(f"{folder} has no release gate against the baseline {baseline_sha256[:16]}")
        if not gate["passed"]:
            raise ManifestError(f"{folder} failed its release gate ({gate['report']['path']}); nothing to sign off")
        gate["sign_offs"].append(
            {
                "by": by,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "report_sha256": gate["report"]["sha256"],
            }
        )

    return _rewrite(folder, change)

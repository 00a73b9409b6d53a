from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from serving.engine import hardware
from serving.models import manifest


def write_safetensors(path: Path, tensors: dict[str, bytes], metadata: dict[str, str] | None = None) -> None:
    """A minimal safetensors writer (uint8 tensors), so the hash is tested without torch."""
    header: dict[str, object] = {}
    offset = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values()))


def test_weight_hash_ignores_file_metadata_and_tensor_order(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    write_safetensors(one / "model.safetensors", {"a": b"\x01\x02", "b": b"\x03"}, {"written": "monday"})
    write_safetensors(two / "model.safetensors", {"b": b"\x03", "a": b"\x01\x02"}, {"written": "tuesday"})
    assert manifest.weights_sha256(one) == manifest.weights_sha256(two)


def test_weight_hash_is_the_same_across_shards(tmp_path: Path) -> None:
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir()
    sharded.mkdir()
    write_safetensors(whole / "model.safetensors", {"a": b"\x01", "b": b"\x02"})
    write_safetensors(sharded / "model-00001.safetensors", {"a": b"\x01"})
    write_safetensors(sharded / "model-00002.safetensors", {"b": b"\x02"})
    assert manifest.weights_sha256(whole) == manifest.weights_sha256(sharded)


def test_weight_hash_changes_with_any_byte(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"a": b"\x01\x02"})
    before = manifest.weights_sha256(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {"a": b"\x01\x03"})
    assert manifest.weights_sha256(tmp_path) != before


def test_written_manifest_reads_back_and_detects_tampering(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"w": b"\x05\x06"})
    fields = {
        "variant": "int8",
        "precision": "int8",
        "base_model": {"name": "base", "weights_sha256": "00"},
        "quantization": {"method": "gptq", "scheme": "W8A8"},
        "calibration": {"num_samples": 4},
        "tools": manifest.tool_versions("pytest", "surely-not-installed-dist"),
    }
    written = manifest.write_manifest(tmp_path, fields)
    found = manifest.read_manifest(tmp_path, verify_weights=True)
    assert found == written
    assert found["tools"]["surely-not-installed-dist"] == "not installed"
    # the machine it was built on: quantized weights are reproducible on that machine, not across CPUs
    assert found["built_on"]["cpu"]
    assert found["built_on"]["machine"]
    assert set(found["built_on"]["cpu_flags"]) <= set(hardware.KERNEL_CPU_FLAGS)
    assert found["tools"]["pytest"] != "not installed"

    write_safetensors(tmp_path / "model.safetensors", {"w": b"\x05\x07"})
    with pytest.raises(manifest.ManifestError, match="do not match"):
        manifest.read_manifest(tmp_path, verify_weights=True)


def test_missing_or_incomplete_manifest_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(manifest.ManifestError, match=r"no provenance\.json"):
        manifest.read_manifest(tmp_path)
    (tmp_path / manifest.MANIFEST_NAME).write_text(json.dumps({"variant": "x"}))
    with pytest.raises(manifest.ManifestError, match="lacks the fields: schema_version"):
        manifest.read_manifest(tmp_path)
    (tmp_path / manifest.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(manifest.ManifestError, match="not valid JSON"):
        manifest.read_manifest(tmp_path)


def test_folder_without_weights_cannot_be_hashed(tmp_path: Path) -> None:
    with pytest.raises(manifest.ManifestError, match=r"no \*\.safetensors"):
        manifest.weights_sha256(tmp_path)

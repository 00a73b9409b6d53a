"""Shared fixtures. The demo family is built fresh, once per test session, into a temporary folder:
tests never depend on (or disturb) a `models/` folder a developer built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.models import build


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-family")
    build.build_family(out)
    return out

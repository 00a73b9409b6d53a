"""Shared fixtures. The demo family is built fresh, once per test session, into a temporary folder:
tests never depend on (or disturb) a `models/` folder a developer built by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.models import build


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # For quick iteration on the serving tests only: SERVING_TEST_FAMILY=models/demo reuses a built family.
    # `make test` and CI never set it, so they always build (and check) the family from scratch.
    reuse = os.environ.get("SERVING_TEST_FAMILY")
    if reuse:
        return Path(reuse).resolve()
    out = tmp_path_factory.mktemp("demo-family")
    build.build_family(out)
    return out

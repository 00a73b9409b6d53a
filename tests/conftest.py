"""Shared fixtures. The demo families are built fresh, once per test session, into temporary folders:
tests never depend on (or disturb) a `models/` folder a developer built by hand.

Which tests use which family: everything that serves (the stack, the router, rollback, metrics) runs on
`tiny`, whose engines are fast; `smol` (the real model of `make serve`) is built and checked by
tests/integration/test_smol_family.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.models import build, family


def built_family(models: family.Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # For quick iteration on the serving tests only: SERVING_TEST_FAMILY_TINY=models/tiny (or _SMOL) reuses a
    # built family. `make test` and CI never set it, so they always build (and check) the family from scratch.
    reuse = os.environ.get(f"SERVING_TEST_FAMILY_{models.name.upper()}")
    if reuse:
        return Path(reuse).resolve()
    out = tmp_path_factory.mktemp(f"{models.name}-family")
    build.build_family(models, out)
    return out


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_family(family.TINY, tmp_path_factory)


@pytest.fixture(scope="session")
def smol_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_family(family.SMOL, tmp_path_factory)

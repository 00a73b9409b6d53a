"""The package's public surface, pinned (as httpx pins its `__all__`): a name added or removed is a decision,
made here on purpose, never a side effect."""

from __future__ import annotations

import subprocess
import sys

import pytest

import serving

PUBLIC = {
    "__version__",
    # configuration
    "Config",
    "ConfigError",
    "load_config",
    # the errors a client sees, one class per status
    "ServingError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "TooManyRequests",
    "Unavailable",
    # metrics, with their two backends
    "Metrics",
    "InMemory",
    "RayExport",
    # the router and its seam to the engines
    "RouterCore",
    "create_app",
    "Endpoint",
    "VariantClient",
    "RayVariant",
    "FakeVariant",
}


def test_all_is_the_public_surface() -> None:
    assert set(serving.__all__) == PUBLIC
    assert len(serving.__all__) == len(PUBLIC)  # no name listed twice


def test_every_public_name_is_the_object_its_module_defines() -> None:
    import importlib

    for name in PUBLIC - {"__version__"}:
        defining = importlib.import_module(serving._EXPORTS[name])
        assert getattr(serving, name) is getattr(defining, name), name
    assert issubclass(serving.Unavailable, serving.ServingError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        serving.no_such_name  # noqa: B018


def test_importing_the_package_root_loads_neither_ray_nor_vllm() -> None:
    # The quantization environment imports `serving.models`, and so the package root, without Ray or vLLM.
    code = "import sys, serving; print(sorted(m for m in ('ray', 'vllm', 'fastapi') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

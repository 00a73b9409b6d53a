"""Precision-aware LLM serving: one model, several precisions, routed by tier, canaried, shadowed, rolled back.

The names below are the package's public surface (pinned by tests/unit/test_public_api.py); everything else
is an implementation module and may change. They are loaded on first use, so importing the package root
stays light: `serving.models.quantize` runs in the separate quantization environment, which has no Ray and
no vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from serving.config import Config, ConfigError, load_config
    from serving.errors import (
        BadRequest,
        Conflict,
        Forbidden,
        NotFound,
        PayloadTooLarge,
        ServingError,
        TooManyRequests,
        Unauthorized,
        Unavailable,
    )
    from serving.metrics import InMemory, Metrics, RayExport
    from serving.route.core import RouterCore, create_app
    from serving.variants.client import Endpoint, FakeVariant, RayVariant, VariantClient

# name -> the module that defines it
_EXPORTS = {
    "Config": "serving.config",
    "ConfigError": "serving.config",
    "load_config": "serving.config",
    "ServingError": "serving.errors",
    "BadRequest": "serving.errors",
    "Unauthorized": "serving.errors",
    "Forbidden": "serving.errors",
    "NotFound": "serving.errors",
    "Conflict": "serving.errors",
    "PayloadTooLarge": "serving.errors",
    "TooManyRequests": "serving.errors",
    "Unavailable": "serving.errors",
    "Metrics": "serving.metrics",
    "InMemory": "serving.metrics",
    "RayExport": "serving.metrics",
    "RouterCore": "serving.route.core",
    "create_app": "serving.route.core",
    "Endpoint": "serving.variants.client",
    "VariantClient": "serving.variants.client",
    "RayVariant": "serving.variants.client",
    "FakeVariant": "serving.variants.client",
}

__all__ = [
    "BadRequest",
    "Config",
    "ConfigError",
    "Conflict",
    "Endpoint",
    "FakeVariant",
    "Forbidden",
    "InMemory",
    "Metrics",
    "NotFound",
    "PayloadTooLarge",
    "RayExport",
    "RayVariant",
    "RouterCore",
    "ServingError",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "VariantClient",
    "__version__",
    "create_app",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

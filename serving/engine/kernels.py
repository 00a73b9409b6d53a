"""What vLLM really runs: a worker extension that reports the kernel behind each linear layer.

vLLM decides its linear kernels while it loads the weights, from the hardware and the activation dtype
(an int8 layer takes the AMX "sgl" path or the "onednn" one; a 4-bit layer an "amx" or a "vec" ISA).
Engines are started with `worker_extension_cls=WORKER_EXTENSION`, and `collective_rpc("linear_kernels")`
then asks each worker; the call carries a method name, not pickled code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WORKER_EXTENSION = "serving.engine.kernels.KernelReport"


def describe_layer(module: Any) -> str | None:
    """One linear layer's scheme and kernel, e.g. `CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel/sgl`."""
    scheme = getattr(module, "scheme", None)
    if scheme is None:
        method = getattr(module, "quant_method", None)
        return type(method).__name__ if method is not None and "Linear" in type(method).__name__ else None
    parts = [type(scheme).__name__]
    kernel = getattr(scheme, "kernel", None)
    if kernel is not None:
        parts.append(type(kernel).__name__)
        path = getattr(getattr(kernel, "linear_method", None), "__name__", "")
        if path.startswith("_apply_weights_"):
            parts.append(path.removeprefix("_apply_weights_"))
    isa = getattr(module, "isa_hint", None)
    if isa:
        parts.append(f"isa={isa}")
    return "/".join(parts)


def summarize(descriptions: Iterable[str | None]) -> list[str]:
    return sorted({d for d in descriptions if d})


class KernelReport:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the worker."""

    def linear_kernels(self) -> list[str]:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return summarize(describe_layer(m) for m in model.modules())


def merge(per_worker: Iterable[Iterable[str]]) -> list[str]:
    """The answers of every worker of one engine, as one list."""
    return sorted({k for worker in per_worker for k in worker})

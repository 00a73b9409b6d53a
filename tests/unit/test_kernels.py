"""Naming the kernel vLLM took for each linear layer, from modules shaped as vLLM's are."""

from __future__ import annotations

from typing import Any

from serving.engine.kernels import describe_layer, merge, summarize


class CompressedTensorsW8A8Int8:
    def __init__(self, path: str) -> None:
        self.kernel = CPUInt8ScaledMMLinearKernel(path)


class CPUInt8ScaledMMLinearKernel:
    def __init__(self, path: str) -> None:
        self.linear_method = {"sgl": self._apply_weights_sgl, "onednn": self._apply_weights_onednn}[path]

    def _apply_weights_sgl(self) -> None: ...

    def _apply_weights_onednn(self) -> None: ...


class CompressedTensorsWNA16:
    pass


class UnquantizedLinearMethod:
    pass


class Layer:
    def __init__(self, scheme: Any = None, quant_method: Any = None, isa_hint: str | None = None) -> None:
        self.scheme = scheme
        self.quant_method = quant_method
        if isa_hint is not None:
            self.isa_hint = isa_hint


def test_int8_layers_name_their_kernel_path() -> None:
    assert describe_layer(Layer(CompressedTensorsW8A8Int8("sgl"))) == (
        "CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel/sgl"
    )
    assert describe_layer(Layer(CompressedTensorsW8A8Int8("onednn"))).endswith("/onednn")  # type: ignore[union-attr]


def test_4bit_layers_name_their_isa() -> None:
    assert describe_layer(Layer(CompressedTensorsWNA16(), isa_hint="amx")) == "CompressedTensorsWNA16/isa=amx"
    assert describe_layer(Layer(CompressedTensorsWNA16(), isa_hint="vec")) == "CompressedTensorsWNA16/isa=vec"


def test_unquantized_layers_name_their_method_and_other_modules_nothing() -> None:
    assert describe_layer(Layer(quant_method=UnquantizedLinearMethod())) == "UnquantizedLinearMethod"
    assert describe_layer(Layer()) is None
    assert describe_layer(object()) is None


def test_reports_are_deduplicated_across_layers_and_workers() -> None:
    layers = [Layer(CompressedTensorsW8A8Int8("onednn")) for _ in range(3)] + [Layer()]
    one_worker = summarize(describe_layer(m) for m in layers)
    assert one_worker == ["CompressedTensorsW8A8Int8/CPUInt8ScaledMMLinearKernel/onednn"]
    assert merge([one_worker, one_worker, ["UnquantizedLinearMethod"]]) == sorted(
        [*one_worker, "UnquantizedLinearMethod"]
    )

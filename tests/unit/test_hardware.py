"""Every branch of the activation-dtype order, with the capability probe faked: the machine running the tests
can take only one branch for real (the integration tests check that one on real engines, and the engines
prove whichever they take: serving.engine.verify)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from serving.engine import hardware
from serving.engine.hardware import Capabilities, choose_dtype

AMX_CPU = Capabilities("cpu", "Intel Xeon Platinum 8480+", amx=True, avx512=True, avx512_bf16=True)
AVX512_CPU = Capabilities("cpu", "AMD EPYC 9554", avx512=True, avx512_bf16=True)
AVX2_CPU = Capabilities("cpu", "AMD EPYC 7B12")
AMPERE = Capabilities("cuda", "NVIDIA A100", cuda_capability=(8, 0))
TURING = Capabilities("cuda", "Tesla T4", cuda_capability=(7, 5))


@pytest.mark.parametrize("cpu", [AMX_CPU, AVX512_CPU, AVX2_CPU], ids=["amx", "avx512", "avx2"])
def test_every_cpu_tries_the_weights_dtype_first_then_bfloat16(cpu: Capabilities) -> None:
    """No CPU flag decides a dtype any more (int8 on AMX in bfloat16 answered garbage: STACK.md, quirk 10): the
    weights' own dtype is tried first on every CPU, AMX or not, and the other half-precision dtype after it."""
    order = hardware.dtype_order("float16", cpu)
    assert [c.dtype for c in order] == ["float16", "bfloat16"]
    assert cpu.device in order[0].reason
    assert choose_dtype("float16", cpu) == order[0]


def test_bfloat16_weights_try_float16_second() -> None:
    assert [c.dtype for c in hardware.dtype_order("bfloat16", AMX_CPU)] == ["bfloat16", "float16"]


def test_a_gpu_without_bfloat16_serves_bfloat16_weights_in_float16_and_never_tries_bfloat16() -> None:
    order = hardware.dtype_order("bfloat16", TURING)
    assert [c.dtype for c in order] == ["float16"]
    assert "8.0" in order[0].reason


@pytest.mark.parametrize(("saved", "gpu"), [("bfloat16", AMPERE), ("float16", AMPERE), ("float16", TURING)])
def test_a_gpu_that_can_run_the_weights_dtype_keeps_it(saved: hardware.Dtype, gpu: Capabilities) -> None:
    assert choose_dtype(saved, gpu).dtype == saved


def test_a_float16_model_on_a_gpu_without_bfloat16_has_one_choice() -> None:
    assert [c.dtype for c in hardware.dtype_order("float16", TURING)] == ["float16"]


@pytest.mark.parametrize("capabilities", [AMX_CPU, AVX2_CPU, AMPERE, TURING])
def test_a_pin_in_the_config_always_wins_and_is_the_only_choice(capabilities: Capabilities) -> None:
    order = hardware.dtype_order("float16", capabilities, pinned="float32", kept="bfloat16")
    assert [(c.dtype, c.reason) for c in order] == [("float32", "pinned in the config")]


def test_the_dtype_that_passed_on_this_machine_is_tried_first() -> None:
    order = hardware.dtype_order("float16", AMX_CPU, kept="bfloat16")
    assert [c.dtype for c in order] == ["bfloat16", "float16"]
    assert "passed verification on this machine" in order[0].reason


def test_descriptions_name_the_features_that_decide() -> None:
    assert AMX_CPU.describe() == "CPU Intel Xeon Platinum 8480+ (amx, avx512, avx512_bf16)"
    assert AVX2_CPU.describe() == "CPU AMD EPYC 7B12 (no AVX-512)"
    assert TURING.describe() == "GPU Tesla T4 (compute capability 7.5)"
    assert not TURING.bf16
    assert AMPERE.bf16
    assert AVX2_CPU.bf16


def fake_torch(monkeypatch: pytest.MonkeyPatch, *, cuda: tuple[int, int] | None, amx: bool) -> None:
    cpu = types.SimpleNamespace(
        _is_amx_tile_supported=lambda: amx,
        _is_avx512_supported=lambda: True,
        _is_avx512_bf16_supported=lambda: amx,
    )
    gpu = types.SimpleNamespace(
        is_available=lambda: cuda is not None,
        get_device_capability=lambda index: cuda,
        get_device_name=lambda index: "NVIDIA H100",
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cpu=cpu, cuda=gpu))


def test_detect_reads_the_cpu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch(monkeypatch, cuda=None, amx=True)
    found = hardware.detect()
    assert (found.accelerator, found.amx, found.avx512, found.avx512_bf16) == ("cpu", True, True, True)
    assert choose_dtype("float16", found).dtype == "float16"


def test_detect_prefers_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch(monkeypatch, cuda=(9, 0), amx=True)
    found = hardware.detect()
    assert found == Capabilities("cuda", "NVIDIA H100", cuda_capability=(9, 0))


def test_detect_on_this_machine_agrees_with_torch() -> None:
    import torch

    found = hardware.detect()
    if found.accelerator == "cpu":
        assert found.amx == torch.cpu._is_amx_tile_supported()
        assert found.device


@pytest.mark.parametrize(
    ("config", "expected"),
    [({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float32"}, "float32"), ({}, "float16"), (None, "float16")],
)
def test_weights_dtype_comes_from_config_json(tmp_path: Path, config: dict[str, str] | None, expected: str) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert hardware.weights_dtype(tmp_path) == expected


@pytest.mark.parametrize(
    ("engines", "cpus", "expected"),
    [
        (1, [0, 1], ["auto"]),  # one engine: vLLM's own binding
        (3, [0, 1], ["nobind"] * 3),  # fewer CPUs than engines plus one: the OS spreads them
        (3, list(range(8)), ["0,1", "2,3", "4,5"]),  # disjoint slices, CPUs 6 and 7 left over
        (2, [4, 5, 6, 7, 8], ["4,5", "6,7"]),  # the CPUs this process may use, not 0..n
    ],
)
def test_engines_sharing_a_node_never_bind_the_same_cpus(engines: int, cpus: list[int], expected: list[str]) -> None:
    assert [hardware.cpu_threads_bind(i, engines, cpus) for i in range(engines)] == expected


def test_a_gpu_replica_that_torch_cannot_see_reads_the_gpu_with_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch(monkeypatch, cuda=None, amx=False)
    monkeypatch.setattr(hardware, "nvidia_smi_gpu", lambda: TURING)
    assert hardware.detect(gpu=True) == TURING
    assert hardware.detect().accelerator == "cpu"


def test_nvidia_smi_output_is_parsed_and_its_failure_is_safe() -> None:
    found = hardware.nvidia_smi_gpu(lambda command: "NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n")
    assert found == Capabilities("cuda", "NVIDIA H100 80GB HBM3", cuda_capability=(9, 0))

    def missing(command: list[str]) -> str:
        raise FileNotFoundError("nvidia-smi")

    unknown = hardware.nvidia_smi_gpu(missing)
    assert unknown.accelerator == "cuda"
    assert not unknown.bf16  # so bfloat16 weights are served in float16, which every GPU runs
    assert choose_dtype("bfloat16", unknown).dtype == "float16"

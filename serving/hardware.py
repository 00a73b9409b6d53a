"""Which activation dtype each variant is served with, chosen from what this machine's hardware can run.

vLLM picks its kernels from the CPU's or GPU's features, and some kernels lack some dtypes: on CPUs with
AMX tiles (Sapphire Rapids and newer) vLLM routes INT8 W8A8 to its SGL kernel, which has no float16
output and aborts on the first generation (`scale_C: scalar path not implemented!`). So the dtype is
decided here, in one place, from a capability probe that tests replace with a fake:

    detect() -> Capabilities -> choose_dtype(precision, weights dtype, capabilities, pinned) -> DtypeChoice

Used by the engines the application deploys and by the offline probe the tests run, so both take the
same choice. A config may pin a variant's dtype (`variants.NAME.dtype`); a pin always wins.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Dtype = Literal["float16", "bfloat16", "float32"]
DTYPES: tuple[Dtype, ...] = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Capabilities:
    """What the kernels vLLM chooses depend on; read by `detect`, faked in tests."""

    accelerator: Literal["cpu", "cuda"]
    device: str  # the CPU model, or the GPU's name
    amx: bool = False  # AMX tiles: vLLM's SGL int8 and AMX WNA16 kernels
    avx512: bool = False
    avx512_bf16: bool = False
    cuda_capability: tuple[int, int] | None = None  # (major, minor) of the first GPU

    @property
    def bf16(self) -> bool:
        """Whether bfloat16 is a native compute type (GPUs from Ampere, compute capability 8.0, on)."""
        if self.accelerator == "cuda":
            return self.cuda_capability is not None and self.cuda_capability >= (8, 0)
        return True  # vLLM's CPU backend runs bfloat16 on every x86 and Arm CPU it supports

    def describe(self) -> str:
        if self.accelerator == "cuda":
            major, minor = self.cuda_capability or (0, 0)
            return f"GPU {self.device} (compute capability {major}.{minor})"
        features = [name for name in ("amx", "avx512", "avx512_bf16") if getattr(self, name)] or ["no AVX-512"]
        return f"CPU {self.device} ({', '.join(features)})"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: Dtype
    reason: str


def cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo, or None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


# The CPU features that decide which kernels vLLM and the quantizers take (and so their numerics).
KERNEL_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> set[str]:
    return set((cpuinfo("flags") or "").split())


def host() -> dict[str, object]:
    """The machine something was built on, as a provenance manifest records it. Standard library only
    (the quantization environment calls it); names the GPU only where torch is already loaded."""
    found: dict[str, object] = {
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu": cpu_model_name(),
        "cpu_flags": sorted(cpu_flags() & set(KERNEL_CPU_FLAGS)),
        "gpu": None,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def detect(*, gpu: bool = False) -> Capabilities:
    """Reads this machine's capabilities with the same torch calls vLLM's kernel selection uses.

    `gpu` says the engine runs on this node's GPUs. Ray Serve LLM's replica process itself holds no GPU
    (its engine workers do), so torch sees none there: the GPU is then read with nvidia-smi, which
    sees every GPU of the node.
    """
    import torch

    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        return Capabilities("cuda", torch.cuda.get_device_name(0), cuda_capability=(capability[0], capability[1]))
    if gpu:
        return nvidia_smi_gpu()
    cpu = torch.cpu
    return Capabilities(
        "cpu",
        cpu_model_name(),
        amx=bool(cpu._is_amx_tile_supported()),
        avx512=bool(cpu._is_avx512_supported()),
        avx512_bf16=bool(cpu._is_avx512_bf16_supported()),
    )


def nvidia_smi_gpu(run: Callable[[list[str]], str] | None = None) -> Capabilities:
    """The node's first GPU as nvidia-smi reports it; capability unknown (so no bfloat16) if it cannot."""
    run = run or (lambda command: subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    try:
        first = run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]).splitlines()[0]
        name, capability = (part.strip() for part in first.rsplit(",", 1))
        major, minor = (int(n) for n in capability.split("."))
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return Capabilities("cuda", "unknown GPU (nvidia-smi did not answer)")
    return Capabilities("cuda", name, cuda_capability=(major, minor))


def weights_dtype(model_dir: Path) -> Dtype:
    """The dtype the model's weights were saved in (config.json), float16 when it does not say."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float16"
    found = config.get("torch_dtype") or config.get("dtype") or "float16"
    return found if found in DTYPES else "float16"


def choose_dtype(precision: str, saved: Dtype, capabilities: Capabilities, pinned: Dtype | None = None) -> DtypeChoice:
    """The activation dtype to serve a variant with: its weights' own dtype, unless the hardware
    cannot run that for this precision."""
    if pinned is not None:
        return DtypeChoice(pinned, "pinned in the config")
    if capabilities.accelerator == "cpu":
        if precision == "int8" and capabilities.amx and saved != "bfloat16":
            return DtypeChoice(
                "bfloat16", "AMX CPU: vLLM's SGL int8 kernel has no float16 output, so int8 runs in bfloat16"
            )
        return DtypeChoice(saved, f"the weights' own dtype ({capabilities.describe()})")
    if saved == "bfloat16" and not capabilities.bf16:
        return DtypeChoice("float16", "this GPU has no bfloat16 (compute capability below 8.0)")
    return DtypeChoice(saved, f"the weights' own dtype ({capabilities.describe()})")


def choose_compile(capabilities: Capabilities, pinned: bool | None = None) -> bool:
    """Whether vLLM compiles the model (torch.compile, CUDA graphs) or runs it eagerly.

    On GPUs compiling is what makes decoding fast. On CPUs it cost about a minute and a half of start-up
    for three tiny engines on 2 cores, and gave no measurable throughput (README, "Start-up"), so CPU
    engines run eagerly unless the config pins `compile: true`.
    """
    if pinned is not None:
        return pinned
    return capabilities.accelerator == "cuda"


def cpu_threads_bind(engine_index: int, engines: int, cpus: list[int]) -> str:
    """vLLM's `VLLM_CPU_OMP_THREADS_BIND` for engine `engine_index` of `engines` CPU engines on one node.

    vLLM's "auto" binds an engine as if it owned the node, so engines sharing a node all bind the same
    cores: on 2 cores, the three demo engines all ran on core 0 while core 1 idled. Engines sharing a
    node get disjoint slices of its CPUs instead, one CPU left over for the router and the engines' API
    processes; with fewer CPUs than that, none is bound and the OS spreads the engines (Ray starts
    them with one OpenMP thread each). A single engine keeps vLLM's own binding.
    """
    if engines <= 1:
        return "auto"
    per_engine = (len(cpus) - 1) // engines
    if per_engine < 1:
        return "nobind"
    mine = cpus[engine_index * per_engine : (engine_index + 1) * per_engine]
    return ",".join(str(cpu) for cpu in mine)

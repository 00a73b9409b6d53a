"""Which activation dtypes a variant may be served with on this machine's hardware, in the order they are tried.

vLLM picks its kernels from the CPU's or GPU's features, the layer shapes and the quantization config
(STACK.md, quirk 10): no rule written from CPU flags has held on every machine. So nothing here predicts
that a dtype works; it only orders the viable ones, and the engine that serves a variant proves the first
that passes on this machine (`serving.engine.verify`, `serving.engine.server`):

    detect() -> Capabilities -> dtype_order(weights dtype, capabilities, pinned, kept) -> [DtypeChoice]

The order: a pinned dtype alone (`variants.NAME.dtype` in the config: a pin always wins); else the dtype kept
by this machine's last passing verification; then the weights' own dtype (on a GPU without bfloat16, float16
in its place); then the other half-precision dtype. Used by the engines the application deploys and by the
offline probe `serving models build` runs, so both try the same choices in the same order.
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


def choose_dtype(saved: Dtype, capabilities: Capabilities, pinned: Dtype | None = None) -> DtypeChoice:
    """The first dtype to try: the weights' own, unless the hardware cannot run it at all."""
    return dtype_order(saved, capabilities, pinned)[0]


def dtype_order(
    saved: Dtype, capabilities: Capabilities, pinned: Dtype | None = None, kept: Dtype | None = None
) -> list[DtypeChoice]:
    """The activation dtypes to try for a variant, first to last (the module docstring says why this order).
    No precision has a rule of its own: int8 on AMX CPUs had one, and it was wrong (STACK.md, quirk 10)."""
    if pinned is not None:
        return [DtypeChoice(pinned, "pinned in the config")]
    where = capabilities.describe()
    first = DtypeChoice(saved, f"the weights' own dtype ({where})")
    if capabilities.accelerator == "cuda" and saved == "bfloat16" and not capabilities.bf16:
        first = DtypeChoice("float16", "this GPU has no bfloat16 (compute capability below 8.0)")
    order = [first]
    other: Dtype = "bfloat16" if first.dtype != "bfloat16" else "float16"
    if other == "float16" or capabilities.bf16:
        order.append(DtypeChoice(other, f"the other half-precision dtype, tried when {first.dtype} fails ({where})"))
    if kept is not None:
        order = [DtypeChoice(kept, f"passed verification on this machine before ({where})")] + [
            c for c in order if c.dtype != kept
        ]
    return order


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

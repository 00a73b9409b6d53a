"""Starts Ray and Ray Serve on this machine, serves the demo variants, and stops everything on Ctrl-C.

Until the router exists, each variant is served as its own model by Ray Serve LLM's OpenAI app
(`demo-chat-fp16`, `demo-chat-int8`, `demo-chat-awq`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from serving.models import family, manifest

logger = logging.getLogger(__name__)

MODEL_NAME = "demo-chat"
# Ray's logical CPUs, not the machine's: each engine replica holds one, and on a 2-core machine the
# ingress would otherwise wait forever for a CPU (STACK.md quirk 8).
RAY_LOGICAL_CPUS = 12
KV_CACHE_GIB = "1"  # STACK.md quirk 9: the CPU default reserves far more than tiny models need


def has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def llm_config(name: str, folder: Path, *, gpu: bool) -> Any:
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": f"{MODEL_NAME}-{name}", "model_source": str(folder)},
        # Without a GPU, a CPU bundle makes Ray infer a CPU deployment; the default asks for a GPU
        # and would wait for one forever (STACK.md quirk 4).
        placement_group_config=None if gpu else {"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)}},
        engine_kwargs={"max_model_len": 1024, "dtype": "float16"},
        deployment_config={"num_replicas": 1},
    )


def variant_folders(models: Path, overrides: dict[str, Path]) -> dict[str, Path]:
    """The demo family's folders, with any variant pointed elsewhere (e.g. a real model's builds)."""
    folders = {v.name: models / v.folder for v in family.VARIANTS}
    folders.update(overrides)
    return folders


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean shutdown as Ctrl-C


def serve(models: Path, *, host: str, port: int, overrides: dict[str, Path] | None = None) -> int:
    import ray
    from ray import serve as ray_serve
    from ray.serve.llm import build_openai_app

    gpu = has_gpu()
    configs = []
    for name, folder in variant_folders(models, overrides or {}).items():
        try:
            found = manifest.read_manifest(folder)
            print(f"variant {name}: {found['precision']}, weights {found['weights_sha256'][:16]}, {folder}")
        except manifest.ManifestError as exc:
            # Flagged, not refused: a real model built elsewhere may have no manifest of ours yet.
            print(f"warning: variant {name} has no recorded provenance: {exc}")
        configs.append(llm_config(name, folder, gpu=gpu))

    started = time.monotonic()
    ray.init(num_cpus=RAY_LOGICAL_CPUS, include_dashboard=False, logging_level=logging.WARNING)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        print(f"starting {len(configs)} engines (first start takes a minute or two) ...", flush=True)
        ray_serve.run(build_openai_app({"llm_configs": configs}), name="demo", route_prefix="/")
        print(
            f"serving at http://{host}:{port}/v1 (models: {', '.join(c.model_id for c in configs)}); "
            f"ready in {time.monotonic() - started:.0f} s. Ctrl-C stops.",
            flush=True,
        )
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    return 0

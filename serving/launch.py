"""Starts Ray and Ray Serve on this machine, serves the configured application, and stops everything
on Ctrl-C; `apply` hands a changed config file to the running application."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from serving.config import Config, ConfigError, load_config, variants_differ

logger = logging.getLogger(__name__)

# Ray's logical CPUs, not the machine's: each engine replica holds one, and on a 2-core machine the
# ingress would otherwise wait forever for a CPU (STACK.md quirk 8).
RAY_LOGICAL_CPUS = 12


def has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean shutdown as Ctrl-C


def check_variants_exist(config: Config) -> None:
    missing = [f"{name} ({v.path})" for name, v in config.variants.items() if not (v.path / "config.json").is_file()]
    if missing:
        raise ConfigError(f"these variants have no model at their path: {', '.join(missing)}")


def serve(config_path: Path) -> int:
    import ray
    from ray import serve as ray_serve

    from serving.app import APP_NAME, build_app
    from serving.rollout.controller import NAMESPACE

    config = load_config(config_path)
    check_variants_exist(config)
    started = time.monotonic()
    # Replica logs stay in Ray's session log folder; the terminal shows what an operator needs.
    ray.init(num_cpus=RAY_LOGICAL_CPUS, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # Ctrl-C must stop the stack even where the shell started us with SIGINT ignored (e.g. with `&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ray_serve.start(http_options={"host": config.server.host, "port": config.server.port})
        print(f"starting {len(config.variants)} engines and the router (a minute or two) ...", flush=True)
        ray_serve.run(build_app(config, gpu=has_gpu()), name=APP_NAME, route_prefix="/")
        base = f"http://{config.server.host}:{config.server.port}"
        print(
            f"serving {config.model!r} at {base}/v1 (variants: {', '.join(config.variants)}); "
            f"ready in {time.monotonic() - started:.0f} s.\n"
            f"metrics: http://{config.observability.metrics_host}:{config.observability.metrics_port}/metrics\n"
            f"change weights: edit {config_path} and run `.venv/bin/serving apply {config_path}`. "
            "Ctrl-C stops.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    return 0


def connect() -> Any:
    """Joins the running stack's Ray cluster and returns its rollout controller."""
    import ray

    from serving.rollout.controller import NAMESPACE, controller

    try:
        ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ConfigError(f"no running stack (start it with `make serve`): {exc}") from None
    try:
        return controller()
    except ValueError:
        raise ConfigError("Ray is running, but no serving application is (start it with `make serve`)") from None


def rollout_status() -> dict[str, Any]:
    import ray

    status: dict[str, Any] = ray.get(connect().status.remote())
    return status


def apply(config_path: Path) -> int:
    """Validates the file and hands it to the running application's rollout controller."""
    import ray

    config = load_config(config_path)
    store = connect()
    current = Config.model_validate_json(ray.get(store.snapshot.remote(0))["config"])
    if variants_differ(current, config):
        raise ConfigError("the variants changed; that needs a restart of the stack, not an apply")
    version = ray.get(store.apply.remote(config.model_dump_json()))
    print(f"applied {config_path} as config version {version}; routers pick it up within a second")
    for name, tier in ray.get(store.status.remote())["tiers"].items():
        if tier["phase"] == "rolled_back":
            print(
                f"tier {name} stays rolled back ({tier['candidate']} at weight 0); change its section to re-enable it"
            )
    return 0

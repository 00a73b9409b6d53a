"""Builds the Ray Serve application from the config: one `LLMServer` deployment per variant, the
router ingress in front, which follows the rollout controller. Nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Any

from ray import serve

from serving.config import FULL_PRECISIONS, Config, ConfigError, VariantConfig, config_from_data
from serving.engine.kernels import WORKER_EXTENSION
from serving.engine.server import Placement, VariantServer, Verification
from serving.metrics import Metrics, RayExport
from serving.models import manifest
from serving.rollout.follower import RayController
from serving.route.core import RouterCore, create_app
from serving.variants.client import RayVariant

logger = logging.getLogger("serving.deploy.app")

KV_CACHE_GIB = "1"  # GiB per engine: the CPU default reserves far more than tiny models need
SYNC_INTERVAL_S = 0.5


@serve.deployment(ray_actor_options={"num_cpus": 0})  # queues and replicas: config.router
@serve.ingress()
class Router:
    def __init__(self, config_json: str, handles: dict[str, Any], provenance: dict[str, Any]) -> None:
        config = Config.model_validate_json(config_json)
        # Created here, in the replica, so Serve labels them with this deployment and replica; the node's
        # metrics agent exports them (see serving/metrics.py): no replica opens a port of its own.
        metrics = Metrics(RayExport())
        self.controller = RayController(config_json)
        self.replica = secrets.token_hex(8)  # names this replica's drain reports
        self.core = RouterCore(
            config,
            {name: RayVariant(h) for name, h in handles.items()},
            provenance,
            metrics=metrics,
            controller=self.controller,
        )

    async def sync(self) -> None:
        """Delivers this replica's signals and takes the controller's config, secret and live weights."""
        snapshot = await self.core.follower.sync(self.core.config_version)
        if snapshot.config is not None:
            self.core.apply(Config.model_validate_json(snapshot.config))
            logger.info("config version %d applied", snapshot.version)
        self.core.config_version = snapshot.version
        self.core.secret = bytes.fromhex(snapshot.secret)
        self.core.unfit = dict(snapshot.unfit)
        self.core.follower.follow(snapshot.weights)
        # Once told to drain, a replica refuses new requests (for good: a shutdown is not taken back); its next
        # report says so, with the requests it still holds.
        if await self.controller.drain_report(self.core.drain.report(self.replica)):
            self.core.drain.draining = True

    async def follow_controller(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self.sync()
            except Exception:
                logger.exception(
                    "could not sync with the rollout controller; keeping version %d", self.core.config_version
                )
                try:
                    self.controller.reconnect()
                except Exception:
                    logger.exception("could not find or start a rollout controller")

    async def start_following(self) -> None:
        try:
            await self.sync()
        except Exception:
            logger.exception("the rollout controller did not answer at start; candidates stay at 0 until it does")
        asyncio.get_running_loop().create_task(self.follow_controller())

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(lambda: self.core, [self.start_following])


def llm_config(model: str, name: str, variant: VariantConfig, *, gpu: bool) -> Any:
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        # Every variant serves the same model name, so engine answers carry the name clients asked for.
        model_loading_config={"model_id": model, "model_source": variant.source},
        placement_group_config=placement_group(variant, gpu=gpu),
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)}},
        # dtype and enforce_eager are set by VariantServer on the engine's own node, from its hardware.
        engine_kwargs={
            "max_model_len": variant.max_model_len,
            "enable_log_requests": False,
            "worker_extension_cls": WORKER_EXTENSION,
            # Shadow generations and scoring calls carry a lower priority (serving.shadow.shadower.SHADOW_PRIORITY):
            # the engine schedules every waiting primary first.
            "scheduling_policy": "priority",
        },
        deployment_config={"name": variant_deployment(name), **variant.deployment_options()},
        experimental_configs={"stream_batching_interval_ms": variant.stream_batching_ms},
    )


def placement_group(variant: VariantConfig, *, gpu: bool) -> dict[str, Any] | None:
    """The replica's resource bundle: its engine's device plus the variant's custom resources, which pin
    it to the nodes that advertise them. Without a GPU, a CPU bundle makes Ray infer a CPU deployment;
    Ray Serve LLM's default (None) asks for a GPU and would wait for one forever."""
    if gpu and not variant.resources:
        return None
    return {"bundles": [{"GPU" if gpu else "CPU": 1, **variant.resources}]}


def variant_deployment(name: str) -> str:
    return f"variant-{name}"


def provenance_of(config: Config) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, variant in config.variants.items():
        if variant.path is None:
            # A hub model's folder exists only on the nodes that downloaded it; its model card is its provenance.
            logger.warning("variant %s comes from the hub (%s): no provenance manifest is read", name, variant.hub)
            found[name] = None
            continue
        try:
            found[name] = manifest.read_manifest(variant.path)
        except manifest.ManifestError as exc:
            logger.warning("variant %s has no recorded provenance: %s", name, exc)
            found[name] = None
    return found


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to has GPUs (this machine's, when not connected)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0)) > 0
    import torch

    return bool(torch.cuda.is_available())


def build_app(config: Config, *, gpu_default: bool) -> Any:
    """The application for `serve.run`; the config's variant paths must already be resolved.

    A variant runs on a GPU when its config says `gpu: true`, on a CPU when it says false, and
    otherwise as `gpu_default` says (see cluster_has_gpus).
    """
    from ray.serve.llm import build_llm_deployment

    on_gpu = {name: v.gpu if v.gpu is not None else gpu_default for name, v in config.variants.items()}
    cpu_variants = [name for name, gpu in on_gpu.items() if not gpu]  # on CPU, the engines share a node
    reference = reference_variant(config)
    handles: dict[str, Any] = {}
    # The reference first: every other variant's deployment is handed its handle, to compare answers with.
    for name in sorted(config.variants, key=lambda n: n != reference):
        v = config.variants[name]
        handles[name] = build_llm_deployment(
            llm_config(config.model, name, v, gpu=on_gpu[name]),
            name_prefix="",
            deployment_cls=VariantServer,
            bind_kwargs={
                "variant": name,
                "precision": v.precision,
                "pinned_dtype": v.dtype,
                "pinned_compile": v.compile,
                "placement": Placement(0, 1, gpu=True)
                if on_gpu[name]
                else Placement(cpu_variants.index(name), len(cpu_variants), gpu=False),
                "verification": verification_plan(config, name, reference),
                "reference": handles[reference] if reference is not None and name != reference else None,
            },
        )
    handles = {name: handles[name] for name in config.variants}
    router = Router.options(**config.router.deployment_options())  # type: ignore[attr-defined]
    return router.bind(config.model_dump_json(), handles, provenance_of(config))


def reference_variant(config: Config) -> str | None:
    """The variant every other one is compared with at start-up: the first full-precision one (None: none is)."""
    return next((n for n, v in config.variants.items() if v.precision in FULL_PRECISIONS), None)


def verification_plan(config: Config, name: str, reference: str | None) -> Verification:
    """How a variant is proven at start-up: against the reference (unless it is the reference), and whether
    its being unfit stops the stack: the reference's and any tier's baseline's does; a candidate's or a
    shadow-only target's takes it out of the rollout instead."""
    baselines = {tier.baseline for tier in config.tiers.values()}
    return Verification(
        reference=None if name == reference else reference,
        required=name == reference or name in baselines,
        min_agreement=config.variants[name].min_agreement,
    )


def build_from_args(args: dict[str, Any]) -> Any:
    """The application builder that a Ray Serve config file names (`import_path: serving.deploy.app:build_from_args`),
    with the args that `serving serve-config` writes: `config` (the validated config file's content) and
    `base_dir` (where its relative paths resolve on the cluster). The config is validated again here,
    on the cluster, so a hand-edited file is refused with the same messages as `serving check`."""
    from pathlib import Path

    unknown = set(args) - {"config", "base_dir"}
    if unknown:
        raise ConfigError(f"unknown application args: {', '.join(sorted(unknown))} (expected config, base_dir)")
    config = config_from_data(
        args.get("config"), base_dir=Path(args.get("base_dir", ".")), source="the application's args.config"
    )
    return build_app(config, gpu_default=cluster_has_gpus())

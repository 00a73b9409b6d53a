"""The one config file: variants, tiers, keys, limits. Frozen pydantic models that refuse unknown keys.

`load_config(path)` is the only way in; a bad file raises `ConfigError` whose message names every
offending key by its path in the file (e.g. `tiers.batch.weight`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.engine.hardware import Dtype

Precision = Literal["fp32", "bf16", "fp16", "int8", "awq", "gptq", "fp8"]
# Unquantized weights: what an escalated request is re-run on (README, "Escalation").
FULL_PRECISIONS: frozenset[Precision] = frozenset({"fp32", "bf16", "fp16"})
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class ConfigError(ValueError):
    """The config file cannot be used; the message names each problem and where it is."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(Strict):
    """Ray Serve's autoscaling for one deployment (the fields of `ray.serve.config.AutoscalingConfig`
    that operators set; defaults are Ray's). Replicas scale with requests in flight per replica."""

    min_replicas: int = Field(1, ge=0, description="never fewer replicas than this")
    max_replicas: int = Field(1, ge=1, description="never more replicas than this")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy time (default: min_replicas)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(30.0, ge=0, description="how long the load must stay high before scaling up")
    downscale_delay_s: float = Field(600.0, ge=0, description="how long the load must stay low before scaling down")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


# How often a draining replica checks whether its requests in flight have finished.
GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 0.5


class Scaling(Strict):
    """How many replicas a deployment runs: a fixed count, or Ray Serve's autoscaling (not both)."""

    replicas: int | None = Field(None, ge=1, description="a fixed number of replicas (default 1)")
    autoscaling: AutoscalingConfig | None = Field(None, description="Ray Serve autoscaling instead of a fixed count")
    # Bounded queues: Ray Serve LLM leaves an engine's max_ongoing_requests at a billion and every queue
    # unbounded, so an overload would grow memory and latency without end instead of being refused.
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one replica works on at once (Ray Serve's max_ongoing_requests)"
    )
    max_queued_requests: int = Field(
        128,
        ge=1,
        description="requests waiting for a replica, per caller, beyond which new ones are refused at once with "
        "a 503 and Retry-After (Ray Serve's max_queued_requests)",
    )
    graceful_shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on redeploy or shutdown, how long a replica that takes no new requests waits for the ones "
        "in flight to finish before it is stopped (Ray Serve's graceful_shutdown_timeout_s); the router's is also "
        "how long `serving serve`, stopped, drains the answers in flight before it stops Serve (serving.route.drain)",
    )

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> Self:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set replicas or autoscaling, not both")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """The Ray Serve deployment options for this scaling (`num_replicas` or `autoscaling_config`)."""
        queues = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
        }
        if self.autoscaling is not None:
            return {"autoscaling_config": self.autoscaling.model_dump(exclude_none=True), **queues}
        return {"num_replicas": self.replicas or 1, **queues}

    def most_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.replicas or 1


# A Hugging Face model id, `org/name`: what vLLM and Ray Serve LLM download when no local folder is given.
HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


# Ray Serve LLM's default is 50 ms: on the tiny family it put ~20 % on the median time to first token
# against vLLM's own server; 10 ms cost no throughput measurably there (BENCHMARKS.md).
STREAM_BATCHING_MS = 10.0


class VariantConfig(Scaling):
    path: Path | None = Field(None, description="folder of the model weights (HF layout), relative to the config file")
    hub: str | None = Field(
        None,
        pattern=HUB_ID,
        description="a Hugging Face model id (org/name), downloaded by each engine's node; instead of path",
    )
    precision: Precision = Field(description="what the weights are; `forbid` lists refer to this")
    max_model_len: int = Field(1024, ge=16, description="engine context length (prompt + output tokens)")
    dtype: Dtype | None = Field(
        None,
        description="activation dtype; by default the first that passes verification on the engine's machine, "
        "in serving.engine.hardware.dtype_order's order",
    )
    min_agreement: float = Field(
        0.3,
        ge=0,
        le=1,
        description="the floor of word agreement with the reference (the first full-precision variant) on the "
        "verification facts at start-up; below it the variant is unfit on that machine (serving.engine.verify)",
    )
    compile: bool | None = Field(
        None, description="torch.compile the model; by default on GPUs only (serving.engine.hardware.choose_compile)"
    )
    gpu: bool | None = Field(
        None,
        description="one GPU per replica (true) or a CPU engine (false); by default, whether the Ray cluster "
        "has GPUs when the application is built",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each replica needs, e.g. {worker_b: 1}: the variant runs only on the "
        "nodes that advertise them (`ray start --resources`); CPU and GPU are not set here (see gpu)",
    )
    stream_batching_ms: float = Field(
        STREAM_BATCHING_MS,
        ge=0,
        description="how long the engine's deployment gathers streamed tokens into one message to the router "
        "(Ray Serve LLM's stream_batching_interval_ms; 0: a message per token). Longer costs less CPU per answer; "
        "the first token waits up to this long (BENCHMARKS.md)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give the model's path (a local folder) or hub (a Hugging Face id), exactly one")
        return self

    @model_validator(mode="after")
    def _custom_resources_only(self) -> Self:
        builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources))
        if builtin:
            raise ValueError(f"resources names only custom resources; {', '.join(builtin)} follow from gpu")
        if any(amount <= 0 for amount in self.resources.values()):
            raise ValueError("resources: every amount must be above 0")
        return self

    @property
    def source(self) -> str:
        """What vLLM loads: the local folder, or the hub id."""
        return str(self.path) if self.path is not None else str(self.hub)


class ShadowConfig(Strict):
    target: Name = Field(description="the variant that shadow copies of requests go to")
    rate: float = Field(ge=0.0, le=1.0, description="fraction of the tier's requests mirrored")


class ProgressionConfig(Strict):
    """Progressive promotion: the tier's `weight` is where the candidate starts; each `interval_s` in
    which every check passed raises its live weight by `step_weight`, up to `max_weight`; one more
    passing interval there promotes it (weight 100; with max_weight 100, the step that reaches it does).
    A failed check rolls back at any step."""

    step_weight: float = Field(gt=0, le=100, description="percent added to the live weight per passing interval")
    max_weight: float = Field(50.0, gt=0, le=100, description="the last step's weight before promotion")
    interval_s: float = Field(gt=0, description="seconds every check must pass before the next step")

    @model_validator(mode="after")
    def _resolution(self) -> Self:
        for name in ("step_weight", "max_weight"):
            if round(getattr(self, name), 3) != getattr(self, name):
                raise ValueError(f"{name} has a resolution of 0.001 percent; round it to 3 decimals")
        return self


class EscalationConfig(Strict):
    """Re-runs a whole (non-streamed) answer of a quantized variant on the tier's full-precision baseline
    when the answer's confidence is low, and returns the baseline's answer instead (README, "Escalation")."""

    min_mean_logprob: float = Field(
        le=0.0,
        description="a quantized answer whose mean token log-prob (of its least confident choice) is below this "
        "is re-run on the baseline; 0.0 escalates every quantized answer, a very low value none",
    )


class TierConfig(Strict):
    baseline: Name = Field(description="the variant that answers unless the canary picks the candidate")
    candidate: Name | None = Field(None, description="the variant under canary, if any")
    weight: float = Field(
        0.0, ge=0.0, le=100.0, description="percent of users sent to the candidate (with progression: the start)"
    )
    shadow: ShadowConfig | None = None
    forbid: tuple[Precision, ...] = Field((), description="precisions this tier's traffic may never reach")
    progression: ProgressionConfig | None = Field(None, description="step the weight up while checks pass")
    require_gate: bool = Field(
        False,
        description="the candidate may get weight above 0 only with a passed release gate against this tier's "
        "baseline recorded in its manifest (`serving evaluate`; checked by serving check, apply and serve)",
    )
    high_impact: bool = Field(
        False,
        description="the candidate's passed gate must also carry a named sign-off (`serving sign-off`); "
        "needs require_gate",
    )
    escalation: EscalationConfig | None = Field(
        None,
        description="re-run low-confidence answers of a quantized candidate on the baseline, which must be full "
        "precision (not for streamed answers)",
    )

    @model_validator(mode="after")
    def _weight_needs_candidate(self) -> Self:
        if self.weight > 0 and self.candidate is None:
            raise ValueError("weight is above 0 but the tier has no candidate")
        if round(self.weight, 3) != self.weight:
            raise ValueError("weight has a resolution of 0.001 percent; round it to 3 decimals")
        if self.progression is not None:
            if self.candidate is None:
                raise ValueError("progression needs a candidate")
            if self.weight > self.progression.max_weight:
                raise ValueError(
                    f"weight ({self.weight:g}) is the progression's start; it exceeds max_weight "
                    f"({self.progression.max_weight:g})"
                )
        if self.high_impact and not self.require_gate:
            raise ValueError("high_impact needs require_gate: true (a sign-off is given on a passed gate)")
        return self


class KeyConfig(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the bearer key; never the key")
    tenant: Name
    tier: Name
    may_override: bool = Field(False, description="may pin a variant with the x-variant header")
    admin: bool = Field(False, description="may read /admin endpoints (rollout state)")


class LimitsConfig(Strict):
    """What one request may ask of the engines. Checked on the parsed request (serving.intake.limits), so a
    number sent as a string or a float is held to the same bound."""

    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_n: int = Field(4, ge=1, le=128, description="choices per request (n), beam width included")
    max_tokens: int = Field(512, ge=1, description="max_tokens, max_completion_tokens and min_tokens")
    default_max_tokens: int = Field(256, ge=1, description="applied when a request sets no max_tokens")
    max_prompt_chars: int = Field(32_000, ge=1)
    max_prompts: int = Field(8, ge=1, description="prompts in one batched completions request")
    max_logprobs: int = Field(5, ge=0, le=20, description="logprobs, top_logprobs and prompt_logprobs")
    max_stop: int = Field(8, ge=0, description="stop strings, stop token ids and bad words, each")
    max_token_ids: int = Field(300, ge=0, description="entries of logit_bias, allowed_token_ids, logprob_token_ids")
    feedback_per_minute: int = Field(60, ge=1, description="feedback posts per API key per minute, per router")
    max_headers: int = Field(100, ge=8, description="header lines in one request; more is refused with a 431")
    max_header_bytes: int = Field(
        16_384, ge=1024, description="all header names and values of one request together; more is a 431"
    )
    requests_per_minute: int | None = Field(
        600, ge=1, description="completion requests per API key per minute, per router replica (None: unlimited)"
    )
    tokens_per_minute: int | None = Field(
        200_000,
        ge=1,
        description="tokens per API key per minute, per router replica, charged when a request is admitted: its "
        "prompt (4 characters a token) plus max_tokens for each of its n choices (None: unlimited)",
    )
    feedback_max_age_s: float = Field(86_400, gt=0, description="feedback is taken on answers this recent")

    @model_validator(mode="after")
    def default_within_max(self) -> Self:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class ShadowingConfig(Strict):
    max_concurrency: int = Field(4, ge=1, description="comparisons in flight per router; more are dropped")
    noise_floor_rate: float = Field(0.1, ge=0.0, le=1.0, description="share of shadowed requests paired with itself")
    max_primary_in_flight: int = Field(
        2,
        ge=0,
        description="a shadow is shed (reason busy) when the primary's or the target's engine has more primary "
        "requests in flight from this router than this, now or averaged over the last second",
    )


class ObservabilityConfig(Strict):
    metrics_host: str = Field("127.0.0.1", description="the host in the metrics address that `serving serve` prints")
    metrics_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="the port of the node's Ray metrics agent, which exports every replica's metrics, for a Ray "
        "that `serving serve` starts (a cluster that is joined keeps its own)",
    )
    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP traces endpoint, e.g. http://host:4318/v1/traces")


class RollbackConfig(Strict):
    enabled: bool = Field(True, description="judge candidates and roll back automatically")
    interval_s: float = Field(2.0, gt=0, le=300, description="how often every candidate is judged")
    window_s: float = Field(300.0, gt=0, description="the sliding window of signals judged")
    min_samples: int = Field(30, ge=5, description="a check judges only once its window holds this many")
    confidence_z: float = Field(2.576, gt=0, description="z of the Wilson bound on rates (2.576: 99 %)")
    max_error_rate: float = Field(0.02, ge=0, le=1, description="candidate error rate (lower bound)")
    latency_quantile: float = Field(
        0.95, gt=0.5, lt=1, description="quantile of TTFT and TPOT judged; p99 needs ~900 samples, p95 ~140"
    )
    max_latency_ratio: float = Field(
        2.0, gt=1, description="candidate / baseline at that quantile, for TTFT and TPOT, by confidence bounds"
    )
    max_disagreement_rate: float = Field(0.5, ge=0, le=1, description="lower bound above the noise floor")
    max_score_drift: float = Field(0.05, ge=0, description="mean |delta log-prob| per token above the floor")
    max_override_rate_delta: float = Field(0.05, ge=0, le=1, description="candidate minus baseline")
    state_file: Path = Field(Path("rollout-state.json"), description="where rollbacks are persisted")
    window_save_s: float = Field(
        5.0, gt=0, description="how often the window of signals is saved beside the state file (restarts resume it)"
    )
    warmup_exclusion_s: float = Field(
        30.0,
        ge=0,
        description="after an engine replica of a variant starts, that variant's latency samples of this many "
        "seconds are left out of the TTFT and TPOT checks (errors and quality signals still count); 0: none",
    )

    @model_validator(mode="after")
    def _exclusion_inside_window(self) -> Self:
        if self.warmup_exclusion_s > self.window_s:
            raise ValueError(
                f"warmup_exclusion_s ({self.warmup_exclusion_s:g}) exceeds window_s ({self.window_s:g}): a replica's "
                "start leaves the window before its exclusion ends"
            )
        return self


class GateConfig(Strict):
    """Thresholds of the offline release gate, `serving evaluate` (README, "Release gate"). The defaults
    come from measuring fp16 against itself (a second engine, prompts in reverse batch order) on the tiny
    and smol families: greedy answers were identical and drift 0.0 on this CPU build, so each default is
    that noise plus a documented margin. None: measured and reported, not judged."""

    max_exact_match_drop: float | None = Field(
        0.05, ge=0, le=1, description="baseline minus candidate exact-match rate, over all labelled items"
    )
    max_task_exact_match_drop: float | None = Field(
        0.10, ge=0, le=1, description="the same for the worst task, so one task's collapse cannot hide in the mean"
    )
    min_label_agreement: float | None = Field(
        0.90, ge=0, le=1, description="share of labelled items where both sides got the same match decision"
    )
    min_token_agreement: float | None = Field(
        0.50, ge=0, le=1, description="mean share of positions where the greedy answers agree token for token"
    )
    max_score_drift: float | None = Field(
        0.05, ge=0, description="mean |delta log-prob| per token of the baseline's answers, scored by both"
    )
    max_refusal_rate_drop: float | None = Field(
        0.0, ge=0, le=1, description="baseline minus candidate refusal rate on the safety prompts"
    )
    max_latency_ratio: float | None = Field(
        None, gt=0, description="candidate / baseline median single-request latency (off by default: see README)"
    )
    min_throughput_ratio: float | None = Field(
        None, gt=0, description="candidate / baseline batch output tokens per second (off by default)"
    )

    def thresholds(self) -> dict[str, float | None]:
        return self.model_dump()


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class RouterConfig(Scaling):
    """The router (the HTTP ingress) deployment: how many replicas Ray Serve runs, and its queues. A router
    request mostly waits on an engine, so one replica holds many at once."""

    max_ongoing_requests: int = Field(1000, ge=1, description="requests one router replica works on at once")
    max_queued_requests: int = Field(
        1000, ge=1, description="requests waiting for a router replica, per proxy, beyond which a 503 is sent"
    )
    # On a cluster Ray Serve may place every router replica on one node; that node's loss then takes every
    # router (and the calls they hold) with it. Engines cannot take this option: their replicas are placement
    # groups, which Ray Serve does not combine with it.
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="the most router replicas on one Ray node (Ray Serve's max_replicas_per_node)"
    )

    def deployment_options(self) -> dict[str, Any]:
        options = super().deployment_options()
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        return options


class Config(Strict):
    model: Name = Field(description="the model name clients send; the one name /v1/models lists")
    variants: dict[Name, VariantConfig]
    tiers: dict[Name, TierConfig]
    keys: tuple[KeyConfig, ...]
    limits: LimitsConfig = LimitsConfig()
    shadowing: ShadowingConfig = ShadowingConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    rollback: RollbackConfig = RollbackConfig()
    gate: GateConfig = GateConfig()
    server: ServerConfig = ServerConfig()
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _references_resolve(self) -> Self:
        problems = []
        for tier_name, tier in self.tiers.items():
            used = {"baseline": tier.baseline, "candidate": tier.candidate}
            if tier.shadow is not None:
                used["shadow.target"] = tier.shadow.target
            for field, variant in used.items():
                if variant is None:
                    continue
                if variant not in self.variants:
                    problems.append(f"tiers.{tier_name}.{field}: unknown variant {variant!r}")
                elif field != "shadow.target" and self.variants[variant].precision in tier.forbid:
                    problems.append(
                        f"tiers.{tier_name}.{field}: variant {variant!r} is {self.variants[variant].precision}, "
                        "which the tier forbids"
                    )
            problems.extend(self._escalation_problems(tier_name, tier))
        shadow_slots = self.shadowing.max_concurrency * self.router.most_replicas()
        if any(t.shadow is not None for t in self.tiers.values()):
            for name, v in self.variants.items():
                # Shadow calls wait in the same queues as primaries: bounded to half an engine's slots,
                # they can never take a primary's place.
                if 2 * shadow_slots > v.max_ongoing_requests:
                    problems.append(
                        f"variants.{name}.max_ongoing_requests: {v.max_ongoing_requests} leaves no room for primaries "
                        f"beside {shadow_slots} shadow calls (shadowing.max_concurrency x router replicas); "
                        f"set it to at least {2 * shadow_slots}"
                    )
        for i, key in enumerate(self.keys):
            if key.tier not in self.tiers:
                problems.append(f"keys.{i}.tier: unknown tier {key.tier!r}")
        if len({k.sha256 for k in self.keys}) != len(self.keys):
            problems.append("keys: the same key hash appears twice")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _escalation_problems(self, tier_name: str, tier: TierConfig) -> list[str]:
        """Escalation re-runs on the baseline: it must be full precision, and something quantized must answer."""
        if tier.escalation is None or tier.baseline not in self.variants:
            return []
        where = f"tiers.{tier_name}.escalation"
        baseline = self.variants[tier.baseline].precision
        if baseline not in FULL_PRECISIONS:
            return [
                f"{where}: the baseline {tier.baseline!r} is {baseline}; escalation re-runs answers on the baseline, "
                f"which must be full precision ({', '.join(sorted(FULL_PRECISIONS))})"
            ]
        candidate = self.variants.get(tier.candidate) if tier.candidate is not None else None
        if candidate is None or candidate.precision in FULL_PRECISIONS:
            return [f"{where}: the tier has no quantized candidate, so no answer could be escalated"]
        return []


def variants_differ(old: Config, new: Config) -> bool:
    """Whether `new` changes what is deployed (any setting of any variant's engine, or the router's replicas
    or autoscaling): that needs a redeploy, not an apply."""

    def deployed(config: Config) -> object:
        variants = {n: v.model_dump() for n, v in config.variants.items()}
        return variants, config.router.deployment_options()

    return deployed(old) != deployed(new)


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(text: str, *, base_dir: Path, source: str = "<config>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    return config_from_data(raw, base_dir=base_dir, source=source)


def config_from_data(raw: object, *, base_dir: Path, source: str = "<config>") -> Config:
    """Validates a config already read into Python data (a parsed file, or the args of a Ray Serve config)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping at the top level")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_describe(exc)}") from None
    return resolve_paths(config, base_dir)


def resolve_paths(config: Config, base_dir: Path) -> Config:
    # Relative variant paths are relative to the config file, so a config can sit beside its models.
    # Hub ids are not paths: each engine's node downloads them.
    variants = {
        name: v if v.path is None else v.model_copy(update={"path": (base_dir / v.path).resolve()})
        for name, v in config.variants.items()
    }
    rollback = config.rollback.model_copy(update={"state_file": (base_dir / config.rollback.state_file).resolve()})
    return config.model_copy(update={"variants": variants, "rollback": rollback})


def load_config(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse_config(text, base_dir=path.parent, source=str(path))

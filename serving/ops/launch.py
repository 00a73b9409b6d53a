"""Starts Ray and Ray Serve on this machine, serves the configured application, and on Ctrl-C or SIGTERM drains
the answers in flight (serving.route.drain) and stops everything; `apply` hands a changed config file to the running
application.

The terminal shows what an operator needs: one line per engine as it comes up (precision, activation
dtype, seconds), then where to reach the stack. Everything else (Ray's, Serve's and vLLM's own logs)
stays in Ray's session log folder, whose path is printed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.config import Config, ConfigError, load_config, variants_differ
from serving.release import policy as release_policy

logger = logging.getLogger(__name__)

# Ray's logical CPUs, not the machine's: each engine replica holds one, and on a 2-core machine the
# ingress would otherwise wait forever for a CPU.
RAY_LOGICAL_CPUS = 12
STARTUP_POLL_S = 0.5
# Loggers that print to the driver's terminal while the stack starts; their records stay in Ray's files.
CHATTY_LOGGERS = ("ray", "ray.serve", "ray.llm", "vllm", "serving.deploy.app")
# How often every process hands its metrics to the node's metrics agent, for a Ray started here (Ray's
# default, 10 s, would leave the demo's and the tests' first scrapes empty); Ray's own Serve tests use 1 s.
METRICS_REPORT_INTERVAL_MS = 1000
LOOPBACK = "127.0.0.1"


class StartupFailed(RuntimeError):
    """A deployment of the application failed to start; the message says which and why."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # same clean shutdown as Ctrl-C


def check_variants_exist(config: Config) -> None:
    # Hub models are downloaded by each engine's node; only local folders can be checked here.
    missing = [
        f"{name} ({v.path})"
        for name, v in config.variants.items()
        if v.path is not None and not (v.path / "config.json").is_file()
    ]
    if missing:
        raise ConfigError(f"these variants have no model at their path: {', '.join(missing)}")


def check_state_file(config: Config) -> None:
    """Refuses a damaged rollout state file before anything starts, saying what to do (never a silent reset:
    the file records which candidates were rolled back)."""
    from serving.rollout import store

    try:
        store.read_state(config.rollback.state_file)
    except store.DamagedState as damaged:
        raise ConfigError(store.refusal(damaged)) from None


def quiet_terminal() -> None:
    """Keeps library logs off the terminal: warnings and errors still show, as plain text."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.disable(logging.INFO)  # in this process only; replicas keep logging to Ray's files
    # Some set up their own handler and level per module (ray.serve.ray.llm...), so every one is set.
    for name in [*CHATTY_LOGGERS, *logging.root.manager.loggerDict]:
        if name.split(".")[0] in ("ray", "vllm") or name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.seconds():4.0f} s] {text}", flush=True)


# Ray Serve's settings for a short request path, measured in BENCHMARKS.md: user code and the handle's router
# run on the replica's own event loop instead of threads of their own, deployments call each other over gRPC,
# request logs are buffered. These are what RAY_SERVE_THROUGHPUT_OPTIMIZED sets, less its direct ingress (no
# proxy, an HTTP port per router replica), which several router replicas on one node could not share.
FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def set_fast_path_env() -> None:
    """Puts FAST_PATH_ENV into the environment of the Ray processes started from here (an operator's own
    values win). Called once this process has imported Ray Serve, which then keeps its defaults: this
    driver makes blocking handle calls, which a router on its caller's event loop refuses."""
    for name, value in FAST_PATH_ENV.items():
        os.environ.setdefault(name, value)


def ray_init_options(address: str | None, metrics_port: int | None = None) -> dict[str, Any]:
    """`ray.init` arguments: start a local Ray (no address) or join a running cluster (`auto`, `ray://...`).

    Only a Ray started here gets more logical CPUs than the machine has (see RAY_LOGICAL_CPUS), no
    dashboard, its metrics agent on `metrics_port` (where every replica's metrics are served; Ray would
    pick a random port) and a short metrics export interval; a cluster that is joined keeps the
    resources, dashboard and metrics settings its operator gave it.
    """
    from serving.rollout.controller import NAMESPACE

    options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        return {
            **options,
            "num_cpus": RAY_LOGICAL_CPUS,
            # No dashboard: its job API runs any code sent to it (CVE-2023-48022). The node's address is
            # loopback, so Ray advertises and dials itself there; its gRPC servers (GCS, raylet, object
            # manager, workers) still listen on every interface, which Ray offers no setting to change:
            # README, "Overload, impatient clients, redeploys and exposure", says how to guard them.
            "include_dashboard": False,
            "dashboard_host": LOOPBACK,
            "_node_ip_address": LOOPBACK,
            "_metrics_export_port": metrics_port,
            "_system_config": {"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
        }
    return {**options, "address": address}


def serve(config_path: Path, address: str | None = None) -> int:
    """Serves the config until Ctrl-C on a Ray started here; with `address`, deploys onto that running
    cluster, waits until every deployment is ready, and returns, leaving the application running there."""
    clock = Clock()
    config = load_config(config_path)
    release_policy.enforce(config, config_path)  # a gated tier's candidate takes weight only with its gate
    if address is None:
        # On a cluster the state file and the folders are on other nodes, not necessarily here: Serve reports a
        # missing folder, and a controller started there on a damaged state file starts fail-safe.
        check_state_file(config)
        check_variants_exist(config)
    quiet_terminal()

    import ray
    from ray import serve as ray_serve

    if address is None:  # a cluster that is joined has its own environment (helm/serving: values.yaml)
        set_fast_path_env()
    # The application module imports vLLM (about 6 s on 2 cores); do that while Ray starts its processes.
    importing = threading.Thread(target=importlib.import_module, args=("serving.deploy.app",), daemon=True)
    importing.start()
    where = f"the Ray cluster at {address}" if address else "Ray"
    clock.say(f"starting {where} and {len(config.variants)} engines ({', '.join(config.variants)}) ...")
    context = ray.init(**ray_init_options(address, config.observability.metrics_port))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # Ctrl-C must stop the stack even where the shell started us with SIGINT ignored (e.g. with `&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = 0
    serving = False  # the application is up: a stop drains it first
    try:
        if address is None:
            clock.say(f"logs of Ray, the router and every engine: {Path(context.address_info['session_dir']) / 'logs'}")
        # On a cluster whose Serve already runs, Serve keeps its own HTTP options and says so in its log.
        ray_serve.start(http_options={"host": config.server.host, "port": config.server.port})
        importing.join()
        quiet_terminal()  # again: Serve and Ray Serve LLM set their loggers' levels as they start
        deploy(config, clock)
        print_ready(config, config_path, clock, joined=address is not None, metrics_port=metrics_port_of(context))
        serving = address is None
        while serving:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(
            "stopping ..." if address is None else "stopped watching; the deployment goes on in the cluster", flush=True
        )
        if serving:
            try:
                drain(config.router.graceful_shutdown_timeout_s, clock)
            except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) again: stop at once
                print("stopping at once; answers in flight are cut", flush=True)
    except StartupFailed as exc:
        print(f"error: {exc}", flush=True)
        status = 1
    finally:
        # A cluster that was joined is not ours to stop: only this driver disconnects.
        stop(*((ray_serve.shutdown, ray.shutdown) if address is None else (ray.shutdown,)))
    return status


def drain(bound_s: float, clock: Clock) -> None:
    """Has every router replica refuse new requests and waits, up to `bound_s`, for the ones in flight to end
    (serving.route.drain), through the rollout controller: Serve's own stop, which follows, kills the HTTP proxy and
    every answer streaming through it."""
    import ray

    from serving.rollout.controller import controller
    from serving.route.drain import DrainStatus

    def begin() -> None:
        ray.get(controller().begin_drain.remote(), timeout=10)

    def status() -> DrainStatus:
        try:
            seen: DrainStatus = ray.get(controller().drain_status.remote(), timeout=5)
        except ray.exceptions.GetTimeoutError:  # a busy controller: asked again
            return DrainStatus(began=True, routers=1, draining=0, in_flight=0)
        return seen

    follow_drain(begin, status, bound_s, clock)


def follow_drain(begin: Callable[[], None], status: Callable[[], Any], bound_s: float, clock: Clock) -> None:
    """Begins the drain and waits for it, saying on the terminal how it went. A drain that cannot begin or be
    followed (no controller) is skipped: the stop goes on."""
    from serving.route.drain import wait_for_drain

    try:
        begin()
    except Exception as exc:
        print(f"could not drain ({exc!r}); stopping", flush=True)
        return
    clock.say(f"draining: new requests are refused; waiting up to {bound_s:g} s for those in flight (Ctrl-C: stop now)")
    try:
        left = wait_for_drain(status, bound_s)
    except Exception as exc:  # the controller died mid-drain
        print(f"could not follow the drain ({exc!r}); stopping", flush=True)
        return
    if left.done():
        clock.say("drained: every request in flight has ended")
    else:
        clock.say(f"drain bound ({bound_s:g} s) reached: {left.in_flight} requests still in flight are cut")


def stop(*steps: Callable[[], None]) -> None:
    """Runs the shutdown steps. While Serve drains and stops its actors, Ray reports its own retried
    tasks ("ServeController.graceful_shutdown failed ...") to this terminal, on stdout; that text is
    shown only if stopping fails."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            for step in steps:
                step()
    except BaseException:
        print(said.getvalue(), file=sys.stderr, end="")
        raise


def deploy(config: Config, clock: Clock) -> None:
    """Deploys the application and prints a line per deployment as it becomes ready."""
    from ray import serve as ray_serve

    from serving.deploy.app import build_app, cluster_has_gpus, variant_deployment
    from serving.deploy.serve_config import APP_NAME

    app = build_app(config, gpu_default=cluster_has_gpus())
    ray_serve.run_many([ray_serve.RunTarget(app, name=APP_NAME, route_prefix="/")], wait_for_applications_running=False)
    names = {variant_deployment(name): name for name in config.variants}
    watch(lambda: deployment_states(APP_NAME), names, clock, describe=lambda name: engine_facts(APP_NAME, name))


def deployment_states(app_name: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """The application's status and, per deployment, its status and message."""
    from ray import serve as ray_serve

    found = ray_serve.status().applications.get(app_name)
    if found is None:
        return "NOT_STARTED", {}
    deployments = {name: (str(d.status.value), d.message) for name, d in found.deployments.items()}
    return str(found.status.value), deployments


def engine_facts(app_name: str, deployment: str) -> dict[str, Any]:
    from ray import serve as ray_serve

    async def ask() -> dict[str, Any]:
        facts: dict[str, Any] = await ray_serve.get_deployment_handle(deployment, app_name).describe.remote()
        return facts

    return asyncio.run_coroutine_threadsafe(ask(), handle_loop()).result(timeout=30)


_handle_loop: asyncio.AbstractEventLoop | None = None


def handle_loop() -> asyncio.AbstractEventLoop:
    """An event loop that runs for the life of this process, for the few Serve handle calls it makes.

    Serve handles refuse blocking calls from outside an event loop where its router runs on its caller's
    loop (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, e.g. an operator's RAY_SERVE_THROUGHPUT_OPTIMIZED=1),
    and a handle first used in a loop that then closes (asyncio.run) keeps a dead long-poll client. A loop
    of its own that never closes suits both settings."""
    global _handle_loop
    if _handle_loop is None:
        _handle_loop = asyncio.new_event_loop()
        threading.Thread(target=_handle_loop.run_forever, name="serve-handles", daemon=True).start()
    return _handle_loop


def watch(
    states: Callable[[], tuple[str, dict[str, tuple[str, str]]]],
    engines: dict[str, str],  # Serve's deployment name (after any "Class:" prefix) -> engine
    clock: Clock,
    *,
    describe: Callable[[str], dict[str, Any]],
) -> None:
    """Polls until the application runs, printing each deployment once when it turns healthy (an engine unfit on
    this machine once, as out of the rollout); raises `StartupFailed` naming the deployment that failed and why."""
    reported: set[str] = set()
    while True:
        app_status, deployments = states()
        for deployment, (status, message) in deployments.items():
            engine = engines.get(deployment.rpartition(":")[2])  # "VariantServer:variant-fp16" -> fp16
            what = f"engine {engine}" if engine else deployment
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise StartupFailed(f"{what} did not start: {reason_of(message) or status}")
            if status == "HEALTHY" and deployment not in reported:
                reported.add(deployment)
                clock.say(engine_line(engine, describe(deployment)) if engine else f"{deployment.lower()} ready")
        if app_status == "DEPLOY_FAILED":  # failed, yet no deployment says so: the application's own message
            raise StartupFailed(f"the application did not start: {app_status}")
        if app_status == "RUNNING":
            return
        time.sleep(STARTUP_POLL_S)


def reason_of(message: str) -> str:
    """The line of Serve's message that says why (its message carries the constructor's whole traceback): the
    verification's verdict where there is one, else the exception's last line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if "unfit on this machine" in line:
            return line.split("Unfit: ", 1)[-1]
    return lines[-1] if lines else ""


def engine_line(engine: str, facts: dict[str, Any]) -> str:
    if facts.get("unfit"):
        return f"engine {engine:<6} OUT: {facts['unfit']}; out of the rollout, its tiers are served by their baselines"
    kernels = ", ".join(k.split("/", 1)[-1] for k in facts.get("linear_kernels", []) if "/" in k)
    verified = (facts.get("verification") or {}).get("reason")
    return (
        f"engine {engine:<6} ready: {facts.get('precision')}, {facts.get('dtype')} activations"
        f"{', kernels ' + kernels if kernels else ''}"
        f" (engine {facts.get('engine_start_s')} s{'; ' + verified if verified else ''})"
    )


def metrics_port_of(context: Any) -> int | None:
    """The port of this node's Ray metrics agent (None through Ray Client, which runs no node here)."""
    port = getattr(context, "address_info", {}).get("metrics_export_port")
    return int(port) if port else None


def print_ready(
    config: Config, config_path: Path, clock: Clock, *, joined: bool = False, metrics_port: int | None = None
) -> None:
    base = f"http://{config.server.host}:{config.server.port}"
    # Every replica's metrics (router and engines) come out of each node's Ray metrics agent; this node's:
    metrics = (
        f"http://{config.observability.metrics_host}:{metrics_port}/metrics (this node's Ray metrics agent)"
        if metrics_port
        else "each node's Ray metrics agent (Prometheus: prom_metrics_service_discovery.json in Ray's session folder)"
    )
    clock.say(f"ready: serving {config.model!r} at {base}/v1")
    print(
        f"  keys       see README (demo keys: demo-premium, demo-standard, demo-batch, demo-admin)\n"
        f"  try        curl {base}/v1/chat/completions -H 'authorization: Bearer demo-premium' "
        f"-H 'content-type: application/json' "
        f"""-d '{{"model": "{config.model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'\n"""
        f"  variants   {base}/v1/models (precision, dtype and kernels of each)\n"
        f"  metrics    {metrics}\n"
        f"  weights    edit {config_path}, then `.venv/bin/serving apply {config_path}`\n"
        f"  rollout    `.venv/bin/serving rollout status`\n"
        + (
            "  the application stays on the cluster; `serve shutdown` (Ray's CLI) removes it."
            if joined
            else "  Ctrl-C lets the answers in flight finish, then stops everything (again: at once)."
        ),
        flush=True,
    )


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
    release_policy.enforce(config, config_path)  # before the stack: a refused config never reaches it
    store = connect()
    current = Config.model_validate_json(ray.get(store.snapshot.remote(0)).config)
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

"""Faults injected through Ray's API, by actor handle, never by process name: one replica of a Serve
deployment of the stack, or the rollout controller. Used by tests/integration/test_rollback.py and
loadtests/soak.py; the caller is connected to the stack's Ray cluster (`ray.init(address="auto")`)."""

from __future__ import annotations

from typing import Any

from tests.polling import poll_until


def replicas(deployment: str) -> set[tuple[str, str]]:
    """The live replicas of a Serve deployment of the stack's application, as (namespace, actor name):
    from Ray's named-actor registry (the state API needs the dashboard, which the stack does not run).
    Serve names a replica `SERVE_REPLICA::app#deployment#id`; Ray Serve LLM prefixes an engine's
    deployment name with its class (`VariantServer:variant-fp16`)."""
    import ray

    found = set()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        app, _, rest = actor["name"].removeprefix("SERVE_REPLICA::").partition("#")
        name = rest.rpartition("#")[0]
        if actor["name"].startswith("SERVE_REPLICA::") and app == "serving" and name.split(":")[-1] == deployment:
            found.add((actor["namespace"], actor["name"]))
    return found


def replica(deployment: str) -> Any:
    """One live replica of a deployment, as its actor handle (waiting for one while Serve restarts it).
    Looking it up takes a while on a busy machine (a listing of every named actor): a test that must kill
    at a given moment looks it up beforehand and calls `kill`."""
    import ray

    namespace, name = sorted(poll_until(lambda: replicas(deployment), f"a replica of {deployment}"))[0]
    return ray.get_actor(name, namespace=namespace)


def kill(handle: Any) -> None:
    """Kills a replica (its handle from `replica`) through Ray's API; Serve starts a new one."""
    import ray

    ray.kill(handle, no_restart=False)


def kill_replica(deployment: str) -> None:
    """Kills one replica of a deployment through Ray's API (by its actor handle, never by process name)."""
    kill(replica(deployment))


def kill_controller() -> None:
    """Kills the rollout controller actor; Ray restarts it (max_restarts=-1), from its state file."""
    import ray

    from serving.rollout.controller import controller

    ray.kill(controller(), no_restart=False)

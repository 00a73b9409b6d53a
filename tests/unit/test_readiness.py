"""Ready means warm: /ready asks every variant for a generation, caches the answer, never hangs."""

from __future__ import annotations

import asyncio

import pytest

from serving.route.readiness import Readiness
from serving.variants.client import FakeVariant


async def test_every_variant_is_asked_and_a_failing_one_is_not_ready() -> None:
    variants = {"a": FakeVariant("a"), "b": FakeVariant("b", fail=RuntimeError("engine died"))}
    assert await Readiness().check(variants) == {"a": True, "b": False}
    assert variants["a"].health_checks == variants["b"].health_checks == 1


async def test_answers_are_cached_so_probes_cannot_load_the_engines() -> None:
    variants = {"a": FakeVariant("a")}
    readiness = Readiness(cache_s=60)
    for _ in range(20):
        assert await readiness.check(variants) == {"a": True}
    assert variants["a"].health_checks == 1


async def test_concurrent_probes_share_one_check() -> None:
    variants = {"a": FakeVariant("a", delay_s=0.05)}
    readiness = Readiness(cache_s=60)
    answers = await asyncio.gather(*(readiness.check(variants) for _ in range(10)))
    assert answers == [{"a": True}] * 10
    assert variants["a"].health_checks == 1


async def test_the_cache_expires() -> None:
    variants = {"a": FakeVariant("a")}
    readiness = Readiness(cache_s=0)
    await readiness.check(variants)
    await readiness.check(variants)
    assert variants["a"].health_checks == 2


async def test_a_new_variant_set_is_checked_at_once() -> None:
    readiness = Readiness(cache_s=60)
    await readiness.check({"a": FakeVariant("a")})
    assert await readiness.check({"a": FakeVariant("a"), "b": FakeVariant("b")}) == {"a": True, "b": True}


@pytest.mark.parametrize("timeout_s", [0.05])
async def test_a_hung_engine_reads_as_not_ready_not_as_a_hang(timeout_s: float) -> None:
    variants = {"slow": FakeVariant("slow", delay_s=10), "fast": FakeVariant("fast")}
    answer = await asyncio.wait_for(Readiness(timeout_s=timeout_s).check(variants), 2)
    assert answer == {"slow": False, "fast": True}

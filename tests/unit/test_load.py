"""The engine load that sheds shadows: primaries in flight now and averaged over the last second."""

from __future__ import annotations

import gc

import pytest

from serving.variants.load import EngineLoad


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Call:
    pass


def test_the_average_follows_the_level_over_about_a_second() -> None:
    clock = Clock()
    load = EngineLoad(average_over_s=1.0, clock=clock)
    calls = [Call() for _ in range(4)]
    for call in calls:
        load.started(call)
    assert load.now() == 4
    assert load.recent() == 0.0  # no time has passed at that level yet
    clock.t = 1.0
    assert load.recent() == pytest.approx(4 * (1 - 0.3679), rel=1e-3)
    clock.t = 10.0
    assert load.recent() == pytest.approx(4, rel=1e-3)
    for call in calls:
        load.finished(call)
    assert load.now() == 0
    clock.t = 11.0
    assert load.recent() == pytest.approx(4 * 0.3679, rel=1e-3)
    clock.t = 30.0
    assert load.recent() < 0.01


def test_answers_that_finish_together_do_not_look_idle() -> None:
    # Four clients in lockstep: all answers end at once and the next four start a millisecond later.
    clock = Clock()
    load = EngineLoad(clock=clock)
    for _ in range(20):
        calls = [Call() for _ in range(4)]
        for call in calls:
            load.started(call)
        clock.t += 0.25
        for call in calls:
            load.finished(call)
        assert load.now() == 0
        clock.t += 0.001
    assert load.recent() > 3.9


def test_a_call_dropped_without_finishing_stops_counting() -> None:
    load = EngineLoad()
    load.started(Call())  # nothing else holds it, as a response whose stream never ran
    gc.collect()
    assert load.now() == 0

"""The rollout phase of one tier's candidate, as an explicit state machine.

idle ──(candidate with weight > 0 applied)──> progressing
progressing ──(a check fails, or an operator aborts)──> rolled_back
progressing ──(weight reaches 100 by progression or by config)──> promoted
rolled_back ──(an operator applies a changed tier config that re-enables it)──> progressing
any ──(config removes the candidate or sets weight 0)──> idle   (except rolled_back, which only
                                                                 a re-enabling apply leaves)

Steps of a progression (the live weight rising while the phase stays progressing) and an operator's
pause are not phases: they are recorded in the tier's state and history (serving.rollout.controller).
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    IDLE = "idle"
    PROGRESSING = "progressing"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    CONFIG_ENABLES = "config_enables"  # an apply with a candidate and weight > 0
    CONFIG_DISABLES = "config_disables"  # an apply with no candidate or weight 0
    CHECK_FAILED = "check_failed"
    FULLY_PROMOTED = "fully_promoted"
    OPERATOR_REENABLES = "operator_reenables"  # an apply that changed a rolled-back tier's config
    OPERATOR_ABORTS = "operator_aborts"  # `serving rollout abort TIER`


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.IDLE, Event.CONFIG_ENABLES): Phase.PROGRESSING,
    (Phase.IDLE, Event.CONFIG_DISABLES): Phase.IDLE,
    (Phase.PROGRESSING, Event.CONFIG_ENABLES): Phase.PROGRESSING,
    (Phase.PROGRESSING, Event.CONFIG_DISABLES): Phase.IDLE,
    (Phase.PROGRESSING, Event.CHECK_FAILED): Phase.ROLLED_BACK,
    (Phase.PROGRESSING, Event.FULLY_PROMOTED): Phase.PROMOTED,
    (Phase.PROGRESSING, Event.OPERATOR_ABORTS): Phase.ROLLED_BACK,
    (Phase.PROMOTED, Event.CONFIG_ENABLES): Phase.PROGRESSING,
    (Phase.PROMOTED, Event.CONFIG_DISABLES): Phase.IDLE,
    (Phase.PROMOTED, Event.CHECK_FAILED): Phase.ROLLED_BACK,
    (Phase.PROMOTED, Event.OPERATOR_ABORTS): Phase.ROLLED_BACK,
    (Phase.ROLLED_BACK, Event.CONFIG_ENABLES): Phase.ROLLED_BACK,  # the same config never re-enables
    (Phase.ROLLED_BACK, Event.CONFIG_DISABLES): Phase.ROLLED_BACK,
    (Phase.ROLLED_BACK, Event.CHECK_FAILED): Phase.ROLLED_BACK,
    (Phase.ROLLED_BACK, Event.OPERATOR_REENABLES): Phase.PROGRESSING,
}


class InvalidTransition(ValueError):
    pass


def next_phase(phase: Phase, event: Event) -> Phase:
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise InvalidTransition(f"no transition from {phase} on {event}") from None

"""The job state machine, in one place.

`queued -> soft_labeling -> distilling -> evaluating -> exporting -> succeeded`; `failed` and `cancelled`
from any non-terminal state. Every state has a timestamp column `<state>_at` on the job row, and every
transition is also written to the job's event log (see `app.jobs.service`).
"""

from __future__ import annotations

from app.errors import Conflict

PIPELINE = ("queued", "soft_labeling", "distilling", "evaluating", "exporting", "succeeded")
RUNNING = ("soft_labeling", "distilling", "evaluating", "exporting")
TERMINAL = ("succeeded", "failed", "cancelled")
STATES = PIPELINE + ("failed", "cancelled")
NON_TERMINAL = tuple(s for s in STATES if s not in TERMINAL)
# Every state has a `<state>_at` column; the API shows them as `timestamps`.
TIMESTAMP_STATES = STATES

TRANSITIONS: dict[str, frozenset[str]] = {
    **{
        src: frozenset({dst, "failed", "cancelled"}) for src, dst in zip(PIPELINE, PIPELINE[1:], strict=False)
    },
    **{state: frozenset() for state in TERMINAL},
}


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, src: str, dst: str) -> None:
        super().__init__(f"a job cannot go from {src!r} to {dst!r}")
        self.src, self.dst = src, dst


def can_transition(src: str, dst: str) -> bool:
    return dst in TRANSITIONS.get(src, frozenset())


def check_transition(src: str, dst: str) -> None:
    if src not in TRANSITIONS or dst not in TRANSITIONS:
        raise ValueError(f"unknown job state in {src!r} -> {dst!r}")
    if not can_transition(src, dst):
        raise InvalidTransition(src, dst)


def sources_of(dst: str) -> tuple[str, ...]:
    """Every state from which `dst` may be entered."""
    return tuple(src for src in STATES if can_transition(src, dst))


def timestamp_column(state: str) -> str:
    if state not in TRANSITIONS:
        raise ValueError(f"unknown job state {state!r}")
    return f"{state}_at"


def is_terminal(state: str) -> bool:
    return state in TERMINAL

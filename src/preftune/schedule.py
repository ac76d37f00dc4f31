"""The learning rate of every optimiser step, and how a resume that changes the schedule re-plans the rest.

A fresh run has one segment: linear warm-up to `optim.lr`, then constant, linear decay or cosine decay to 0
at the last step (`lr_factor`). A resume at step s whose optim.lr, optim.warmup_steps, optim.schedule or
total step count (train.max_steps, train.epochs) differ from the checkpoint's appends a segment that governs
the steps from s on. It starts from the factor the last trained step (s - 1) used, so the curve does not
jump: a warm-up still in progress ramps on to 1 at the new warm-up end, and a decay runs on along the new
shape from the point where that shape has the factor reached, down to 0 at the new last step (constant holds
the factor reached). A new optim.lr scales the factor: the one jump, and a deliberate one. The segments are
checkpointed, so a re-planned run that is stopped and resumed again follows the same curve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from preftune.config import ConfigError, OptimConfig


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warm-up to 1 (the DPO paper), then constant, linear decay or cosine decay to 0."""
    return _planned(step, total, optim.warmup_steps, optim.schedule)


def _planned(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    return _decay(schedule, (step - warmup_steps) / max(1, total - warmup_steps))


def _decay(schedule: str, progress: float) -> float:
    """The factor of a linear or cosine decay at `progress` in [0, 1] (1 at 0, 0 at 1)."""
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _progress_at(schedule: str, factor: float) -> float:
    """The inverse of _decay: the progress at which `schedule` has fallen to `factor`."""
    if schedule == "linear":
        return 1.0 - factor
    return math.acos(min(1.0, max(-1.0, 2.0 * factor - 1.0))) / math.pi


@dataclass
class Segment:
    """The schedule of the steps from `start` on (until a later segment's start)."""

    start: int
    lr: float
    warmup_steps: int
    """Warm-up ends at this step, counted from step 0 of the run as in the config."""
    schedule: str
    total: int
    anchor: int = -1
    """-1: planned from step 0 (lr_factor). Otherwise the last step trained before the re-plan; its factor
    is `anchor_factor` and the curve continues from it."""
    anchor_factor: float = 0.0
    warming: bool = False
    """The anchor step was still warming up: ramp on from its factor to 1 at warmup_steps, then decay."""

    def factor(self, step: int) -> float:
        if self.anchor < 0 or (self.warming and step >= self.warmup_steps):
            return _planned(step, self.total, self.warmup_steps, self.schedule)
        a, f = self.anchor, self.anchor_factor
        if self.warming:
            return f + (1.0 - f) * (step - a) / (self.warmup_steps - a)
        if self.schedule == "constant":
            return f
        p = _progress_at(self.schedule, f)
        return _decay(self.schedule, p + (1.0 - p) * (step - a) / (self.total - a))

    def is_warming(self, step: int) -> bool:
        return (self.anchor < 0 or self.warming) and step < self.warmup_steps


class Schedule:
    """lr(step) for every optimiser step; checkpointed through state_dict()/load_state_dict().

    Replaces torch's LambdaLR, whose state_dict restores the learning rate it was built with: a resume with
    a new optim.lr would keep training at the old one.
    """

    def __init__(self, optim: OptimConfig, total: int):
        self.segments = [Segment(0, optim.lr, optim.warmup_steps, optim.schedule, total)]

    def _at(self, step: int) -> Segment:
        return [s for s in self.segments if s.start <= step][-1]

    def lr(self, step: int) -> float:
        """The learning rate optimiser step `step` (0-based) uses."""
        segment = self._at(step)
        return segment.lr * segment.factor(step)

    def state_dict(self) -> dict[str, Any]:
        return {"segments": [dataclasses.asdict(s) for s in self.segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.segments = [Segment(**s) for s in state["segments"]]

    def resume(self, step: int, optim: OptimConfig, total: int) -> bool:
        """Continue at `step` with this config's schedule fields; True if that re-planned the curve. Refuses
        (ConfigError) what has no continuous meaning: a run shorter than the steps already trained, or a
        warm-up change that would end a warm-up in progress before `step` or restart one that has ended."""
        current = self.segments[-1]
        if (current.lr, current.warmup_steps, current.schedule, current.total) == (
                optim.lr, optim.warmup_steps, optim.schedule, total):
            return False
        if step == 0:  # nothing trained yet: the new schedule from the start
            self.segments = [Segment(0, optim.lr, optim.warmup_steps, optim.schedule, total)]
            return True
        if total < step:
            raise ConfigError(f"train.max_steps/train.epochs give {total} steps, but the run resumes at step "
                              f"{step}: they can not end it before the steps it has already trained")
        last = step - 1
        in_force = self._at(last)
        warming = in_force.is_warming(last)
        if optim.warmup_steps != in_force.warmup_steps:
            if warming and optim.warmup_steps < step:
                raise ConfigError(f"optim.warmup_steps={optim.warmup_steps}: the run resumes at step {step} in "
                                  f"the middle of its warm-up (to step {in_force.warmup_steps}); a new warm-up "
                                  f"must end at step {step} or later")
            if not warming and optim.warmup_steps > step:
                raise ConfigError(f"optim.warmup_steps={optim.warmup_steps}: the run's warm-up ended at step "
                                  f"{in_force.warmup_steps}, before the resumed step {step}; it can not restart")
        self.segments = [s for s in self.segments if s.start < step] + [
            Segment(step, optim.lr, optim.warmup_steps, optim.schedule, total, anchor=last,
                    anchor_factor=in_force.factor(last), warming=warming)]
        return True

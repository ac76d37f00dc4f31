"""Non-finite steps: detected before the optimiser sees them, skipped, counted, named, and stopped.

One NaN applied by the optimiser poisons every weight it touches, and AdamW's moments carry it into every
later step. So a step whose loss or gradient norm is not finite is never applied: its gradients are dropped,
the warning names the records of the batch, and after `limit` such steps in a row the run stops with a
diagnosis instead of spinning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

log = logging.getLogger("preftune")


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; registered as a stateful component, so the counts survive a resume."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped = 0
        self.in_a_row = 0
        self.last = ""

    def check(self, accelerator: Accelerator, step: int, loss_sum: float, grad_norm: float,
              records: list[tuple[list[str], torch.Tensor]]) -> bool:
        """True if the step may be applied. `loss_sum` is summed over every process and the gradient norm is
        taken after the all-reduce, so every process reaches the same verdict (and the gather below)."""
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        # the pairs whose own loss is not finite; if every loss is finite the gradient alone overflowed and
        # the whole batch is suspect
        local = [src for sources, losses in records
                 for src, loss in zip(sources, losses.tolist(), strict=True) if not math.isfinite(loss)]
        local = local or [src for sources, _ in records for src in sources]
        offenders = [src for part in gather_object([local]) for src in part]
        if accelerator.scaler is not None:
            # fp16: the skipped optimizer.step() would have backed the loss scale off and reset the scaler's
            # per-step state (clip_grad_norm_ unscaled the gradients); do both here
            accelerator.scaler.update(accelerator.scaler.get_scale() * accelerator.scaler.get_backoff_factor())
        self.skipped += 1
        self.in_a_row += 1
        self.last = (f"step {step}: loss sum {loss_sum}, gradient norm {grad_norm}; records: "
                     f"{', '.join(offenders[:8])}{' ...' if len(offenders) > 8 else ''}")
        if accelerator.is_main_process:
            log.warning("skipped %s (not applied; %d skipped so far, %d in a row)",
                        self.last, self.skipped, self.in_a_row)
        return False

    def stop_if_stuck(self, lr: float, mixed_precision: str) -> None:
        if self.in_a_row < self.limit:
            return
        hints = [f"the learning rate ({lr:g}) may be too high for this model"]
        if mixed_precision == "fp16":
            hints.append("fp16 overflows easily: try train.mixed_precision=bf16 or no")
        hints.append("if the loss itself is not finite, inspect the records named above (empty or extreme "
                     "responses); the weights were never updated with these steps")
        raise NonFiniteError(f"stopped: {self.in_a_row} optimiser steps in a row had a non-finite loss or "
                             f"gradient (train.max_bad_steps={self.limit}); last {self.last}. "
                             f"Likely: {'; '.join(hints)}. The newest checkpoint holds finite weights.")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinity are not JSON: a skipped step's values are written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}

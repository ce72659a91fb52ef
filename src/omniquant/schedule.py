"""Learning-rate schedules of one block's training (`--lr-schedule`).

Each block trains for `epochs x batches` optimizer steps. `constant` keeps every group's rate
(the reference code); `cosine` and `linear` decay it towards zero over those steps, so the last
steps of a block make small moves instead of a random walk of one learning rate per step
(AdamW moves each parameter by about its rate whatever the gradient's size). The guard's early
stop only cuts the schedule short; it does not stretch it.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "cosine", "linear"]
SCHEDULES: tuple[Schedule, ...] = ("constant", "cosine", "linear")


def lr_factor(step: int, total: int, schedule: Schedule) -> float:
    """The factor on every group's rate at optimizer step `step` (0-based) of `total`:
    1 at step 0 for every schedule, then 1 / ½(1 + cos πt/T) / 1 - t/T (never 0 inside)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant" or total <= 0:
        return 1.0
    t = min(max(step, 0), total - 1) / total
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 - t

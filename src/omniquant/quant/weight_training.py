"""Scale-aware block-wise weight training (`--weight-lr`).

With `weight_lr` > 0 every linear of the block also learns an offset to its float weight, through
the same straight-through quantizer as LWC (block-wise quantization-aware fine-tuning, as
EfficientQAT's Block-AP). The offset is counted in quantization steps of the weight's own group:

    W = W0 + h ⊙ Δ

with W0 the weight as it reaches the quantizer at the start (after LET's initial transform, if
any), h the min-max quantization step of each group of W0 (detached, fixed for the block) and Δ the
trained parameter, zero at the start. AdamW's steps on Δ have a size set by the learning rate
alone, whatever the gradient's scale, so a learning rate means "a fraction of a quantization step
per optimizer step" on every model, whatever its weights' magnitudes. That holds while the
gradient stays well above AdamW's epsilon, so the offsets train with `ADAM_EPS` = 1e-12 instead of
PyTorch's 1e-8 (a block with small weights and a small loss has gradients of 1e-8 and below).

That same property moves a weight whose gradient is only noise (an input channel that the
calibration text hardly uses) by a full step each time, so with many optimizer steps such weights
drift by several quantization steps where nothing measures them, and text of another domain pays
for it (W4A16g128 at 32 x 512, 4 epochs, 0.015 steps: Emma 38.09, Debian Policy 137.95 against
RTN's 24.55). `--weight-bound B` projects Δ back into [-B, B] after every step: a bound of 0.5
lets training choose the rounding of each weight (as AutoRound does) but never carry it further.
"""

from __future__ import annotations

import torch
from torch import nn

from omniquant.config import WeightQuant
from omniquant.quant.primitives import from_groups, minmax_params, to_groups

ADAM_EPS = 1e-12  # AdamW's epsilon for the offsets: far below their gradients on any model


def quant_step(weight: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """The min-max quantization step h of each group of a weight (out, in): (out, n_groups, 1)."""
    wg = to_groups(weight.detach().float(), spec.group_size)
    return minmax_params(wg, spec.bits, spec.symmetric).scale


def step_offset(delta: torch.Tensor, step: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """h ⊙ Δ: an offset (out, in) counted in steps, times each group's step (out, n_groups, 1)."""
    return from_groups(to_groups(delta, group_size) * step, delta.shape[1])


class StepOffset(nn.Module):
    """Parametrization W ↦ W + h ⊙ Δ of one linear's weight; Δ (float32) is what trains.

    `absolute=True` takes h = 1: the learning rate is then in weight units, as before the step
    unit (kept so that rows measured that way can be reproduced: `--weight-lr-unit absolute`)."""

    def __init__(self, weight: torch.Tensor, spec: WeightQuant, absolute: bool = False) -> None:
        super().__init__()
        self.group_size = spec.group_size
        step = quant_step(weight, spec)
        self.register_buffer("step", torch.ones_like(step) if absolute else step)
        self.delta = nn.Parameter(torch.zeros(weight.shape, device=weight.device))

    @torch.no_grad()
    def bound_(self, bound: float) -> None:
        """Keep every offset within ±`bound` steps (a projection after each optimizer step)."""
        self.delta.clamp_(-bound, bound)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + step_offset(self.delta, self.step, self.group_size).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"groups of {self.group_size or 'a whole row'}"

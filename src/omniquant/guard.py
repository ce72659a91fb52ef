"""The guard of the block loop: a block never ends calibration worse than it started.

Besides its training windows, every block sees a few held-out *validation* windows that went
through the float and the quantized chains like the training ones (`CalibConfig.val_windows`).
`Guard` records the validation loss with the quantizers at their initial values (epoch 0) and
after every epoch, keeps a copy of the learnable parameters (LWC, LET, weight offsets) of the best
epoch, and says when to stop early (no better validation loss for `patience` epochs). At the end
`restore` puts the best epoch's parameters back; when no epoch beat the start, these are the
starting parameters: the block *falls back* to its untrained quantizers (plain round-to-nearest for
LWC, the LET start), and the block report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of the parameters, on their own devices."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def copy_into(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Write saved values back into the parameters, in place."""
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def fell_back_message(what: str, losses: Sequence[float], restored: str) -> str:
    """The warning when no epoch beat the start: `losses` are [start, epoch 1, ...]."""
    epochs = ", ".join(f"{v:.5g}" for v in losses[1:])
    return (
        f"{what}: training never beat the starting held-out loss {losses[0]:.5g} (epochs: "
        f"{epochs}); {restored}"
    )


def improves(loss: float, best: float) -> bool:
    """Whether a validation loss is finite and strictly below the best so far."""
    return math.isfinite(loss) and loss < best


class Guard:
    """Tracks one block's validation loss per epoch and the parameters of its best epoch."""

    def __init__(self, params: Sequence[torch.Tensor], start_loss: float, patience: int) -> None:
        self.params = list(params)
        self.patience = patience
        self.losses = [start_loss]  # index 0: the start, then one per epoch
        self.best_epoch = 0
        self.best_loss = start_loss if math.isfinite(start_loss) else math.inf
        self._best = snapshot(self.params)
        self._stale = 0  # epochs since the last improvement

    def update(self, loss: float) -> bool:
        """Record an epoch's validation loss; True when training should stop early."""
        self.losses.append(loss)
        if improves(loss, self.best_loss):
            self.best_loss, self.best_epoch, self._stale = loss, len(self.losses) - 1, 0
            self._best = snapshot(self.params)
        else:
            self._stale += 1
        return self.patience > 0 and self._stale >= self.patience

    def restore(self) -> None:
        """Put the best epoch's parameters (the starting ones if no epoch was better) back."""
        copy_into(self.params, self._best)

    @property
    def fell_back(self) -> bool:
        """Whether training ran but no epoch beat the starting validation loss."""
        return len(self.losses) > 1 and self.best_epoch == 0

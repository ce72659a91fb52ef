"""Perplexity per the austen-v1 protocol: mean next-token cross-entropy over every position of
every window, exp of it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of windows (B, T), and the tokens predicted."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return nll.item(), targets.numel()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """exp(mean next-token cross-entropy) of the model on windows (N, T)."""
    model.eval()
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc="perplexity", leave=False, disable=not progress):
        nll, n = window_nll(model, windows[s : s + batch_size].to(device))
        total += nll
        count += n
    return math.exp(total / count)

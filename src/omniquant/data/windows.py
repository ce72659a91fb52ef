"""Token windows cut from a text, by the usual OmniQuant / GPTQ protocol.

Calibration draws ``nsamples`` windows at uniformly random start positions
(`calibration_windows`); evaluation cuts the token stream into consecutive non-overlapping windows
from the start (`eval_windows`). When the tokenizer has a BOS token, each window is
``[BOS] + (seqlen - 1)`` text tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from omniquant.errors import DataError


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenizes a whole text without special tokens; returns a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def bos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's BOS token id, or None when it has none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


def _text_span(
    tokens: Sequence[int] | torch.Tensor, seqlen: int, bos_id: int | None, what: str, setting: str
) -> tuple[torch.Tensor, int]:
    """The tokens as one int64 tensor and the text tokens a window holds (``seqlen - 1`` beside a
    BOS token); refuses a window shorter than 2 or longer than the text."""
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    span = seqlen - 1 if bos_id is not None else seqlen
    if ids.numel() < span:
        raise DataError(
            f"{what} text too short: a window of {seqlen} tokens needs {span} text tokens, "
            f"found {ids.numel()}; use a smaller {setting} or a longer text"
        )
    return ids, span


def calibration_windows(
    tokens: Sequence[int] | torch.Tensor,
    nsamples: int,
    seqlen: int,
    bos_id: int | None,
    seed: int = 0,
) -> torch.Tensor:
    """Draws ``nsamples`` calibration windows at uniformly random positions of the text.

    Each window is ``[bos_id]`` followed by ``seqlen - 1`` consecutive tokens, or ``seqlen``
    tokens when ``bos_id`` is None. Start positions come from ``random.Random(seed)``.

    Returns:
        An int64 tensor of shape ``(nsamples, seqlen)``.

    Raises:
        DataError: bad ``nsamples``/``seqlen``, or fewer tokens than one window needs.
    """
    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    ids, span = _text_span(tokens, seqlen, bos_id, "calibration", "`seqlen`")
    rng = random.Random(seed)
    out = torch.empty((nsamples, seqlen), dtype=torch.long)
    offset = 0
    if bos_id is not None:
        out[:, 0] = bos_id
        offset = 1
    for row in range(nsamples):
        start = rng.randint(0, ids.numel() - span)
        out[row, offset:] = ids[start : start + span]
    return out


def eval_windows(
    tokens: Sequence[int] | torch.Tensor,
    seqlen: int,
    bos_id: int | None,
    max_windows: int | None = 80,
) -> torch.Tensor:
    """Cuts the text into consecutive, non-overlapping evaluation windows from its start.

    Chunks hold ``seqlen - 1`` tokens (``seqlen`` when ``bos_id`` is None); a final partial chunk
    is dropped; each window is ``[bos_id] + chunk``. Only the first ``max_windows`` are kept
    (None keeps all).

    Returns:
        An int64 tensor of shape ``(n, seqlen)``.

    Raises:
        DataError: bad ``seqlen``/``max_windows``, or a text shorter than one window.
    """
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1 or None, got {max_windows}")
    ids, span = _text_span(tokens, seqlen, bos_id, "evaluation", "--eval-seqlen")
    count = ids.numel() // span
    if max_windows is not None:
        count = min(count, max_windows)
    chunks = ids[: count * span].reshape(count, span)
    if bos_id is None:
        return chunks.clone()
    bos = torch.full((count, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, chunks], dim=1)

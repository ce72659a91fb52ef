"""A thin lm-eval adapter: any causal LM `nn.Module` that returns `.logits`, scored by
log-likelihood (multiple-choice tasks). Imports `lm_eval`; load it through
`omniquant.eval.zeroshot`, which says what to install when it is missing.

Tokenization follows the austen-v1 perplexity protocol: text is encoded without special tokens and
the tokenizer's BOS token (where it has one) starts every sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from torch import nn
from tqdm.auto import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]


def continuation_logprob(
    logits: torch.Tensor, continuation: list[int], end: int
) -> tuple[float, bool]:
    """Summed log-probability of `continuation`, whose last token sits at position `end` of the
    input, from one sequence's logits (T, V); and whether greedy decoding would produce it."""
    n = len(continuation)
    logp = logits[end - n : end].float().log_softmax(-1)  # row t predicts token t + 1
    target = torch.as_tensor(continuation, device=logp.device)
    total = logp.gather(-1, target[:, None]).sum().item()
    return total, bool((logp.argmax(-1) == target).all())


class ModuleLM(TemplateLM):
    """lm-eval's `LM` interface over an in-memory causal LM (float, fake-quantized or packed)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.max_length = max_length or _max_length(model)
        self.progress = progress
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_id: int | None = None if bos is None else int(bos)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eot_token_id

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        if add_special_tokens is not False and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(self._window(requests[i])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        starts = range(0, len(order), self.batch_size)
        quiet = disable_tqdm or not self.progress
        for s in tqdm(starts, desc="zero-shot", leave=False, disable=quiet):
            batch = order[s : s + self.batch_size]
            scores = self._score([self._window(requests[i]) for i in batch], requests, batch)
            for i, score in zip(batch, scores, strict=True):
                results[i] = score
        return results

    def _window(self, request: Request) -> list[int]:
        """The model input: context + continuation without its last token, left-truncated."""
        _, context, continuation = request
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    @torch.no_grad()
    def _score(
        self, windows: list[list[int]], requests: list[Request], batch: list[int]
    ) -> list[tuple[float, bool]]:
        """One right-padded forward pass (causal: padding after a sequence cannot change it)."""
        width = max(len(w) for w in windows)
        ids = torch.zeros((len(windows), width), dtype=torch.long)
        for row, w in enumerate(windows):
            ids[row, : len(w)] = torch.as_tensor(w)
        logits = self.model(input_ids=ids.to(self._device), use_cache=False).logits
        return [
            continuation_logprob(logits[row], requests[i][2], len(windows[row]))
            for row, i in enumerate(batch)
        ]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "omniquant's lm-eval adapter scores log-likelihood (multiple-choice) tasks only; "
            "for perplexity use `omniquant eval` without --tasks"
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "omniquant's lm-eval adapter scores log-likelihood (multiple-choice) tasks only; "
            "generation tasks are not supported"
        )


def _max_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 2048)

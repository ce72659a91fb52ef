"""`evaluate`: perplexity per the austen-v1 protocol (or on another text), through torch, the
integer kernels, or the native decoder."""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec

from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from omniquant.checks import check_eval_settings, check_head, check_native_settings
from omniquant.data import bos_token_id, eval_windows, load_text, tokenize_text
from omniquant.errors import ConfigError, ModelError
from omniquant.eval.perplexity import perplexity
from omniquant.pipeline.load import load, load_native
from omniquant.runtime import check_device

EVAL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}
ModelArg = str | os.PathLike[str] | nn.Module | None
P = ParamSpec("P")


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and what it was measured on: the text and the windows."""

    perplexity: float
    dataset: str
    seqlen: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def protocol(self) -> str:
        """'austen:emma, 80 x 512'."""
        return f"{self.dataset}, {self.windows} x {self.seqlen}"


def measure_perplexity(
    model: ModelArg = None,
    *,
    tokenizer: Any = None,
    dataset: str = "austen:emma",
    seqlen: int = 512,
    max_windows: int | None = 80,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
    kernels: bool = False,
    head: str = "float32",
    native: bool = False,
) -> PerplexityResult:
    """Perplexity per the austen-v1 protocol (defaults) or on another text source, with the text
    and the windows it was measured on (`evaluate` returns the number alone).

    kernels=True (a quantized folder given by path): the perplexity of the model as it runs with
    the integer kernels (`load(path, kernels=True)`), bf16 activations included.
    native=True: as the native decoder runs it (`load_native`; int16 activations, the KV cache,
    `head` float32 or float16), on the CPU."""
    check_eval_settings(seqlen, max_windows, batch_size)
    check_device(device)
    check_head(head, kernels or native)
    given = isinstance(model, nn.Module)
    if given and kernels:
        raise ConfigError("`kernels` needs a model path; or pass load(path, kernels=True)[0]")
    if native:
        check_native_settings(kernels, device)
    text = load_text(dataset, split=EVAL_SPLITS.get(dataset, "train"))  # before the model
    if native:
        return native_perplexity(
            model, tokenizer, text, dataset, seqlen, max_windows, head, progress
        )
    if not given:
        model, tokenizer = load(model, kernels=kernels, device=device, progress=progress, head=head)
    if tokenizer is None:
        raise ModelError("pass the tokenizer with a model object: evaluate(model, tokenizer=...)")
    assert isinstance(model, nn.Module)
    windows = eval_windows(
        tokenize_text(tokenizer, text), seqlen, bos_token_id(tokenizer), max_windows
    )
    model.to(device)
    try:
        ppl = perplexity(model, windows, device, batch_size, progress)
    finally:
        if given:  # the caller's model goes back where models live between steps
            model.to("cpu")
    return PerplexityResult(ppl, dataset, seqlen, windows.shape[0])


def native_perplexity(
    model: ModelArg,
    tokenizer: Any,
    text: str,
    dataset: str,
    seqlen: int,
    max_windows: int | None,
    head: str,
    progress: bool,
) -> PerplexityResult:
    """Perplexity through the native decoder: each window fed through its KV cache in chunks,
    every position's logits kept (`NativeDecoder.sequence_logits`)."""
    from omniquant.kernels.native import NativeDecoder

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ModelError(
                "pass the tokenizer with a model object: evaluate(model, tokenizer=...)"
            )
        decoder = NativeDecoder(model, head=head)
    else:
        decoder, tokenizer = load_native(model, head=head, progress=progress)
    windows = eval_windows(
        tokenize_text(tokenizer, text), seqlen, bos_token_id(tokenizer), max_windows
    )
    total, count = 0.0, 0
    for window in tqdm(windows, desc="perplexity (native)", leave=False, disable=not progress):
        logits = decoder.sequence_logits(window.tolist())[:-1]
        total += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        count += window.numel() - 1
    return PerplexityResult(math.exp(total / count), dataset, seqlen, windows.shape[0])


def returning_perplexity(
    measure: Callable[P, PerplexityResult],
) -> Callable[P, float]:
    """`measure` with its arguments, returning the perplexity alone."""

    @functools.wraps(measure)  # help() and inspect show measure's signature
    def perplexity_only(*args: P.args, **kwargs: P.kwargs) -> float:
        return measure(*args, **kwargs).perplexity

    signature = inspect.signature(measure).replace(return_annotation="float")
    perplexity_only.__signature__ = signature  # type: ignore[attr-defined]
    return perplexity_only


evaluate = returning_perplexity(measure_perplexity)
evaluate.__name__ = evaluate.__qualname__ = "evaluate"
evaluate.__doc__ = """Perplexity per the austen-v1 protocol (defaults) or on another text
source: the number that `measure_perplexity` (same arguments) measures."""

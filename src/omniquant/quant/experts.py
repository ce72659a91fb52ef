"""Fused mixture-of-experts weights, quantized as what they are: stacked linears.

In transformers 5 a MoE block's experts are one module holding 3-D parameters, `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I], which the model's own code reads per expert
(`F.linear(x, gate_up_proj[e])`): the last dimension is each expert's input. Seen as a matrix of
E x out rows over `in` columns, the tensor is E linears stacked, and every row of every expert is
a row of the grid, with its groups along that expert's input. So the quantizers of a linear (LWC,
the weight offsets of weight training) serve unchanged, through `Stacked`, which hands them the
(E x out, in) view and gives the model back its 3-D tensor; the block loop trains them on the
block's output error with the model's own routing, and folds them into the parameters the
model's code reads.

The grids of fused experts are kept on the module (`expert_qparams`); only the fake format stores
them so far (the packed formats refuse such a model in one line, `check_no_fused_experts`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omniquant.errors import ExportError

EXPERT_QPARAMS = "omniquant_expert_qparams"  # on an experts module: {attr: LinearQParams}
# experts modules whose code computes x @ W[e], so that their tensors are [E, in, out]
TRANSPOSED = ("GptOssExperts",)


@dataclass(frozen=True)
class ExpertWeight:
    """A fused 3-D expert parameter: its module, the attribute, and its stacked shape."""

    module: nn.Module
    attr: str
    experts: int
    out_features: int
    in_features: int
    transposed: bool = False  # stored [E, in, out] (the code computes x @ W[e])

    @property
    def rows(self) -> int:
        return self.experts * self.out_features


def is_experts_module(path: str, module: nn.Module) -> bool:
    name = f"{path}.{type(module).__name__}".lower()
    return "expert" in name and "shared_expert" not in path.lower()


def expert_weights(root: nn.Module) -> dict[str, ExpertWeight]:
    """Every fused expert parameter under `root`, by '<module path>.<attribute>'."""
    found: dict[str, ExpertWeight] = {}
    for path, module in root.named_modules():
        if "parametrizations" in path.split(".") or not is_experts_module(path, module):
            continue  # (a parametrized tensor's own modules are not experts)
        params = dict(module.named_parameters(recurse=False))
        originals = getattr(module, "parametrizations", None)
        for attr in originals.keys() if originals is not None else ():
            params.setdefault(attr, getattr(originals, attr).original)
        transposed = any(type(module).__name__.endswith(name) for name in TRANSPOSED)
        for attr, p in params.items():
            if p.dim() == 3:
                e, out, cols = (p.shape[0], p.shape[2], p.shape[1]) if transposed else p.shape
                key = f"{path}.{attr}" if path else attr
                found[key] = ExpertWeight(module, attr, e, out, cols, transposed)
    return found


class Stacked(nn.Module):
    """A parametrization of a 3-D expert tensor through a 2-D one (`inner`: LWC, a weight
    offset): the inner module sees the (E x out, in) view."""

    def __init__(self, inner: nn.Module, transposed: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.transposed = transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = self.inner(stacked_view(weight, self.transposed))
        return unstack(out, weight.shape, self.transposed)


def stacked_view(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The (E x out, in) matrix of a 3-D expert tensor ([E, out, in], or [E, in, out])."""
    w = weight.transpose(1, 2) if transposed else weight
    return w.reshape(-1, w.shape[-1])


def unstack(matrix: torch.Tensor, shape: torch.Size, transposed: bool = False) -> torch.Tensor:
    """The inverse of `stacked_view`: the 3-D tensor of that shape."""
    if not transposed:
        return matrix.reshape(shape)
    return matrix.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)


def check_no_fused_experts(model: nn.Module, fmt: str) -> None:
    """Refuse writing a model with fused experts in a format that does not hold them yet."""
    found = expert_weights(model)
    if found:
        first = next(iter(found))
        raise ExportError(
            f"`format` {fmt} cannot hold fused mixture-of-experts weights yet ({len(found)} "
            f"tensors, e.g. {first}): use the fake format (the default of quantize)"
        )


def _routed_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The top-k expert indices an experts module is called with (its one integer tensor)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dtype != torch.bool:
            return a
    return None


@contextmanager
def expert_token_counts(block: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the tokens routed to each expert of each experts module of `block`
    (module path -> counts [E]), read from the top-k indices the model's router hands its
    experts module."""
    counts: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[nn.Module, int]] = {}
    for name, e in expert_weights(block).items():
        modules.setdefault(name.rpartition(".")[0], (e.module, e.experts))
    handles = []
    for path, (module, n) in modules.items():

        def count(_: nn.Module, args: Any, kwargs: Any, path: str = path, n: int = n) -> None:
            index = _routed_index(args, kwargs)
            if index is not None:
                ids = index.reshape(-1).long().cpu()
                ids = ids[(ids >= 0) & (ids < n)]
                counts[path] = counts.get(path, torch.zeros(n, dtype=torch.long)) + torch.bincount(
                    ids, minlength=n
                )

        handles.append(module.register_forward_pre_hook(count, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def token_summary(counts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Min / median / max of the calibration tokens the block's experts received (empty without
    experts): an expert with few tokens learns its clipping from few examples."""
    every = [int(c) for counts_e in counts.values() for c in counts_e]
    if not every:
        return {}
    return {
        "experts": len(every),
        "min": min(every),
        "median": statistics.median(every),
        "max": max(every),
        "without_tokens": sum(c == 0 for c in every),
        "routed": sum(every),  # tokens x top-k, summed over the block's experts modules
    }


def run_summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The blocks' expert token counts over the whole run (empty without experts)."""
    rows = [b for b in blocks if b]
    if not rows:
        return {}
    return {
        "min": min(r["min"] for r in rows),
        "median_of_blocks": statistics.median(r["median"] for r in rows),
        "max": max(r["max"] for r in rows),
        "without_tokens": sum(r["without_tokens"] for r in rows),
    }

"""Coverage: which of a model's weights a run quantizes and which it leaves in float, by kind.

Measured on the model's meta skeleton (no weight read), before calibration: a run never
quantizes part of a model silently. The weights are the parameters of two or more dimensions
(matrices, fused 3-D expert tensors, convolution kernels); norms and biases are not counted. Each
is of one kind:

    attention       a block's attention (or linear-attention / mixer) projections
    mlp             a block's dense MLP
    experts         a mixture-of-experts block's experts (fused 3-D tensors or per-expert linears)
    shared_experts  the experts every token goes through
    router          the gate that picks the experts (kept float: it is small and decides routing)
    head            the output head (float unless `quantize_lm_head`)
    embeddings      the token (and position) embeddings (float)
    other           anything else (outside the blocks, or inside them but of no kind above)

Embeddings, the router and the head are float by design; of every other weight, a run that would
leave more than `FLOAT_LIMIT` in float is refused, naming the modules, unless the user names them
with `keep_float` (patterns of module paths, as `fnmatch` reads them).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from omniquant.errors import ConfigError
from omniquant.models.architecture import Architecture, block_linears, get_module
from omniquant.quant.experts import expert_weights

KINDS = (
    "attention",
    "mlp",
    "experts",
    "shared_experts",
    "router",
    "head",
    "embeddings",
    "other",
)
FLOAT_BY_DESIGN = ("router", "head", "embeddings")
FLOAT_LIMIT = 0.01  # of the weights outside FLOAT_BY_DESIGN
ATTENTION_WORDS = ("attn", "attention", "mixer", "mamba", "ssm", "linear_attn", "mla")
MLP_WORDS = ("mlp", "ffn", "feed_forward", "moe")


def is_router(path: str, module: nn.Module) -> bool:
    """The gate of a mixture of experts: a module named `gate`/`router` (not `gate_proj`), or a
    class that says it routes."""
    name = type(module).__name__.lower()
    last = path.rsplit(".", 1)[-1]
    return last in ("gate", "router") or "router" in name or name.endswith("gate")


def in_block_path(path: str, arch: Architecture) -> str | None:
    """`path` relative to its block ('self_attn.q_proj'), or None outside the blocks."""
    prefix = arch.layers + "."
    if not path.startswith(prefix):
        return None
    index, _, inner = path[len(prefix) :].partition(".")
    return inner if index.isdigit() else None


def weight_kind(path: str, module: nn.Module, arch: Architecture | None = None) -> str:
    """The kind of the weights of the module at `path` (see the module docstring): from the
    family's record where it names the module, else from the path's words."""
    inner = in_block_path(path, arch) if arch is not None else path
    if arch is not None and inner is not None:
        if inner in (*arch.qkv, arch.o_proj):
            return "attention"
        if inner in (*arch.mlp_in, arch.mlp_out):
            return "mlp"
    parts = path.lower().split(".")
    if is_router(path, module):
        return "router"
    if any("shared_expert" in p for p in parts):
        return "shared_experts"
    if any("expert" in p for p in parts) or "experts" in type(module).__name__.lower():
        return "experts"
    if inner is None:
        return "other"
    if any(w in p for p in parts for w in ATTENTION_WORDS):
        return "attention"
    if any(w in p for p in parts for w in MLP_WORDS):
        return "mlp"
    return "other"


@dataclass(frozen=True)
class Coverage:
    """Weights (parameter counts) by kind, quantized and float, and the float modules that count
    against the limit (module path -> (kind, weights))."""

    quantized: dict[str, int]
    floating: dict[str, int]
    float_modules: dict[str, tuple[str, int]] = field(default_factory=dict)
    kept: tuple[str, ...] = ()  # float modules the user named with `keep_float`

    @property
    def counted(self) -> int:
        """The weights outside FLOAT_BY_DESIGN."""
        return sum(
            n
            for kinds in (self.quantized, self.floating)
            for k, n in kinds.items()
            if k not in FLOAT_BY_DESIGN
        )

    @property
    def float_share(self) -> float:
        """The share of the counted weights left in float (0.0 when nothing counts)."""
        floating = sum(n for k, n in self.floating.items() if k not in FLOAT_BY_DESIGN)
        return floating / self.counted if self.counted else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized": dict(self.quantized),
            "float": dict(self.floating),
            "float_share": self.float_share,
            "float_modules": {
                p: {"kind": k, "weights": n} for p, (k, n) in self.float_modules.items()
            },
            "kept_float": list(self.kept),
            "float_by_design": list(FLOAT_BY_DESIGN),
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """One line: what share was quantized, and what stays float and why."""
        kept = [k for k in FLOAT_BY_DESIGN if self.floating.get(k)]
        share = 100 * (1 - self.float_share)
        line = f"quantized {share:.1f}% of the weights outside {', '.join(FLOAT_BY_DESIGN)}"
        if kept:
            line += f" (float by design: {', '.join(kept)})"
        if self.kept:
            line += f"; kept float as asked: {', '.join(self.kept)}"
        return line


def quantized_tensors(
    model: nn.Module, arch: Architecture, quantize_lm_head: bool
) -> set[tuple[str, str]]:
    """The (module path, attribute) of every tensor a run quantizes: the `weight` of each
    nn.Linear inside the blocks, each fused 3-D expert tensor, and the head when asked."""
    blocks = get_module(model, arch.layers)
    found = set()
    for i, block in enumerate(blocks):
        prefix = f"{arch.layers}.{i}."
        found |= {(prefix + name, "weight") for name in block_linears(block)}
        found |= {(prefix + n.rpartition(".")[0], e.attr) for n, e in expert_weights(block).items()}
    if quantize_lm_head:
        found.add((arch.lm_head, "weight"))
    return found


def measure_coverage(
    model: nn.Module, arch: Architecture, quantize_lm_head: bool = False
) -> Coverage:
    """What the run will quantize and leave float, from the model's structure alone."""
    quantized = quantized_tensors(model, arch, quantize_lm_head)
    modules = dict(model.named_modules())
    embeddings = set(arch.embeddings)
    q = dict.fromkeys(KINDS, 0)
    f = dict.fromkeys(KINDS, 0)
    float_modules: dict[str, tuple[str, int]] = {}
    for name, p in model.named_parameters():  # tied tensors once (the embedding's name)
        if p.dim() < 2 or "bias" in name.rpartition(".")[2]:  # stacked biases: [E, out]
            continue
        path, _, attr = name.rpartition(".")
        module = modules[path]
        if path in embeddings or isinstance(module, nn.Embedding):
            kind = "embeddings"
        elif path == arch.lm_head:
            kind = "head"
        else:
            kind = weight_kind(path, module, arch)
        if (path, attr) in quantized:
            q[kind] += p.numel()
            continue
        f[kind] += p.numel()
        if kind not in FLOAT_BY_DESIGN:
            _, n = float_modules.get(path, (kind, 0))
            float_modules[path] = (kind, n + p.numel())
    return Coverage(
        {k: n for k, n in q.items() if n}, {k: n for k, n in f.items() if n}, float_modules
    )


def keep_float(coverage: Coverage, patterns: tuple[str, ...]) -> Coverage:
    """The coverage with the float modules matching `patterns` marked as kept on purpose."""
    kept = tuple(p for p in coverage.float_modules if any(fnmatch.fnmatch(p, x) for x in patterns))
    return Coverage(coverage.quantized, coverage.floating, coverage.float_modules, kept)


def layer_pattern(path: str) -> str:
    """A module path with its block index as a wildcard: 'model.layers.*.mlp.experts'."""
    return re.sub(r"\.\d+\.", ".*.", path, count=1)


def _named(modules: dict[str, tuple[str, int]], most: int = 4) -> str:
    shown = ", ".join(f"{p} ({k})" for p, (k, _) in list(modules.items())[:most])
    return shown + (f" and {len(modules) - most} more" if len(modules) > most else "")


def check_coverage(coverage: Coverage, patterns: tuple[str, ...] = ()) -> Coverage:
    """Refuse a run that would leave more than FLOAT_LIMIT of its counted weights in float,
    naming the modules, unless `patterns` (`keep_float`) name them all. Returns the coverage with
    what the patterns kept."""
    coverage = keep_float(coverage, patterns)
    unnamed = {p: v for p, v in coverage.float_modules.items() if p not in coverage.kept}
    left = sum(n for _, n in unnamed.values())
    if coverage.counted and left / coverage.counted > FLOAT_LIMIT:
        kinds = sorted({k for k, _ in unnamed.values()})
        raise ConfigError(
            f"this run would leave {100 * left / coverage.counted:.1f}% of the weights outside "
            f"{', '.join(FLOAT_BY_DESIGN)} in float ({', '.join(kinds)}: {_named(unnamed)}), which "
            f"omniquant does not quantize for this model; name them with `keep_float` (e.g. "
            f"'{layer_pattern(next(iter(unnamed)))}') to run anyway with them in float"
        )
    return coverage

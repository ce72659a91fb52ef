"""Learnable Equivalent Transformation (LET): where it goes in a block, and how it folds.

For a linear layer Y = X Wᵀ + B and a channel-wise scale s and shift δ of its input:
    Y = [(X − δ) ⊘ s] · (s ⊙ W)ᵀ + (B + W δ)
so the activation the linear sees, (X − δ) ⊘ s, is easier to quantize, and the scale moves into
the weight. Four places in a decoder block, each an exact identity when folded:

  norm → linears   the norm's weight (and bias) absorb 1/s (and −δ); every linear that reads the
                   norm's output takes s on its input columns and B + W δ on its bias. Shifts need
                   a norm with a bias (LayerNorm); RMSNorm gets scales only.
  v → o            v's output rows take 1/s, o's input columns take s. With grouped-query attention
                   a KV head feeds several query heads: s has one value per (KV head, channel) and
                   o's columns of every query head of that group take the same value.
  q → k            Q·Kᵀ = (Q ⊘ s)(K ⊙ s)ᵀ: q's rows take 1/s, k's rows take s, per KV group. With
                   rotary embeddings, channels i and i + head_dim/2 rotate together, so s takes
                   equal values on each such pair (then the rotation commutes with the scale).
  (o → down, the MLP's inner linear, is not transformed.)

Where a transform cannot be exact for an architecture (per-head q/k norms, fused qkv, partial
rotary), `let_sites` leaves that place out and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from omniquant.config import OmniQuantConfig
from omniquant.errors import ConfigError
from omniquant.models.architecture import Architecture, NormKind, get_module

log = logging.getLogger(__name__)

SiteKind = Literal["norm", "vo", "qk"]
ScaleParam = Literal["log", "direct"]
LetInit = Literal["ours", "reference"]


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of a block's attention."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int  # channels per head that rotate (0 without rotary embeddings)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


def attention_shape(config: object, arch: Architecture) -> AttentionShape:
    """Read the head layout from a Hugging Face config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    rotary = 0
    if arch.rotary:
        factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
        rotary = int(head_dim * factor)
    return AttentionShape(n_heads, n_kv, head_dim, rotary)


@dataclass(frozen=True)
class Site:
    """One place of a block where LET applies."""

    kind: SiteKind
    source: str  # the norm (kind "norm"), v_proj ("vo") or q_proj ("qk")
    targets: tuple[str, ...]  # the linears that read it (o_proj / k_proj for vo / qk)
    shift: bool = False


def let_sites(arch: Architecture, shape: AttentionShape) -> tuple[list[Site], list[str]]:
    """The exact LET places of a block of this architecture, and the reasons for those left out."""
    sites: list[Site] = []
    skipped: list[str] = []
    shift = arch.norm_kind == "layernorm"
    for norm, linears in ((arch.attn_norm, arch.qkv), (arch.mlp_norm, arch.mlp_in)):
        if norm and linears:
            sites.append(Site("norm", norm, linears, shift))
    if arch.fused_qkv or not arch.o_proj or len(arch.qkv) != 3:
        skipped.append(f"{arch.name}: v→o and q→k skipped: q, k and v are not separate linears")
        return sites, skipped
    q, k, v = arch.qkv
    sites.append(Site("vo", v, (arch.o_proj,)))
    if arch.qk_norm:
        skipped.append(f"{arch.name}: q→k skipped: a per-head norm on q and k would undo the scale")
    elif arch.rotary and shape.rotary_dim != shape.head_dim:
        skipped.append(f"{arch.name}: q→k skipped: partial rotary embeddings")
    else:
        sites.append(Site("qk", q, (k,)))
    return sites, skipped


# ---------------------------------------------------------------- pure tensor maths


def expand_kv(s_kv: torch.Tensor, group: int) -> torch.Tensor:
    """(n_kv, d) per-KV-head values -> (n_kv * group * d,) for the query heads that read them."""
    return s_kv.repeat_interleave(group, dim=0).reshape(-1)


def rope_tied(s_half: torch.Tensor) -> torch.Tensor:
    """(n_kv, d/2) -> (n_kv, d) with equal values on channels i and i + d/2 (rotary pairs)."""
    return torch.cat([s_half, s_half], dim=-1)


def fold_norm_weight(weight: torch.Tensor, s: torch.Tensor, kind: NormKind) -> torch.Tensor:
    """The norm weight that makes the norm's output come out divided by s."""
    if kind == "rms_offset":  # Gemma: x̂ · (1 + w)
        return (1 + weight) / s - 1
    return weight / s


def fold_norm_bias(bias: torch.Tensor, s: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The norm bias that makes the norm's output come out as (out − δ) ⊘ s."""
    return (bias - delta) / s


def fold_input(
    w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear (W (out, in), B) that reads (X − δ) ⊘ s instead of X: (W ⊙ s, B + W δ)."""
    if delta is not None:
        shifted = w @ delta  # (out,)
        b = shifted if b is None else b + shifted
    return w * s, b


def fold_output(
    w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear whose output comes out divided by s (per output row)."""
    return w / s[:, None], None if b is None else b / s


# ---------------------------------------------------------------- folding into modules


def _set(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    old = getattr(module, name)
    if old is None:
        setattr(module, name, nn.Parameter(value, requires_grad=False))
    else:
        old.data = value.to(old.dtype)


@torch.no_grad()
def fold_site(
    block: nn.Module,
    site: Site,
    s: torch.Tensor,
    delta: torch.Tensor | None,
    arch: Architecture,
    shape: AttentionShape,
) -> None:
    """Fold a scale (and shift) into the block's modules; the block computes the same function
    (a checking tool: runs fold through `fold_parametrizations`; tests prove the identity of
    each site with it).

    Shapes of s: "norm": (C,), "vo": (n_kv, head_dim), "qk": (n_kv, head_dim / 2).
    """
    src = get_module(block, site.source)
    targets = [get_module(block, t) for t in site.targets]
    if site.kind == "norm":
        _set(src, "weight", fold_norm_weight(src.weight, s, arch.norm_kind))
        if delta is not None:
            _set(src, "bias", fold_norm_bias(src.bias, s, delta))
        for lin in targets:
            w, b = fold_input(lin.weight, lin.bias, s, delta)
            _set(lin, "weight", w)
            _set(lin, "bias", b)
    elif site.kind == "vo":
        w, b = fold_output(src.weight, src.bias, s.reshape(-1))
        _set(src, "weight", w)
        _set(src, "bias", b)
        o = targets[0]
        _set(o, "weight", o.weight * expand_kv(s, shape.group))
    else:  # qk
        s_full = rope_tied(s)  # (n_kv, head_dim)
        w, b = fold_output(src.weight, src.bias, expand_kv(s_full, shape.group))
        _set(src, "weight", w)
        _set(src, "bias", b)
        k = targets[0]
        w, b = fold_output(k.weight, k.bias, 1 / s_full.reshape(-1))
        _set(k, "weight", w)
        _set(k, "bias", b)


def site_shape(site: Site, block: nn.Module, shape: AttentionShape) -> tuple[int, ...]:
    """Shape of the scale of a site."""
    if site.kind == "norm":
        return (get_module(block, site.targets[0]).in_features,)
    if site.kind == "vo":
        return (shape.n_kv_heads, shape.head_dim)
    return (shape.n_kv_heads, shape.head_dim // 2)


# ---------------------------------------------------------------- learnable, during calibration

SCALE_MIN = 1e-5


@dataclass(frozen=True)
class LetPlan:
    """What LET does in every block of one model: its sites, and how scales start."""

    arch: Architecture
    shape: AttentionShape
    sites: tuple[Site, ...]
    alpha: float | None  # SmoothQuant migration strength; None: start at the identity (s = 1)
    shifts: bool  # learn shifts where the norm has a bias
    # "log": learn log s (a step changes s by a relative amount); "direct": learn s itself, its
    # magnitude floored at 1e-2 in the forward pass (straight-through), as the reference code
    scale_param: ScaleParam = "direct"
    # "ours": SmoothQuant start of the norm sites from the quantized chain's inputs and the largest
    # |W| over all linears of the site, v→o at the identity; "reference": as the reference code,
    # statistics of the float chain, |W| of the site's first linear, and v→o SmoothQuant-style too
    init: LetInit = "ours"

    @property
    def reference_init(self) -> bool:
        return self.init == "reference"


def plan_let(
    arch: Architecture,
    config: object,
    alpha: float | None,
    shifts: bool,
    scale_param: ScaleParam = "direct",
    init: LetInit = "ours",
) -> LetPlan:
    """The LET plan of a model; logs the places left out and why."""
    shape = attention_shape(config, arch)
    sites, skipped = let_sites(arch, shape)
    for reason in skipped:
        log.info("LET: %s", reason)
    return LetPlan(arch, shape, tuple(sites), alpha, shifts, scale_param, init)


SCALE_FLOOR = 1e-2  # the smallest |s| of a directly learned scale (the reference's threshold)


class _FloorSTE(torch.autograd.Function):
    """sign(s) · max(|s|, floor) forward, identity gradient backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, s: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
        return torch.where(s.abs() < SCALE_FLOOR, sign * SCALE_FLOOR, s)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class LetParams(nn.Module):
    """The learnable scales (s itself, or log s: `LetPlan.scale_param`) and shifts of one block,
    one entry per site."""

    def __init__(self, plan: LetPlan, block: nn.Module) -> None:
        super().__init__()
        self.plan = plan
        self.scales = nn.ParameterList()
        self.shifts = nn.ParameterList()
        self.shift_of: dict[int, int] = {}
        for i, site in enumerate(plan.sites):
            dims = site_shape(site, block, plan.shape)
            start = torch.zeros(dims) if plan.scale_param == "log" else torch.ones(dims)  # s = 1
            self.scales.append(nn.Parameter(start))
            if site.shift and plan.shifts:
                self.shift_of[i] = len(self.shifts)
                self.shifts.append(nn.Parameter(torch.zeros(dims)))

    def scale(self, i: int) -> torch.Tensor:
        """s = exp(log s): Adam's steps change a scale by a relative amount, whatever its size;
        or, learned directly, s with its magnitude floored at 1e-2."""
        if self.plan.scale_param == "log":
            return self.scales[i].exp()
        return _FloorSTE.apply(self.scales[i])

    def _set_scale(self, i: int, s: torch.Tensor) -> None:
        s = s.clamp(min=SCALE_MIN)
        self.scales[i].copy_(s.log() if self.plan.scale_param == "log" else s)

    def shift(self, i: int) -> torch.Tensor | None:
        return self.shifts[self.shift_of[i]] if i in self.shift_of else None

    @torch.no_grad()
    def init_from_stats(self, block: nn.Module, stats: dict[int, ChannelStats]) -> None:
        """SmoothQuant start: s = max|X|^α / max|W|^(1−α); δ = (max + min) / 2 (norm sites).

        Norm sites always; the v→o site too with the reference start (`plan.init`), its
        statistics taken per o input channel and reduced to one value per (KV head, channel).
        """
        alpha, plan = self.plan.alpha, self.plan
        for i, site in enumerate(plan.sites):
            if i not in stats or site.kind == "qk":
                continue
            st = stats[i]
            if site.kind == "vo":
                if alpha is None:
                    continue
                act = _per_kv(st.absmax, plan.shape)
                w = _per_kv(get_module(block, site.targets[0]).weight.abs().amax(dim=0), plan.shape)
                self._set_scale(i, _smooth(act, w, alpha))
                continue
            delta = (st.cmax + st.cmin) / 2 if i in self.shift_of else None
            act = (st.cmax - st.cmin) / 2 if delta is not None else st.absmax
            if delta is not None:
                self.shifts[self.shift_of[i]].copy_(delta)
            if alpha is None:
                continue
            linears = site.targets[:1] if plan.reference_init else site.targets
            w = torch.stack([get_module(block, t).weight.abs().amax(dim=0) for t in linears]).amax(
                dim=0
            )  # (C,)
            self._set_scale(i, _smooth(act, w, alpha))


def _smooth(act: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's migration scale max|X|^α / max|W|^(1−α)."""
    return act.clamp(min=SCALE_MIN).pow(alpha) / w.clamp(min=SCALE_MIN).pow(1 - alpha)


def _per_kv(x: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """Per o input channel (n_heads · d,) -> the largest over each KV group's heads (n_kv, d)."""
    return x.reshape(shape.n_kv_heads, shape.group, shape.head_dim).amax(dim=1)


@dataclass
class ChannelStats:
    """Per-channel statistics of a linear's input over the calibration set."""

    absmax: torch.Tensor
    cmax: torch.Tensor
    cmin: torch.Tensor


def stats_hooks(
    block: nn.Module, plan: LetPlan
) -> tuple[dict[int, ChannelStats], list[torch.utils.hooks.RemovableHandle]]:
    """Hooks that gather the input statistics of every norm site while the block runs."""
    stats: dict[int, ChannelStats] = {}
    handles = []
    for i, site in enumerate(plan.sites):
        if site.kind == "qk" or (site.kind == "vo" and not plan.reference_init):
            continue

        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, C)
            mx, mn = x.amax(dim=0), x.amin(dim=0)
            if i in stats:
                mx, mn = torch.maximum(mx, stats[i].cmax), torch.minimum(mn, stats[i].cmin)
            stats[i] = ChannelStats(torch.maximum(mx.abs(), mn.abs()), mx, mn)

        handles.append(get_module(block, site.targets[0]).register_forward_pre_hook(hook))
    return stats, handles


Role = Literal[
    "norm_weight", "norm_bias", "in_weight", "in_bias", "src", "src_bias", "dst", "dst_bias"
]


def _src_out_scale(let: LetParams, i: int) -> torch.Tensor:
    """Per output row of the site's source linear (v or q): its output comes out divided by it."""
    site, s, group = let.plan.sites[i], let.scale(i), let.plan.shape.group
    return s.reshape(-1) if site.kind == "vo" else expand_kv(rope_tied(s), group)


def _dst_factor(let: LetParams, i: int) -> torch.Tensor:
    """vo: o's input columns times s (shared by a KV group); qk: k's output rows times s."""
    site, s, group = let.plan.sites[i], let.scale(i), let.plan.shape.group
    return expand_kv(s, group) if site.kind == "vo" else rope_tied(s).reshape(-1)


def _weight_before_let(linear: nn.Module) -> torch.Tensor:
    params = getattr(linear, "parametrizations", None)
    return params.weight.original if params is not None and "weight" in params else linear.weight


class LetFold(nn.Module):
    """Parametrization of one tensor by one LET site: the tensor's folded value, computed from
    the site's current scale (and shift) on every access, so gradients reach them."""

    def __init__(self, let: LetParams, index: int, role: Role, linear: nn.Module | None = None):
        super().__init__()
        self.let, self.index, self.role = [let], index, role  # list: not a submodule
        self.linear = [linear]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        let, i = self.let[0], self.index
        s, delta = let.scale(i), let.shift(i)
        role = self.role
        if role == "norm_weight":
            return fold_norm_weight(v, s, let.plan.arch.norm_kind)
        if role == "norm_bias":
            return fold_norm_bias(v, s, delta)
        if role == "in_weight":
            return v * s
        if role == "in_bias":
            return v + _weight_before_let(self.linear[0]) @ delta
        if role in ("src", "src_bias"):
            out = _src_out_scale(let, i)
            return v / (out[:, None] if role == "src" else out)
        factor = _dst_factor(let, i)
        if let.plan.sites[i].kind == "vo":
            return v * factor  # o's input columns
        return v * (factor[:, None] if role == "dst" else factor)  # k's output rows


def _register(module: nn.Module, name: str, fold: LetFold) -> None:
    from torch.nn.utils import parametrize

    if getattr(module, name) is None:  # a shift needs a bias: create it
        weight = module.weight
        setattr(module, name, nn.Parameter(torch.zeros(weight.shape[0], device=weight.device)))
    if not parametrize.is_parametrized(module, name):
        getattr(module, name).requires_grad_(False)
    parametrize.register_parametrization(module, name, fold, unsafe=True)


def attach_let(block: nn.Module, let: LetParams) -> None:
    """Parametrize the block's norms and linears with LET (before any weight quantizer)."""
    for i, site in enumerate(let.plan.sites):
        src = get_module(block, site.source)
        targets = [get_module(block, t) for t in site.targets]
        shifted = let.shift(i) is not None
        if site.kind == "norm":
            _register(src, "weight", LetFold(let, i, "norm_weight"))
            if shifted:
                _register(src, "bias", LetFold(let, i, "norm_bias"))
            for lin in targets:
                if shifted:
                    _register(lin, "bias", LetFold(let, i, "in_bias", lin))
                _register(lin, "weight", LetFold(let, i, "in_weight"))
            continue
        _register(src, "weight", LetFold(let, i, "src"))
        if src.bias is not None:
            _register(src, "bias", LetFold(let, i, "src_bias"))
        for lin in targets:
            _register(lin, "weight", LetFold(let, i, "dst"))
            if site.kind == "qk" and lin.bias is not None:
                _register(lin, "bias", LetFold(let, i, "dst_bias"))


def head_dim_of(model: nn.Module, arch: Architecture) -> int | None:
    """Channels per attention head, where the architecture names its q/k/v projections."""
    if len(arch.qkv) != 3:
        return None
    return attention_shape(model.config, arch).head_dim


def let_plan_for(model: nn.Module, arch: Architecture, config: OmniQuantConfig) -> LetPlan | None:
    """The LET plan of a run: identity start for weight-only runs, SmoothQuant α otherwise."""
    if not config.calib.let:
        return None
    if not (arch.qkv or arch.mlp_in):
        raise ConfigError(f"LET needs a registered architecture; {arch.name} is not registered")
    calib = config.calib
    alpha = calib.let_alpha
    if alpha is None and calib.let_init == "reference":
        alpha = 0.5  # the reference code's --alpha default, weight-only runs included
    elif alpha is None and config.act.enabled:
        alpha = 0.75 if config.act.bits <= 4 else 0.5
    return plan_let(arch, model.config, alpha, config.act.enabled, calib.let_scale, calib.let_init)

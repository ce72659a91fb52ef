"""The block loop: OmniQuant's block-wise error minimization.

For each decoder block l, in order:
  1. targets   F(W, X_fp): the float block on the float chain's inputs (and F(W, X_q) for aug_loss);
  2. attach    LET (optional), a weight offset (with weight training) and an LWC quantizer on every
               linear, as parametrizations, and activation quantizers (optional) as hooks;
  3. train     AdamW on LWC / LET (/ weight offset) parameters, loss between F(Q(W), X_q) and
               targets, in a fixed window order (or reshuffled each epoch), under the guard
               (`omniquant.guard`): held-out windows' loss per epoch, best epoch kept, early stop;
  4. fold      norms, biases and weights take their transformed, quantized values;
  5. advance   X_q ← F(Q(W), X_q) and X_fp ← F(W, X_fp) become block l+1's inputs.
The held-out validation windows (the last `val_batches` captured batches) go through both chains
like the training windows but are never trained on.
Activations live on the CPU and go to the device one batch at a time; only block l is on the device.
After each block its learned parameters are written to the state folder, so an interrupted run can
resume from the next block and produce the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from omniquant.activations import ActivationStore, MemoryBudget, StoreView, peak_rss_bytes
from omniquant.capture import BlockArgs, CapturedInputs, map_tensors
from omniquant.config import ActQuant, CalibConfig, WeightQuant
from omniquant.errors import CalibrationError, ExportError
from omniquant.guard import Guard, copy_into, fell_back_message, snapshot
from omniquant.memory import map_large_allocations
from omniquant.models.architecture import Architecture, block_linears
from omniquant.quant.activation import attach_act_quantizers
from omniquant.quant.experts import (
    EXPERT_QPARAMS,
    Stacked,
    expert_token_counts,
    expert_weights,
    stacked_view,
    token_summary,
)
from omniquant.quant.lwc import LWC
from omniquant.quant.qparams import QPARAMS_ATTR, from_affine
from omniquant.quant.recompute import recompute_weights
from omniquant.quant.weight_training import ADAM_EPS, StepOffset
from omniquant.runtime import Runtime
from omniquant.schedule import lr_factor
from omniquant.transforms.let import ChannelStats, LetParams, LetPlan, attach_let, stats_hooks

log = logging.getLogger(__name__)

Batches = Sequence[torch.Tensor] | ActivationStore | StoreView  # per batch (B, T, C), on the CPU


@dataclass
class BlockReport:
    """What happened to one block."""

    index: int
    loss_before: float  # training objective with the quantizers at their initial values
    loss_after: float  # the same after training and folding
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # of `seconds`, in the training epochs (steps + held-out passes)
    nan_events: int = 0
    final_lr_scale: float = 1.0
    # the guard (empty / NaN / False without validation windows)
    val_losses: list[float] = field(default_factory=list)  # [0]: at the start, then per epoch
    val_loss_after: float = float("nan")  # after restoring the best epoch and folding
    best_epoch: int = 0  # 0: the start
    fell_back: bool = False  # no epoch beat the start: the starting parameters were restored
    stopped_early: bool = False
    peak_rss_bytes: int = 0  # the process's peak RSS so far, when this block was done
    # calibration tokens per expert of a MoE block (min/median/max; empty without experts)
    expert_tokens: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- loss


def block_loss(out: torch.Tensor, target: torch.Tensor, weighting: str) -> torch.Tensor:
    """Error between a quantized block's output and its target, both (B, T, C).

    "mse": the plain mean squared error. "token-normalized": each token's squared error divided by
    its target's mean square, then averaged, so that a token with a huge hidden state (the massive
    activation of the first token) weighs no more than any other token.
    """
    out, target = out.float(), target.float()
    if weighting == "mse":
        return F.mse_loss(out, target)
    err = (out - target).pow(2).mean(dim=-1)  # (B, T)
    scale = target.pow(2).mean(dim=-1).clamp_min(1e-12)  # (B, T)
    return (err / scale).mean()


# ---------------------------------------------------------------- quantizers on a block


@dataclass(frozen=True)
class WeightSite:
    """One weight the block loop quantizes: a linear's `weight`, or a fused 3-D expert tensor
    (quantized through `experts.Stacked`), with its shape as a matrix (rows, in)."""

    module: nn.Module
    attr: str
    rows: int
    in_features: int
    stacked: bool = False
    transposed: bool = False

    def wrap(self, inner: nn.Module) -> nn.Module:
        return Stacked(inner, self.transposed) if self.stacked else inner

    def original(self) -> nn.Parameter:
        """The float tensor under the site's parametrizations (or the parameter itself)."""
        if parametrize.is_parametrized(self.module, self.attr):
            return getattr(self.module.parametrizations, self.attr).original
        return getattr(self.module, self.attr)

    def matrix(self) -> torch.Tensor:
        """The current float tensor as a (rows, in) matrix."""
        w = self.original().detach()
        return stacked_view(w, self.transposed) if self.stacked else w


def weight_sites(block: nn.Module) -> dict[str, WeightSite]:
    """Every weight of the block the loop quantizes, by name: its nn.Linears (by module path)
    and its fused expert tensors ('<module path>.<attribute>')."""
    sites = {
        name: WeightSite(linear, "weight", linear.out_features, linear.in_features)
        for name, linear in block_linears(block).items()
    }
    for name, e in expert_weights(block).items():
        sites[name] = WeightSite(e.module, e.attr, e.rows, e.in_features, True, e.transposed)
    return sites


def attach_offsets(
    block: nn.Module, spec: WeightQuant, absolute: bool = False
) -> dict[str, StepOffset]:
    """Register a trainable weight offset W + h ⊙ Δ on every weight the block quantizes (weight
    training); after LET, before LWC, so h is the step of the weight that LWC starts from."""
    offsets: dict[str, StepOffset] = {}
    for name, site in weight_sites(block).items():
        offsets[name] = StepOffset(site.matrix(), spec, absolute)
        parametrize.register_parametrization(
            site.module, site.attr, site.wrap(offsets[name]), unsafe=True
        )
    return offsets


def attach_quantizers(block: nn.Module, spec: WeightQuant, cfg: CalibConfig) -> dict[str, LWC]:
    """Register an LWC parametrization on every weight the block quantizes; returns them by name.

    Registered after any LET parametrization and weight offset, so LWC quantizes their result.
    """
    learnable = cfg.method == "omniquant" and cfg.lwc
    quantizers: dict[str, LWC] = {}
    for name, site in weight_sites(block).items():
        q = LWC(
            site.rows,
            site.in_features,
            spec,
            learnable,
            cfg.lwc_init,
            zero_point_ste=cfg.zero_point_ste,
        )
        q.to(site.original().device)
        parametrize.register_parametrization(site.module, site.attr, site.wrap(q), unsafe=True)
        site.original().requires_grad_(False)
        quantizers[name] = q
    return quantizers


@torch.no_grad()
def fold_parametrizations(block: nn.Module) -> None:
    """Replace every parametrized tensor of the block (LET-transformed norms, biases, quantized
    weights) by its current value and drop the parametrizations."""
    for name, module in block.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            chain = list(module.parametrizations[tensor_name])
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            for p in chain:  # a cache of the old tensor (LWC's grouped weight) would keep it
                inner = p.inner if isinstance(p, Stacked) else p
                if isinstance(inner, LWC):
                    inner.clear_cache()
            value = getattr(module, tensor_name)
            if not torch.isfinite(value).all():
                raise CalibrationError(f"non-finite {tensor_name} after folding {name}")
            value.requires_grad_(False)


def record_qparams(block: nn.Module, bq: BlockQuant, spec: WeightQuant) -> None:
    """Keep each folded weight's grid (scales, zero points) beside it, for packed export: on a
    linear as QPARAMS_ATTR, on an experts module per attribute in EXPERT_QPARAMS."""
    experts = expert_weights(block)
    for name, q in bq.lwc.items():
        if q.last_params is None:
            continue
        if name in experts:
            e = experts[name]
            grids = getattr(e.module, EXPERT_QPARAMS, {})
            try:
                grids[e.attr] = from_affine(q.last_params, spec, e.in_features)
            except ExportError as err:
                log.warning("%s: no grid kept for these experts: %s", name, err)
            setattr(e.module, EXPERT_QPARAMS, grids)
            continue
        linear = block.get_submodule(name)
        try:
            setattr(linear, QPARAMS_ATTR, from_affine(q.last_params, spec, linear.in_features))
        except ExportError as e:
            log.warning("%s: no packed export for this layer: %s", name, e)


@dataclass
class BlockQuant:
    """What is attached to one block while it is calibrated: LWC per linear, LET (optional),
    weight offsets per linear (with weight training)."""

    lwc: dict[str, LWC]
    let: LetParams | None = None
    offsets: dict[str, StepOffset] = field(default_factory=dict)

    def param_groups(self, cfg: CalibConfig, lr_scale: float) -> list[dict[str, Any]]:
        """AdamW groups: LWC, LET and (with `weight_lr` > 0) the weight offsets."""
        lwc = [p for q in self.lwc.values() for p in q.parameters() if p.requires_grad]
        groups = [{"params": lwc, "lr": cfg.lwc_lr * lr_scale}]
        if self.let is not None and cfg.method == "omniquant":
            groups.append({"params": list(self.let.parameters()), "lr": cfg.let_lr * lr_scale})
        offsets = [o.delta for o in self.offsets.values()]
        if offsets:
            lr = cfg.weight_lr * lr_scale
            eps = ADAM_EPS if cfg.weight_lr_unit == "step" else 1e-8  # AdamW's default
            groups.append({"params": offsets, "lr": lr, "weight_decay": 0.0, "eps": eps})
        return [g for g in groups if g["params"]]

    def bound_offsets(self, bound: float | None) -> None:
        """Project the weight offsets into [-bound, bound] (no-op without a bound)."""
        if bound is not None:
            for o in self.offsets.values():
                o.bound_(bound)

    def state(self) -> dict[str, Any]:
        """What the block learned, on the CPU (for --resume)."""
        lwc = {
            name: {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
            for name, q in self.lwc.items()
        }
        let = None if self.let is None else {k: v.cpu() for k, v in self.let.state_dict().items()}
        offsets = {name: o.delta.detach().cpu().clone() for name, o in self.offsets.items()}
        return {"lwc": lwc, "let": let, "offsets": offsets}

    @torch.no_grad()
    def load(self, state: dict[str, Any]) -> None:
        for name, q in self.lwc.items():
            q.load_state_dict(state["lwc"][name])
        if self.let is not None:
            self.let.load_state_dict(state["let"])
        for name, o in self.offsets.items():
            o.delta.copy_(state["offsets"][name])


def attach_block_quant(
    block: nn.Module,
    spec: WeightQuant,
    cfg: CalibConfig,
    plan: LetPlan | None,
    stats: dict[int, ChannelStats] | None,
) -> BlockQuant:
    """LET parametrizations first (started from activation statistics), then weight offsets (with
    weight training), then LWC."""
    let = None
    if plan is not None:
        let = LetParams(plan, block).to(next(block.parameters()).device)
        if stats:
            let.init_from_stats(block, stats)
        attach_let(block, let)
    trains_weights = cfg.trains and cfg.weight_lr > 0
    absolute = cfg.weight_lr_unit == "absolute"
    offsets = attach_offsets(block, spec, absolute) if trains_weights else {}
    return BlockQuant(attach_quantizers(block, spec, cfg), let, offsets)


@torch.no_grad()
def gather_stats(
    block: nn.Module,
    plan: LetPlan,
    inputs: Batches,
    extra: BlockArgs,
    runtime: Runtime,
) -> dict[int, ChannelStats]:
    """Per-channel input statistics of the LET norm sites on the given inputs."""
    stats, handles = stats_hooks(block, plan)
    try:
        for x in inputs:  # the hooks keep the statistics; the outputs are not needed
            run_block(block, x.to(runtime.device, torch.float32), extra, runtime)
    finally:
        for h in handles:
            h.remove()
    return stats


# ---------------------------------------------------------------- running a block


def run_block(
    block: nn.Module, x: torch.Tensor, extra: BlockArgs, runtime: Runtime
) -> torch.Tensor:
    """The block's own forward on one batch; returns the hidden state (B, T, C)."""
    with runtime.autocast():
        out = block(x, *extra.args, **extra.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block_over(
    block: nn.Module,
    store: ActivationStore,
    extra: BlockArgs,
    runtime: Runtime,
    targets: Batches | None = None,
    weighting: str = "mse",
) -> list[float]:
    """Replace every batch of the store by the block's output on it, one batch at a time (no
    second copy of the chain); with `targets`, returns each batch's loss of the stored output
    against its target."""
    losses = []
    with parametrize.cached():  # quantized weights computed once for every batch
        for j in range(len(store)):
            x = store[j]
            out = run_block(block, x.to(runtime.device, torch.float32), extra, runtime)
            out = out.to("cpu", x.dtype)  # as stored: the loss needs no read back
            store[j] = out
            if targets is not None:
                losses.append(block_loss(out, targets[j], weighting).item())
    return losses


@torch.no_grad()
def mean_loss(outputs: Batches, targets: Batches, weighting: str) -> float:
    pairs = zip(outputs, targets, strict=True)
    return sum(block_loss(o, t, weighting).item() for o, t in pairs) / len(outputs)


@torch.no_grad()
def mean_loss_of(
    block: nn.Module,
    inputs: Batches,
    targets: Batches,
    extra: BlockArgs,
    runtime: Runtime,
    weighting: str,
) -> float:
    """`mean_loss` of the block's outputs on `inputs`, without keeping the outputs."""
    total = 0.0
    with parametrize.cached():
        for x, t in zip(inputs, targets, strict=True):
            out = run_block(block, x.to(runtime.device, torch.float32), extra, runtime)
            total += block_loss(out.to("cpu", x.dtype), t, weighting).item()
    return total / len(inputs)


# ---------------------------------------------------------------- training one block


def _optimizer(bq: BlockQuant, cfg: CalibConfig, lr_scale: float) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(bq.param_groups(cfg, lr_scale), weight_decay=cfg.wd)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]  # the schedule's factor multiplies this
    return opt


def _schedule_lr(state: _TrainState, cfg: CalibConfig) -> None:
    """Every group's rate for the coming step: its base rate x the schedule's factor."""
    factor = lr_factor(state.step, state.total_steps, cfg.lr_schedule)
    for group in state.opt.param_groups:
        group["lr"] = group["base_lr"] * factor


@dataclass
class BlockData:
    """One block's batches (training or validation), on the CPU (lists, or activation stores
    and their slices), and its extra arguments on the device."""

    inputs_q: Batches  # X_q
    targets: Batches  # F(W, X_fp)
    aug_targets: Batches | None  # F(W, X_q), with aug_loss
    extra: BlockArgs

    def split(self, n_val: int) -> tuple[BlockData, BlockData | None]:
        """(the first batches, the last `n_val` batches or None): training and validation."""
        if n_val == 0:
            return self, None
        n = len(self.inputs_q) - n_val
        aug = self.aug_targets
        head = BlockData(self.inputs_q[:n], self.targets[:n], aug[:n] if aug else None, self.extra)
        tail = BlockData(self.inputs_q[n:], self.targets[n:], aug[n:] if aug else None, self.extra)
        return head, tail


def _loss(
    block: nn.Module, j: int, data: BlockData, cfg: CalibConfig, runtime: Runtime
) -> torch.Tensor:
    """The training objective on batch j: F(Q(W), X_q) against F(W, X_fp) (+ F(W, X_q))."""
    x = data.inputs_q[j].to(runtime.device, torch.float32)
    out = run_block(block, x, data.extra, runtime)
    loss = block_loss(out, data.targets[j].to(runtime.device), cfg.loss)
    if data.aug_targets is not None:
        loss = loss + block_loss(out, data.aug_targets[j].to(runtime.device), cfg.loss)
    return loss


@torch.no_grad()
def objective(block: nn.Module, data: BlockData, cfg: CalibConfig, runtime: Runtime) -> float:
    """The training objective averaged over every batch of `data` (forward passes only)."""
    n = len(data.inputs_q)
    with parametrize.cached():  # quantized weights computed once for every batch
        return sum(_loss(block, j, data, cfg, runtime).item() for j in range(n)) / n


def epoch_order(n: int, shuffle: bool, gen: torch.Generator) -> list[int]:
    """The batch order of one epoch: 0..n-1 as the reference code, or a seeded permutation."""
    return torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))


def _finite_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """Backward and step if the loss and every gradient are finite; else change nothing."""
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
        return False
    opt.step()
    return True


@dataclass
class _TrainState:
    """The optimizer, its parameters and their last values with a finite step."""

    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    good: list[torch.Tensor]
    total_steps: int = 0  # epochs x batches: the schedule's length
    step: int = 0  # optimizer steps taken
    lr_scale: float = 1.0
    nan_events: int = 0


def _start(bq: BlockQuant, cfg: CalibConfig, total_steps: int) -> _TrainState:
    opt = _optimizer(bq, cfg, 1.0)
    params = [p for group in opt.param_groups for p in group["params"]]
    return _TrainState(opt, params, snapshot(params), total_steps)


def _recover(bq: BlockQuant, cfg: CalibConfig, state: _TrainState) -> None:
    """After a non-finite loss or gradient: the last good parameters back, half the rate."""
    state.nan_events += 1
    if state.nan_events > cfg.max_nan_retries:
        raise CalibrationError(
            f"the loss stayed non-finite after {cfg.max_nan_retries} retries with a "
            f"halved learning rate; try a lower `lwc_lr` or `dtype` float32"
        )
    state.lr_scale /= 2
    log.warning("non-finite loss: last good parameters back, lr x%.4g", state.lr_scale)
    copy_into(state.params, state.good)
    state.opt = _optimizer(bq, cfg, state.lr_scale)


def _train_epoch(
    block: nn.Module,
    bq: BlockQuant,
    data: BlockData,
    cfg: CalibConfig,
    runtime: Runtime,
    state: _TrainState,
    order: list[int],
) -> float:
    """One pass over the batches in `order`; returns the mean training loss."""
    total = 0.0
    for j in order:
        _schedule_lr(state, cfg)
        loss = _loss(block, j, data, cfg, runtime)
        while not _finite_step(state.opt, loss):
            _recover(bq, cfg, state)
            _schedule_lr(state, cfg)
            loss = _loss(block, j, data, cfg, runtime)
        state.step += 1
        bq.bound_offsets(cfg.weight_bound)
        copy_into(state.good, state.params)
        total += loss.item()
    return total / len(order)


def train_block(
    block: nn.Module,
    bq: BlockQuant,
    data: BlockData,
    cfg: CalibConfig,
    runtime: Runtime,
    seed: int,
    validation: BlockData | None = None,
) -> tuple[list[float], _TrainState, Guard | None]:
    """AdamW on the block's LWC (and LET, weight offset) parameters; returns each epoch's mean
    loss, the training state and the guard (None without validation batches).

    A non-finite loss or gradient restores the last good parameters, halves the learning rate and
    retries the batch, at most `cfg.max_nan_retries` times per block. With validation batches,
    the guard measures their loss before training and after each epoch, stops after
    `cfg.patience` epochs without improvement and, at the end, restores the best epoch's
    parameters (the starting ones when no epoch beat the start).
    """
    state = _start(bq, cfg, cfg.epochs * len(data.inputs_q))
    guard = None
    if validation is not None:
        guard = Guard(state.params, objective(block, validation, cfg, runtime), cfg.patience)
    gen = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    bar = tqdm(range(cfg.epochs), desc="  epochs", leave=False, disable=not runtime.progress)
    for _ in bar:
        order = epoch_order(len(data.inputs_q), cfg.shuffle, gen)
        epoch_losses.append(_train_epoch(block, bq, data, cfg, runtime, state, order))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4g}")
        if guard is not None and guard.update(objective(block, validation, cfg, runtime)):
            break
    if guard is not None:
        guard.restore()
    return epoch_losses, state, guard


# ---------------------------------------------------------------- the block loop


class StateStore:
    """Per-block learned parameters and reports in a folder, for --resume."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.damaged: set[int] = set()  # blocks whose file could not be read (warned once)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"block_{index:04d}.pt"

    def save(self, index: int, params: dict[str, Any], report: BlockReport) -> None:
        if self.folder is None:
            return
        tmp = self.path(index).with_suffix(".tmp")
        torch.save({"params": params, "report": report.to_dict()}, tmp)
        tmp.replace(self.path(index))

    def load(self, index: int) -> tuple[dict[str, Any], BlockReport] | None:
        """The saved state of a block; None when there is none, or when its file is damaged
        (truncated, say), which is then logged and the block trained again."""
        if self.folder is None or not self.path(index).exists():
            return None
        try:
            data = torch.load(self.path(index), weights_only=True)
            return data["params"], BlockReport(**data["report"])
        except Exception as e:  # torch raises several types for a damaged archive
            if index in self.damaged:
                return None
            self.damaged.add(index)
            log.warning(
                "%s is damaged (%s); block %d will be trained again",
                self.path(index),
                " ".join(str(e).split())[:200],
                index,
            )
            return None

    def completed(self) -> int:
        """How many leading blocks have a saved state."""
        n = 0
        while self.load(n) is not None:
            n += 1
        return n


def _extra_on_device(extra: BlockArgs, device: torch.device) -> BlockArgs:
    """A block's extra arguments on the device, floating tensors in float32 like the block."""
    moved = map_tensors(
        (extra.args, extra.kwargs),
        lambda t: t.to(device, torch.float32) if t.is_floating_point() else t.to(device),
    )
    return BlockArgs(*moved)


@contextmanager
def _block_on(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move the block to the device in float32 for the duration, back to the CPU after."""
    dtype = next(block.parameters()).dtype
    block.to(device, torch.float32)
    try:
        yield block
    finally:
        block.to("cpu", dtype)


class BlockWeights(Protocol):
    """Where the blocks' weights come from and go (weights streamed from disk): `load` fills
    block i's parameters before it is calibrated, `release` writes the quantized block and
    drops its weights."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


@dataclass
class LoopMemory:
    """How the block loop keeps its activations: the stored dtype and the shared RAM budget."""

    dtype: torch.dtype = torch.float32
    budget: MemoryBudget = field(default_factory=MemoryBudget)

    def copies(self, cfg: CalibConfig) -> int:
        """Full chains of activations the loop holds at its peak: X_fp (overwritten by the
        targets), X_q (overwritten by the outputs), and F(W, X_q) with aug_loss."""
        return 3 if cfg.aug_loss and cfg.trains else 2


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Subnormal floats (below 1.2e-38) read and written as zero on the CPU, within the context.

    Block training makes them in quantity: the losses of early blocks are small (1e-4), their
    gradients smaller, and AdamW squares them; each subnormal operand costs the CPU's floating-
    point unit a slow path (a random-weight block of SmolLM2's shape trained 3.3x slower). Values
    that small carry no information for the block's parameters (AdamW's epsilon is 1e-12), and
    GPUs flush them in most kernels anyway. PyTorch's default (off) comes back on exit."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


@flush_denormals()
def calibrate_blocks(
    blocks: nn.ModuleList,
    captured: CapturedInputs,
    spec: WeightQuant,
    cfg: CalibConfig,
    runtime: Runtime,
    store: StateStore | None = None,
    on_block: Callable[[BlockReport], None] | None = None,
    *,
    act: ActQuant | None = None,
    let_plan: LetPlan | None = None,
    arch: Architecture | None = None,
    head_dim: int | None = None,
    val_batches: int = 0,
    memory: LoopMemory | None = None,
    weights: BlockWeights | None = None,
    consume: bool = False,
) -> list[BlockReport]:
    """Quantize every block in place; returns one report per block.

    With `act` enabled, activation quantizers are attached to each block (and stay attached);
    with `let_plan`, LET is learned jointly with LWC and folded. The last `val_batches` captured
    batches are held out: they go through both chains but only the guard sees them.
    `captured.hidden` is copied into the loop's activation stores (`memory`: their dtype and
    RAM budget); with `consume`, moved (the list is emptied, so no other copy stays). With
    `weights`, each block's weights are loaded before and released after its calibration.

    The activations held at once: the float chain's store (block l's inputs, replaced batch by
    batch by its targets F(W, X_fp), which are block l+1's inputs) and the quantized chain's
    (X_q, replaced by F(Q(W), X_q)), plus F(W, X_q) while the block trains with aug_loss.
    """
    if not 0 <= val_batches < len(captured.hidden):
        raise CalibrationError(
            f"{val_batches} validation batches of {len(captured.hidden)} captured leave no "
            "training batch"
        )
    memory = memory or LoopMemory()
    if weights is not None:  # streamed: memory first, ~10% time for 0.35 GiB on 8B (memory.py)
        map_large_allocations()
    n_train = len(captured.hidden) - val_batches
    store = store or StateStore(None)
    resume_from = store.completed()
    chain_fp = ActivationStore.of("fp", memory.dtype, memory.budget, captured.hidden)
    if consume:
        captured.hidden.clear()  # the float chain's store holds them now
    chain_q = ActivationStore.of("q", memory.dtype, memory.budget, chain_fp)
    reports: list[BlockReport] = []
    bar = tqdm(range(len(blocks)), desc="blocks", disable=not runtime.progress)
    try:
        for i in bar:
            t0 = time.perf_counter()
            extra = _extra_on_device(captured.block_args[i], runtime.device)
            saved = store.load(i) if i < resume_from else None
            if weights is not None:
                weights.load(i, blocks[i])
            with _block_on(blocks[i], runtime.device) as block:
                block.requires_grad_(False)
                # LET's statistics first: they read the float chain's inputs, which the targets
                # then replace
                stats = (
                    gather_stats(
                        block,
                        let_plan,
                        _stats_inputs(let_plan, chain_fp[:n_train], chain_q[:n_train]),
                        extra,
                        runtime,
                    )
                    if let_plan is not None and saved is None
                    else None
                )
                aug = None
                if cfg.aug_loss and cfg.trains and saved is None:
                    aug = ActivationStore.of("aug", memory.dtype, memory.budget, chain_q)
                    run_block_over(block, aug, extra, runtime)
                with expert_token_counts(block) as routed:  # the model's own routing
                    run_block_over(block, chain_fp, extra, runtime)  # the targets F(W, X_fp)
                targets = chain_fp
                bq = attach_block_quant(block, spec, cfg, let_plan, stats)
                if act is not None and act.enabled:
                    attach_act_quantizers(block, act, arch or let_plan.arch, head_dim)
                if saved is not None:
                    bq.load(saved[0])
                    report = saved[1]
                else:
                    data = BlockData(chain_q, targets, aug, extra)
                    report = _train_and_report(i, block, bq, data, cfg, runtime, val_batches)
                if aug is not None:
                    aug.clear()
                params = bq.state()
                fold_parametrizations(block)
                record_qparams(block, bq, spec)
                losses = run_block_over(block, chain_q, extra, runtime, targets, cfg.loss)
            if weights is not None:
                weights.release(i, blocks[i])
            if saved is None:
                report.loss_after = sum(losses[:n_train]) / n_train
                if val_batches:
                    report.val_loss_after = sum(losses[n_train:]) / val_batches
                if math.isnan(report.loss_before):  # nothing trained: the loss did not change
                    report.loss_before = report.loss_after
                report.seconds = time.perf_counter() - t0
                report.peak_rss_bytes = peak_rss_bytes()
                report.expert_tokens = token_summary(routed)
                store.save(i, params, report)
            if not math.isfinite(report.loss_after):
                raise CalibrationError(f"block {i}: non-finite output after quantization")
            reports.append(report)
            if report.fell_back:
                log.warning(
                    "%s",
                    fell_back_message(
                        f"block {i}", report.val_losses, "its starting parameters are restored"
                    ),
                )
            bar.set_postfix(loss=f"{report.loss_before:.3g}->{report.loss_after:.3g}")
            log.info(
                "block %d: loss %.5g -> %.5g (%.1fs)",
                i,
                report.loss_before,
                report.loss_after,
                report.seconds,
            )
            if on_block is not None:
                on_block(report)
    finally:
        chain_fp.clear()
        chain_q.clear()
    return reports


def _stats_inputs(plan: LetPlan, inputs_fp: Batches, inputs_q: Batches) -> Batches:
    """LET's starting statistics: the float chain's inputs (reference), else the quantized one's."""
    return inputs_fp if plan.reference_init else inputs_q


def _train_and_report(
    index: int,
    block: nn.Module,
    bq: BlockQuant,
    data: BlockData,
    cfg: CalibConfig,
    runtime: Runtime,
    val_batches: int,
) -> BlockReport:
    if not cfg.trains:
        return BlockReport(index, loss_before=float("nan"), loss_after=float("nan"), seconds=0.0)
    train, validation = data.split(val_batches)
    before = mean_loss_of(block, train.inputs_q, train.targets, train.extra, runtime, cfg.loss)
    t0 = time.perf_counter()
    shared = [] if bq.let is None else list(bq.let.parameters())
    with recompute_weights(block_linears(block), shared, cfg.recompute):
        epoch_losses, state, guard = train_block(
            block, bq, train, cfg, runtime, cfg.seed + index, validation
        )
    train_seconds = time.perf_counter() - t0
    report = BlockReport(
        index,
        loss_before=before,
        loss_after=float("nan"),
        seconds=0.0,
        epoch_losses=epoch_losses,
        train_seconds=train_seconds,
        nan_events=state.nan_events,
        final_lr_scale=state.lr_scale,
    )
    if guard is not None:
        report.val_losses = guard.losses
        report.best_epoch = guard.best_epoch
        report.fell_back = guard.fell_back
        report.stopped_early = len(epoch_losses) < cfg.epochs
    return report

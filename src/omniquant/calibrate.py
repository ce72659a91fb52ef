"""The block loop: OmniQuant's block-wise error minimization.

For each decoder block l, in order:
  1. targets   F(W, X_fp): the float block on the float chain's inputs (and F(W, X_q) for aug_loss);
  2. attach    LET (optional) and an LWC quantizer on every linear, as parametrizations, and
               activation quantizers (optional) as hooks;
  3. train     AdamW on LWC / LET (/ weight) parameters, loss between F(Q(W), X_q) and targets;
  4. fold      norms, biases and weights take their transformed, quantized values;
  5. advance   X_q ← F(Q(W), X_q) and X_fp ← F(W, X_fp) become block l+1's inputs.
Activations live on the CPU and go to the device one batch at a time; only block l is on the device.
After each block its learned parameters are written to the state folder, so an interrupted run can
resume from the next block and produce the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from omniquant.capture import BlockArgs, CapturedInputs, map_tensors
from omniquant.config import ActQuant, CalibConfig, WeightQuant
from omniquant.errors import CalibrationError, ExportError
from omniquant.models.architecture import Architecture, block_linears
from omniquant.quant.activation import attach_act_quantizers
from omniquant.quant.lwc import LWC
from omniquant.quant.qparams import QPARAMS_ATTR, from_affine
from omniquant.transforms.let import ChannelStats, LetParams, LetPlan, attach_let, stats_hooks

log = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """What happened to one block."""

    index: int
    loss_before: float  # training objective with the quantizers at their initial values
    loss_after: float  # the same after training and folding
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    nan_events: int = 0
    final_lr_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the block loop runs."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    progress: bool = True

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


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


def attach_quantizers(block: nn.Module, spec: WeightQuant, cfg: CalibConfig) -> dict[str, LWC]:
    """Register an LWC parametrization on every linear of the block; returns them by name.

    Registered after any LET parametrization, so LWC quantizes the transformed weight.
    """
    learnable = cfg.method == "omniquant" and cfg.lwc
    quantizers: dict[str, LWC] = {}
    for name, linear in block_linears(block).items():
        q = LWC(linear.out_features, linear.in_features, spec, learnable, cfg.lwc_init)
        q.to(
            _original(block, name).device
            if parametrize.is_parametrized(linear, "weight")
            else linear.weight.device
        )
        parametrize.register_parametrization(linear, "weight", q, unsafe=True)
        _original(block, name).requires_grad_(cfg.trains and cfg.weight_lr > 0)
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
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            value = getattr(module, tensor_name)
            if not torch.isfinite(value).all():
                raise CalibrationError(f"non-finite {tensor_name} after folding {name}")
            value.requires_grad_(False)


def record_qparams(block: nn.Module, bq: BlockQuant, spec: WeightQuant) -> None:
    """Keep each folded linear's grid (scales, zero points) on it, for packed export."""
    for name, q in bq.lwc.items():
        if q.last_params is not None:
            linear = block.get_submodule(name)
            try:
                setattr(linear, QPARAMS_ATTR, from_affine(q.last_params, spec, linear.in_features))
            except ExportError as e:
                log.warning("%s: no packed export for this layer: %s", name, e)


def _original(block: nn.Module, name: str) -> nn.Parameter:
    """The float weight under a linear's parametrizations."""
    return block.get_submodule(name).parametrizations.weight.original


@dataclass
class BlockQuant:
    """What is attached to one block while it is calibrated: LWC per linear, LET (optional)."""

    lwc: dict[str, LWC]
    let: LetParams | None = None

    def param_groups(
        self, block: nn.Module, cfg: CalibConfig, lr_scale: float
    ) -> list[dict[str, Any]]:
        """AdamW groups: LWC, LET and (with `weight_lr` > 0) the block's float weights."""
        lwc = [p for q in self.lwc.values() for p in q.parameters() if p.requires_grad]
        groups = [{"params": lwc, "lr": cfg.lwc_lr * lr_scale}]
        if self.let is not None and cfg.method == "omniquant":
            groups.append({"params": list(self.let.parameters()), "lr": cfg.let_lr * lr_scale})
        weights = [_original(block, n) for n in self.lwc if _original(block, n).requires_grad]
        if weights:
            groups.append({"params": weights, "lr": cfg.weight_lr * lr_scale, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def state(self, block: nn.Module) -> dict[str, Any]:
        """What the block learned, on the CPU (for --resume)."""
        lwc = {}
        for name, q in self.lwc.items():
            entry = {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
            if _original(block, name).requires_grad:
                entry["weight"] = _original(block, name).detach().cpu().clone()
            lwc[name] = entry
        let = None if self.let is None else {k: v.cpu() for k, v in self.let.state_dict().items()}
        return {"lwc": lwc, "let": let}

    @torch.no_grad()
    def load(self, block: nn.Module, state: dict[str, Any]) -> None:
        for name, q in self.lwc.items():
            entry = dict(state["lwc"][name])
            if "weight" in entry:
                _original(block, name).copy_(entry.pop("weight"))
            q.load_state_dict(entry)
        if self.let is not None:
            self.let.load_state_dict(state["let"])


def attach_block_quant(
    block: nn.Module,
    spec: WeightQuant,
    cfg: CalibConfig,
    plan: LetPlan | None,
    stats: dict[int, ChannelStats] | None,
) -> BlockQuant:
    """LET parametrizations first (started from activation statistics), then LWC."""
    let = None
    if plan is not None:
        let = LetParams(plan, block).to(next(block.parameters()).device)
        if stats:
            let.init_from_stats(block, stats)
        attach_let(block, let)
    return BlockQuant(attach_quantizers(block, spec, cfg), let)


@torch.no_grad()
def gather_stats(
    block: nn.Module,
    plan: LetPlan,
    inputs: list[torch.Tensor],
    extra: BlockArgs,
    runtime: Runtime,
) -> dict[int, ChannelStats]:
    """Per-channel input statistics of the LET norm sites on the given inputs."""
    stats, handles = stats_hooks(block, plan)
    try:
        run_block_all(block, inputs, extra, runtime)
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
def run_block_all(
    block: nn.Module, inputs: list[torch.Tensor], extra: BlockArgs, runtime: Runtime
) -> list[torch.Tensor]:
    """Run the block on every batch; outputs go back to the CPU in the inputs' dtype."""
    return [
        run_block(block, x.to(runtime.device, torch.float32), extra, runtime).to("cpu", x.dtype)
        for x in inputs
    ]


@torch.no_grad()
def mean_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], weighting: str) -> float:
    pairs = zip(outputs, targets, strict=True)
    return sum(block_loss(o, t, weighting).item() for o, t in pairs) / len(outputs)


# ---------------------------------------------------------------- training one block


@dataclass
class _TrainState:
    lr_scale: float = 1.0
    nan_events: int = 0


def _optimizer(
    block: nn.Module, bq: BlockQuant, cfg: CalibConfig, lr_scale: float
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(bq.param_groups(block, cfg, lr_scale), weight_decay=cfg.wd)


@dataclass
class BlockData:
    """One block's training data, per batch on the CPU, and its extra arguments on the device."""

    inputs_q: list[torch.Tensor]  # X_q
    targets: list[torch.Tensor]  # F(W, X_fp)
    aug_targets: list[torch.Tensor] | None  # F(W, X_q), with aug_loss
    extra: BlockArgs


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


def train_block(
    block: nn.Module,
    bq: BlockQuant,
    data: BlockData,
    cfg: CalibConfig,
    runtime: Runtime,
    seed: int,
) -> tuple[list[float], _TrainState]:
    """AdamW on the block's LWC (and LET, weight) parameters; returns each epoch's mean loss.

    A non-finite loss or gradient restores the last good parameters, halves the learning rate and
    retries the batch, at most `cfg.max_nan_retries` times per block.
    """
    state = _TrainState()
    opt = _optimizer(block, bq, cfg, state.lr_scale)
    params = [p for group in opt.param_groups for p in group["params"]]
    good = [p.detach().clone() for p in params]  # the last parameters with a finite step
    gen = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    bar = tqdm(range(cfg.epochs), desc="  epochs", leave=False, disable=not runtime.progress)
    for _ in bar:
        total = 0.0
        for j in torch.randperm(len(data.inputs_q), generator=gen).tolist():
            loss = _loss(block, j, data, cfg, runtime)
            while not _finite_step(opt, loss):
                state.nan_events += 1
                if state.nan_events > cfg.max_nan_retries:
                    raise CalibrationError(
                        f"the loss stayed non-finite after {cfg.max_nan_retries} retries with a "
                        f"halved learning rate; try a lower --lwc-lr or --dtype float32"
                    )
                state.lr_scale /= 2
                log.warning("non-finite loss: last good parameters back, lr x%.4g", state.lr_scale)
                with torch.no_grad():
                    for g, p in zip(good, params, strict=True):
                        p.copy_(g)
                opt = _optimizer(block, bq, cfg, state.lr_scale)
                loss = _loss(block, j, data, cfg, runtime)
            with torch.no_grad():
                for g, p in zip(good, params, strict=True):
                    g.copy_(p)
            total += loss.item()
        epoch_losses.append(total / len(data.inputs_q))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4g}")
    return epoch_losses, state


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
) -> list[BlockReport]:
    """Quantize every block in place; returns one report per block.

    With `act` enabled, activation quantizers are attached to each block (and stay attached);
    with `let_plan`, LET is learned jointly with LWC and folded.
    """
    store = store or StateStore(None)
    resume_from = store.completed()
    inputs_fp = captured.hidden
    inputs_q = captured.hidden
    reports: list[BlockReport] = []
    bar = tqdm(range(len(blocks)), desc="blocks", disable=not runtime.progress)
    for i in bar:
        t0 = time.perf_counter()
        extra = _extra_on_device(captured.block_args[i], runtime.device)
        saved = store.load(i) if i < resume_from else None
        with _block_on(blocks[i], runtime.device) as block:
            block.requires_grad_(False)
            targets = run_block_all(block, inputs_fp, extra, runtime)
            aug = (
                run_block_all(block, inputs_q, extra, runtime)
                if cfg.aug_loss and cfg.trains and saved is None
                else None
            )
            stats = (
                gather_stats(block, let_plan, inputs_q, extra, runtime)
                if let_plan is not None and saved is None
                else None
            )
            bq = attach_block_quant(block, spec, cfg, let_plan, stats)
            if act is not None and act.enabled:
                attach_act_quantizers(block, act, arch or let_plan.arch, head_dim)
            if saved is not None:
                bq.load(block, saved[0])
                report = saved[1]
            else:
                data = BlockData(inputs_q, targets, aug, extra)
                report = _train_and_report(i, block, bq, data, cfg, runtime)
            params = bq.state(block)
            fold_parametrizations(block)
            record_qparams(block, bq, spec)
            outputs_q = run_block_all(block, inputs_q, extra, runtime)
        if saved is None:
            report.loss_after = mean_loss(outputs_q, targets, cfg.loss)
            if math.isnan(report.loss_before):  # nothing trained: the loss did not change
                report.loss_before = report.loss_after
            report.seconds = time.perf_counter() - t0
            store.save(i, params, report)
        if not math.isfinite(report.loss_after):
            raise CalibrationError(f"block {i}: non-finite output after quantization")
        reports.append(report)
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
        inputs_fp, inputs_q = targets, outputs_q
    return reports


def _train_and_report(
    index: int,
    block: nn.Module,
    bq: BlockQuant,
    data: BlockData,
    cfg: CalibConfig,
    runtime: Runtime,
) -> BlockReport:
    if not cfg.trains:
        return BlockReport(index, loss_before=float("nan"), loss_after=float("nan"), seconds=0.0)
    outputs = run_block_all(block, data.inputs_q, data.extra, runtime)
    before = mean_loss(outputs, data.targets, cfg.loss)
    epoch_losses, state = train_block(block, bq, data, cfg, runtime, seed=cfg.seed + index)
    return BlockReport(
        index,
        loss_before=before,
        loss_after=float("nan"),
        seconds=0.0,
        epoch_losses=epoch_losses,
        nan_events=state.nan_events,
        final_lr_scale=state.lr_scale,
    )

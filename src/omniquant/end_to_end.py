"""End-to-end training of the step sizes (EfficientQAT's E2E-QP), after the block loop.

The block loop fits each block to its float outputs, one block at a time, so no block sees what
its errors do to the blocks after it or to the next-token loss. This stage trains every quantized
linear's scales together, through the whole model, on the next-token loss of the calibration
windows. The integer codes and zero points stay as the block loop left them: the weights stay on
a grid of the same shape (w = (u - z) h, only h changed), so every format writes them as before,
exactly, and a symmetric grid stays symmetric.

The scales train in their own unit: each group's scale is h0 (1 + t), t learned from 0 with AdamW
and a cosine decay over the stage's steps, so `e2e_lr` is a relative step (1e-3: a tenth of a
percent of each scale per step) and means the same in every model. t stays above -0.5.

Memory: a trained linear holds its centered codes (int8; int16 at 8 bits) and its scales; its
float weight is rebuilt in each forward and again in backward (`StepLinearFunction`), never kept
for the backward pass.

The guard, as in the block loop (`guard.Guard`): the held-out windows (the block loop's validation
windows) are scored before training and after every epoch; the best epoch's scales are kept,
training stops after `patience` epochs without a better held-out loss, and when no epoch beats the
start the model keeps its starting scales and the report says so. A non-finite loss skips its
step; after `max_nan_retries` of them the stage stops and the guard puts the best epoch back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from omniquant.config import CalibConfig
from omniquant.guard import Guard, fell_back_message
from omniquant.quant.primitives import from_groups, num_groups, to_groups
from omniquant.quant.qparams import QPARAMS_ATTR, LinearQParams, weight_codes
from omniquant.runtime import Runtime
from omniquant.schedule import lr_factor

log = logging.getLogger(__name__)

MIN_RELATIVE_SCALE = 0.5  # t >= -0.5: a scale never falls below half its start


def group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups): sums over each row's groups (a ragged last group sums the
    columns it has)."""
    out_f, in_f = t.shape
    pad = num_groups(in_f, group_size) * group_size - in_f
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(out_f, -1, group_size).sum(-1)


def grid_weight(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """(u - z) h as an (out, in) float32 weight, from centered codes (u - z) and scales."""
    cg = to_groups(codes.float(), group_size)
    return from_groups(cg * scale.float().unsqueeze(-1), codes.shape[1])


class StepLinearFunction(torch.autograd.Function):
    """y = x W(h)^T + b with W(h) = (u - z) h rebuilt from the codes in forward and in backward;
    gradients for x and h only (codes, bias: frozen)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, codes, scale)
        ctx.group_size = group_size
        w = grid_weight(codes, scale, group_size)
        dtype = torch.get_autocast_dtype(x.device.type) if _autocasting(x) else x.dtype
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), w.to(dtype), b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, codes, scale = ctx.saved_tensors
        w = grid_weight(codes, scale, ctx.group_size)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w.to(grad.dtype)).to(x.dtype)
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        x2 = x.reshape(-1, x.shape[-1]).float()
        grad_w = g2.t() @ x2  # (out, in)
        grad_scale = group_sum(grad_w * codes.float(), ctx.group_size)
        return grad_x, None, grad_scale, None, None


def _autocasting(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


class StepLinear(nn.Module):
    """A quantized linear whose scales train: h = h0 (1 + t); codes and zero points frozen."""

    def __init__(self, linear: nn.Linear, qp: LinearQParams) -> None:
        super().__init__()
        device = linear.weight.device
        self.qp = qp
        codes = to_groups(weight_codes(linear.weight, qp).float(), qp.group)
        centered = from_groups(codes - qp.zero.float().unsqueeze(-1), qp.in_features)
        dtype = torch.int8 if qp.bits < 8 else torch.int16
        self.register_buffer("codes", centered.to(dtype).to(device))
        self.register_buffer("scale0", qp.scale.float().to(device))
        self.t = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def scale(self) -> torch.Tensor:
        return self.scale0 * (1 + self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return StepLinearFunction.apply(x, self.codes, self.scale(), bias, self.qp.group)

    @torch.no_grad()
    def bound(self) -> None:
        self.t.clamp_(min=MIN_RELATIVE_SCALE - 1)

    def write_back(self, linear: nn.Linear) -> None:
        """Put the trained grid into the original linear: weight (u - z) h and its scales."""
        scale = self.scale().detach()
        with torch.no_grad():
            w = grid_weight(self.codes, scale, self.qp.group)
            linear.weight.data = w.to(linear.weight.dtype)
        setattr(linear, QPARAMS_ATTR, replace(self.qp, scale=scale.float().cpu().contiguous()))


@dataclass
class EndToEndReport:
    """What the stage did (the run report's `end_to_end` section)."""

    epochs: int  # configured
    lr: float
    loss: str
    linears: int = 0
    scales: int = 0
    val_losses: list[float] = field(default_factory=list)  # [start, epoch 1, ...]
    best_epoch: int = 0
    fell_back: bool = False
    stopped_early: bool = False
    nan_events: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attach_step_linears(model: nn.Module) -> list[tuple[str, nn.Linear, StepLinear]]:
    """Replace every linear that carries a grid by a `StepLinear` (in place); returns
    (name, original, replacement) for `detach_step_linears`."""
    swapped = []
    for name, module in list(model.named_modules()):
        qp = getattr(module, QPARAMS_ATTR, None)
        if qp is None or not isinstance(module, nn.Linear):
            continue
        step = StepLinear(module, qp)
        model.set_submodule(name, step)
        swapped.append((name, module, step))
    return swapped


def detach_step_linears(
    model: nn.Module, swapped: Sequence[tuple[str, nn.Linear, StepLinear]]
) -> None:
    """Put the original linears back, carrying the trained grids."""
    for name, linear, step in swapped:
        step.write_back(linear)
        model.set_submodule(name, linear)


@dataclass(frozen=True)
class TeacherTargets:
    """The float model's `k` most likely next tokens at every position of one batch of windows:
    their probabilities (B, T, k) and ids (B, T, k); the rest of the vocabulary is one more
    outcome, of probability 1 - sum(probs)."""

    probs: torch.Tensor
    ids: torch.Tensor


@torch.no_grad()
def teacher_targets(
    model: nn.Module, batches: Sequence[torch.Tensor], k: int, runtime: Runtime
) -> list[TeacherTargets]:
    """The float model's top-k next-token distributions over `batches`, kept on the CPU (taken
    before the block loop changes the weights; 36 windows of 512 at k = 64 are 14 MB)."""
    home = next(model.parameters()).device
    model.to(runtime.device)
    out = []
    try:
        for ids in batches:
            with runtime.autocast():
                logits = model(input_ids=ids.to(runtime.device), use_cache=False).logits
            top, idx = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
            out.append(TeacherTargets(top.exp().cpu(), idx.to(torch.int32).cpu()))
    finally:
        model.to(home)
    return out


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of windows, in float32."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def distill_loss(model: nn.Module, ids: torch.Tensor, target: TeacherTargets) -> torch.Tensor:
    """Mean cross-entropy from the float model's next-token distribution to the model's, in
    float32, over k + 1 outcomes: the teacher's top k tokens and the rest of the vocabulary taken
    together (so the model keeps the tail's mass where the teacher has it: the KL divergence of
    the two distributions coarsened to those outcomes, up to the teacher's constant entropy)."""
    logits = model(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, target.ids.to(logp.device, torch.int64))  # (B, T, k)
    probs = target.probs.to(logp.device)
    rest_p = (1 - probs.sum(-1)).clamp(min=0)
    rest_logq = torch.log((1 - picked.exp().sum(-1)).clamp(min=1e-12))
    return -((probs * picked).sum(-1) + rest_p * rest_logq).mean()


def stage_loss(model: nn.Module, ids: torch.Tensor, target: TeacherTargets | None) -> torch.Tensor:
    """The stage's loss on one batch: distillation with a teacher's targets, else next-token."""
    return next_token_loss(model, ids) if target is None else distill_loss(model, ids, target)


@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    runtime: Runtime,
    targets: Sequence[TeacherTargets] | None = None,
) -> float:
    total = 0.0
    for i, ids in enumerate(batches):
        with runtime.autocast():
            target = None if targets is None else targets[i]
            total += float(stage_loss(model, ids.to(runtime.device), target))
    return total / len(batches)


def train_step_sizes(
    model: nn.Module,
    train: Sequence[torch.Tensor],
    val: Sequence[torch.Tensor],
    cfg: CalibConfig,
    runtime: Runtime,
    teacher: Sequence[TeacherTargets] | None = None,
) -> EndToEndReport:
    """Train every gridded linear's scales on `train` (batches of token ids), guarded by `val`:
    on the next-token loss, or with `teacher` (the float model's targets for train + val, in
    that order) on the distillation loss. The model is changed in place and moved to
    `runtime.device` for the stage and back. See the module docstring."""
    report = EndToEndReport(epochs=cfg.e2e_epochs, lr=cfg.e2e_lr, loss=cfg.e2e_loss)
    if (teacher is None) != (cfg.e2e_loss == "next-token"):
        raise ValueError(f"e2e_loss {cfg.e2e_loss!r} with{'out' * (teacher is None)} a teacher")
    if teacher is not None and len(teacher) != len(train) + len(val):
        raise ValueError(f"{len(teacher)} teacher targets for {len(train) + len(val)} batches")
    t_train = None if teacher is None else list(teacher[: len(train)])
    t_val = None if teacher is None else list(teacher[len(train) :])
    home = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the loss is the one the model is scored on
    swapped = attach_step_linears(model)
    if not swapped:
        raise ValueError("the end-to-end stage found no quantized linear to train")
    t0 = time.perf_counter()
    try:
        model.to(runtime.device)
        params = [step.t for _, _, step in swapped]
        report.linears, report.scales = len(params), sum(p.numel() for p in params)
        start = held_out_loss(model, val, runtime, t_val) if val else math.nan
        guard = Guard(params, start, cfg.patience)
        opt = torch.optim.AdamW(params, lr=cfg.e2e_lr, weight_decay=0.0)
        total = cfg.e2e_epochs * len(train)
        gen = torch.Generator().manual_seed(cfg.seed)
        bar = tqdm(total=total, desc="end-to-end", disable=not runtime.progress)
        step = 0
        for _epoch in range(cfg.e2e_epochs):
            for i in torch.randperm(len(train), generator=gen).tolist():
                for group in opt.param_groups:
                    group["lr"] = cfg.e2e_lr * lr_factor(step, total, "cosine")
                with runtime.autocast():
                    target = None if t_train is None else t_train[i]
                    loss = stage_loss(model, train[i].to(runtime.device), target)
                opt.zero_grad(set_to_none=True)
                if torch.isfinite(loss):
                    loss.backward()
                    opt.step()
                    for _, _, s in swapped:
                        s.bound()
                else:
                    report.nan_events += 1
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
                if report.nan_events > cfg.max_nan_retries:
                    break
            if report.nan_events > cfg.max_nan_retries:
                log.warning(
                    "end-to-end: the loss was non-finite %d times; stopping (with held-out "
                    "windows, with the best epoch's scales, else the last finite step's)",
                    report.nan_events,
                )
                break
            if val and guard.update(held_out_loss(model, val, runtime, t_val)):
                report.stopped_early = True
                break
        bar.close()
        if val:
            guard.restore()
            report.val_losses = list(guard.losses)
            report.best_epoch = guard.best_epoch
            report.fell_back = guard.fell_back
            if report.fell_back:
                log.warning(
                    "%s",
                    fell_back_message("end-to-end", guard.losses, "the starting scales are kept"),
                )
    finally:
        detach_step_linears(model, swapped)
        model.to(home)
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    log.info(
        "end-to-end: %d scales of %d linears, held-out loss %s (%.1f s)",
        report.scales,
        report.linears,
        " -> ".join(f"{v:.5g}" for v in report.val_losses) or "n/a",
        report.seconds,
    )
    return report

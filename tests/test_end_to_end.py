"""The end-to-end stage: scales trained through the whole model, codes kept, guarded."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import omniquant
from omniquant import end_to_end
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.end_to_end import (
    StepLinear,
    attach_step_linears,
    detach_step_linears,
    grid_weight,
    group_sum,
    train_step_sizes,
)
from omniquant.errors import ConfigError
from omniquant.quant.primitives import minmax_params, to_groups
from omniquant.quant.qparams import QPARAMS_ATTR, dequantize, from_affine, weight_codes
from omniquant.runtime import Runtime
from tests.conftest import VOCAB, needs_austen, random_ids, tiny_model

RUNTIME = Runtime(progress=False)
NT = "next-token"


def put_on_grid(linear: nn.Linear, bits: int = 4, group: int = 16, symmetric: bool = False):
    """Round a linear's weight to its min-max grid and record the grid (as the block loop does)."""
    spec = WeightQuant(bits, group, symmetric)
    p = minmax_params(to_groups(linear.weight.detach(), group), bits, symmetric)
    qp = from_affine(p, spec, linear.in_features)
    codes = ((to_groups(linear.weight.detach(), group) / p.scale) + p.zero).round()
    codes = codes.clamp(0, 2**bits - 1).reshape(linear.out_features, -1)[:, : linear.in_features]
    with torch.no_grad():
        linear.weight.copy_(dequantize(codes, qp, torch.float32))
    setattr(linear, QPARAMS_ATTR, qp)
    return qp


def gridded_model(family: str = "llama", **grid) -> nn.Module:
    model = tiny_model(family)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}.":
            put_on_grid(m, **grid)
    return model


def test_group_sum_counts_only_the_columns_of_a_ragged_group():
    t = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5)
    assert group_sum(t, 2).tolist() == [[1, 5, 4], [11, 15, 9]]


@pytest.mark.parametrize("bias", [False, True])
def test_step_linear_gradients_equal_autograd_of_the_plain_composition(bias):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=bias)  # 40 = 2 x 16 + 8: a ragged last group
    qp = put_on_grid(lin, group=16)
    step = StepLinear(lin, qp)
    with torch.no_grad():
        step.t.normal_(0, 0.05)
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = step(x)
    (y.sin().sum()).backward()
    gx, gt = x.grad.clone(), step.t.grad.clone()
    # the same through plain autograd
    x2 = x.detach().clone().requires_grad_(True)
    t2 = step.t.detach().clone().requires_grad_(True)
    w = grid_weight(step.codes, step.scale0 * (1 + t2), 16)
    y2 = F.linear(x2, w, None if lin.bias is None else lin.bias.detach())
    (y2.sin().sum()).backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gt, t2.grad, rtol=1e-4, atol=1e-5)
    assert gt.abs().sum() > 0


def test_step_linear_at_its_start_is_the_linear_and_keeps_codes_on_write_back():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    qp = put_on_grid(lin, group=16)
    codes = weight_codes(lin.weight, qp)
    step = StepLinear(lin, qp)
    x = torch.randn(4, 40)
    torch.testing.assert_close(step(x), lin(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        step.t.fill_(0.1)
    step.write_back(lin)
    new = getattr(lin, QPARAMS_ATTR)
    torch.testing.assert_close(new.scale, qp.scale * 1.1)
    assert torch.equal(new.zero, qp.zero)
    assert torch.equal(weight_codes(lin.weight, new), codes)  # same codes, new step sizes


def test_attach_and_detach_leave_an_untrained_model_unchanged():
    model = gridded_model()
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    swapped = attach_step_linears(model)
    assert len(swapped) == 2 * 7  # two blocks of q, k, v, o, gate, up, down
    assert all(isinstance(model.get_submodule(n), StepLinear) for n, _, _ in swapped)
    with torch.no_grad():
        during = model(ids).logits
    detach_step_linears(model, swapped)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    return list(random_ids(n, 24, seed).split(1))


def _grids(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: getattr(m, QPARAMS_ATTR).scale.clone()
        for n, m in model.named_modules()
        if hasattr(m, QPARAMS_ATTR)
    }


def test_training_lowers_the_loss_it_is_guarded_by_and_keeps_every_weight_on_its_grid():
    model = gridded_model()
    codes = {n: weight_codes(m.weight, getattr(m, QPARAMS_ATTR)) for n, m in _linears(model)}
    start = _grids(model)
    train = _batches(4, 0)
    cfg = CalibConfig(e2e_epochs=3, e2e_lr=0.02, patience=0, e2e_loss=NT)
    report = train_step_sizes(model, train, train, cfg, RUNTIME)
    assert report.linears == 14 and report.scales == sum(s.numel() for s in start.values())
    assert len(report.val_losses) == 4 and report.best_epoch > 0 and not report.fell_back
    assert report.val_losses[report.best_epoch] < report.val_losses[0]
    after = _grids(model)
    assert any(not torch.equal(after[n], start[n]) for n in start)
    for name, m in _linears(model):
        qp = getattr(m, QPARAMS_ATTR)
        assert torch.equal(weight_codes(m.weight, qp), codes[name])
        assert isinstance(m, nn.Linear)
    # the held-out loss the report quotes is the model's now
    now = end_to_end.held_out_loss(model, train, RUNTIME)
    assert now == pytest.approx(report.val_losses[report.best_epoch], rel=1e-5)


def _linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, QPARAMS_ATTR)]


def test_distillation_moves_the_quantized_model_towards_the_float_one():
    float_model = tiny_model("llama")
    model = gridded_model()
    train = _batches(4, 0)
    val = train  # the loss it trains is the loss it is scored on
    teacher = end_to_end.teacher_targets(float_model, train + val, 16, RUNTIME)
    assert teacher[0].probs.shape == (1, 24, 16) and teacher[0].ids.dtype == torch.int32
    assert ((teacher[0].probs.sum(-1) > 0) & (teacher[0].probs.sum(-1) < 1)).all()  # a tail
    with torch.no_grad():  # the float model's top token comes first
        top = float_model(train[0]).logits.argmax(-1)
    assert torch.equal(teacher[0].ids[..., 0].long(), top)
    # with the whole vocabulary as the top k, the loss is the cross-entropy to the teacher
    full = end_to_end.teacher_targets(float_model, train[:1], VOCAB, RUNTIME)[0]
    with torch.no_grad():
        p = torch.softmax(float_model(train[0]).logits, -1)
        logq = torch.log_softmax(model(train[0]).logits, -1)
        loss = end_to_end.distill_loss(model, train[0], full)
    assert float(loss) == pytest.approx(float(-(p * logq).sum(-1).mean()), rel=1e-4)
    cfg = CalibConfig(e2e_epochs=3, e2e_lr=0.02, patience=0)
    report = train_step_sizes(model, train, val, cfg, RUNTIME, teacher)
    assert report.loss == "distill" and report.best_epoch > 0
    assert report.val_losses[report.best_epoch] < report.val_losses[0]
    with pytest.raises(ValueError, match="teacher"):  # the loss and the targets must agree
        train_step_sizes(model, train, val, cfg, RUNTIME)
    with pytest.raises(ValueError, match="teacher targets"):
        train_step_sizes(model, train, val, cfg, RUNTIME, teacher[:-1])


def test_the_guard_keeps_the_starting_scales_when_training_only_hurts():
    model = gridded_model()
    start = {n: m.weight.detach().clone() for n, m in _linears(model)}
    scales = _grids(model)
    cfg = CalibConfig(
        e2e_epochs=3, e2e_lr=50.0, patience=2, e2e_loss=NT
    )  # a deliberately absurd rate
    report = train_step_sizes(model, _batches(4, 0), _batches(2, 1), cfg, RUNTIME)
    assert report.fell_back and report.best_epoch == 0
    assert report.stopped_early and len(report.val_losses) == 3  # start + 2 stale epochs
    assert all(v > report.val_losses[0] for v in report.val_losses[1:])
    for n, m in _linears(model):
        assert torch.equal(m.weight, start[n])
        assert torch.equal(getattr(m, QPARAMS_ATTR).scale, scales[n])


def test_non_finite_losses_stop_the_stage_with_the_start(monkeypatch):
    model = gridded_model()
    start = {n: m.weight.detach().clone() for n, m in _linears(model)}
    real = end_to_end.next_token_loss

    def nan_loss(model, ids):
        return real(model, ids) * float("nan")

    monkeypatch.setattr(end_to_end, "next_token_loss", nan_loss)
    cfg = CalibConfig(e2e_epochs=2, max_nan_retries=2, e2e_loss=NT)
    report = train_step_sizes(model, _batches(4, 0), [], cfg, RUNTIME)
    assert report.nan_events == 3 and report.val_losses == []
    for n, m in _linears(model):
        assert torch.equal(m.weight, start[n])


def test_the_stage_is_deterministic_under_a_seed():
    runs = []
    for _ in range(2):
        model = gridded_model()
        cfg = CalibConfig(e2e_epochs=1, e2e_lr=0.01, seed=3, e2e_loss=NT)
        train_step_sizes(model, _batches(3, 0), [], cfg, RUNTIME)
        runs.append(_grids(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_symmetric_grids_stay_symmetric():
    model = gridded_model(symmetric=True)
    zeros = {n: getattr(m, QPARAMS_ATTR).zero.clone() for n, m in _linears(model)}
    train_step_sizes(
        model, _batches(2, 0), [], CalibConfig(e2e_epochs=1, e2e_lr=0.02, e2e_loss=NT), RUNTIME
    )
    for n, m in _linears(model):
        assert torch.equal(getattr(m, QPARAMS_ATTR).zero, zeros[n])
        assert (getattr(m, QPARAMS_ATTR).zero == 8).all()


def test_settings_the_stage_cannot_run_are_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="weight-only"):
        OmniQuantConfig(WeightQuant(4), ActQuant(8), CalibConfig(e2e_epochs=1))
    with pytest.raises(ConfigError, match="e2e_lr"):
        CalibConfig(e2e_epochs=1, e2e_lr=0)
    with pytest.raises(ConfigError, match="e2e_epochs"):
        CalibConfig(e2e_epochs=-1)
    with pytest.raises(ConfigError, match="e2e_loss"):
        CalibConfig(e2e_epochs=1, e2e_loss="kl")
    with pytest.raises(ConfigError, match="e2e_topk"):
        CalibConfig(e2e_epochs=1, e2e_topk=0)
    cfg = OmniQuantConfig(WeightQuant(4, 32), calib=CalibConfig(e2e_epochs=1))
    missing = tmp_path / "no-such-model"  # refused before anything looks at the model
    with pytest.raises(ConfigError, match="`stream`"):
        omniquant.quantize(missing, cfg, output=tmp_path / "q", stream=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_rtn_runs_get_held_out_windows_for_the_stage():
    assert CalibConfig(method="rtn", nsamples=16).val_windows == 0
    assert CalibConfig(method="rtn", nsamples=16, e2e_epochs=1).val_windows == 2


@needs_austen
def test_quantize_with_the_stage_reports_it_and_exports_exactly(tiny_llama_folder, tmp_path):
    calib = CalibConfig(method="rtn", nsamples=8, seqlen=32, e2e_epochs=2, e2e_lr=0.01)
    cfg = OmniQuantConfig(WeightQuant(4, 32), calib=calib)
    out = tmp_path / "q"
    omniquant.quantize(
        tiny_llama_folder, cfg, output=out, format="omniquant-packed", progress=False
    )
    report = json.loads((out / "omniquant.json").read_text())
    e2e = report["end_to_end"]
    assert e2e["linears"] == 14 and len(e2e["val_losses"]) >= 2
    assert all(math.isfinite(v) for v in e2e["val_losses"])
    assert "end-to-end scales" in (out / "report.md").read_text()
    # the packed folder (written from codes and the trained scales) gives the trained model
    fake = omniquant.quantize(tiny_llama_folder, cfg, progress=False).model
    packed, _ = omniquant.load(out)
    ids = random_ids(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)

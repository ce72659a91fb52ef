import math

import pytest
import torch

import omniquant.block_loop as block_loop_mod
from omniquant.block_loop import (
    BlockData,
    Runtime,
    StateStore,
    attach_block_quant,
    block_loss,
    calibrate_blocks,
    epoch_order,
    flush_denormals,
    train_block,
)
from omniquant.capture import BlockArgs, capture_block_inputs
from omniquant.config import ActQuant, CalibConfig, WeightQuant
from omniquant.errors import CalibrationError, ConfigError
from omniquant.guard import Guard
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.quant.primitives import to_groups
from omniquant.transforms.let import attention_shape, plan_let
from tests.conftest import random_ids, tiny_model

SPEC = WeightQuant(bits=3, group_size=16)
RT = Runtime(progress=False)


def _run(family, cfg, store=None, on_block=None, seed=0, act=None, spec=SPEC, val_batches=0):
    model = tiny_model(family, seed=seed)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    windows = random_ids(cfg.nsamples + val_batches * cfg.batch_size, 24)
    cap = capture_block_inputs(model, blocks, list(windows.split(cfg.batch_size)))
    plan = None
    if cfg.let:
        alpha = 0.75 if act is not None and act.enabled else None
        plan = plan_let(arch, model.config, alpha, shifts=act is not None and act.enabled)
    reports = calibrate_blocks(
        blocks,
        cap,
        spec,
        cfg,
        RT,
        store,
        on_block,
        act=act,
        let_plan=plan,
        arch=arch,
        head_dim=attention_shape(model.config, arch).head_dim,
        val_batches=val_batches,
    )
    return model, blocks, reports


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_weight_activation_runs_fold_let_and_keep_activation_quantizers(family):
    """W4A4 / W8A8 with LET: LET is folded into norms and linears (the norm weights move), the
    activation quantizers stay on every block, and 8-bit errors are far below 4-bit ones."""
    base = {"nsamples": 4, "seqlen": 24, "let": True, "epochs": 2, "let_lr": 2e-3}
    losses = {}
    for bits in (4, 8):
        model, blocks, reports = _run(
            family, CalibConfig(**base), act=ActQuant(bits), spec=WeightQuant(bits)
        )
        losses[bits] = sum(r.loss_after for r in reports)
        original = tiny_model(family)
        norm_name = get_architecture(model).attn_norm
        moved = blocks[0].get_submodule(norm_name).weight
        ref = decoder_layers(original, get_architecture(original))[0].get_submodule(norm_name)
        assert not torch.allclose(moved, ref.weight)
        assert all(len(getattr(b, "_omniquant_act_hooks", [])) >= 4 for b in blocks)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(type(m).__name__ != "ParametrizedLinear" for m in model.modules())
    assert losses[8] < 0.1 * losses[4], losses


def test_block_loop_lowers_the_block_error_below_rtn(family):
    torch.manual_seed(0)
    _, _, rtn = _run(family, CalibConfig(method="rtn", nsamples=4, seqlen=24))
    _, blocks, omni = _run(family, CalibConfig(epochs=6, nsamples=4, seqlen=24, lwc_lr=5e-2))
    for r in omni:
        assert r.loss_after < r.loss_before
        assert len(r.epoch_losses) == 6 and r.epoch_losses[-1] < r.epoch_losses[0]
    assert omni[0].loss_after < rtn[0].loss_after
    assert sum(r.loss_after for r in omni) < sum(r.loss_after for r in rtn)
    for r in rtn:
        assert r.loss_before == r.loss_after and r.epoch_losses == []
    # folded: plain weights (no parametrization left) that lie on a 3-bit grid per group
    for linear in block_linears(blocks[1]).values():
        assert type(linear).__name__ == "Linear" and not linear.weight.requires_grad
        groups = to_groups(linear.weight, 16)
        assert (
            max(groups[r, c].unique().numel() for r in range(4) for c in range(groups.shape[1]))
            <= 8
        )


def test_block_loss_token_normalized_weighs_tokens_equally():
    target = torch.ones(1, 3, 4)
    target[0, 0] *= 1000  # a massive first-token activation
    out = target.clone()
    out[0, 0] += 10  # error of 1% on the huge token
    out[0, 1] += 1  # error of 100% on a normal token
    mse = block_loss(out, target, "mse")
    assert mse > 20  # dominated by the huge token
    norm = block_loss(out, target, "token-normalized")
    assert norm == pytest.approx((1e-4 + 1.0 + 0.0) / 3, rel=1e-4)


@pytest.mark.parametrize(
    "weight_lr,let,val_batches",
    [(0.0, False, 0), (0.05, False, 0), (0.0, True, 0), (0.05, False, 1), (0.0, True, 1)],
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    tmp_path, weight_lr, let, val_batches
):
    cfg = CalibConfig(
        epochs=3, nsamples=4, seqlen=24, batch_size=2, weight_lr=weight_lr, let=let, patience=1
    )
    act = ActQuant(8) if let else None
    kw = {"act": act, "val_batches": val_batches}
    whole, _, reports = _run("llama", cfg, StateStore(tmp_path / "a"), **kw)

    def stop_after_first(report):
        if report.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run("llama", cfg, StateStore(tmp_path / "b"), stop_after_first, **kw)
    assert StateStore(tmp_path / "b").completed() == 1
    resumed, _, resumed_reports = _run("llama", cfg, StateStore(tmp_path / "b"), **kw)
    for (name, p), (_, q) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    assert [r.loss_after for r in reports] == [r.loss_after for r in resumed_reports]
    assert [r.val_losses for r in reports] == [r.val_losses for r in resumed_reports]


def test_weight_training_changes_weights_beyond_clipping_and_lowers_the_error():
    cfg = CalibConfig(epochs=4, nsamples=4, seqlen=24, lwc_lr=5e-2)
    _, _, lwc_only = _run("llama", cfg)
    _, _, trained = _run("llama", CalibConfig(**{**cfg.__dict__, "weight_lr": 2e-3}))
    assert sum(r.loss_after for r in trained) < sum(r.loss_after for r in lwc_only)


def _nan_on_calls(linear, calls):
    count = {"n": 0}

    def hook(module, args, output):
        count["n"] += 1
        return output * float("nan") if count["n"] in calls else output

    return linear.register_forward_hook(hook)


def test_a_nan_loss_restores_parameters_halves_the_rate_and_retries():
    model = tiny_model("llama")
    blocks = decoder_layers(model, get_architecture(model))
    cap = capture_block_inputs(model, blocks, list(random_ids(4, 24).split(1)))
    # calls: 1-4 targets, 5-8 "before" pass, 9+ training steps
    handle = _nan_on_calls(blocks[0].mlp.down_proj, {10})
    cfg = CalibConfig(epochs=2, nsamples=4, seqlen=24)
    reports = calibrate_blocks(blocks, cap, SPEC, cfg, RT)
    handle.remove()
    assert reports[0].nan_events == 1 and reports[0].final_lr_scale == 0.5
    assert reports[1].nan_events == 0
    for linear in block_linears(blocks[0]).values():
        assert torch.isfinite(linear.weight).all()


def test_a_loss_that_stays_nan_raises_a_clear_error():
    model = tiny_model("llama")
    blocks = decoder_layers(model, get_architecture(model))
    cap = capture_block_inputs(model, blocks, list(random_ids(2, 16).split(1)))
    _nan_on_calls(blocks[0].mlp.down_proj, set(range(5, 1000)))
    cfg = CalibConfig(epochs=2, nsamples=2, seqlen=16, max_nan_retries=3)
    with pytest.raises(CalibrationError, match="non-finite after 3 retries"):
        calibrate_blocks(blocks, cap, SPEC, cfg, RT)


# ---------------------------------------------------------------- the guard


GUARDED = {"nsamples": 4, "seqlen": 24, "patience": 0}


def test_the_guard_restores_the_start_when_training_only_hurts_the_held_out_loss():
    """A huge weight learning rate makes every epoch worse on the held-out windows: each block
    falls back to its starting quantizers, exactly what an untrained run folds."""
    cfg = CalibConfig(epochs=3, weight_lr=20.0, **GUARDED)
    trained, _, reports = _run("llama", cfg, val_batches=2)
    untrained, _, start = _run("llama", CalibConfig(epochs=0, **GUARDED), val_batches=2)
    for r, s in zip(reports, start, strict=True):
        assert r.fell_back and r.best_epoch == 0 and len(r.val_losses) == 4
        assert all(v > r.val_losses[0] for v in r.val_losses[1:])
        assert r.val_loss_after == pytest.approx(r.val_losses[0], rel=1e-5)
        assert r.loss_after == s.loss_after
    for (name, p), (_, q) in zip(
        trained.state_dict().items(), untrained.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


def test_the_block_report_and_the_log_say_that_a_block_fell_back(caplog):
    cfg = CalibConfig(epochs=1, weight_lr=20.0, **GUARDED)
    with caplog.at_level("WARNING", logger="omniquant.block_loop"):
        _, _, reports = _run("llama", cfg, val_batches=1)
    assert [r.to_dict()["fell_back"] for r in reports] == [True, True]
    assert "block 0: training never beat the starting held-out loss" in caplog.text


@pytest.mark.parametrize("patience,epochs_run", [(1, 1), (2, 2), (0, 4)])
def test_early_stopping_after_patience_epochs_without_improvement(patience, epochs_run):
    cfg = CalibConfig(epochs=4, weight_lr=20.0, **{**GUARDED, "patience": patience})
    _, _, reports = _run("llama", cfg, val_batches=1)
    for r in reports:
        assert len(r.epoch_losses) == epochs_run and len(r.val_losses) == epochs_run + 1
        assert r.stopped_early == (epochs_run < 4)


def test_the_guard_keeps_the_best_epoch():
    """With a moderate weight learning rate the held-out loss is lowest mid-way: the folded block
    scores that epoch's held-out loss, not the last epoch's."""
    cfg = CalibConfig(epochs=6, weight_lr=0.01, **GUARDED)
    _, _, reports = _run("llama", cfg, val_batches=2)
    for r in reports:
        assert r.best_epoch == min(range(len(r.val_losses)), key=r.val_losses.__getitem__)
        assert r.val_loss_after == pytest.approx(r.val_losses[r.best_epoch], rel=1e-4)
    assert any(0 < r.best_epoch < 6 for r in reports)


def test_without_validation_batches_there_is_no_guard():
    _, _, reports = _run("llama", CalibConfig(epochs=2, **GUARDED))
    for r in reports:
        assert r.val_losses == [] and not r.fell_back and math.isnan(r.val_loss_after)
        assert len(r.epoch_losses) == 2


def test_validation_batches_must_leave_a_training_batch():
    model = tiny_model("llama")
    blocks = decoder_layers(model, get_architecture(model))
    cap = capture_block_inputs(model, blocks, list(random_ids(2, 16).split(1)))
    cfg = CalibConfig(epochs=1, nsamples=2, seqlen=16)
    with pytest.raises(CalibrationError, match="leave no training batch"):
        calibrate_blocks(blocks, cap, SPEC, cfg, RT, val_batches=2)


def test_guard_records_losses_and_restores_the_best_parameters():
    p = torch.zeros(3)
    guard = Guard([p], start_loss=1.0, patience=2)
    for value, loss, stop in [(1.0, 0.9, False), (2.0, 0.5, False), (3.0, 0.7, False)]:
        p.fill_(value)
        assert guard.update(loss) is stop
    p.fill_(4.0)
    assert guard.update(float("nan")) is True  # two epochs without improvement
    guard.restore()
    assert guard.best_epoch == 2 and not guard.fell_back and torch.equal(p, torch.full((3,), 2.0))


def test_guard_falls_back_to_the_start():
    p = torch.ones(2)
    guard = Guard([p], start_loss=1.0, patience=0)
    p.fill_(5.0)
    assert guard.update(1.0) is False  # equal is not better
    guard.restore()
    assert guard.fell_back and torch.equal(p, torch.ones(2))


def test_windows_come_in_a_fixed_order_unless_shuffled():
    gen = torch.Generator().manual_seed(0)
    assert epoch_order(5, False, gen) == [0, 1, 2, 3, 4]
    first, second = epoch_order(5, True, gen), epoch_order(5, True, gen)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second


# ---------------------------------------------------------------- scale-aware weight training


def _train_scaled_linear(
    scale: float, bound: float | None = None, epochs: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one linear whose weights (and targets) are multiplied by `scale`; returns its
    offset in quantization steps (delta) and the weight's move divided by its steps."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    teacher = w + 0.3 * torch.randn(8, 32, generator=g)
    block = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False))
    with torch.no_grad():
        block[0].weight.copy_(scale * w)
    xs = [torch.randn(1, 6, 32, generator=g) for _ in range(4)]
    targets = [scale * x @ teacher.T for x in xs]
    cfg = CalibConfig(
        lwc=False, weight_lr=0.05, epochs=epochs, nsamples=4, seqlen=6, weight_bound=bound
    )
    bq = attach_block_quant(block, SPEC, cfg, None, None)
    train_block(block, bq, BlockData(xs, targets, None, BlockArgs((), {})), cfg, RT, seed=0)
    offset = bq.offsets["0"]
    moved = block[0].parametrizations.weight[0](block[0].parametrizations.weight.original)
    steps = to_groups(moved - scale * w, 16) / offset.step
    return offset.delta.detach().clone(), steps.reshape(8, 32)


def test_weight_training_moves_weights_of_any_scale_by_the_same_number_of_steps():
    delta_big, steps_big = _train_scaled_linear(100.0)
    delta_small, steps_small = _train_scaled_linear(0.01)
    assert delta_big.abs().max() > 0.1  # it moved: several optimizer steps of ~0.05 step each
    torch.testing.assert_close(delta_big, delta_small, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(steps_big, steps_small, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(steps_big, delta_big, rtol=1e-4, atol=1e-4)


def test_weight_bound_keeps_every_offset_within_the_bound():
    """Unbounded, 10 epochs at 0.05 steps carry some weights past 0.3 steps; bounded at 0.25,
    none passes it, some sit on it, and the weights really are within 0.25 steps of the start."""
    free, _ = _train_scaled_linear(1.0, None, epochs=10)
    bounded, steps = _train_scaled_linear(1.0, 0.25, epochs=10)
    assert free.abs().max() > 0.3
    assert bounded.abs().max() <= 0.25
    assert steps.abs().max() <= 0.25 + 1e-5
    assert (bounded.abs() == 0.25).any()


def test_weight_bound_must_be_positive():
    with pytest.raises(ConfigError, match="weight_bound"):
        CalibConfig(weight_bound=0.0)


def test_absolute_weight_lr_unit_moves_weights_in_weight_units():
    """--weight-lr-unit absolute: the offset's step is 1, so a block with weights x100 moves by
    the same absolute amount as the original (the step unit moves it 100x further)."""
    from omniquant.quant.weight_training import StepOffset

    w = torch.randn(8, 32)
    spec = WeightQuant(bits=3, group_size=16)
    absolute = StepOffset(w, spec, absolute=True)
    step = StepOffset(w * 100, spec)
    assert torch.equal(absolute.step, torch.ones_like(absolute.step))
    with torch.no_grad():
        absolute.delta.fill_(0.5)
        step.delta.fill_(0.5)
    assert torch.allclose(absolute(w) - w, torch.full_like(w, 0.5))
    assert ((step(w * 100) - w * 100).abs() > 5).all()


# ---------------------------------------------------------------- subnormal floats


def test_subnormal_floats_are_flushed_during_calibration_and_kept_after():
    tiny = torch.tensor([1e-40])  # subnormal in float32
    seen = []
    with flush_denormals():
        seen.append((tiny * 1.0).item())
    assert seen == [0.0]
    assert (tiny * 1.0).item() > 0.0  # PyTorch's default is back


def test_calibration_runs_with_subnormals_flushed(monkeypatch):
    """The block loop runs inside `flush_denormals`: a subnormal computed in a block's forward
    pass reads as zero there."""
    seen = []
    real = block_loop_mod.run_block

    def spy(block, x, extra, runtime):
        seen.append((torch.tensor([1e-40]) * 1.0).item())
        return real(block, x, extra, runtime)

    monkeypatch.setattr(block_loop_mod, "run_block", spy)
    _run("llama", CalibConfig(epochs=1, nsamples=2, seqlen=24))
    assert seen and set(seen) == {0.0}
    assert (torch.tensor([1e-40]) * 1.0).item() > 0.0

import pytest
import torch

from omniquant.calibrate import Runtime, StateStore, block_loss, calibrate_blocks
from omniquant.capture import capture_block_inputs
from omniquant.config import ActQuant, CalibConfig, WeightQuant
from omniquant.errors import CalibrationError
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.quant.primitives import to_groups
from omniquant.transforms.let import attention_shape, plan_let
from tests.conftest import random_ids, tiny_model

SPEC = WeightQuant(bits=3, group_size=16)
RT = Runtime(progress=False)


def _run(family, cfg, store=None, on_block=None, seed=0, act=None, spec=SPEC):
    model = tiny_model(family, seed=seed)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    cap = capture_block_inputs(model, blocks, list(random_ids(4, 24).split(cfg.batch_size)))
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


@pytest.mark.parametrize("weight_lr,let", [(0.0, False), (1e-3, False), (0.0, True)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, weight_lr, let):
    cfg = CalibConfig(epochs=2, nsamples=4, seqlen=24, batch_size=2, weight_lr=weight_lr, let=let)
    act = ActQuant(8) if let else None
    whole, _, reports = _run("llama", cfg, StateStore(tmp_path / "a"), act=act)

    def stop_after_first(report):
        if report.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run("llama", cfg, StateStore(tmp_path / "b"), stop_after_first, act=act)
    assert StateStore(tmp_path / "b").completed() == 1
    resumed, _, resumed_reports = _run("llama", cfg, StateStore(tmp_path / "b"), act=act)
    for (name, p), (_, q) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    assert [r.loss_after for r in reports] == [r.loss_after for r in resumed_reports]


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

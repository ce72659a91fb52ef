"""Fused mixture-of-experts weights (transformers 5's 3-D `gate_up_proj` / `down_proj`) are
quantized weights: on the grid per expert row and group, trained by the block loop with the
model's own routing, folded into the tensors the model's code reads, counted by the coverage."""

from __future__ import annotations

import pytest
import torch
import transformers as t

import omniquant
from omniquant.block_loop import attach_offsets, attach_quantizers, weight_sites
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError, ExportError
from omniquant.quant.experts import EXPERT_QPARAMS, expert_weights
from omniquant.quant.qparams import dequantize, weight_codes
from tests.formats.test_gguf import byte_bpe_tokenizer
from tests.test_coverage import MOE

FAMILIES = ["MixtralConfig", "Qwen3MoeConfig"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


def moe(config_class: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = getattr(t, config_class)(**{**MOE, "vocab_size": vocab, "hidden_size": 64})
    model = t.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # weights of a realistic spread, so rounding shows in the losses
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def _config(method: str = "omniquant", **calib) -> OmniQuantConfig:
    calib = {"epochs": 2, "nsamples": 4, "seqlen": 32, "batch_size": 2, **calib}
    return OmniQuantConfig(WeightQuant(3, 16), calib=CalibConfig(method=method, **calib))


def test_the_expert_tensors_are_found_and_not_the_parametrizations_inner_ones(tokenizer):
    block = moe("MixtralConfig", len(tokenizer)).model.layers[0]
    assert set(expert_weights(block)) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    attach_offsets(block, WeightQuant(3, 16))  # weight training, then LWC: both see experts
    attach_quantizers(block, WeightQuant(3, 16), CalibConfig())
    assert set(expert_weights(block)) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    sites = weight_sites(block)
    assert sites["mlp.experts.gate_up_proj"].rows == 4 * block.mlp.experts.gate_up_proj.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_end_on_the_grid_and_train(family, tokenizer):
    base = moe(family, len(tokenizer))
    model = moe(family, len(tokenizer))
    report = omniquant.quantize(model, _config(), tokenizer=tokenizer, progress=False).report
    assert report["coverage"]["float_share"] == 0.0 and report["coverage"]["quantized"]["experts"]
    for block in model.model.layers:
        experts = block.mlp.experts
        grids = getattr(experts, EXPERT_QPARAMS)
        for attr in ("gate_up_proj", "down_proj"):
            w = getattr(experts, attr).detach()
            matrix = w.reshape(-1, w.shape[-1])
            qp = grids[attr]
            codes = weight_codes(matrix, qp)  # refuses off-grid weights
            assert int(codes.max()) <= 7
            assert torch.equal(dequantize(codes, qp, torch.float32), matrix)
            assert not torch.equal(w, getattr(base.model.layers[0].mlp.experts, attr))
    trained = report["blocks"]
    assert all(b["loss_after"] <= b["loss_before"] for b in trained)  # no block ends worse
    assert trained[0]["loss_after"] < trained[0]["loss_before"]  # the experts' clipping learned


def test_weight_training_moves_the_experts_too(tokenizer):
    model = moe("Qwen3MoeConfig", len(tokenizer))
    rtn = moe("Qwen3MoeConfig", len(tokenizer))
    rtn.load_state_dict(model.state_dict())
    omniquant.quantize(rtn, _config("rtn"), tokenizer=tokenizer, progress=False)
    omniquant.quantize(model, _config(weight_lr=0.05), tokenizer=tokenizer, progress=False)
    a = model.model.layers[0].mlp.experts.down_proj
    b = rtn.model.layers[0].mlp.experts.down_proj
    assert (a != b).float().mean() > 0.01  # other grid points than round-to-nearest's


def test_the_fake_format_keeps_the_quantized_experts(tokenizer, tmp_path):
    moe("MixtralConfig", len(tokenizer)).save_pretrained(tmp_path / "f")
    tokenizer.save_pretrained(tmp_path / "f")
    out = tmp_path / "q"
    result = omniquant.quantize(tmp_path / "f", _config("rtn"), output=out, progress=False)
    loaded, _ = omniquant.load(out)
    ids = torch.randint(3, len(tokenizer), (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-5)
    w = loaded.model.layers[1].mlp.experts.gate_up_proj
    assert max(len(torch.unique(g)) for g in w.detach().reshape(-1, 16)) <= 8  # 3 bits


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"format": "omniquant-packed"}, ExportError, "cannot hold fused mixture-of-experts"),
        ({"format": "compressed-tensors"}, ExportError, "cannot hold fused mixture-of-experts"),
        ({"act": ActQuant(8, quantize_qkv=False)}, ConfigError, "weight-only so far"),
        ({"e2e": True}, ConfigError, "would be left out"),
        ({"group": 32}, ConfigError, "larger than the experts' input width 16"),
    ],
)
def test_what_experts_cannot_have_yet_is_refused_before_calibration(
    settings, error, message, tokenizer, tmp_path, monkeypatch
):
    from omniquant.pipeline import quantize as quantize_step

    calls = []
    monkeypatch.setattr(quantize_step, "calibrate_blocks", lambda *a, **k: calls.append(a))
    calib = CalibConfig(epochs=1, nsamples=2, seqlen=32, e2e_epochs=1 if "e2e" in settings else 0)
    config = OmniQuantConfig(
        WeightQuant(4, settings.get("group", 16)), settings.get("act", ActQuant()), calib
    )
    with pytest.raises(error, match=message):
        omniquant.quantize(
            moe("Qwen3MoeConfig", len(tokenizer)),
            config,
            tokenizer=tokenizer,
            output=tmp_path / "q",
            format=settings.get("format", "fake"),
            progress=False,
        )
    assert not calls and not (tmp_path / "q").exists()


def test_streaming_fused_experts_is_refused_before_loading(tokenizer, tmp_path):
    moe("MixtralConfig", len(tokenizer)).save_pretrained(tmp_path / "f")
    tokenizer.save_pretrained(tmp_path / "f")
    with pytest.raises(ConfigError, match="`stream` reads the checkpoint's tensors as they are"):
        omniquant.quantize(
            tmp_path / "f", _config("rtn"), output=tmp_path / "q", stream=True, progress=False
        )
    assert not (tmp_path / "q").exists()


def test_experts_stored_input_first_are_grouped_along_their_input(tokenizer):
    """gpt-oss keeps its experts [E, in, out] (its code computes x @ W[e]): the grid's groups
    run along each expert's input there too."""
    from omniquant.quant.experts import stacked_view, unstack

    w = torch.randn(3, 8, 5)
    assert torch.equal(unstack(stacked_view(w, True), w.shape, True), w)
    assert stacked_view(w, True).shape == (15, 8)
    config = t.GptOssConfig(**{**MOE, "vocab_size": len(tokenizer), "hidden_size": 64})
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).eval()
    found = expert_weights(model.model.layers[0])
    assert found["mlp.experts.gate_up_proj"].transposed
    assert found["mlp.experts.gate_up_proj"].in_features == 64
    report = omniquant.quantize(model, _config("rtn"), tokenizer=tokenizer, progress=False).report
    assert report["coverage"]["float_share"] == 0.0
    experts = model.model.layers[0].mlp.experts
    qp = getattr(experts, EXPERT_QPARAMS)["gate_up_proj"]
    weight_codes(stacked_view(experts.gate_up_proj.detach(), True), qp)  # on the grid


def test_the_tokens_each_expert_receives_are_counted_and_reported(tokenizer):
    model = moe("MixtralConfig", len(tokenizer))
    config = _config("rtn", nsamples=4, batch_size=2)
    report = omniquant.quantize(model, config, tokenizer=tokenizer, progress=False).report
    windows = config.calib.windows
    for block in report["blocks"]:
        tokens = block["expert_tokens"]
        assert tokens["experts"] == 4 and tokens["min"] <= tokens["median"] <= tokens["max"]
        assert tokens["routed"] == windows * config.calib.seqlen * 2  # every token to top-2
    run = report["expert_tokens"]
    assert run["max"] == max(b["expert_tokens"]["max"] for b in report["blocks"])

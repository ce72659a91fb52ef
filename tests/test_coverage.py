"""A run never quantizes part of a model silently: coverage by kind is measured on the skeleton,
reported, and a run that would leave more than 1% of its weights in float (outside embeddings,
router and head) is refused before loading, naming the modules, unless they are named to keep."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as t

import omniquant
from omniquant import cli
from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.coverage import check_coverage, layer_pattern, measure_coverage, weight_kind
from omniquant.errors import ConfigError
from omniquant.models import get_architecture
from omniquant.pipeline import source
from tests.conftest import FAMILIES, needs_austen, tiny_model

MOE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    head_dim=8,
    max_position_embeddings=128,
)


def moe_model(config_class: str) -> torch.nn.Module:
    with torch.device("meta"):
        return t.AutoModelForCausalLM.from_config(getattr(t, config_class)(**MOE))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_family_is_quantized_whole(family):
    model = tiny_model(family)
    coverage = check_coverage(measure_coverage(model, get_architecture(model)))
    assert coverage.float_share == 0.0 and not coverage.float_modules
    assert coverage.quantized["attention"] > 0 and coverage.quantized["mlp"] > 0
    assert set(coverage.floating) <= {"embeddings", "head"}


def test_a_quantized_head_counts_as_quantized():
    model = tiny_model("llama")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    arch = get_architecture(model)
    assert "head" in measure_coverage(model, arch).floating
    assert "head" in measure_coverage(model, arch, quantize_lm_head=True).quantized


MAMBA = dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, time_step_rank=16)


def mamba(vocab: int = 128, device: str = "meta") -> torch.nn.Module:
    """A tiny Mamba: its mixers' A_log and depthwise convolution are weights that are not
    nn.Linear (4.8% of this tiny model's weights; under 1% at real sizes)."""
    with torch.device(device):
        return t.AutoModelForCausalLM.from_config(t.MambaConfig(vocab_size=vocab, **MAMBA))


@pytest.mark.parametrize("config_class", ["MixtralConfig", "Qwen3MoeConfig"])
def test_fused_experts_count_as_quantized(config_class):
    model = moe_model(config_class)
    coverage = check_coverage(measure_coverage(model, get_architecture(model)))
    assert coverage.float_share == 0.0 and coverage.quantized["experts"] > 0
    assert set(coverage.floating) == {"router", "head", "embeddings"}


def test_weights_left_float_are_refused_naming_the_modules():
    model = mamba()
    coverage = measure_coverage(model, get_architecture(model))
    assert coverage.float_share == pytest.approx(1 / 21)
    with pytest.raises(ConfigError) as refused:
        check_coverage(coverage)
    message = str(refused.value)
    assert "4.8% of the weights outside router, head, embeddings" in message
    assert "backbone.layers.0.mixer (attention)" in message
    assert "`keep_float` (e.g. 'backbone.layers.*.mixer')" in message
    kept = check_coverage(coverage, ("backbone.layers.*.mixer*",))
    assert kept.kept[:2] == ("backbone.layers.0.mixer", "backbone.layers.0.mixer.conv1d")
    assert "kept float as asked" in kept.summary()


def test_a_float_share_under_the_limit_passes_and_over_it_is_refused():
    model = tiny_model("llama")
    coverage = measure_coverage(model, get_architecture(model))
    counted = coverage.counted
    small = dict(coverage.float_modules, x=("other", counted // 200))  # 0.5%
    check_coverage(type(coverage)(coverage.quantized, {"other": counted // 200}, small))
    large = dict(coverage.float_modules, x=("other", counted // 50))  # 2%
    with pytest.raises(ConfigError, match=r"2\.0% of the weights"):
        check_coverage(type(coverage)(coverage.quantized, {"other": counted // 50}, large))


def test_kinds_by_path():
    linear = torch.nn.Linear(2, 2)
    assert weight_kind("model.layers.0.mlp.gate", linear) == "router"
    assert weight_kind("model.layers.0.mlp.gate_proj", linear) == "mlp"
    assert weight_kind("model.layers.0.mlp.shared_expert.up_proj", linear) == "shared_experts"
    assert weight_kind("model.layers.0.mlp.experts.3.w1", linear) == "experts"
    assert weight_kind("model.layers.0.linear_attn.in_proj_qkvz", linear) == "attention"
    assert weight_kind("model.layers.0.self_attn.q_proj", linear) == "attention"
    assert weight_kind("model.layers.0.conv", linear) == "other"
    opt = get_architecture(tiny_model("opt"))  # the record names fc1/fc2 as the MLP
    assert weight_kind("model.decoder.layers.1.fc1", linear, opt) == "mlp"
    assert weight_kind("model.decoder.embed_positions", linear, opt) == "other"
    assert layer_pattern("model.layers.17.mlp.experts") == "model.layers.*.mlp.experts"


def test_quantize_refuses_a_partial_run_before_loading(tmp_path, monkeypatch):
    folder = tmp_path / "mamba"
    mamba(device="cpu").save_pretrained(folder)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(source, "load_model", refuse)
    config = OmniQuantConfig(WeightQuant(4, 16), calib=CalibConfig(epochs=1, nsamples=2, seqlen=32))
    with pytest.raises(ConfigError, match=r"4\.8% of the weights"):
        omniquant.quantize(folder, config, output=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


@needs_austen
def test_the_run_reports_its_coverage(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", tiny_llama_folder, "--output", out, "--group-size", "32"]
    argv += ["--epochs", "1", "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "quantized 100.0% of the weights outside router, head, embeddings" in printed
    coverage = json.loads((out / "omniquant.json").read_text())["coverage"]
    assert coverage["float_share"] == 0.0 and coverage["quantized"]["attention"] > 0
    assert coverage["float"] == {"embeddings": coverage["float"]["embeddings"]}  # tied head


@needs_austen
def test_keep_float_runs_with_the_named_modules_float_and_says_so(tmp_path, tokenizer, capsys):
    folder = tmp_path / "mamba"
    mamba(len(tokenizer), device="cpu").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["quantize", "--model", folder, "--output", tmp_path / "q", "--group-size", "16"]
    argv += ["--epochs", "1", "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert cli.main([str(a) for a in argv]) == 2
    assert "4.8% of the weights" in capsys.readouterr().err
    assert cli.main([str(a) for a in [*argv, "--keep-float", "backbone.layers.*.mixer*"]]) == 0
    assert "kept float as asked: backbone.layers.0.mixer" in capsys.readouterr().out
    coverage = json.loads((tmp_path / "q" / "omniquant.json").read_text())["coverage"]
    assert coverage["float_share"] == pytest.approx(1 / 21)
    kept = coverage["kept_float"][:2]
    assert kept == ["backbone.layers.0.mixer", "backbone.layers.0.mixer.conv1d"]

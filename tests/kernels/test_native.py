"""The native decoder (`omniquant.kernels.native`): its step against PyTorch on every family it
runs, its int8-activation arithmetic reproduced in PyTorch, and its refusals."""

from __future__ import annotations

import io
import platform

import pytest
import torch
from torch import nn

import omniquant
from omniquant.cli import main
from omniquant.config import WeightQuant
from omniquant.data import AUSTEN_RDB
from omniquant.errors import ConfigError
from omniquant.generate import generate
from omniquant.kernels.native import NativeDecoder, compiler, pack_codes, unpack_codes
from omniquant.models.registry import decoder_layers, get_architecture
from omniquant.quant.primitives import fake_quantize, minmax_params, to_groups
from omniquant.quant.qparams import QPARAMS_ATTR, dequantize, from_affine, weight_codes
from tests.conftest import VOCAB, needs_smollm2, tiny_config

try:
    compiler()
except ConfigError:  # pragma: no cover - every CI image has g++
    pytest.skip("no C++ compiler", allow_module_level=True)

NATIVE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def model_of(family: str, layers: int = 2, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:layers]
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def round_to_grid(
    model: nn.Module, bits: int, group: int | None, only: tuple[str, ...] | None = None
) -> nn.Module:
    """Round every block linear (or those whose names end with one of `only`) to nearest on its
    grid, keeping the grid (as a fake-quantized model loaded from disk has it)."""
    for block in decoder_layers(model, get_architecture(model)):
        for name, lin in block.named_modules():
            if isinstance(lin, nn.Linear) and (only is None or name.endswith(only)):
                w = lin.weight.data
                spec = WeightQuant(bits, group)
                qp = from_affine(minmax_params(to_groups(w, group), bits), spec, w.shape[1])
                codes = weight_codes(fake_quantize(w, bits, group), qp)
                lin.weight.data = dequantize(codes, qp, torch.float32)
                setattr(lin, QPARAMS_ATTR, qp)
    return model


def integer_arithmetic(model: nn.Module, bits: int) -> None:
    """Make every gridded linear compute what the native step computes: its input rounded to
    int8/int16 per 32 (step max|x| / 127 or / 32767), s * sum(q xq) per group plus m * sum(x) with
    m = -z s."""
    top = 2 ** (bits - 1) - 1

    def forward(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        qp = getattr(lin, QPARAMS_ATTR)
        rows = x.reshape(-1, x.shape[-1])
        blocks = rows.reshape(rows.shape[0], -1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / top
        x8 = (blocks * torch.where(step > 0, 1 / step, 0)).round() * step  # as the C++ does
        x8 = x8.reshape(rows.shape)
        codes = weight_codes(lin.weight, qp).float()
        y = torch.zeros(rows.shape[0], codes.shape[0])
        for g in range(qp.n_groups):
            cols = slice(g * qp.group, min((g + 1) * qp.group, qp.in_features))
            y += (x8[:, cols] @ codes[:, cols].T) * qp.scale[:, g]
            y -= rows[:, cols].sum(-1, keepdim=True) * (qp.zero[:, g].float() * qp.scale[:, g])
        if lin.bias is not None:
            y += lin.bias
        return y.reshape(*x.shape[:-1], -1)

    for lin in model.modules():
        if isinstance(lin, nn.Linear) and hasattr(lin, QPARAMS_ATTR):
            lin.forward = lambda x, lin=lin: forward(lin, x)


def native_logits(decoder: NativeDecoder, ids: list[int]) -> torch.Tensor:
    decoder.reset()
    return torch.stack([decoder.step(t).clone() for t in ids])  # type: ignore[union-attr]


def torch_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


IDS = [5, 17, 200, 3, 99, 42, 7, 150, 64, 11]


def test_codes_pack_32_per_16_bytes_and_unpack_back():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 16]) << 4
    assert torch.equal(unpack_codes(packed), codes)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_a_float_model_decodes_as_transformers_does(family):
    """No grids: every linear in float32, so norms, RoPE, q/k norms, biases, grouped-query
    attention and the KV cache must match transformers to float rounding, position by position."""
    model = model_of(family)
    decoder = NativeDecoder(model, head="float32", threads=2)
    assert rel_err(native_logits(decoder, IDS), torch_logits(model, IDS)) < 1e-4


STAGES = [("q_proj", "k_proj", "v_proj", "qkv_proj"), ("o_proj",), ("gate_proj", "up_proj",
    "gate_up_proj"), ("down_proj",)]  # fmt: skip


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
@pytest.mark.parametrize("bits,group,act", [(4, 32, 8), (3, 64, 16), (2, 32, 8), (4, None, 16)])
def test_the_int4_step_is_its_integer_arithmetic(family, bits, group, act):
    """The native step equals the PyTorch model whose linears compute the same integer arithmetic
    (int8 or int16 activations).
    A float-order difference of 1e-7 in a linear's input flips an int8 rounding now and then, and
    on a tiny random model one flip moves that position's logits by up to 1% (measured: noise of
    1e-6 on the inputs of the PyTorch arithmetic alone does that). So one stage of linears at a
    time carries a grid (the others stay float: no int8 stage feeds another), and the median
    position must agree to 1e-4 (a flip hits one position; a wrong formula hits them all)."""
    for stage in STAGES:
        model = round_to_grid(model_of(family, layers=1), bits, group, only=stage)  # g64: ragged
        decoder = NativeDecoder(model, head="float32", threads=2, activations=act)
        got = native_logits(decoder, IDS)
        integer_arithmetic(model, act)
        want = torch_logits(model, IDS)
        errors = sorted(rel_err(g, w) for g, w in zip(got, want, strict=True))
        assert errors[len(errors) // 2] < 1e-4, (stage, errors)


def test_a_sliding_window_sees_only_its_last_positions():
    model = model_of("mistral", layers=1, sliding_window=3)
    decoder = NativeDecoder(model, head="float32", threads=2)
    assert decoder.blocks[0]["window"] == 3
    want = torch_logits(model, IDS)
    assert rel_err(native_logits(decoder, IDS), want) < 1e-4
    full = torch_logits(model_of("mistral", layers=1, sliding_window=None), IDS)
    assert rel_err(full[5:], want[5:]) > 1e-3  # the window changes the result


def test_threads_and_a_growing_cache_do_not_change_the_result():
    model = round_to_grid(model_of("llama"), 4, 32)
    one = NativeDecoder(model, head="float32", threads=1)
    one.reserve(2)  # grows to 4, 8, 16 on the way, copying what is cached
    three = NativeDecoder(model, head="float32", threads=3)
    three.reserve(64)
    assert torch.equal(native_logits(one, IDS), native_logits(three, IDS))
    assert one.capacity == 16


def test_a_float16_head_shares_the_tied_table_and_stays_close():
    model = model_of("llama", tie_word_embeddings=True)
    model.tie_weights()
    half = NativeDecoder(model, head="float16", threads=2)
    assert half.embedding is half.head and half.head.dtype == torch.float16
    assert rel_err(native_logits(half, IDS), torch_logits(model, IDS)) < 2e-3


def test_tokens_are_the_argmax_chain_stop_at_eos_and_sample_under_a_seed():
    model = round_to_grid(model_of("qwen2"), 4, 32)
    decoder = NativeDecoder(model, head="float32", threads=2)
    new = list(decoder.tokens(IDS[:3], 6))
    chain, ids = [], IDS[:3]
    for _ in range(6):
        chain.append(int(native_logits(decoder, ids)[-1].argmax()))
        ids = ids + chain[-1:]
    assert new == chain
    assert list(decoder.tokens(IDS[:3], 6, stop={new[1]})) == new[:2]
    draws = [
        list(decoder.tokens(IDS[:3], 8, 1.0, generator=torch.Generator().manual_seed(s)))
        for s in (1, 1, 2)
    ]
    assert draws[0] == draws[1] and all(0 <= t < VOCAB for t in draws[2])


@pytest.mark.parametrize(
    "family,message",
    [("gemma3", "sandwich norms.*without `native`"), ("opt", "layernorm norms.*no RoPE")],
)
def test_families_it_does_not_compute_are_refused(family, message):
    from tests.conftest import tiny_model

    with pytest.raises(ConfigError, match=message):
        NativeDecoder(tiny_model(family))


@pytest.mark.parametrize(
    "bits,group,message", [(8, 32, "2-4-bit"), (4, 16, "multiple of 32"), (5, None, "5 bits")]
)
def test_grids_it_cannot_hold_are_refused(bits, group, message):
    model = round_to_grid(model_of("llama", layers=1), bits, group)
    with pytest.raises(ConfigError, match=message):
        NativeDecoder(model)


def test_integer_kernels_and_activation_hooks_are_refused():
    model = round_to_grid(model_of("llama", layers=1), 4, 32)
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: a)
    with pytest.raises(ConfigError, match="hooks"):
        NativeDecoder(model)
    hook.remove()
    from omniquant.formats.packed import use_kernels

    use_kernels(model)
    with pytest.raises(ConfigError, match="without kernels"):
        NativeDecoder(model)


@pytest.mark.skipif(not AUSTEN_RDB.exists(), reason="needs the Austen corpus")
def test_cli_generate_native_streams_what_the_decoder_gives(tiny_llama_folder, tmp_path, capsys):
    from omniquant.config import CalibConfig, OmniQuantConfig

    config = OmniQuantConfig(
        WeightQuant(4, 32), calib=CalibConfig(method="rtn", nsamples=2, seqlen=64)
    )
    out = tmp_path / "q"
    omniquant.quantize(
        tiny_llama_folder, config, output=out, format="omniquant-packed", progress=False
    )
    model, tokenizer = omniquant.load(out)
    model.generation_config.eos_token_id = None
    buf = io.StringIO()
    new = generate(model, tokenizer, "Anne", 5, out=buf, native=True, head="float16")
    ids = tokenizer("Anne", return_tensors="pt").input_ids[0].tolist()
    assert new == list(NativeDecoder(model, head="float16").tokens(ids, 5))
    assert buf.getvalue().rstrip("\n") == "Anne" + tokenizer.decode(new, skip_special_tokens=True)
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "Anne", "--max-new-tokens", "3", "--native"]
    assert main([*args, "--head", "float16"]) == 0
    assert capsys.readouterr().out.startswith("Anne")
    assert main([*args, "--kernels"]) == 2
    assert "drop --kernels" in capsys.readouterr().err


@needs_smollm2
def test_smollm2_int4_native_keeps_the_fake_quantized_models_likelihood():
    """On 96 tokens of Emma, the native W4A16g128 step's mean log-likelihood (int16 activations,
    the default) is within 0.1% of the fake-quantized model's and its greedy choice agrees at
    nearly every position; int8 activations (llama.cpp's Q8) cost visibly more."""
    from omniquant.data import load_text, tokenize_text
    from omniquant.model_io import load_model

    model, tokenizer = load_model("smollm2")
    round_to_grid(model, 4, 128)
    ids = tokenize_text(tokenizer, load_text("austen:emma"))[1000:1096].tolist()
    want = torch_logits(model, ids)
    got = native_logits(NativeDecoder(model, head="float16", threads=2), ids)
    got8 = native_logits(NativeDecoder(model, head="float16", threads=2, activations=8), ids)
    target = torch.tensor(ids[1:])

    def nll(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:-1], target))

    def agree(logits: torch.Tensor) -> float:
        return float((logits.argmax(-1) == want.argmax(-1)).float().mean())

    assert abs(nll(got) / nll(want) - 1) < 1e-3 and agree(got) > 0.98
    assert abs(nll(got8) / nll(want) - 1) > abs(nll(got) / nll(want) - 1)
    assert agree(got8) < agree(got)


@pytest.mark.skipif(not AUSTEN_RDB.exists(), reason="needs the Austen corpus")
def test_a_packed_folder_goes_to_the_decoder_without_float_blocks(tiny_llama_folder, tmp_path):
    from omniquant.config import CalibConfig, OmniQuantConfig
    from omniquant.formats.packed import load_packed

    calib = CalibConfig(method="rtn", nsamples=2, seqlen=64)
    out = tmp_path / "q"
    config = OmniQuantConfig(WeightQuant(3, 64), calib=calib)
    omniquant.quantize(
        tiny_llama_folder, config, output=out, format="omniquant-packed", progress=False
    )
    model, _, _ = load_packed(out, native=True)
    assert model.model.layers[0].mlp.down_proj.weight.is_meta  # the codes stand for it
    direct, _ = omniquant.load_native(out, head="float32")
    fake = NativeDecoder(omniquant.load(out)[0], head="float32")
    assert torch.equal(native_logits(direct, IDS), native_logits(fake, IDS))
    eight = tmp_path / "q8"
    config = OmniQuantConfig(WeightQuant(8, 32), calib=calib)
    omniquant.quantize(
        tiny_llama_folder, config, output=eight, format="omniquant-packed", progress=False
    )
    with pytest.raises(ConfigError, match="2-4-bit"):
        omniquant.load_native(eight)


def test_no_compiler_or_a_failed_build_is_one_clear_error(monkeypatch, tmp_path):
    from omniquant.kernels import native

    monkeypatch.setattr(native, "CACHE", tmp_path)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler"):
        native.compiler()
    monkeypatch.undo()
    monkeypatch.setattr(native, "CACHE", tmp_path)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    native.library.cache_clear()
    try:
        with pytest.raises(ConfigError, match="building the native decoder with false failed"):
            native.library()
    finally:
        native.library.cache_clear()
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


@pytest.mark.parametrize("act", [16, 8])
def test_a_prompt_fed_in_chunks_gives_what_token_by_token_gives(act):
    """Prefill runs 16 tokens per call (int16: each block of codes widened once for 4 tokens):
    the same arithmetic per token, so the same bits, across chunk and tile edges."""
    model = round_to_grid(model_of("qwen3"), 4, 32, only=("q_proj", "o_proj", "mlp.up_proj"))
    decoder = NativeDecoder(model, head="float32", threads=2, activations=act)
    prompt = [int(t) for t in torch.randint(3, VOCAB, (37,), generator=torch.Generator())]
    chunked = decoder.prefill(prompt).clone()
    assert decoder.position == 37
    assert torch.equal(chunked, native_logits(decoder, prompt)[-1])
    decoder.reset()
    decoder.prefill(prompt[:20])  # a prompt, then more tokens: positions carry on
    assert torch.equal(decoder.prefill(prompt[20:]), chunked)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds the x86-64 baseline")
@pytest.mark.parametrize("act", [16, 8])
def test_the_portable_loops_compute_what_the_avx2_ones_do(act):
    """Built for plain x86-64 (no AVX2: the portable loops), the step gives the same logits up to
    float summation order, chunked prompt and decode steps alike."""
    from omniquant.kernels.native import library

    model = round_to_grid(model_of("phi3", layers=1), 4, 32, only=("gate_up_proj",))
    fast = NativeDecoder(model, head="float16", threads=2, activations=act)
    plain = NativeDecoder(model, head="float16", threads=2, activations=act)
    plain.lib = library("x86-64")
    assert plain.lib.oq_avx2() == 0
    assert rel_err(plain.prefill(IDS).clone(), fast.prefill(IDS)) < 1e-4
    assert rel_err(native_logits(plain, IDS), native_logits(fast, IDS)) < 1e-4


def test_every_positions_logits_in_chunks_equal_the_steps():
    model = round_to_grid(model_of("mistral"), 3, 32)
    decoder = NativeDecoder(model, head="float16", threads=2)
    ids = [int(t) for t in torch.randint(3, VOCAB, (35,), generator=torch.Generator())]
    every = decoder.sequence_logits(ids)
    assert every.shape == (35, VOCAB) and decoder.position == 35
    assert torch.equal(every, native_logits(decoder, ids))


@pytest.mark.skipif(not AUSTEN_RDB.exists(), reason="needs the Austen corpus")
def test_eval_native_measures_the_decoders_perplexity(tiny_llama_folder, tmp_path, capsys):
    import json

    from omniquant.config import CalibConfig, OmniQuantConfig

    config = OmniQuantConfig(
        WeightQuant(4, 32), calib=CalibConfig(method="rtn", nsamples=2, seqlen=64)
    )
    out = tmp_path / "q"
    omniquant.quantize(
        tiny_llama_folder, config, output=out, format="omniquant-packed", progress=False
    )
    settings = {"seqlen": 64, "max_windows": 3, "progress": False}
    fake = omniquant.evaluate(out, **settings)
    native = omniquant.evaluate(out, native=True, head="float32", **settings)
    assert native != fake and abs(native / fake - 1) < 1e-3  # int16 activations: close, not equal
    args = ["eval", str(out), "--eval-seqlen", "64", "--eval-windows", "3", "--quiet"]
    capsys.readouterr()
    assert main([*args, "--native"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["native"] is True and row["windows"] == 3
    assert row["perplexity"] == pytest.approx(native, rel=1e-6)
    refused = [(["--kernels"], "drop --kernels"), (["--tasks", "piqa"], "drop --tasks")]
    for extra, message in refused:
        assert main([*args, "--native", *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(not AUSTEN_RDB.exists(), reason="needs the Austen corpus")
def test_a_rounded_untied_head_decodes_and_activation_runs_are_refused_before_loading(
    tiny_llama_folder, tmp_path, monkeypatch
):
    from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig
    from omniquant.formats import packed

    calib = CalibConfig(method="rtn", nsamples=2, seqlen=64)
    out = tmp_path / "head"
    config = OmniQuantConfig(WeightQuant(4, 32), calib=calib, quantize_lm_head=True)
    omniquant.quantize(
        tiny_llama_folder, config, output=out, format="omniquant-packed", progress=False
    )
    direct, _ = omniquant.load_native(out, head="float32")
    fake_model = omniquant.load(out)[0]
    fake = NativeDecoder(fake_model, head="float32")
    assert direct.embedding is not direct.head  # --quantize-lm-head unties the head
    assert torch.equal(direct.head, fake.head)
    assert torch.equal(native_logits(direct, IDS), native_logits(fake, IDS))
    acts = tmp_path / "w4a8"
    config = OmniQuantConfig(WeightQuant(4, 32), ActQuant(8), calib=calib)
    omniquant.quantize(
        tiny_llama_folder, config, output=acts, format="omniquant-packed", progress=False
    )
    monkeypatch.setattr(packed, "load_packed", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="quantizes activations"):
        omniquant.load_native(acts)

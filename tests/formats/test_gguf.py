"""GGUF export: exact blocks from the learned grids, refusals, and a client we did not write
(transformers' GGUF loader, which dequantizes with the `gguf` package) giving our logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError, ExportError
from omniquant.formats.gguf.vocab import pre_tokenizer_name
from omniquant.formats.gguf.writer import (
    GGUF_FILE,
    GgufOptions,
    check_gguf_setting,
    check_gguf_widths,
    gguf_architecture,
    permute_qk,
    write_gguf,
)
from omniquant.quant.qparams import QPARAMS_ATTR, LinearQParams, dequantize, weight_codes
from tests.conftest import tiny_config

pytest.importorskip("gguf")
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
SPACE = "\u2581"
TEXT = "the quick brown fox jumps over the lazy dog. " * 8 + "0123456789 Hello, world!"
# words over a 5-letter alphabet: merges overlap ("ab"+"c" or "a"+"bc"), so the order in which a
# tokenizer applies them changes its ids
_letters = np.random.default_rng(0).integers(0, 5, size=(600, 6))
WORDS = " ".join("".join("abcde"[i] for i in row[: 3 + k % 4]) for k, row in enumerate(_letters))


def dequantized_linear(path: Path, gguf_name: str) -> np.ndarray:
    """A tensor of a GGUF file dequantized by the `gguf` package."""
    from gguf.quants import dequantize

    from gguf import GGUFReader

    for t in GGUFReader(str(path)).tensors:
        if t.name == gguf_name:
            return dequantize(t.data, t.tensor_type)
    raise KeyError(gguf_name)


def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2 style): 256 bytes, 3 specials, a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>"
    )


def sentencepiece_tokenizer(style: str = "prepend") -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE in Llama 2's layout: <unk>, <s>, </s>, the 256 byte tokens
    <0x00>..<0xFF>, then pieces over "▁"-spelled text, byte fallback for characters it lacks.
    `style`: how spaces become "▁": "prepend" (Llama 2 / Phi-3: Prepend + Replace normalizer),
    "metaspace" (newer conversions: Metaspace, prepend scheme "first") or "no-prefix" (Gemma)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as pt

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pt.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False)
    learner.train_from_iterator([TEXT, WORDS], trainer)
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {p: i for i, p in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    bpe = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    space = normalizers.Replace(" ", SPACE)
    if style == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), space])
    elif style == "metaspace":
        tok.pre_tokenizer = pt.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    else:
        tok.normalizer = space
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def gguf_tiny_model(family: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A 2-block model whose settings GGUF carries (fields GGUF does not carry left at the
    defaults transformers' GGUF loader assumes), with non-trivial norms and biases."""
    cfg = tiny_config(family)
    cfg.vocab_size = vocab
    if family == "qwen3":
        cfg.head_dim = 128  # transformers reads no head_dim for qwen3: its default
    if family == "gemma3":
        cfg.head_dim = cfg.query_pre_attn_scalar = 256
        cfg.sliding_window = 64  # longer than the test windows
        # transformers' loader reads no layer pattern (llama.cpp reads ours): its default, every
        # 6th layer global, makes both blocks of a 2-block model sliding
        cfg.layer_types = ["sliding_attention", "sliding_attention"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def rtn(model: torch.nn.Module, weight: WeightQuant) -> OmniQuantConfig:
    """Round-to-nearest every block linear in place, leaving its grid on it."""
    from omniquant.block_loop import calibrate_blocks
    from omniquant.capture import capture_block_inputs
    from omniquant.models import decoder_layers, get_architecture
    from omniquant.runtime import runtime_for

    blocks = decoder_layers(model, get_architecture(model))
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator())
    captured = capture_block_inputs(model, blocks, list(ids.split(1)), "cpu")
    config = OmniQuantConfig(weight, calib=CalibConfig(method="rtn"))
    calibrate_blocks(blocks, captured, weight, config.calib, runtime_for("cpu", progress=False))
    return config


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    linear = model.get_submodule(name)
    assert isinstance(linear, torch.nn.Linear)
    return linear


def held_by_blocks(weight: torch.Tensor, qp: LinearQParams, signed: bool) -> torch.Tensor:
    """Our grid's weight as GGUF blocks hold it: d = fp16(h) and m = fp16(-z h) (Q4_1, Q5_1),
    or the signed codes u - z times d = fp16(h) (`signed`: Q4_0, Q5_0, Q8_0)."""
    codes = weight_codes(weight, qp)
    d16 = qp.scale.half().float()
    if signed:
        return dequantize(codes, LinearQParams(d16, qp.zero, *_shape(qp)), torch.float32)
    m16 = (-qp.zero.float() * qp.scale).half().float()
    no_zero = LinearQParams(d16, torch.zeros_like(qp.zero), *_shape(qp))
    m_row = torch.repeat_interleave(m16, qp.group, dim=1)[:, : qp.in_features]
    return dequantize(codes, no_zero, torch.float32) + m_row


def _shape(qp: LinearQParams) -> tuple[int, int, int]:
    return qp.bits, qp.group, qp.in_features


def with_blocks_grid(model: torch.nn.Module, signed: bool = False) -> torch.nn.Module:
    """A copy of a quantized model whose linears hold exactly what the GGUF blocks hold."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            qp = getattr(module, QPARAMS_ATTR, None)
            if qp is not None:
                module.weight.copy_(held_by_blocks(module.weight, qp, signed))
    return twin


@pytest.mark.parametrize(
    "weight,kind",
    [
        (WeightQuant(4, 64), "Q4_1"),  # widths 64 and 96: 96 = 64 + a ragged group of 32
        (WeightQuant(4, None), "Q4_1"),  # per-channel: one d and m for every block of a row
        (WeightQuant(5, 32), "Q5_1"),
        (WeightQuant(4, 32, symmetric=True), "Q4_0"),
        (WeightQuant(5, 64, symmetric=True), "Q5_0"),
        (WeightQuant(8, None, symmetric=True), "Q8_0"),
        (WeightQuant(3, 32), "Q4_1"),  # narrower grids fit wider blocks exactly
        (WeightQuant(3, 64, symmetric=True), "Q4_0"),
        (WeightQuant(6, 32), "Q8_0"),  # asymmetric 6 bits: |u - z| <= 63
    ],
)
def test_blocks_dequantize_to_our_grid_up_to_the_fp16_rounding_of_d_and_m(tmp_path, weight, kind):
    tokenizer = byte_bpe_tokenizer()
    model = gguf_tiny_model("qwen2", len(tokenizer))
    config = rtn(model, weight)
    path = tmp_path / GGUF_FILE
    written = write_gguf(model, tokenizer, config, path)
    assert written["weight_type"] == kind
    for hf_name, gguf_name in [("mlp.down_proj", "ffn_down"), ("self_attn.q_proj", "attn_q")]:
        linear = _linear(model, f"model.layers.1.{hf_name}")
        qp: LinearQParams = getattr(linear, QPARAMS_ATTR)
        got = torch.from_numpy(dequantized_linear(path, f"blk.1.{gguf_name}.weight"))
        # the grid with d = fp16(h), m = fp16(-z h): what the blocks can hold
        want = held_by_blocks(linear.weight, qp, signed=not kind.endswith("_1"))
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
        # and that is the fake-quantized weight up to fp16's relative precision of d and m
        bound = (2**qp.bits) * qp.scale.abs().max() * 2**-10
        assert (got - linear.weight).abs().max() <= bound


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_transformers_loads_the_gguf_with_our_logits(tmp_path, family):
    tokenizer = byte_bpe_tokenizer()
    model = gguf_tiny_model(family, len(tokenizer))
    config = rtn(model, WeightQuant(4, 64))
    write_gguf(model, tokenizer, config, tmp_path / GGUF_FILE, GgufOptions("f32", "f32"))
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=GGUF_FILE, dtype=torch.float32
    ).eval()
    ids = torch.randint(3, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        exact = with_blocks_grid(model)(ids).logits
        got = loaded(ids).logits
    # what the blocks hold, reproduced by transformers and the gguf package: float32 rounding
    assert (got - exact).abs().max() <= 1e-4 * exact.abs().max()
    # and our fake-quantized model's logits within the fp16 rounding of d and m (these random
    # tiny models have weights near 1, so m = -z h is large and its rounding shows)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_f16_embeddings_and_a_q8_0_head_stay_close_and_report_their_error(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    model = gguf_tiny_model("llama", len(tokenizer))
    config = rtn(model, WeightQuant(4, 32))
    written = write_gguf(model, tokenizer, config, tmp_path / GGUF_FILE, GgufOptions("f16", "q8_0"))
    errors = written["relative_rms_error"]
    assert set(errors) == {"token_embd.weight", "output.weight"}
    assert errors["output.weight"] < 1e-2 and errors["token_embd.weight"] < 1e-3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE).eval()
    ids = torch.randint(3, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_the_file_carries_the_tokenizer_and_llama_rows_are_permuted(tmp_path):
    from gguf import GGUFReader

    tokenizer = byte_bpe_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = gguf_tiny_model("llama", len(tokenizer))
    config = rtn(model, WeightQuant(4, 32))
    write_gguf(model, tokenizer, config, tmp_path / GGUF_FILE)
    fields = GGUFReader(str(tmp_path / GGUF_FILE)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["llama.rope.dimension_count"].contents() == 16
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    q = _linear(model, "model.layers.0.self_attn.q_proj").weight
    got = torch.from_numpy(dequantized_linear(tmp_path / GGUF_FILE, "blk.0.attn_q.weight"))
    assert torch.allclose(got, permute_qk(q, 4), atol=1e-2 * float(q.abs().max()))
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_FILE)
    assert back(TEXT[:60])["input_ids"][-10:] == tokenizer(TEXT[:60])["input_ids"][-10:]


def test_permute_qk_is_llama_cpps_adjacent_pair_order():
    rows = torch.arange(8).float().unsqueeze(1)  # one head of 8: pairs (0, 4), (1, 5), ...
    assert permute_qk(rows, 1).squeeze(1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize(
    "weight,act,match",
    [
        (WeightQuant(8, 32), ActQuant(), "add --symmetric, or use --wbits 7"),
        (WeightQuant(4, 48), ActQuant(), "--group-size 32 or 64"),
        (WeightQuant(8, 128), ActQuant(), "--gguf-approximate"),
        (WeightQuant(4, 128), ActQuant(8, quantize_qkv=False), "--abits 16"),
    ],
)
def test_settings_no_gguf_type_holds_are_refused_with_the_nearest_that_fits(weight, act, match):
    from omniquant.cli import flag_names

    with pytest.raises(ExportError) as refused:
        check_gguf_setting(OmniQuantConfig(weight, act))
    assert match in flag_names(str(refused.value))  # as the CLI prints it


def test_rows_that_are_not_whole_blocks_are_refused():
    check_gguf_widths({"a": 576, "b": 1536}, 128)  # SmolLM2: 576 = 4 x 128 + 64, ragged: fits
    with pytest.raises(ExportError, match="not a multiple of 32"):
        check_gguf_widths({"a": 80}, None)


def test_families_llama_cpp_or_transformers_cannot_read_are_refused():
    with pytest.raises(ExportError, match="omniquant-packed"):
        gguf_architecture(tiny_config("opt"))
    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ExportError, match="dynamic"):
        gguf_architecture(cfg)
    assert gguf_architecture(tiny_config("mistral")) == "llama"


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == (
        "smollm"
    )
    assert pre_tokenizer_name({"type": "Whitespace"}) is None


def test_gguf_options_are_validated():
    with pytest.raises(ConfigError, match="q8_0"):
        GgufOptions(embeddings="q4_0")


def test_quantize_refuses_before_loading_and_writes_atomically(tiny_llama_folder, tmp_path):
    import omniquant

    fast = CalibConfig(epochs=1, nsamples=2, seqlen=32)
    with pytest.raises(ExportError, match="`group_size` 32 or 64"):
        omniquant.quantize(
            tiny_llama_folder,
            OmniQuantConfig(WeightQuant(4, 40), calib=fast),
            output=tmp_path / "bad",
            format="gguf",
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "q"
    result = omniquant.quantize(
        tiny_llama_folder,
        OmniQuantConfig(WeightQuant(4, 32), calib=fast),
        output=out,
        format="gguf",
        progress=False,
        gguf=GgufOptions(output="f32", embeddings="f32"),
    )
    record = json.loads((out / "omniquant.json").read_text())
    assert record["format"]["name"] == "gguf" and record["format"]["weight_type"] == "Q4_1"
    assert not list(Path(out).glob("*.partial"))
    loaded, tokenizer = omniquant.load(out)
    ids = torch.randint(3, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = result.model(ids).logits
        got = loaded(ids).logits
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    assert np.array_equal(tokenizer("Emma")["input_ids"], result.tokenizer("Emma")["input_ids"])


def test_a_float_model_written_as_f32_gguf_loads_back_exactly(tmp_path):
    from omniquant.formats.gguf.writer import write_float_gguf

    tokenizer = byte_bpe_tokenizer()
    model = gguf_tiny_model("qwen2", len(tokenizer))
    write_float_gguf(model, tokenizer, tmp_path / GGUF_FILE, "f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE).eval()
    ids = torch.randint(3, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_cli_refuses_gguf_flags_with_another_format_and_a_family_it_cannot_write(
    tiny_llama_folder, tmp_path, capsys
):
    from omniquant.cli import main

    base = ["quantize", "--model", str(tiny_llama_folder), "--method", "rtn", "--quiet"]
    args = [*base, "--output", str(tmp_path / "a"), "--gguf-output", "q8_0"]
    assert main(args) == 2
    assert "--gguf-output only applies with --format gguf" in capsys.readouterr().err
    args = [*base, "--output", str(tmp_path / "b"), "--format", "gguf", "--wbits", "8"]
    assert main(args) == 2
    assert "add --symmetric" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_writes_gguf_from_a_quantize_folder(tiny_llama_folder, tmp_path, capsys):
    from omniquant.cli import main

    fake = tmp_path / "fake"
    base = ["quantize", "--model", str(tiny_llama_folder), "--method", "rtn", "--quiet"]
    assert main([*base, "--output", str(fake), "--group-size", "32", "--seqlen", "32"]) == 0
    out = tmp_path / "g"
    assert main(["export", str(fake), str(out), "--format", "gguf", "--gguf-output", "q8_0"]) == 0
    assert "gguf model written" in capsys.readouterr().out
    record = json.loads((out / "omniquant.json").read_text())["format"]
    assert record["output"] == "q8_0" and "output.weight" in record["relative_rms_error"]
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "omniquant.json"]


def test_an_approximate_mapping_is_written_only_on_request_with_its_error(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    model = gguf_tiny_model("llama", len(tokenizer))
    config = rtn(model, WeightQuant(4, 48))  # widths 64 and 96: groups not whole blocks
    with pytest.raises(ExportError, match="`gguf_approximate`"):
        write_gguf(model, tokenizer, config, tmp_path / GGUF_FILE)
    assert list(tmp_path.iterdir()) == []
    options = GgufOptions("f32", "f32", approximate="q4_1")
    written = write_gguf(model, tokenizer, config, tmp_path / GGUF_FILE, options)
    assert written["weight_type"] == "Q4_1" and not written["exact"]
    errors = written["relative_rms_error"]
    assert 0 < max(errors.values()) < 0.1
    # the reported error is the one the file carries (v_proj: no row permutation)
    v = _linear(model, "model.layers.1.self_attn.v_proj").weight
    got = torch.from_numpy(dequantized_linear(tmp_path / GGUF_FILE, "blk.1.attn_v.weight"))
    actual = float((got - v).norm() / v.norm())
    assert actual == pytest.approx(errors["blk.1.attn_v.weight"], rel=1e-3)


SAMPLES = [
    "the quick brown fox",
    WORDS[:200],
    "two  spaces, a tab\tand\na newline",
    "café, 日本語 and ünïcödé outside the vocabulary",
    "Hello, world! 0123456789 the lazy dog.",
]


@pytest.mark.parametrize(
    "family,style",
    [("llama", "prepend"), ("mistral", "metaspace"), ("phi3", "prepend"), ("gemma3", "no-prefix")],
)
def test_sentencepiece_tokenizers_are_written_for_llama_cpps_spm_and_load_back(
    tmp_path, family, style
):
    from transformers import AutoTokenizer

    from gguf import GGUFReader

    tokenizer = sentencepiece_tokenizer(style)
    model = gguf_tiny_model(family, len(tokenizer))
    write_gguf(model, tokenizer, rtn(model, WeightQuant(4, 32)), tmp_path / GGUF_FILE)
    fields = GGUFReader(str(tmp_path / GGUF_FILE)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "default"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() == (style != "no-prefix")
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [2, 3, 3, 6]  # <unk> unknown, <s> </s> control, <0x00> byte
    assert types.count(6) == 256
    scores = fields["tokenizer.ggml.scores"].contents()
    assert len(scores) == len(types) == model.config.vocab_size
    assert min(scores) < 0 and scores[:259] == [0.0] * 259  # specials and bytes: no merge
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_FILE)
    for text in SAMPLES:  # transformers' loader rebuilds the tokenizer from the merges
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text


def spm_greedy(text: str, vocab: Any, prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenizer, in short: spaces spelled "▁" (one in front when
    `prefix`), characters merged pairwise, always the adjacent pair whose result has the highest
    score (leftmost on ties), characters not in the vocabulary as their <0xXX> byte tokens."""
    ids = {t: i for i, t in enumerate(vocab.tokens) if vocab.types[i] in (1, 6)}
    symbols = list((SPACE if prefix else "") + text.replace(" ", SPACE))
    while True:
        best: tuple[float, int] | None = None
        for i in range(len(symbols) - 1):
            merged = ids.get(symbols[i] + symbols[i + 1])
            better = merged is not None and (best is None or vocab.scores[merged] > best[0])
            if better and vocab.types[merged] == 1:
                best = (vocab.scores[merged], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out: list[int] = []
    for s in symbols:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


@pytest.mark.parametrize("style", ["prepend", "no-prefix"])
def test_merging_by_the_written_scores_is_the_tokenizers_bpe(style):
    from omniquant.formats.gguf.vocab import tokenizer_vocab

    tokenizer = sentencepiece_tokenizer(style)
    vocab = tokenizer_vocab(tokenizer, len(tokenizer))
    assert vocab.scores is not None and vocab.add_space_prefix == (style == "prepend")
    for text in [TEXT[:90], *SAMPLES]:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert spm_greedy(text, vocab, vocab.add_space_prefix) == want, text


def test_merge_scores_are_minus_the_first_rank_that_makes_a_token():
    from omniquant.formats.gguf.vocab import merge_scores

    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "c": 4}
    assert merge_scores(vocab, ["a b", ["ab", "b"], "a bb", ["a", "b"]]) == {2: -1.0, 3: -2.0}


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused_naming_what_was_found():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from omniquant.formats.gguf.vocab import check_gguf_tokenizer

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match=r"WordPiece.*Whitespace.*not one llama\.cpp"):
        check_gguf_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))
    no_spaces = sentencepiece_tokenizer("no-prefix")
    no_spaces.backend_tokenizer.normalizer = None  # byte fallback, but spaces never become "▁"
    with pytest.raises(ExportError, match="byte fallback True"):
        check_gguf_tokenizer(no_spaces)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # head size 16: all three wavelength regimes
}


def scaled_model(family: str, rope: dict[str, Any], vocab: int, **config: Any) -> torch.nn.Module:
    model = gguf_tiny_model(family, vocab)
    model.config.rope_parameters = dict(rope)
    for key, value in config.items():
        setattr(model.config, key, value)
    rebuilt = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.eval()


def _fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items()}
    out.update({t.name: np.array(t.data) for t in reader.tensors if t.name.startswith("rope_")})
    return out


def test_llama3_scaling_is_the_rope_freqs_tensor_transformers_implies(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    tokenizer = byte_bpe_tokenizer()
    model = scaled_model("llama", LLAMA3_ROPE, len(tokenizer))
    written = write_gguf(model, tokenizer, rtn(model, WeightQuant(4, 32)), tmp_path / GGUF_FILE)
    got = _fields(tmp_path / GGUF_FILE)["rope_freqs.weight"]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    divisors = (plain / scaled.double()).numpy()  # llama.cpp divides each frequency by these
    assert got.shape == (8,) and got.min() == 1.0 and got.max() == 8.0  # both ends reached
    assert np.allclose(got, divisors, rtol=1e-5)
    assert written["rope_scaling"] == "llama3"


@pytest.mark.parametrize(
    "family,rope,want",
    [
        ("qwen2", {"rope_type": "linear", "factor": 4.0}, ("linear", 4.0, None)),
        (
            "qwen3",
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
            ("yarn", 4.0, 128),
        ),
        (
            "mistral",
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256},
            ("yarn", 2.0, 256),
        ),
    ],
)
def test_linear_and_yarn_scaling_are_written_as_llama_cpp_reads_them(tmp_path, family, rope, want):
    tokenizer = byte_bpe_tokenizer()
    model = scaled_model(family, {"rope_theta": 10000.0, **rope}, len(tokenizer))
    write_gguf(model, tokenizer, rtn(model, WeightQuant(4, 32)), tmp_path / GGUF_FILE)
    fields = _fields(tmp_path / GGUF_FILE)
    arch = fields["general.architecture"]
    kind, factor, original = want
    assert fields[f"{arch}.rope.scaling.type"] == kind
    assert fields[f"{arch}.rope.scaling.factor"] == factor
    assert fields.get(f"{arch}.rope.scaling.original_context_length") == original
    assert not any(k.startswith("rope_") for k in fields)  # no tensor for these


def test_longrope_factors_and_attention_factor_match_transformers(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    tokenizer = byte_bpe_tokenizer()
    gen = torch.Generator().manual_seed(3)
    short, long = (1 + torch.rand(8, generator=gen) * k for k in (0.1, 4.0))
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": short.tolist(),
        "long_factor": long.tolist(),
        "original_max_position_embeddings": 64,
    }
    sizes = {"max_position_embeddings": 1024, "original_max_position_embeddings": 64}
    model = scaled_model("phi3", rope, len(tokenizer), **sizes)
    write_gguf(model, tokenizer, rtn(model, WeightQuant(4, 32)), tmp_path / GGUF_FILE)
    fields = _fields(tmp_path / GGUF_FILE)
    assert np.allclose(fields["rope_factors_short.weight"], short.numpy())
    assert np.allclose(fields["rope_factors_long.weight"], long.numpy())
    _, attention = ROPE_INIT_FUNCTIONS["longrope"](model.config, seq_len=1024)
    assert attention > 1.0
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(attention, rel=1e-6)
    assert fields["phi3.rope.scaling.original_context_length"] == 64


@pytest.mark.parametrize(
    "family,rope,match",
    [
        ("llama", {"rope_type": "dynamic", "factor": 2.0}, "'dynamic' on llama.cpp's llama"),
        ("qwen2", LLAMA3_ROPE, "'llama3' on llama.cpp's qwen2"),
        (
            "llama",
            {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16.0},
            "llama.cpp's defaults.*beta_fast",
        ),
    ],
)
def test_rope_scaling_llama_cpp_would_run_differently_is_refused(family, rope, match):
    model = gguf_tiny_model(family, 64)
    model.config.rope_parameters = {"rope_theta": 10000.0, **rope}
    with pytest.raises(ExportError, match=match):
        gguf_architecture(model.config)


def test_a_scaled_models_folder_loads_back_with_its_scaling(tmp_path):
    from omniquant.formats import write_packed_format
    from omniquant.formats.gguf.reader import load_gguf_folder

    tokenizer = byte_bpe_tokenizer()
    model = scaled_model("llama", LLAMA3_ROPE, len(tokenizer))
    config = rtn(model, WeightQuant(4, 32))
    options = GgufOptions("f32", "f32")
    write_packed_format("gguf", model, tokenizer, config, {}, tmp_path, gguf=options)
    loaded, _ = load_gguf_folder(tmp_path)
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(3, len(tokenizer), (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = with_blocks_grid(model)(ids).logits
        got = loaded(ids).logits
        unscaled = gguf_tiny_model("llama", len(tokenizer))
        unscaled.load_state_dict(with_blocks_grid(model).state_dict())
        plain = unscaled(ids).logits
    assert (got - exact).abs().max() <= 1e-4 * exact.abs().max()
    assert (plain - exact).abs().max() > 1e-2 * exact.abs().max()  # the scaling matters here

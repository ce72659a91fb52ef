"""The float16 output head of the kernel path: its two arithmetic paths, the tied embedding that
shares its table, refusals."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from omniquant.checks import check_head
from omniquant.errors import ConfigError
from omniquant.kernels.head import DECODE_ROWS, UPCAST_ROWS, HalfEmbedding, HalfHead, use_half_head
from tests.conftest import tiny_model


def test_few_rows_multiply_in_float16_and_a_prompt_in_float32():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2 * UPCAST_ROWS + 100, 48, generator=gen)  # three upcast slices
    bias = torch.randn(w.shape[0], generator=gen)
    head = HalfHead(w, bias)
    w16 = w.half()
    few = torch.randn(1, DECODE_ROWS, 48, generator=gen)
    want = F.linear(few.half(), w16).float() + bias
    assert torch.equal(head(few), want)
    exact = F.linear(few.double(), w16.double()) + bias.double()
    assert ((head(few) - exact).abs().max() / exact.abs().max()) < 2e-3  # fp16 logits
    many = torch.randn(2, DECODE_ROWS, 48, generator=gen)  # 16 rows: the float32 path
    got = head(many)
    assert got.dtype == torch.float32
    assert torch.allclose(got, F.linear(many, w16.float()) + bias, rtol=1e-6, atol=1e-5)


def test_a_tied_plain_embedding_reads_the_heads_float16_table():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator())
    with torch.no_grad():
        want = model(ids).logits
    assert use_half_head(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, HalfHead) and isinstance(embedding, HalfEmbedding)
    assert embedding.weight16.data_ptr() == head.weight16.data_ptr()  # one copy
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    assert not torch.equal(got, want)  # it did change the arithmetic


def test_untied_and_scaled_embeddings_keep_their_float32_table():
    model = tiny_model("qwen2")  # untied
    model.config.tie_word_embeddings = False
    before = model.get_input_embeddings()
    assert use_half_head(model)
    assert model.get_input_embeddings() is before
    assert before.weight.dtype == torch.float32
    gemma = tiny_model("gemma3")  # tied, but its embedding scales by sqrt(hidden)
    scaled = gemma.get_input_embeddings()
    assert use_half_head(gemma)
    assert gemma.get_input_embeddings() is scaled
    assert isinstance(gemma.get_output_embeddings(), HalfHead)


def test_a_float16_head_needs_the_kernels_and_a_known_dtype():
    with pytest.raises(ConfigError, match="add `kernels`"):
        check_head("float16", kernels=False)
    with pytest.raises(ConfigError, match="float32, float16"):
        check_head("bfloat16", kernels=True)
    check_head("float32", kernels=False)

import logging

import pytest
import torch
from torch import nn

from omniquant.errors import ModelError
from omniquant.models import REGISTRY, block_linears, decoder_layers, get_architecture, get_module
from tests.conftest import CLASS_OF, FAMILIES, tiny_model


def test_every_required_family_is_registered():
    assert {CLASS_OF[f] for f in FAMILIES} <= set(REGISTRY)


def test_registry_locates_blocks_embeddings_norms_and_named_linears(family):
    model = tiny_model(family)
    arch = get_architecture(model)
    assert arch is REGISTRY[CLASS_OF[family]]
    blocks = decoder_layers(model, arch)
    assert len(blocks) == 2
    for path in arch.embeddings:
        assert isinstance(get_module(model, path), nn.Embedding)
    assert get_module(model, arch.lm_head) is model.lm_head
    norm = get_module(model, arch.final_norm)
    assert not isinstance(norm, nn.Linear) and sum(p.numel() for p in norm.parameters()) > 0
    block = blocks[0]
    for path in (*arch.qkv, arch.o_proj, *arch.mlp_in, arch.mlp_out):
        assert isinstance(get_module(block, path), nn.Linear), path
    for path in (arch.attn_norm, arch.mlp_norm):
        get_module(block, path)
    linears = block_linears(block)
    assert len(linears) >= 4
    # lm_head and embeddings are outside the blocks, so never quantized by default
    assert all(m is not model.lm_head for m in linears.values())


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return x + self.proj(x)


class CustomLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 10)


class NoBlocksLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)


def test_unregistered_standard_shape_works_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        arch = get_architecture(CustomLM())
    assert arch.layers == "blocks" and arch.embeddings == ("embed",)
    assert "CustomLM is not a registered architecture" in caplog.text


def test_unsupported_architecture_error_names_the_class():
    with pytest.raises(ModelError, match="unsupported architecture NoBlocksLM"):
        get_architecture(NoBlocksLM())


def test_errors_in_an_unregistered_familys_code_are_one_line():
    import torch

    from omniquant.errors import ModelError
    from omniquant.models.registry import unregistered_model_errors
    from tests.conftest import tiny_model

    class Strange(torch.nn.Module):
        pass

    with (
        pytest.raises(
            ModelError,
            match=r"Strange is not a registered architecture .*"
            r"\(ValueError: expected 2, got 1; test_registry\.py:\d+ in ",
        ),
        unregistered_model_errors(Strange()),
    ):
        raise ValueError("expected 2, got 1")
    # a registered family's error is a bug: its traceback stays
    with pytest.raises(ValueError), unregistered_model_errors(tiny_model("llama")):
        raise ValueError("a bug")
    with pytest.raises(torch.OutOfMemoryError), unregistered_model_errors(Strange()):
        raise torch.OutOfMemoryError("out of memory")  # not reworded
    with pytest.raises(ModelError, match=r"^ours$"), unregistered_model_errors(Strange()):
        raise ModelError("ours")  # already one line: not wrapped again

import sys

import pytest
import torch
from torch import nn

from omniquant.memory import parameters_on_meta, release_free_memory


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 32)
        self.register_buffer("freq", torch.arange(4.0), persistent=False)


def test_parameters_built_inside_are_on_meta_and_buffers_are_real():
    with parameters_on_meta():
        module = WithBuffer()
    assert module.linear.weight.is_meta and module.linear.bias.is_meta
    assert not module.freq.is_meta and module.freq.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not WithBuffer().linear.weight.is_meta  # the patch is gone after the context


def test_the_patch_is_undone_after_an_error():
    with pytest.raises(RuntimeError), parameters_on_meta():
        raise RuntimeError("boom")
    assert not nn.Linear(4, 4).weight.is_meta


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_memory_is_released_on_glibc():
    assert release_free_memory() is True

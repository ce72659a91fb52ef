"""The output head in float16, for decoding with the integer kernels.

Once the decoder blocks' linears are int4, a small model's decode step is dominated by its
output head: SmolLM2-135M's (49152 x 576, float32, tied to the embedding) is 113 MB read per
token, twice the int4 blocks' 56 MB, and its product takes 7.9 ms of a 24.6 ms compiled step
on 2 CPU threads; in float16 it takes 2.7 ms (`benchmarks/head_matmul.py`). llama.cpp stores
the head the same way by default (f16 "output").

`HalfHead` keeps the head's weight in float16 and
  * for a few rows (decoding: at most `DECODE_ROWS` tokens per call) multiplies in float16 (the
    logits then carry float16 rounding: about 4e-4 of the largest logit);
  * for more rows (a prompt) upcasts the weight, `UPCAST_ROWS` output rows at a time, and
    multiplies in float32, because the CPU's float16 matrix product is slower than float32 there
    (512 rows: 1.29 s against 0.25 s).
A tied input embedding (a plain `nn.Embedding`) reads the same float16 weight (`HalfEmbedding`),
so the model holds the matrix once, in half the bytes; an embedding of another kind (Gemma's
scaled one, say) keeps its own float32 weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HEAD_DTYPES = ("float32", "float16")
DECODE_ROWS = 8
UPCAST_ROWS = 4096  # output rows upcast together for a prompt (9.4 MB of float32 at width 576)


class HalfHead(nn.Module):
    """A linear output head holding its weight in float16 (see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight16", weight.detach().to(torch.float16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features <= DECODE_ROWS:
            y = F.linear(x.to(torch.float16), self.weight16).to(x.dtype)
        else:  # upcast a slice of rows at a time: no float32 copy of the whole matrix
            parts = self.weight16.split(UPCAST_ROWS)
            y = torch.cat([F.linear(x, part.to(x.dtype)) for part in parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class HalfEmbedding(nn.Module):
    """A token embedding reading a float16 table (shared with a `HalfHead`), returning float32."""

    def __init__(self, weight16: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__()
        self.weight16 = weight16  # the head's buffer: one copy of the matrix
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight16.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight16, self.padding_idx).float()


def use_half_head(model: nn.Module) -> bool:
    """Put a `HalfHead` in place of the model's output head (and a `HalfEmbedding` in place of a
    plain embedding tied to it). False when the model has no plain linear head to replace."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return False
    embedding = model.get_input_embeddings()
    tied = isinstance(embedding, nn.Embedding) and embedding.weight is head.weight
    half = HalfHead(head.weight, head.bias)
    model.set_output_embeddings(half)
    if tied and type(embedding) is nn.Embedding:
        model.set_input_embeddings(HalfEmbedding(half.weight16, embedding.padding_idx))
    return True

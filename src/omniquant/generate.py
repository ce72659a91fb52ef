"""Text generation from a prompt, streaming each token as it is produced."""

from __future__ import annotations

from typing import Any, TextIO

import torch
from torch import nn

from omniquant.errors import ConfigError


def check_prompt(prompt: str) -> None:
    """Refuse a prompt with nothing to continue (before any model is loaded)."""
    if not prompt.strip():
        raise ConfigError("the prompt is empty; pass the text to continue: --prompt TEXT")


def check_generation(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """Refuse bad generation settings (before any model is loaded)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # NaN included
        raise ConfigError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    check_prompt(prompt)


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """(1, T) token ids of the prompt, through the chat template when asked."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


class _Writer:
    """A transformers streamer that writes decoded text to a stream as tokens arrive."""

    def __init__(self, tokenizer: Any, out: TextIO, skip: int) -> None:
        self.tokenizer, self.out, self.skip = tokenizer, out, skip
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # the prompt comes first, once
            self.skip = 0
            return
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def _writer(tokenizer: Any, out: TextIO | None, prompt: str, chat: bool) -> _Writer | None:
    """The streamer writing to `out` (the prompt first, unless it went through a chat template),
    or None without `out`."""
    if out is None:
        return None
    if not chat:
        out.write(prompt)
    return _Writer(tokenizer, out, skip=1)


def compile_options(device: torch.device) -> dict[str, Any]:
    """`generate` options for compiled decoding: a static cache and a compile config. Transformers
    compiles on its own only on accelerators; the CPU gains as well, so it is asked to there."""
    from transformers import CompileConfig

    config = CompileConfig(
        dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default"
    )
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    chat: bool = False,
    out: TextIO | None = None,
    compile: bool = False,
    native: bool = False,
    head: str = "float32",
) -> list[int]:
    """Generate up to `max_new_tokens` after the prompt (greedy when temperature is 0), writing
    the text to `out` as it comes; returns the new token ids.

    compile=True decodes through `torch.compile` with a static KV cache (CUDA graphs on CUDA):
    the first call spends tens of seconds compiling, later tokens come faster (SmolLM2 W4A16g128
    on 2 CPU threads: see benchmarks/README.md#compiled-decoding).

    native=True decodes a fake-quantized model (with its grids) through `kernels.native`'s
    one-call C++ decode step on the CPU, its head in `head` (float32 or float16)."""
    check_generation(prompt, max_new_tokens, temperature)
    if native:  # refuses a model that is not on the CPU
        from omniquant.kernels.native import NativeDecoder

        decoder = NativeDecoder(model, head=head)
        return generate_native(decoder, tokenizer, prompt, max_new_tokens, temperature, chat, out)
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    streamer = _writer(tokenizer, out, prompt, chat)
    sampling = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    extra = compile_options(device) if compile else {}
    result = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        top_p=None,
        top_k=None,
        **sampling,
        **extra,
    )
    return result[0, ids.shape[1] :].tolist()


def generate_native(
    decoder: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    chat: bool = False,
    out: TextIO | None = None,
) -> list[int]:
    """`generate` through a `kernels.native.NativeDecoder` (the CPU, one C++ call per token):
    greedy at temperature 0, else sampled under torch's global seed; stops at the model's
    end-of-sequence ids."""
    check_generation(prompt, max_new_tokens, temperature)
    ids = prompt_ids(tokenizer, prompt, chat)
    streamer = _writer(tokenizer, out, prompt, chat)
    if streamer is not None:
        streamer.put(ids)
    new = []
    for token in decoder.tokens(ids[0].tolist(), max_new_tokens, temperature, decoder.eos_ids):
        new.append(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
    if streamer is not None:
        streamer.end()
    return new

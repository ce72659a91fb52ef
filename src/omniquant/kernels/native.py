"""The native decoder: a whole decode step (every block and the head) in one C++ call, on the CPU.

Why: at batch 1 a small model's decode step through PyTorch is mostly per-operator overhead
(SmolLM2-135M W4A16g128, compiled: 18.8 ms a token, of which the int4 products are 8.7 ms and
the compiled graph's Python and guards about 5 ms). llama.cpp runs the same step in about 7 ms by
doing it all in native code. `NativeDecoder` does the same for our grids, without re-quantizing:

* each quantized linear keeps its own 2/3/4-bit codes, 32 per 16 bytes, and its float32 scale and
  minimum per group (w = q s + m with m = -z s: the learned grid exactly); a linear without a
  grid keeps its float32 weight;
* the vector a linear reads is rounded to int16 in blocks of 32 (a float32 step per block), so a
  row's dot product is an integer one (AVX2 `madd_epi16`); the minimum's term uses the vector's
  float sums. Int16 keeps the fake-quantized model's austen-v1 perplexity (41.7308 against
  41.7320 at W4A16g128). `activations=8` rounds to int8 instead, as llama.cpp's Q8 does (AVX2
  `maddubs`): faster, but +2.6% perplexity on SmolLM2;
* a prompt goes CHUNK tokens per call, each block of codes widened once for 4 tokens; compiled
  with -ffp-contract=off, a token's arithmetic is the same on every path (chunk or single step);
* norms, RoPE (the model's own rotary tables, so every scaling transformers implements),
  attention over a float32 KV cache, and the activation run in float32; the head and a tied
  embedding in float16 (as `--head float16`, llama.cpp's default) or float32.

The step is data-driven from the family's `Architecture` and config (q/k/v as one or three
linears, gate/up as one or two, biases, q/k norms, grouped-query attention, sliding windows).
It runs the families whose record says so (`Architecture.native` is None: today Llama, SmolLM2,
Mistral, Qwen2, Qwen3, Phi-3); the others are refused with the record's reason (Gemma 3: scaled
embeddings, sandwich norms, soft caps; OPT: LayerNorm, no RoPE), as are activation quantization
and grids the blocks cannot hold (5-8 bits; groups that are not multiples of 32).

The C++ source (`native_decoder.cpp`) is compiled on first use with the machine's C++ compiler
(`-O3 -march=native`; AVX2/FMA/F16C where the CPU has them, portable loops otherwise) and cached
under ~/.cache/omniquant/native, keyed by the source, the compiler and the CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniquant.errors import ConfigError, ModelError
from omniquant.models.architecture import Architecture, get_module
from omniquant.models.registry import decoder_layers, get_architecture
from omniquant.quant.qparams import QPARAMS_ATTR, LinearQParams, weight_codes

SOURCE = Path(__file__).with_name("native_decoder.cpp")
CACHE = Path(os.environ.get("OMNIQUANT_CACHE", Path.home() / ".cache" / "omniquant")) / "native"
# -ffp-contract=off: no a * b + c fused where the source does not say so, so a token's arithmetic
# is the same whichever code path (a prompt's chunk, a decode step) runs it
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread"]
BLOCK = 32  # weights per 16 bytes of codes; activations quantized per 32
CHUNK = 16  # prompt tokens per native call
NATIVE_CODES_ATTR = "omniquant_native_codes"  # codes in this layout, set by load_packed(native=)
ACTIVATION_BITS = (8, 16)  # the integer type a quantized linear's input is rounded to
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2}


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("out", ctypes.c_int32),
        ("in_", ctypes.c_int32),
        ("n_groups", ctypes.c_int32),
        ("codes", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("minimum", ctypes.c_void_p),
        ("group_start", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("qkv", _Linear * 3),
        ("n_qkv", ctypes.c_int32),
        ("o", _Linear),
        ("mlp_in", _Linear * 2),
        ("n_mlp_in", ctypes.c_int32),
        ("down", _Linear),
        ("window", ctypes.c_int32),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "n_layers",
            "hidden",
            "n_heads",
            "n_kv",
            "head_dim",
            "inter",
            "vocab",
            "max_pos",
            "rot_dim",
            "act",
            "head_half",
            "n_threads",
            "act_bits",
        )
    ] + [
        ("eps", ctypes.c_float),
        ("qk_eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
        ("layers", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("head", ctypes.c_void_p),
        ("head_bias", ctypes.c_void_p),
        ("embedding", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
    ]


def compiler() -> str:
    """The C++ compiler to build with ($CXX, else g++ or clang++); ConfigError when none."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    raise ConfigError(
        "the native decoder needs a C++ compiler (g++ or clang++; set CXX) and none was found: "
        "install one (Debian: apt-get install g++) or decode without `native`"
    )


def cpu_flags() -> str:
    """The CPU's model and feature flags (part of the compiled library's cache key)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() + platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({x for x in lines if x.startswith(wanted)}))


@lru_cache(maxsize=2)
def library(march: str = "native") -> ctypes.CDLL:
    """The compiled native decoder (built once per source, compiler and CPU, then cached).
    `march` other than "native" builds for that target instead (tests build "x86-64", whose
    portable loops run where AVX2 is missing)."""
    cxx = compiler()
    flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    # -march=native: a library built on one CPU may not run on another (a shared home folder)
    parts = (SOURCE.read_text(), " ".join(flags), version, cpu_flags())
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    target = CACHE / f"native_decoder-{key[:16]}.so"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:  # no half-written library left
            built = Path(tmp) / target.name
            run = subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True
            )
            if run.returncode != 0:
                raise ConfigError(
                    f"building the native decoder with {cxx} failed:\n{run.stderr[-2000:]}"
                )
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.oq_step.restype = ctypes.c_int
    lib.oq_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    lib.oq_step.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int32]
    lib.oq_scratch_floats.restype = ctypes.c_int64
    lib.oq_scratch_floats.argtypes = [ctypes.c_void_p]
    lib.oq_avx2.restype = ctypes.c_int
    return lib


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes below 16 as (out, in / 2) bytes: per 32, byte j = code j | code j+16 << 4."""
    out, width = codes.shape
    blocks = codes.to(torch.uint8).reshape(out, width // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(out, width // 2).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_codes` (a checking tool: no run needs it; tests read the native
    layout back with it)."""
    out, half = packed.shape
    blocks = packed.reshape(out, half // (BLOCK // 2), 1, BLOCK // 2)
    both = torch.cat([blocks & 15, blocks >> 4], dim=2)
    return both.reshape(out, half * 2)


def group_starts(qp: LinearQParams) -> torch.Tensor:
    """Where each group of the grid starts, in blocks of 32, and the row's end (a ragged last group
    is shorter)."""
    starts = [*range(0, qp.in_features, qp.group), qp.in_features]
    return torch.tensor([s // BLOCK for s in starts], dtype=torch.int32)


def check_bits_and_group(where: str, bits: int, group_size: int | None) -> None:
    """Refuse weight settings the native blocks cannot hold, naming the setting that fits."""
    if bits > 4:
        raise ConfigError(
            f"{where}: the native decoder runs 2-4-bit weights, this one has {bits} bits; "
            f"decode {bits}-bit models without `native`"
        )
    if group_size is not None and group_size % BLOCK:
        raise ConfigError(
            f"{where}: the native decoder needs groups of a multiple of 32 (this one: group "
            f"{group_size}); quantize with `group_size` 32/64/128 or per channel"
        )


def check_grid(name: str, qp: LinearQParams) -> None:
    """Refuse a linear's grid the native blocks cannot hold (bits, group, width)."""
    check_bits_and_group(name, qp.bits, qp.group)
    if qp.in_features % BLOCK:
        raise ConfigError(
            f"{name}: the native decoder needs a width that is a multiple of 32, this one has "
            f"{qp.in_features}; decode it without `native`"
        )


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecoder:
    """Greedy or sampled decoding of a fake-quantized model (with its grids) in native code."""

    def __init__(
        self,
        model: nn.Module,
        head: str = "float16",
        threads: int | None = None,
        activations: int = 16,
    ) -> None:
        if head not in ("float16", "float32"):
            raise ConfigError(f"head must be float16 or float32, got {head!r}")
        if activations not in ACTIVATION_BITS:
            raise ConfigError(f"activations must be 8 or 16 (bits), got {activations!r}")
        self.act_bits = activations
        devices = {t.device.type for t in model.parameters()} - {"meta"}
        if devices - {"cpu"}:
            raise ConfigError(
                f"the native decoder runs on the CPU; this model is on {sorted(devices)}: load it "
                "with device='cpu'"
            )
        self.lib = library()
        self.arch = get_architecture(model)
        config = model.config.get_text_config()
        check_supported(model, self.arch, config)
        self.threads = threads or torch.get_num_threads()
        self.keep: list[torch.Tensor] = []  # every tensor a pointer in the structures refers to
        self.linear_bytes = 0  # what stands for the blocks' linear weights (bias excluded)
        self.hidden = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.n_heads
        self.vocab = config.vocab_size
        self.config = config
        blocks = decoder_layers(model, self.arch)
        self.blocks = [self._block(block, i) for i, block in enumerate(blocks)]
        self.inter = self.blocks[0]["inter"]
        self.final_norm = self._norm(get_module(model, self.arch.final_norm or ""))
        self.eps = norm_eps(get_module(model, self.arch.final_norm or ""))
        attention = get_module(blocks[0], self.arch.attention or "self_attn")
        self.scaling = float(getattr(attention, "scaling", self.head_dim**-0.5))
        self.qk_eps = self.eps
        if self.arch.qk_norm:
            self.qk_eps = norm_eps(get_module(blocks[0], "self_attn.q_norm"))
        self.head_half = head == "float16"
        self._head(model)
        self.rotary = rotary_module(model)
        self.eos_ids = stop_ids(model)
        self.capacity = 0
        self.position = 0

    # -- building ------------------------------------------------------------------------------

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()
        self.keep.append(t)
        return t

    def _norm(self, module: nn.Module) -> torch.Tensor:
        w = module.weight.detach().float()
        return self._hold(w + 1 if self.arch.norm_kind == "rms_offset" else w)

    def _linear(self, name: str, module: nn.Module) -> _Linear:
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"{name} is a {type(module).__name__}: the native decoder reads the fake-quantized "
                "model and its grids; load it without kernels (omniquant.load(path))"
            )
        bias = None if module.bias is None else self._hold(module.bias.float())
        qp: LinearQParams | None = getattr(module, QPARAMS_ATTR, None)
        packed: torch.Tensor | None = getattr(module, NATIVE_CODES_ATTR, None)
        out, width = module.weight.shape
        if width % BLOCK:
            raise ConfigError(f"{name}: width {width} is not a multiple of 32 (native decoder)")
        if qp is None:
            w = self._hold(module.weight.float())
            self.linear_bytes += w.numel() * 4
            return _Linear(1, out, width, 0, None, None, None, None, _ptr(w), _ptr(bias))
        check_grid(name, qp)
        if packed is None:
            packed = pack_codes(weight_codes(module.weight, qp))
        codes = self._hold(packed)
        scale = self._hold(qp.scale.float())
        minimum = self._hold(-(qp.zero.float() * qp.scale.float()))
        starts = self._hold(group_starts(qp))
        self.linear_bytes += sum(t.numel() * t.element_size() for t in (codes, scale, minimum))
        pointers = map(_ptr, (codes, scale, minimum, starts))
        return _Linear(0, out, width, qp.n_groups, *pointers, None, _ptr(bias))

    def _block(self, block: nn.Module, index: int) -> dict[str, Any]:
        arch = self.arch
        qkv = [self._linear(p, get_module(block, p)) for p in arch.qkv]
        mlp_in = [self._linear(p, get_module(block, p)) for p in arch.mlp_in]
        rows = sum(x.out for x in qkv)
        if rows != (self.n_heads + 2 * self.n_kv) * self.head_dim:
            raise ModelError(f"block {index}: q/k/v give {rows} rows, not what the config says")
        inter = sum(x.out for x in mlp_in) // 2
        block_parts = {
            "attn_norm": self._norm(get_module(block, arch.attn_norm or "")),
            "mlp_norm": self._norm(get_module(block, arch.mlp_norm or "")),
            "q_norm": self._norm(get_module(block, "self_attn.q_norm")) if arch.qk_norm else None,
            "k_norm": self._norm(get_module(block, "self_attn.k_norm")) if arch.qk_norm else None,
            "qkv": qkv,
            "o": self._linear(arch.o_proj or "", get_module(block, arch.o_proj or "")),
            "mlp_in": mlp_in,
            "down": self._linear(arch.mlp_out or "", get_module(block, arch.mlp_out or "")),
            "window": layer_window(self.config, index),
            "inter": inter,
        }
        return block_parts

    def _head(self, model: nn.Module) -> None:
        head = model.get_output_embeddings()
        embedding = model.get_input_embeddings()
        dtype = torch.float16 if self.head_half else torch.float32
        self.head = self._hold(head.weight.to(dtype))
        tied = embedding.weight is head.weight
        self.embedding = self.head if tied else self._hold(embedding.weight.to(dtype))
        self.head_bias = None if head.bias is None else self._hold(head.bias.float())

    def reserve(self, positions: int) -> None:
        """Make room for `positions` tokens (KV cache and RoPE tables); keeps what is cached."""
        if positions <= self.capacity:
            return
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and positions > limit:
            raise ConfigError(f"{positions} positions exceed the model's context ({limit})")
        capacity = max(positions, 2 * self.capacity)
        if limit is not None:
            capacity = min(capacity, limit)
        shape = (self.n_kv, capacity, self.head_dim)
        caches = []
        for i in range(len(self.blocks)):
            k, v = torch.zeros(shape), torch.zeros(shape)
            if self.capacity:
                k[:, : self.capacity] = self.caches[i][0]
                v[:, : self.capacity] = self.caches[i][1]
            caches.append((k, v))
        self.caches = caches
        with torch.no_grad():
            ids = torch.arange(capacity)[None]
            cos, sin = self.rotary(torch.zeros(1, 1, dtype=torch.float32), ids)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self.capacity = capacity
        self._build()

    def _build(self) -> None:
        layers = (_Layer * len(self.blocks))()
        for layer, b, (k, v) in zip(layers, self.blocks, self.caches, strict=True):
            layer.attn_norm, layer.mlp_norm = _ptr(b["attn_norm"]), _ptr(b["mlp_norm"])
            layer.q_norm, layer.k_norm = _ptr(b["q_norm"]), _ptr(b["k_norm"])
            for i, x in enumerate(b["qkv"]):
                layer.qkv[i] = x
            layer.n_qkv = len(b["qkv"])
            layer.o, layer.down = b["o"], b["down"]
            for i, x in enumerate(b["mlp_in"]):
                layer.mlp_in[i] = x
            layer.n_mlp_in = len(b["mlp_in"])
            layer.window = b["window"]
            layer.k_cache, layer.v_cache = _ptr(k), _ptr(v)
        self.layers = layers
        act = ACTIVATIONS[activation_name(self.config)]
        self.model = _Model(
            len(self.blocks), self.hidden, self.n_heads, self.n_kv, self.head_dim, self.inter,
            self.vocab, self.capacity, self.cos.shape[-1], act, int(self.head_half),
            self.threads, self.act_bits, self.eps, self.qk_eps, self.scaling,
            ctypes.addressof(layers), _ptr(self.final_norm), _ptr(self.head),
            _ptr(self.head_bias), _ptr(self.embedding), _ptr(self.cos), _ptr(self.sin),
        )  # fmt: skip
        scratch = self.lib.oq_scratch_floats(ctypes.byref(self.model))
        self.scratch = torch.empty(CHUNK * int(scratch))
        self.h = torch.empty(CHUNK, self.hidden)
        self.chunk = torch.empty(CHUNK, dtype=torch.int32)
        self.logits = torch.empty(self.vocab)
        self.chunk_logits = torch.empty(CHUNK, self.vocab)

    # -- running -------------------------------------------------------------------------------

    def _run(self, tokens: list[int], logits: bool, every: bool = False) -> torch.Tensor | None:
        """Feed up to CHUNK tokens at the next positions (one native call): the last one's
        logits (vocab,) when asked, or every one's (len(tokens), vocab) with `every`."""
        self.reserve(self.position + len(tokens))
        self.chunk[: len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        target = self.chunk_logits if every else self.logits
        out = _ptr(target) if logits or every else None
        rc = self.lib.oq_step(
            ctypes.byref(self.model), _ptr(self.chunk), len(tokens), self.position,
            _ptr(self.h), _ptr(self.scratch), out, int(every),
        )  # fmt: skip
        if rc != 0:
            raise ConfigError(f"a token of {tokens} at position {self.position} is out of range")
        self.position += len(tokens)
        if every:
            return self.chunk_logits[: len(tokens)]
        return self.logits if logits else None

    def step(self, token: int, logits: bool = True) -> torch.Tensor | None:
        """Feed one token at the next position; its logits (vocab,) float32 when asked. The
        returned tensor is overwritten by the next step: clone it to keep it."""
        return self._run([int(token)], logits)

    def reset(self) -> None:
        """Forget the cached positions (the next token is the first)."""
        self.position = 0

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed a prompt, CHUNK tokens per native call (each block of weights is read once for
        up to 4 tokens); the last token's logits, equal to feeding it token by token."""
        if not ids:
            raise ConfigError("the prompt has no tokens")
        self.reserve(self.position + len(ids))
        for start in range(0, len(ids), CHUNK):
            part = [int(t) for t in ids[start : start + CHUNK]]
            out = self._run(part, logits=start + CHUNK >= len(ids))
        assert out is not None
        return out

    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's logits (len(ids), vocab) for a sequence fed from an empty cache, CHUNK
        tokens per call (each head row read once per chunk); row i equals what `step` gives for
        ids[i] after ids[:i]."""
        if not ids:
            raise ConfigError("the sequence has no tokens")
        self.reset()
        self.reserve(len(ids))
        out = torch.empty(len(ids), self.vocab)
        for start in range(0, len(ids), CHUNK):
            part = [int(t) for t in ids[start : start + CHUNK]]
            out[start : start + len(part)] = self._run(part, logits=True, every=True)
        return out

    def tokens(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        stop: set[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """New tokens after the prompt `ids`, one at a time (greedy at temperature 0), until
        `max_new_tokens` or a token in `stop`. Starts from an empty cache."""
        self.reset()
        self.reserve(len(ids) + max_new_tokens)
        logits = self.prefill(ids)
        for i in range(max_new_tokens):
            token = pick(logits, temperature, generator)
            yield token
            if (stop and token in stop) or i == max_new_tokens - 1:
                return
            logits = self.step(token)  # type: ignore[assignment]


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """The next token: the argmax at temperature 0, else a sample of softmax(logits / t)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_ids(model: nn.Module) -> set[int]:
    """The end-of-sequence ids generation stops at (the generation config's, else the model's)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in ([ids] if isinstance(ids, int) else ids)}


def norm_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(module, name):
            return float(getattr(module, name))
    raise ModelError(f"{type(module).__name__} has no epsilon the native decoder can read")


def activation_name(config: Any) -> str:
    return str(getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", ""))


def layer_window(config: Any, index: int) -> int:
    """The sliding window of block `index` in positions (0: full attention)."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(window) if types[index] == "sliding_attention" else 0
    if getattr(config, "use_sliding_window", True) is False:
        return 0
    return int(window)


def rotary_module(model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model's own rotary embedding (cos and sin tables for given positions)."""
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        raise ModelError(
            f"the native decoder needs one rotary embedding module, this model has {len(found)}"
        )
    return found[0]


def check_supported(model: nn.Module, arch: Architecture, config: Any) -> None:
    """Refuse, before packing anything, a model the native step does not compute exactly: a
    family whose record says why (`Architecture.native`), and, whatever the record says, a model
    whose modules or config the step does not compute."""
    reasons = [] if arch.native is None else [arch.native]
    if arch.native is None and (arch.norm_kind not in ("rms", "rms_offset") or not arch.rotary):
        reasons.append(f"{arch.name} uses {arch.norm_kind} norms or no RoPE")
    if type(model.get_input_embeddings()) is not nn.Embedding:
        reasons.append("its embedding is not a plain lookup (scaled or otherwise changed)")
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        reasons.append("its output head is not a linear layer")
    if activation_name(config) not in ACTIVATIONS:
        reasons.append(f"activation {activation_name(config)!r} is not one of {list(ACTIVATIONS)}")
    for name in ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
        if getattr(config, name, None) is not None:
            reasons.append(f"config sets {name}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") in ("dynamic", "longrope"):
        reasons.append(f"its RoPE scaling ({rope['rope_type']}) depends on the sequence length")
    layers = decoder_layers(model, arch)
    extra = {"pre_feedforward_layernorm", "post_feedforward_layernorm"} & {
        n for n, _ in layers[0].named_children()
    }
    if extra:
        reasons.append(f"its blocks have extra norms ({sorted(extra)})")
    if any(m._forward_pre_hooks or m._forward_hooks for m in layers.modules()):
        reasons.append("it carries hooks (activation quantization runs only in PyTorch)")
    if reasons:
        raise ConfigError(
            f"the native decoder cannot run this {arch.name} model: {'; '.join(reasons)}. "
            "Decode it without `native`"
        )

"""One record per family: every registered `Architecture` either carries what each consumer (the
GGUF writer, the native decoder) needs, or is refused by it with the record's reason.

Each family is built from its own transformers classes (the registry's key names the model class,
whose `config_class` gives the config), tiny and on the meta device: no weights are made.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, get_args

import pytest
import torch
import transformers
from torch import nn

from omniquant.errors import ConfigError, ExportError
from omniquant.models import REGISTRY, Architecture, GgufSpec, Refusal, by_model_type
from omniquant.models.architecture import GgufKey, RopeScaling
from omniquant.models.registry import get_architecture

gguf = pytest.importorskip("gguf")

# enough for every registered family's config class (unknown keys are kept as attributes)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    ffn_dim=96,
    word_embed_proj_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_meta_model(class_name: str) -> tuple[Any, nn.Module]:
    """The config and a meta-device model of a registered class."""
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**TINY)
    with torch.device("meta"):
        model = model_class(config)
    return config, model.eval()


def _raises(fn: Any, error: type[Exception]) -> str | None:
    """The message of the `error` `fn()` raised, or None when it returned."""
    try:
        fn()
    except error as e:
        return str(e)
    return None


def _setting(config: Any, refusal: Refusal, refused: bool) -> Any:
    """A copy of `config` that sets (or, not `refused`, clears) what `refusal` refuses."""
    changed = copy.deepcopy(config)
    other = getattr(config, refusal.unless_equal_to, None) if refusal.unless_equal_to else None
    if refusal.unless_equal_to is not None:
        setattr(changed, refusal.setting, other + 1 if refused else other)
        return changed
    for value in (True, 1.0, 1) if refused else (None, False):  # configs check their types
        try:
            setattr(changed, refusal.setting, value)
            return changed
        except Exception:  # transformers' strict configs raise their own validation error
            continue
    raise AssertionError(f"no value of {refusal.setting} that {type(config).__name__} takes")


def gguf_problems(arch: Architecture, config: Any, model: nn.Module) -> list[str]:
    """What is wrong between a record and the GGUF writer (nothing: an empty list)."""
    from omniquant.formats.gguf.writer import GGUF_ARCH, gguf_architecture

    if not isinstance(arch.gguf, GgufSpec):
        message = _raises(lambda: gguf_architecture(config), ExportError)
        if message is None:
            return [f"GGUF writes it although its record refuses it ({arch.gguf})"]
        if not arch.gguf or arch.gguf not in message or "omniquant-packed" not in message:
            return [f"GGUF's refusal {message!r} does not give the record's reason {arch.gguf!r}"]
        return []
    spec = arch.gguf
    problems = []
    for refusal in spec.refusals:
        for setting in (refusal.setting, refusal.unless_equal_to):
            if setting is not None and not hasattr(config, setting):
                problems.append(f"its config has no {setting!r} (a refusal reads it)")
    if problems:
        return problems
    for refusal in spec.refusals:  # what the family refuses, then, one by one, each refusal
        refused = _setting(config, refusal, True)
        message = _raises(lambda c=refused: gguf_architecture(c), ExportError)
        if message is None or message != refusal.check(refused):
            problems.append(f"GGUF does not refuse {refusal.setting} with its reason: {message}")
        config = _setting(config, refusal, False)
    got = _raises(lambda: gguf_architecture(config), ExportError)
    if got is not None:
        return [f"GGUF refuses its default config: {got}"]
    if gguf_architecture(config) != spec.arch:
        problems.append(f"GGUF writes {gguf_architecture(config)}, the record says {spec.arch}")
    if not arch.model_types or any(GGUF_ARCH.get(t) != spec.arch for t in arch.model_types):
        problems.append(f"GGUF_ARCH does not map its model_types {arch.model_types} to {spec.arch}")
    if spec.arch not in gguf.MODEL_ARCH_NAMES.values():
        return [*problems, f"llama.cpp has no architecture {spec.arch!r}"]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for name in model.state_dict():
        if names.get_name(name.rpartition(".")[0]) is None:
            problems.append(f"llama.cpp's {spec.arch} has no tensor name for {name}")
    if spec.permute_qk and (arch.fused_qkv or len(arch.qkv) != 3):
        problems.append("permute_qk needs separate q, k, v projections")
    if not set(spec.rope_scaling) <= set(get_args(RopeScaling)):
        problems.append(f"unknown RoPE scaling in {spec.rope_scaling}")
    if not set(spec.metadata) <= set(get_args(GgufKey)):
        problems.append(f"unknown GGUF metadata keys in {spec.metadata}")
    return problems


def native_problems(arch: Architecture, config: Any, model: nn.Module) -> list[str]:
    """What is wrong between a record and the native decoder's check (nothing: an empty list)."""
    from omniquant.kernels.native import check_supported, rotary_module

    message = _raises(lambda: check_supported(model, arch, config), ConfigError)
    if arch.native is None:
        problems = [] if message is None else [f"the native decoder refuses it: {message}"]
        rotary = _raises(lambda: rotary_module(model), Exception)
        return problems + ([] if rotary is None else [rotary])
    if message is None or arch.native not in message:
        return [f"the native decoder does not refuse it with {arch.native!r} (got {message!r})"]
    return []


def family_problems(class_name: str, arch: Architecture) -> list[str]:
    """Everything a registered record misses for the consumers that read it."""
    config, model = tiny_meta_model(class_name)
    problems = []
    if config.model_type not in arch.model_types:
        problems.append(f"model_type {config.model_type!r} is not in its record's model_types")
    found = _raises(lambda: by_model_type(config.model_type), Exception)
    if found is not None:
        problems.append(found)
    elif by_model_type(config.model_type) != arch:
        problems.append(f"model_type {config.model_type!r} finds another record")
    if get_architecture(model) != arch:
        problems.append(f"{class_name} is not the class of the model it builds")
    problems += gguf_problems(arch, config, model)
    problems += native_problems(arch, config, model)
    return problems


@pytest.mark.parametrize("class_name", sorted(REGISTRY))
def test_every_registered_family_is_written_or_refused_by_each_consumer(class_name):
    assert family_problems(class_name, REGISTRY[class_name]) == []


def test_the_records_say_what_the_consumers_did_before():
    from omniquant.formats.gguf.writer import GGUF_ARCH

    assert dict(GGUF_ARCH) == {
        "llama": "llama",
        "mistral": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "phi3": "phi3",
        "gemma3_text": "gemma3",
    }
    native = {a.name for a in REGISTRY.values() if a.native is None}
    assert native == {"llama", "mistral", "qwen2", "qwen3", "phi3"}


@pytest.mark.parametrize(
    "change,problem",
    [
        (dict(model_types=()), "not in its record's model_types"),
        (dict(gguf=GgufSpec(arch="llama", permute_qk=True)), "permute_qk needs separate"),
        (dict(gguf=GgufSpec(arch="no-such-arch")), "llama.cpp has no architecture"),
        (dict(native=None), "the native decoder refuses it"),
        (
            dict(gguf=GgufSpec(arch="phi3", refusals=(Refusal("no_such_setting", "x"),))),
            "its config has no 'no_such_setting'",
        ),
    ],
)
def test_a_record_that_misses_something_is_caught(monkeypatch, change, problem):
    class_name = "OPTForCausalLM" if change.get("native", 0) is None else "Phi3ForCausalLM"
    broken = dataclasses.replace(REGISTRY[class_name], **change)
    monkeypatch.setitem(REGISTRY, class_name, broken)
    problems = family_problems(class_name, broken)
    assert any(problem in p for p in problems), problems


def test_a_model_type_two_records_claim_is_refused(monkeypatch):
    from omniquant.errors import ModelError

    twin = dataclasses.replace(REGISTRY["LlamaForCausalLM"], name="twin")
    monkeypatch.setitem(REGISTRY, "TwinForCausalLM", twin)
    with pytest.raises(ModelError, match="claimed by several records"):
        by_model_type("llama")

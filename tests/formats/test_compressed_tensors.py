import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import omniquant
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ExportError
from omniquant.formats.compressed_tensors import check_compressed_tensors, write_compressed_tensors
from tests.conftest import needs_austen

pytestmark = needs_austen
pytest.importorskip("compressed_tensors")
FAST = CalibConfig(epochs=1, nsamples=2, seqlen=32)


def _quantized(folder, weight: WeightQuant, act: ActQuant | None = None):
    config = OmniQuantConfig(weight, act or ActQuant(), FAST)
    return omniquant.quantize(folder, config, progress=False), config


@pytest.mark.parametrize(
    "weight", [WeightQuant(4, 32), WeightQuant(4, None), WeightQuant(8, None), WeightQuant(2, 32)]
)
def test_plain_transformers_loads_the_export_with_the_same_outputs(
    tiny_llama_folder, tmp_path, weight
):
    result, config = _quantized(tiny_llama_folder, weight)
    out = tmp_path / "ct"
    write_compressed_tensors(result.model, result.tokenizer, config, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = result.model(ids).logits
        got = loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    ppl_fake = omniquant.evaluate(
        result.model, tokenizer=result.tokenizer, seqlen=32, max_windows=4, progress=False
    )
    ppl_ct = omniquant.evaluate(
        loaded, tokenizer=result.tokenizer, seqlen=32, max_windows=4, progress=False
    )
    assert ppl_ct == pytest.approx(ppl_fake, rel=1e-3)


def test_w8a8_exports_int8_with_dynamic_per_token_activations(tiny_llama_folder, tmp_path):
    result, config = _quantized(
        tiny_llama_folder, WeightQuant(8, None), ActQuant(8, quantize_qkv=False)
    )
    out = tmp_path / "ct"
    write_compressed_tensors(result.model, result.tokenizer, config, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized"
    assert (
        group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    )
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = result.model(ids).logits
        got = loaded(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 2e-2


@pytest.mark.parametrize(
    "weight,act,match",
    [
        (WeightQuant(4, 48), ActQuant(), "does not divide its width"),
        (WeightQuant(3, 32), ActQuant(), "omniquant-packed"),
        (WeightQuant(4, None), ActQuant(4), "W8A8"),
        (WeightQuant(8, None), ActQuant(8), "query/key/value"),
    ],
)
def test_what_the_format_cannot_hold_is_refused(tiny_llama_folder, weight, act, match):
    result, config = _quantized(tiny_llama_folder, weight, act)
    with pytest.raises(ExportError, match=match):
        check_compressed_tensors(result.model, config)

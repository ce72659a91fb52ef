import json

import pytest
import torch

import omniquant
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ExportError
from omniquant.kernels.linear import QuantLinear
from omniquant.quant.activation import HOOK_FLAG
from tests.conftest import needs_austen


def write_packed(model, config, folder):
    """An omniquant-packed folder with its run record, as export writes it."""
    from omniquant.formats import write_packed_format

    record = {"config": config.to_dict()}
    write_packed_format("omniquant-packed", model, None, config, record, folder)


pytestmark = needs_austen
FAST = CalibConfig(epochs=1, nsamples=2, seqlen=32)
IDS = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1))


def _config(bits=3, group=40, abits=16):
    return OmniQuantConfig(WeightQuant(bits, group), ActQuant(abits), FAST)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("bits,group,abits", [(3, 40, 16), (4, 32, 16), (4, None, 4), (6, None, 6)])
def test_packed_folder_loads_back_to_the_fake_quantized_model(
    tiny_llama_folder, tmp_path, bits, group, abits
):
    out = tmp_path / "p"
    result = omniquant.quantize(
        tiny_llama_folder,
        _config(bits, group, abits),
        output=out,
        format="omniquant-packed",
        progress=False,
    )
    assert json.loads((out / "omniquant.json").read_text())["format"]["name"] == "omniquant-packed"
    want = _logits(result.model)
    model, _ = omniquant.load(out)
    assert torch.allclose(_logits(model), want, atol=1e-5)
    assert all(hasattr(b, HOOK_FLAG) == (abits < 16) for b in model.model.layers)
    fast, _ = omniquant.load(out, kernels=True)
    assert any(isinstance(m, QuantLinear) for m in fast.modules())
    got = _logits(fast)
    # the kernels take bf16 activations; with 4-6-bit activations a bf16 rounding can move an
    # activation to the next grid step, so the tolerance is wider there
    tolerance = 3e-2 if abits == 16 else 1e-1
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_packed_weights_are_smaller_than_float(tiny_llama_folder, tmp_path):
    omniquant.quantize(tiny_llama_folder, _config(), output=tmp_path / "fake", progress=False)
    omniquant.export(tmp_path / "fake", tmp_path / "p", "omniquant-packed")
    from safetensors.torch import load_file

    fake = load_file(str(tmp_path / "fake" / "model.safetensors"))
    packed = load_file(str(tmp_path / "p" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    assert packed[f"{name}.qweight"].numel() * 4 * 8 == pytest.approx(
        fake[f"{name}.weight"].numel() * 3, abs=32 * 96
    )
    assert f"{name}.weight" not in packed


def test_export_auto_picks_the_format_that_holds_the_setting(tiny_llama_folder, tmp_path):
    omniquant.quantize(tiny_llama_folder, _config(4, 32), output=tmp_path / "g32", progress=False)
    omniquant.quantize(tiny_llama_folder, _config(4, 40), output=tmp_path / "g40", progress=False)
    omniquant.export(tmp_path / "g32", tmp_path / "a")
    omniquant.export(tmp_path / "g40", tmp_path / "b")
    assert "quantization_config" in json.loads((tmp_path / "a" / "config.json").read_text())
    assert json.loads((tmp_path / "b" / "omniquant.json").read_text())["format"]["name"] == (
        "omniquant-packed"
    )


def test_a_refused_export_leaves_nothing_on_disk(tiny_llama_folder, tmp_path):
    omniquant.quantize(tiny_llama_folder, _config(3, 40), output=tmp_path / "q", progress=False)
    with pytest.raises(ExportError, match="omniquant-packed"):
        omniquant.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def _rtn_model(family):
    from omniquant.block_loop import calibrate_blocks
    from omniquant.capture import capture_block_inputs
    from omniquant.models import decoder_layers, get_architecture
    from omniquant.runtime import runtime_for
    from tests.conftest import random_ids, tiny_model

    model = tiny_model(family)
    with torch.no_grad():  # biases that are not zero, so that losing one shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.5 * torch.randn_like(p))
    blocks = decoder_layers(model, get_architecture(model))
    cap = capture_block_inputs(model, blocks, list(random_ids(2, 32).split(1)), "cpu")
    config = OmniQuantConfig(WeightQuant(4, 16), calib=CalibConfig(method="rtn"))
    calibrate_blocks(blocks, cap, config.weight, config.calib, runtime_for("cpu", progress=False))
    return model, config


def test_every_family_round_trips_through_the_packed_format(family, tmp_path):
    from tests.conftest import random_ids

    model, config = _rtn_model(family)
    write_packed(model, config, tmp_path / "q")
    ids = random_ids(2, 24)
    with torch.no_grad():
        want = model(ids).logits
        loaded, _ = omniquant.load(tmp_path / "q")
        assert torch.allclose(loaded(ids).logits, want, atol=1e-4)
        fast, _ = omniquant.load(tmp_path / "q", kernels=True)
        got = fast(ids).logits
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()


def test_float_tensors_exact_in_bf16_are_stored_as_bf16(tmp_path):
    from safetensors import safe_open

    from omniquant.formats.packed import WEIGHTS_FILE

    model, config = _rtn_model("llama")
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # a bf16 checkpoint upcast to float32; the norms stay float32 values
        emb.copy_(emb.bfloat16().float())
    write_packed(model, config, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    loaded, _ = omniquant.load(tmp_path / "q")
    assert loaded.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(loaded.get_input_embeddings().weight, emb)


def test_perplexity_with_the_kernels_is_that_of_the_fake_quantized_model(
    tiny_llama_folder, tmp_path, capsys
):
    from omniquant.cli import main
    from omniquant.errors import ConfigError

    out = tmp_path / "p"
    omniquant.quantize(
        tiny_llama_folder, _config(4, 32), output=out, format="omniquant-packed", progress=False
    )
    kw = {"seqlen": 64, "max_windows": 4, "progress": False}
    fake = omniquant.evaluate(out, **kw)
    real = omniquant.evaluate(out, kernels=True, **kw)
    assert abs(real - fake) <= 0.02 * fake
    model, tokenizer = omniquant.load(out)
    with pytest.raises(ConfigError, match="`kernels` needs a model path"):
        omniquant.evaluate(model, tokenizer=tokenizer, kernels=True, **kw)
    # a float folder has no integer form: a clear error, not a silent float run
    args = ["eval", str(tiny_llama_folder), "--kernels", "--eval-windows", "2", "--quiet"]
    assert main(args) == 2
    assert "--kernels needs an omniquant-packed folder" in capsys.readouterr().err


def test_packed_loading_shows_a_bar_only_when_asked(tmp_path, capsys):

    model, config = _rtn_model("llama")
    write_packed(model, config, tmp_path / "q")
    capsys.readouterr()
    omniquant.load(tmp_path / "q", kernels=True)
    assert "packed layers" not in capsys.readouterr().err
    omniquant.load(tmp_path / "q", kernels=True, progress=True)
    assert "packed layers" in capsys.readouterr().err

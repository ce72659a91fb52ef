import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import omniquant
from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError, DataError, ModelError, OutputError
from omniquant.pipeline import quantize as quantize_step
from tests.conftest import interrupt_after_block, needs_austen

pytestmark = needs_austen
FAST = CalibConfig(epochs=1, nsamples=2, seqlen=32)


def _config(**weight):
    return OmniQuantConfig(WeightQuant(**{"bits": 4, "group_size": 32, **weight}), calib=FAST)


def test_quantize_writes_a_folder_that_plain_transformers_loads(tiny_llama_folder, tmp_path):
    out = tmp_path / "q"
    result = omniquant.quantize(tiny_llama_folder, _config(), output=out, progress=False)
    assert not (tmp_path / "q.partial").exists()
    report = json.loads((out / "omniquant.json").read_text())
    assert report["setting"] == "W4A16g32" and report["config"]["calib"]["nsamples"] == 2
    assert len(report["blocks"]) == 2
    for block in report["blocks"]:
        assert {"loss_before", "loss_after", "seconds"} <= set(block)
    assert {"torch", "transformers", "omniquant"} <= set(report["versions"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-5)
    ppl = omniquant.evaluate(out, seqlen=32, max_windows=2, progress=False)
    ppl2 = omniquant.evaluate(
        result.model, tokenizer=result.tokenizer, seqlen=32, max_windows=2, progress=False
    )
    assert ppl == pytest.approx(ppl2, rel=1e-5) and ppl > 1


def _assert_nothing_written(tmp_path):
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "weight,error,match",
    [
        ({"group_size": 128}, ConfigError, "larger than the width 64"),
        ({"bits": 9}, ConfigError, "weight bits"),
        ({"group_size": 0}, ConfigError, "group size"),
    ],
)
def test_bad_settings_fail_clearly_and_write_nothing(
    tiny_llama_folder, tmp_path, weight, error, match
):
    with pytest.raises(error, match=match):
        omniquant.quantize(
            tiny_llama_folder, _config(**weight), output=tmp_path / "q", progress=False
        )
    _assert_nothing_written(tmp_path)


def test_too_little_calibration_text(tiny_llama_folder, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Too short to calibrate on.")
    cfg = OmniQuantConfig(
        calib=CalibConfig(epochs=1, nsamples=2, seqlen=64, calib_dataset=str(text))
    )
    with pytest.raises(DataError, match="seqlen"):
        omniquant.quantize(tiny_llama_folder, cfg, output=tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_missing_model_and_existing_output(tiny_llama_folder, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        omniquant.quantize(tmp_path / "nope", _config(), progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="exists already"):
        omniquant.quantize(tiny_llama_folder, _config(), output=tmp_path / "taken", progress=False)
    assert list((tmp_path / "taken").iterdir()) == []


def test_interrupted_run_resumes_from_the_partial_folder(tiny_llama_folder, tmp_path, monkeypatch):
    reference = omniquant.quantize(tiny_llama_folder, _config(), progress=False).model
    real = interrupt_after_block(monkeypatch)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        omniquant.quantize(tiny_llama_folder, _config(), output=out, progress=False)
    assert not out.exists() and (tmp_path / "q.partial" / "state" / "block_0000.pt").exists()
    with pytest.raises(OutputError, match="`resume`"):
        omniquant.quantize(tiny_llama_folder, _config(), output=out, progress=False)
    with pytest.raises(OutputError, match="other settings"):
        omniquant.quantize(
            tiny_llama_folder, _config(bits=3), output=out, resume=True, progress=False
        )
    monkeypatch.setattr(quantize_step, "calibrate_blocks", real)
    resumed = omniquant.quantize(
        tiny_llama_folder, _config(), output=out, resume=True, progress=False
    ).model
    assert out.exists() and not (tmp_path / "q.partial").exists()
    for (name, p), (_, q) in zip(
        reference.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


def test_lm_head_is_untouched_unless_asked(tiny_llama_folder):
    base, _ = omniquant.load(tiny_llama_folder)
    q = omniquant.quantize(tiny_llama_folder, _config(), progress=False).model
    assert torch.equal(q.lm_head.weight, base.lm_head.weight)
    assert torch.equal(q.model.embed_tokens.weight, base.model.embed_tokens.weight)
    cfg = OmniQuantConfig(WeightQuant(4, 32), calib=FAST, quantize_lm_head=True)
    q2 = omniquant.quantize(tiny_llama_folder, cfg, progress=False).model
    assert not torch.equal(q2.lm_head.weight, base.lm_head.weight)
    assert torch.equal(q2.model.embed_tokens.weight, base.model.embed_tokens.weight)


@pytest.mark.parametrize("abits", [8, 4])
def test_weight_activation_result_loads_back_with_its_activation_quantizers(
    tiny_llama_folder, tmp_path, abits
):
    cfg = OmniQuantConfig(
        WeightQuant(8 if abits == 8 else 4),
        ActQuant(abits),
        CalibConfig(let=True, epochs=1, nsamples=2, seqlen=32),
    )
    out = tmp_path / "wa"
    result = omniquant.quantize(tiny_llama_folder, cfg, output=out, progress=False)
    loaded, _ = omniquant.load(out)
    plain = AutoModelForCausalLM.from_pretrained(out)  # no activation quantizers
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        expected = result.model(ids).logits
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-5)
    kw = {"seqlen": 32, "max_windows": 2, "progress": False}
    assert omniquant.evaluate(out, **kw) == pytest.approx(
        omniquant.evaluate(result.model, tokenizer=result.tokenizer, **kw), rel=1e-6
    )

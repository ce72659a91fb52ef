import io

import pytest
import torch

import omniquant
from omniquant.cli import main
from omniquant.data import AUSTEN_RDB
from omniquant.generate import generate


def _greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_generation_streams_the_argmax_continuation(tiny_llama_folder):
    model, tokenizer = omniquant.load(tiny_llama_folder)
    model.generation_config.eos_token_id = None  # a random model: never stop early
    buf = io.StringIO()
    new = generate(model, tokenizer, "Emma Woodhouse", max_new_tokens=8, out=buf)
    ids = tokenizer("Emma Woodhouse", return_tensors="pt").input_ids
    assert new == _greedy(model, ids, 8)
    text = buf.getvalue()
    assert text.startswith("Emma Woodhouse")
    assert text.rstrip("\n") == "Emma Woodhouse" + tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.skipif(not AUSTEN_RDB.exists(), reason="needs the Austen corpus")
def test_cli_quantize_packed_then_generate_with_kernels(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_llama_folder), "--wbits", "4", "--group-size", "32"]
    args += ["--method", "rtn", "--nsamples", "2", "--seqlen", "32", "--output", str(out)]
    assert main([*args, "--format", "omniquant-packed", "--quiet"]) == 0
    # a packed folder re-exports: g32 divides every width, so 'auto' gives compressed-tensors
    assert main(["export", str(out), str(tmp_path / "ct"), "--quiet"]) == 0
    assert "quantization_config" in (tmp_path / "ct" / "config.json").read_text()
    assert main(["export", str(out), str(tmp_path / "ct"), "--quiet"]) == 2  # exists already
    capsys.readouterr()
    rc = main(["generate", str(out), "--prompt", "Anne", "--max-new-tokens", "4", "--kernels"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("Anne")


def test_compiled_generation_gives_the_same_greedy_tokens(tiny_llama_folder):
    model, tokenizer = omniquant.load(tiny_llama_folder)
    model.generation_config.eos_token_id = None
    eager = generate(model, tokenizer, "Mr. Knightley", max_new_tokens=6)
    compiled = generate(model, tokenizer, "Mr. Knightley", max_new_tokens=6, compile=True)
    assert compiled == eager
    # the compiled forward was really used: transformers keeps it on the model
    assert getattr(model, "_compiled_call", None) is not None


@pytest.mark.parametrize("args", [["--max-new-tokens", "0"], ["--temperature", "-0.5"]])
def test_generate_refuses_bad_settings_with_a_clear_error(tiny_llama_folder, args, capsys):
    rc = main(["generate", str(tiny_llama_folder), "--prompt", "Emma", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("max_new_tokens" in err or "temperature" in err)


@pytest.mark.skipif(not AUSTEN_RDB.exists(), reason="needs the Austen corpus")
@pytest.mark.parametrize("head", ["float32", "float16"])
def test_compiled_generation_through_the_int4_kernels_matches_eager(
    tiny_llama_folder, tmp_path, head
):
    from omniquant.config import CalibConfig, OmniQuantConfig, WeightQuant
    from omniquant.kernels.linear import QuantLinear

    config = OmniQuantConfig(
        WeightQuant(4, 32), calib=CalibConfig(method="rtn", nsamples=2, seqlen=64)
    )
    omniquant.quantize(
        tiny_llama_folder, config, output=tmp_path / "q", format="omniquant-packed", progress=False
    )
    model, tokenizer = omniquant.load(tmp_path / "q", kernels=True, head=head)
    assert any(isinstance(m, QuantLinear) and m.path == "int4" for m in model.modules())
    assert (type(model.lm_head).__name__ == "HalfHead") == (head == "float16")
    model.generation_config.eos_token_id = None
    eager = generate(model, tokenizer, "Captain Wentworth", max_new_tokens=6)
    compiled = generate(model, tokenizer, "Captain Wentworth", max_new_tokens=6, compile=True)
    assert compiled == eager

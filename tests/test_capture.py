import torch

from omniquant.capture import capture_block_inputs
from omniquant.models import decoder_layers, get_architecture, get_module
from tests.conftest import random_ids, tiny_model


def _final_norm_input(model, arch, ids):
    seen = {}
    norm = get_module(model, arch.final_norm)
    h = norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return seen["x"]


def test_captured_inputs_replay_the_model_exactly(family):
    """Running the blocks on captured inputs and arguments gives the model's own hidden state."""
    model = tiny_model(family)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    batches = [random_ids(2, 12, seed=s) for s in range(3)]
    cap = capture_block_inputs(model, blocks, batches)
    assert len(cap.hidden) == 3 and len(cap.block_args) == len(blocks)
    assert cap.hidden[0].shape == (2, 12, 64) and cap.hidden[0].device.type == "cpu"
    # the blocks are back in place, not recorders
    assert all(type(b).__name__.endswith(("DecoderLayer", "Layer")) for b in blocks)
    for ids, h in zip(batches, cap.hidden, strict=True):
        with torch.no_grad():
            for block, extra in zip(blocks, cap.block_args, strict=True):
                out = block(h, *extra.args, **extra.kwargs)
                h = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(h, _final_norm_input(model, arch, ids), atol=1e-5)


def test_gemma3_sliding_and_full_layers_get_their_own_arguments():
    model = tiny_model("gemma3")
    blocks = decoder_layers(model, get_architecture(model))
    cap = capture_block_inputs(model, blocks, [random_ids(1, 16)])
    sliding, full = (cap.block_args[i].kwargs for i in range(2))
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0]) or (
        sliding["attention_mask"] is not full["attention_mask"]
    )

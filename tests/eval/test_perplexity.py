import math

import pytest
import torch

from omniquant.eval.perplexity import perplexity, window_nll
from tests.conftest import needs_austen, random_ids, tiny_model


def test_window_nll_equals_a_direct_cross_entropy():
    model = tiny_model("llama")
    ids = random_ids(2, 16)
    nll, n = window_nll(model, ids)
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)
    direct = -sum(logp[b, t, ids[b, t + 1]].item() for b in range(2) for t in range(15))
    assert n == 30 and nll == pytest.approx(direct, rel=1e-5)
    # batching does not change the result
    assert perplexity(model, ids, batch_size=1, progress=False) == pytest.approx(
        math.exp(nll / n), rel=1e-6
    )


@needs_austen
@pytest.mark.slow
def test_float_smollm2_scores_the_published_austen_v1_figure(smollm2_folder):
    from omniquant import evaluate

    ppl = evaluate(smollm2_folder, progress=False)
    assert ppl == pytest.approx(33.3325, rel=1e-3)  # BENCHMARK.md: within 0.1%

"""Evaluation: perplexity, and zero-shot accuracy through lm-eval (`omniquant.eval.zeroshot`)."""

from omniquant.eval.perplexity import perplexity

__all__ = ["perplexity"]

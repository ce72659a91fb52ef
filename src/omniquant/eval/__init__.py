"""Evaluation: perplexity (and, later, zero-shot tasks)."""

from omniquant.eval.perplexity import perplexity

__all__ = ["perplexity"]

"""Evaluation: perplexity with the paper's protocol."""
from omniquant_pl.eval.perplexity import WindowPerplexity, evaluate_perplexity, perplexity_on_source

__all__ = ["WindowPerplexity", "evaluate_perplexity", "perplexity_on_source"]

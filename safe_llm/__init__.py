"""safe-llm: post-training pruning of causal LMs to sparse and flat minima.

``safe_llm.prune``, ``safe_llm.evaluate`` and ``safe_llm.load`` are the Python API.
"""

from safe_llm.version import __version__  # noqa: I001 (first: every module may read it)
from safe_llm.evaluation.evaluate import evaluate
from safe_llm.io.export import load
from safe_llm.pipeline import prune

__all__ = ["__version__", "evaluate", "load", "prune"]

"""safe-llm: post-training pruning of causal LMs to sparse and flat minima."""

__version__ = "0.1.0"

from safe_llm.export import load  # noqa: E402
from safe_llm.pipeline import prune  # noqa: E402

__all__ = ["__version__", "load", "prune"]

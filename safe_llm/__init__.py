"""safe-llm: post-training pruning of causal LMs to sparse and flat minima.

``prune`` and ``load`` are imported on first use, so ``import safe_llm`` (or reading
``safe_llm.__version__``) does not load torch or transformers.
"""

from safe_llm.version import __version__

__all__ = ["__version__", "load", "prune"]


def __getattr__(name: str):
    if name == "load":
        from safe_llm.export import load

        return load
    if name == "prune":
        from safe_llm.pipeline import prune

        return prune
    raise AttributeError(f"module 'safe_llm' has no attribute {name!r}")

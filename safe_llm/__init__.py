"""safe-llm: post-training pruning of causal LMs to sparse and flat minima.

``safe_llm.prune``, ``safe_llm.evaluate``, ``safe_llm.load`` and ``safe_llm.load_sparse``
(the pruned matrices kept compressed, :mod:`safe_llm.inference`) are the Python API, imported
on first use (PEP 562) so that ``import safe_llm.cli`` and ``safe-llm --help`` do not load
torch. ``safe_llm.evaluate`` is the function :func:`safe_llm.evaluation.evaluate.evaluate`.
"""

from __future__ import annotations

import importlib

from safe_llm.version import __version__

_API = {
    "evaluate": ("safe_llm.evaluation.evaluate", "evaluate"),
    "load": ("safe_llm.io.export", "load"),
    "load_sparse": ("safe_llm.inference.load", "load_sparse"),
    "prune": ("safe_llm.pipeline", "prune"),
}

__all__ = ["__version__", "evaluate", "load", "load_sparse", "prune"]


def __getattr__(name: str):
    if name in _API:
        module, attribute = _API[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safe_llm' has no attribute {name!r}")

"""How transformers stores and runs the fused experts of a mixture-of-experts block.

transformers 5 keeps an MoE block's experts as fused 3-D parameters (``gate_up_proj``,
``down_proj``) in one module; :func:`expert_layout` reads whether one is such a module and how
its matrices lie (from the module's declaration, else from unambiguous shapes, never from
names); :func:`experts_implementation` switches the kernel the experts run with. Each expert's
calibration statistics are :mod:`safe_llm.core.moe`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def expert_layout(module: nn.Module) -> bool | None:
    """Whether an experts module stores its fused matrices transposed (``[E, in, out]``), or
    None for a module that is not one. The layout comes from the module's declaration
    (transformers 5's ``use_experts_implementation`` sets ``is_transposed`` and ``has_gate``
    on each instance) or, undeclared, from shapes where they are unambiguous
    (:func:`_layout_from_shapes`); nothing is guessed from class or parameter names."""
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool) and isinstance(getattr(module, "has_gate", None), bool):
        return transposed
    return _layout_from_shapes(module)


def _layout_from_shapes(module: nn.Module) -> bool | None:
    """The layout of an undeclared module holding exactly two 3-D parameters with as many
    experts, read as a gated expert MLP ``H -> 2I -> I -> H`` (gate and up fused): stored
    ``[E, H, 2I]`` and ``[E, I, H]`` (transposed, Llama-4) or ``[E, 2I, H]`` and ``[E, H, I]``;
    None unless exactly one reading fits."""
    fused = [p.shape for p in module.parameters(recurse=False) if p.dim() == 3]
    if len(fused) != 2 or fused[0][0] != fused[1][0]:
        return None
    fits = set()
    for up, down in (fused, fused[::-1]):
        if up[1] == down[2] and up[2] == 2 * down[1]:
            fits.add(True)
        if up[2] == down[1] and up[1] == 2 * down[2]:
            fits.add(False)
    return fits.pop() if len(fits) == 1 else None


@contextlib.contextmanager
def experts_implementation(modules: list[nn.Module], name: str) -> Iterator[None]:
    """Inside the ``with``, the experts ``modules`` run transformers' ``name`` implementation
    (``eager``, ``batched_mm``...; their configs' ``_experts_implementation``), restored after."""
    configs = {
        id(m.config): m.config
        for m in modules
        if hasattr(getattr(m, "config", None), "_experts_implementation")
    }
    saved = {key: config._experts_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._experts_implementation = name
        yield
    finally:
        for key, config in configs.items():
            config._experts_implementation = saved[key]

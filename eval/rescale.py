"""Function-preserving rescaling of a causal LM: a test of scale-free solvers.

For every decoder block, each normalisation layer whose output feeds linear layers gets its
gain (and bias) multiplied by ``c`` and those linear layers' weights divided by ``c``: the
model computes the same function, but its weights live on another scale. A pruning method
whose result changes under this reparametrisation depends on the weights' scale.

Which linear layers read a norm's output is found by tracing one forward of the model (the
tensor a norm returns is the very tensor the linear layers receive), not by layer names.
"""

from __future__ import annotations

import torch
from torch import nn

from safe_llm.core.blocks import PRUNABLE_TYPES, find_blocks
from safe_llm.errors import SafeLLMError


def _norm_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules of ``block`` with a 1-D ``weight`` that are not linear layers: the norms."""
    return {
        name: module
        for name, module in block.named_modules()
        if not list(module.children())
        and not isinstance(module, (*PRUNABLE_TYPES, nn.Embedding))
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 1
    }


def _probe_ids(model: nn.Module, length: int = 8) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(length) * 7 % vocab).unsqueeze(0)


@torch.no_grad()
def norm_consumers(model: nn.Module) -> list[dict[str, list[str]]]:
    """Per block, ``{norm name: [names of the linear layers reading its output]}`` (names
    relative to the block), traced from one forward of ``model`` on a few tokens."""
    _, blocks = find_blocks(model)
    # id(output) -> (block, norm, output); holding the output keeps its id from being reused
    outputs: dict[int, tuple[int, str, torch.Tensor]] = {}
    found: list[dict[str, list[str]]] = [{} for _ in blocks]
    handles = []

    def on_norm(index: int, name: str):
        def hook(_module, _args, output):
            outputs[id(output)] = (index, name, output)

        return hook

    def on_linear(index: int, name: str):
        def hook(_module, args):
            source = outputs.get(id(args[0]))
            if source is not None and source[0] == index and source[2] is args[0]:
                consumers = found[index].setdefault(source[1], [])
                if name not in consumers:
                    consumers.append(name)

        return hook

    try:
        for index, block in enumerate(blocks):
            for name, module in _norm_modules(block).items():
                handles.append(module.register_forward_hook(on_norm(index, name)))
            for name, module in block.named_modules():
                if isinstance(module, PRUNABLE_TYPES):
                    handles.append(module.register_forward_pre_hook(on_linear(index, name)))
        device = next(model.parameters()).device
        model(_probe_ids(model).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


@torch.no_grad()
def rescale_norms(model: nn.Module, c: float, atol: float = 1e-4) -> nn.Module:
    """Multiply every block norm's gain (and bias) by ``c`` and divide the weights of the
    linear layers that read its output by ``c``, in place; returns ``model``.

    Raises :class:`SafeLLMError` when no norm feeds a linear layer or when the model's logits
    change by more than ``atol`` relative to their scale (a norm whose output is not
    proportional to its gain, e.g. ``x * (1 + weight)``, cannot be rescaled this way).
    """
    if not c > 0:
        raise SafeLLMError(f"the rescaling factor must be positive, got {c}")
    probe = _probe_ids(model).to(next(model.parameters()).device)
    before = model(probe, use_cache=False).logits
    _, blocks = find_blocks(model)
    consumers = norm_consumers(model)
    if not any(consumers):
        raise SafeLLMError(
            f"{type(model).__name__}: found no normalisation layer whose output feeds a "
            "linear layer; nothing to rescale"
        )
    for block, block_consumers in zip(blocks, consumers, strict=True):
        for norm_name, linear_names in block_consumers.items():
            norm = block.get_submodule(norm_name)
            norm.weight.mul_(c)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(c)
            for linear_name in linear_names:
                block.get_submodule(linear_name).weight.div_(c)
    after = model(probe, use_cache=False).logits
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    if change > atol:
        raise SafeLLMError(
            f"rescaling {type(model).__name__}'s norms by {c} changed its logits by {change:.2g} "
            "(relative): one of its norms is not proportional to its gain"
        )
    return model

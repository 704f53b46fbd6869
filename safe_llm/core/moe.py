"""Mixture-of-experts blocks: each expert's input statistics from the tokens it receives.

transformers 5 keeps the experts of an MoE block as fused 3-D parameters (``gate_up_proj``,
``down_proj``) in a module marked by ``use_experts_implementation``; its ``eager`` forward loops
over the experts the router chose and calls ``F.linear`` / ``@`` with one expert's slice of a
fused parameter, ``param[e]``, on exactly the tokens routed to expert ``e`` (and, for
``down_proj``, on that expert's own intermediate activations). :class:`ExpertInputs` is a
``TorchFunctionMode`` that recognises such a slice by its storage and offset and hands the
input to expert ``e``'s statistics: nothing here knows an architecture, a parameter name or an
activation function. While statistics are gathered the experts run their eager forward
(:func:`eager_experts`); elsewhere they keep the model's own implementation. An experts module
that multiplies all experts at once (``bmm(x [E, T, in], param)``, Llama-4, whose unrouted
tokens arrive as zero rows) gives each expert its non-zero rows.

With ``every_token`` (what llm-compressor's MoE calibration does) each experts call is
repeated with every token routed to every expert, for the statistics only: the block's output,
and so its targets, still come from the model's own routing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from safe_llm.core.blocks import PrunableMatrix
from safe_llm.core.experts import experts_implementation
from safe_llm.errors import SafeLLMError

_PRODUCTS = {
    torch.nn.functional.linear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.Tensor.__matmul__,
    torch.Tensor.matmul,
    torch.Tensor.mm,
    torch.Tensor.bmm,
}


class ExpertInputs(TorchFunctionMode):
    """Feeds ``x`` of every ``F.linear(x, w)`` / ``x @ w`` / ``mm(x, w)`` whose ``w`` is a 2-D
    slice ``param[e]`` of a watched fused parameter to ``sinks[(id(param), e)]``."""

    def __init__(self, sinks: dict[tuple[int, int], Callable[[torch.Tensor], None]]):
        super().__init__()
        self.sinks = sinks
        self.params: dict[int, nn.Parameter] = {}
        self.active = True
        self.recorded: set[int] = set()  # ids of the parameters some input reached

    def watch(self, param: nn.Parameter) -> None:
        self.params[param.untyped_storage().data_ptr()] = param

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and func in _PRODUCTS and len(args) >= 2:
            self._record(args[0], args[1])
        return func(*args, **kwargs)

    def _record(self, x, weight) -> None:
        if not isinstance(weight, torch.Tensor) or not isinstance(x, torch.Tensor):
            return
        param = self.params.get(weight.untyped_storage().data_ptr())
        if param is None:
            return
        if weight.dim() == 3 and weight.shape == param.shape and x.dim() == 3:
            self._record_all(x.detach(), param)
            return
        if weight.dim() != 2:
            return
        expert = (weight.storage_offset() - param.storage_offset()) // param.stride(0)
        sink = self.sinks.get((id(param), expert))
        if sink is not None:
            self.recorded.add(id(param))
            sink(x.detach())

    def _record_all(self, x: torch.Tensor, param: nn.Parameter) -> None:
        """``bmm(x [E, T, in], param)`` over every expert at once (Llama-4 sends every token
        to every expert, the unrouted ones scaled to zero rows): each expert's non-zero rows."""
        self.recorded.add(id(param))
        for expert, rows in enumerate(x):
            sink = self.sinks.get((id(param), expert))
            routed = rows[rows.ne(0).any(dim=-1)]
            if sink is not None and len(routed):
                sink(routed)


class CheckedExperts:
    """Context manager: counts the calls of the experts ``modules`` and, on a clean exit,
    raises :class:`SafeLLMError` for one that ran while ``capture`` saw none of its experts'
    inputs (an eager forward that does not call ``F.linear`` / ``@`` on ``param[e]``): its
    experts would otherwise look as if no token had reached them."""

    def __init__(self, capture: ExpertInputs, modules: list[nn.Module]):
        self.capture, self.modules = capture, modules
        self.calls = dict.fromkeys(map(id, modules), 0)
        self.handles = []

    def _count(self, module, _args, _output) -> None:
        self.calls[id(module)] += 1

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._count) for m in self.modules]
        return self

    def __exit__(self, exc_type, *_):
        for handle in self.handles:
            handle.remove()
        if exc_type is not None:
            return
        for module in self.modules:
            params = {id(p) for p in module.parameters(recurse=False)}
            if self.calls[id(module)] and not params & self.capture.recorded:
                raise SafeLLMError(
                    f"{type(module).__name__} ran during calibration but none of its experts' "
                    "inputs could be seen (its eager forward does not apply F.linear or @ to "
                    "one expert's slice of the fused parameters); --ignore its parameters to "
                    "leave them dense"
                )


def expert_modules(handles: dict[str, PrunableMatrix]) -> list[nn.Module]:
    """The distinct experts modules of ``handles``' expert matrices."""
    modules = {id(h.module): h.module for h in handles.values() if h.expert is not None}
    return list(modules.values())


def eager_experts(modules: list[nn.Module]) -> contextlib.AbstractContextManager:
    """Run ``modules`` with transformers' eager experts loop (one ``F.linear`` per expert on
    its routed tokens) inside the ``with``; their configs' implementation is restored after."""
    return experts_implementation(modules, "eager")


def _every_expert(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The experts call's arguments with every token routed to every expert (weights 1).

    The routing arrives as an integer ``[tokens, k]`` index tensor and a floating tensor of
    the same shape (transformers' ``top_k_index`` / ``top_k_weights``, by whatever name)."""
    values = list(args) + list(kwargs.values())
    index = next(
        (
            v
            for v in values
            if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()
        ),
        None,
    )
    weights = next(
        (
            v
            for v in values
            if isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and index is not None
            and v.shape == index.shape
        ),
        None,
    )
    if index is None or weights is None:
        raise SafeLLMError(
            f"{type(module).__name__}: found no routing (an integer [tokens, k] index and its "
            "weights) among the experts' arguments; calibrate without --moe-every-token"
        )
    count = next(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3)
    every = torch.arange(count, device=index.device).expand(index.shape[0], count)
    ones = torch.ones(every.shape, dtype=weights.dtype, device=weights.device)
    swap = {id(index): every, id(weights): ones}
    new_args = tuple(swap.get(id(a), a) if isinstance(a, torch.Tensor) else a for a in args)
    new_kwargs = {
        k: swap.get(id(v), v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
    }
    return new_args, new_kwargs


@contextlib.contextmanager
def every_token(capture: ExpertInputs, modules: list[nn.Module]) -> Iterator[None]:
    """Inside the ``with``, each call of an experts module in ``modules`` runs as the model
    routes it (not recorded), then once more with every token sent to every expert (recorded,
    output discarded)."""

    def before(_module, _args, _kwargs):
        capture.active = False

    def after(module, args, kwargs, _output):
        capture.active = True
        new_args, new_kwargs = _every_expert(module, args, kwargs)
        with torch.no_grad():
            module.forward(*new_args, **new_kwargs)

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        capture.active = True

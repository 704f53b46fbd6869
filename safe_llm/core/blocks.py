"""Architecture-independent access to a causal LM's decoder blocks.

Nothing here knows model names. The blocks are the largest ``nn.ModuleList`` of identical
modules that hold linear layers; what a block receives (hidden states plus the positional and
keyword arguments the model passes: masks, rotary embeddings, position ids...) is recorded by
swapping the blocks for recorders and running the model itself.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from safe_llm.errors import SafeLLMError

PRUNABLE_TYPES = (nn.Linear, Conv1D)


class BlockDiscoveryError(SafeLLMError):
    """The model has no recognisable stack of decoder blocks."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, module_list)`` of the model's decoder blocks.

    Chooses, among ``nn.ModuleList`` s whose children are all of one class and contain linear
    layers, the one holding the most parameters.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if isinstance(module[0], PRUNABLE_TYPES) or not any(
            isinstance(m, PRUNABLE_TYPES) for m in module[0].modules()
        ):
            continue  # a block holds linear layers; a list of bare linears is not a stack
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise BlockDiscoveryError(
            f"{type(model).__name__} has no decoder blocks: found no nn.ModuleList of "
            "identical modules containing linear layers; safe-llm prunes decoder-only "
            "transformers whose blocks are stored in an nn.ModuleList"
        )
    return best[1], best[2]


@dataclass(frozen=True, eq=False)
class PrunableMatrix:
    """One ``[out, in]`` matrix the engine prunes: the weight of an ``nn.Linear`` / ``Conv1D``,
    or one expert's matrix in a fused 3-D expert parameter (``gate_up_proj [E, out, in]``, or
    ``[E, in, out]`` where the experts module declares ``is_transposed``).

    ``param_name`` is the parameter's name relative to the block (``self_attn.q_proj.weight``,
    ``mlp.experts.gate_up_proj``); ``expert`` its index along the expert dimension (None for a
    linear layer); ``transposed``: the stored layout is ``[in, out]``.
    """

    module: nn.Module
    attr: str
    param_name: str
    expert: int | None = None
    transposed: bool = False

    @property
    def param(self) -> nn.Parameter:
        """The whole parameter the matrix lives in (3-D for fused experts)."""
        return getattr(self.module, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        """The matrix in its stored layout: the parameter, or the expert's slice of it."""
        param = self.param
        return param if self.expert is None else param[self.expert]

    def matrix(self, stored: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[out, in]`` view of :attr:`weight` (or of a tensor laid out like it, or like
        the whole parameter): writing into it writes the stored tensor."""
        value = self.weight if stored is None else stored
        if self.expert is not None and value.dim() == self.param.dim():
            value = value[self.expert]
        return value.t() if self.transposed else value


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


def _module_matrices(name: str, module: nn.Module) -> Iterator[tuple[str, PrunableMatrix]]:
    """The prunable matrices a module holds itself (not its children's)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, PRUNABLE_TYPES):
        handle = PrunableMatrix(
            module, "weight", f"{prefix}weight", None, isinstance(module, Conv1D)
        )
        yield name, handle
        return
    transposed = expert_layout(module)
    if transposed is None:
        return
    for attr, param in module.named_parameters(recurse=False):
        if param.dim() != 3 or not param.is_floating_point():
            continue  # biases [E, out] and anything else stay as they are
        for expert in range(param.shape[0]):
            handle = PrunableMatrix(module, attr, f"{prefix}{attr}", expert, transposed)
            yield f"{prefix}{attr}[{expert}]", handle


def _ignored(name: str, param_name: str, ignore: tuple[str, ...]) -> bool:
    """Whether an fnmatch pattern of ``ignore`` names the matrix (``mlp.down_proj``,
    ``mlp.experts.gate_up_proj[3]``, which is also matched literally) or its parameter
    (``mlp.experts.down_proj``: every expert's)."""
    owner = param_name.removesuffix(".weight")
    return any(
        name == pattern or fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(owner, pattern)
        for pattern in ignore
    )


def prunable_layers(block: nn.Module, ignore: tuple[str, ...] = ()) -> dict[str, PrunableMatrix]:
    """The block's prunable matrices by name relative to the block, minus ``ignore`` patterns.

    A linear layer is named like its module (``mlp.down_proj``); an expert's matrix of a
    fused parameter by the parameter and the index (``mlp.experts.gate_up_proj[3]``). The
    routers of mixture-of-experts layers are not among them (:func:`_routers`).
    ``ignore`` holds fnmatch patterns matched against these names and the parameters' names.
    """
    routers = _routers(block)
    return {
        name: handle
        for module_name, module in block.named_modules()
        if id(module) not in routers
        for name, handle in _module_matrices(module_name, module)
        if not _ignored(name, handle.param_name, ignore)
    }


def unmatched_patterns(blocks: nn.ModuleList, ignore: tuple[str, ...]) -> list[str]:
    """The ``ignore`` patterns that name no prunable matrix and no parameter of any block (a
    pattern that matches nothing leaves the run pruning what the user meant to keep)."""
    names: set[str] = set()
    for block in blocks:
        for name, handle in prunable_layers(block).items():
            names |= {name, handle.param_name, handle.param_name.removesuffix(".weight")}
        for name, _ in block.named_parameters():
            names |= {name, name.removesuffix(".weight")}
    return [p for p in ignore if not any(n == p or fnmatch.fnmatch(n, p) for n in names)]


def _routers(block: nn.Module) -> set[int]:
    """Ids of the linear layers beside a declared experts module (children of the same parent)
    with at most as many outputs as it has experts: its router and gates (Qwen3-Next's
    ``shared_expert_gate``, routers stored as ``nn.Linear``), which stay dense."""
    routers = set()
    for parent in block.modules():
        counts = [
            p.shape[0]
            for child in parent.children()
            if expert_layout(child) is not None
            for p in child.parameters(recurse=False)
            if p.dim() == 3
        ]
        if not counts:
            continue
        for child in parent.children():
            if isinstance(child, PRUNABLE_TYPES) and weight_matrix(child).shape[0] <= max(counts):
                routers.add(id(child))
    return routers


def as_matrix_handle(name: str, layer: nn.Module | PrunableMatrix) -> PrunableMatrix:
    """``layer`` itself if it is a handle, else the handle of a linear layer's weight."""
    if isinstance(layer, PrunableMatrix):
        return layer
    return PrunableMatrix(layer, "weight", f"{name}.weight", None, isinstance(layer, Conv1D))


def weight_matrix(layer: nn.Module | PrunableMatrix) -> torch.Tensor:
    """The weight as an ``[out, in]`` view (GPT-2's Conv1D stores ``[in, out]``)."""
    if isinstance(layer, PrunableMatrix):
        return layer.matrix()
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


UNPRUNED_LIMIT = 0.05  # of a block's parameters: a dense weight above it stops the run


class CoverageError(SafeLLMError):
    """A block holds a large weight the engine would leave dense."""


def unpruned_weights(block: nn.Module, ignore: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """The block's floating parameters of 2+ dimensions that no prunable matrix covers (routers,
    convolutions, anything the engine cannot read as ``[out, in]`` matrices), by name relative
    to the block; those named by ``ignore`` (fnmatch, the parameter or its module) are left out.
    """
    covered = {id(h.param) for h in prunable_layers(block).values()} | _expert_vectors(block)
    return {
        name: param
        for name, param in block.named_parameters()
        if param.dim() >= 2
        and param.is_floating_point()
        and id(param) not in covered
        and not _ignored(name, name, ignore)
    }


def _expert_vectors(block: nn.Module) -> set[int]:
    """Ids of the per-expert vectors of the block's declared experts modules (biases
    ``[E, out]``): biases, not weights, though stored in two dimensions."""
    return {
        id(param)
        for module in block.modules()
        if expert_layout(module) is not None
        for param in module.parameters(recurse=False)
        if param.dim() == 2
    }


def check_coverage(blocks: nn.ModuleList, ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`CoverageError` naming every block weight the engine would leave dense that
    holds more than :data:`UNPRUNED_LIMIT` of its block's parameters (not named by ``ignore``):
    a run must not report a sparsity that leaves most of a block dense."""
    found: dict[str, float] = {}
    for block in blocks:
        size = sum(p.numel() for p in block.parameters())
        for name, param in unpruned_weights(block, ignore).items():
            if param.numel() > UNPRUNED_LIMIT * size:
                found[name] = max(found.get(name, 0.0), param.numel() / size)
    if found:
        listed = ", ".join(f"{name} ({share:.0%} of its block)" for name, share in found.items())
        raise CoverageError(
            f"the blocks hold weights safe-llm cannot prune (it reads nn.Linear, Conv1D and "
            f"fused experts declared by transformers' use_experts_implementation): {listed}. "
            "They would stay dense while the report counts only what was pruned; pass them "
            "to --ignore (e.g. --ignore " + " --ignore ".join(found) + ") to prune the rest"
        )


def dense_block_weights(
    blocks: nn.ModuleList, ignore: tuple[str, ...] = ()
) -> tuple[int, int, dict[str, int]]:
    """``(zeros, total, {name: parameters})`` of the block weights of 2+ dimensions that are not
    pruned (ignored layers included; experts' biases ``[E, out]`` are biases, not counted),
    summed over the blocks; the zeros of blocks not in memory (streamed, on meta) count as
    none."""
    zeros = total = 0
    names: dict[str, int] = {}
    for block in blocks:
        kept = {id(h.param) for h in prunable_layers(block, ignore).values()}
        kept |= _expert_vectors(block)
        for name, param in block.named_parameters():
            if param.dim() < 2 or not param.is_floating_point() or id(param) in kept:
                continue
            names[name] = names.get(name, 0) + param.numel()
            total += param.numel()
            zeros += 0 if param.is_meta else int((param == 0).sum())
    return zeros, total, names


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _without_cache(value: Any) -> Any:
    """Drop KV-cache objects: calibration forwards never use them."""
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


@dataclass
class BlockCall:
    """The arguments a block receives besides its hidden states, recorded for one window.

    Tensors in them have batch size 1 and broadcast over any batch of windows.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> BlockCall:
        return BlockCall(
            _map_tensors(self.args, lambda t: t.to(device)),
            _map_tensors(self.kwargs, lambda t: t.to(device)),
        )


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Apply a block to ``hidden`` ``[batch, seq, d]``; returns ``[batch, seq, d]``."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


class _StopForward(Exception):
    pass


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("meta")


def _hidden_parameter(block: nn.Module) -> str:
    """Name of the first parameter of ``block.forward`` (the hidden states)."""
    for param in inspect.signature(block.forward).parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return param.name
    return "hidden_states"


def _split_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    """Separate the hidden states from the other arguments of a call to ``block``.

    The hidden states may come positionally or by keyword; the rest is returned without
    KV caches and with ``use_cache=False`` so that :func:`run_block` can replay it.
    """
    kwargs = dict(kwargs)
    if args:
        hidden, args = args[0], args[1:]
    else:
        name = _hidden_parameter(block)
        if name not in kwargs:
            raise BlockDiscoveryError(
                f"{type(block).__name__} was called without hidden states "
                f"(no positional argument and no {name!r} keyword)"
            )
        hidden = kwargs.pop(name)
    args = tuple(_without_cache(a) for a in args)
    kwargs = {k: _without_cache(v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, BlockCall(args, kwargs)


class _Recording:
    """Context manager: hooks on the real blocks that record their calls.

    The blocks themselves stay in the model (so whatever the model reads from them, like a
    layer type, and whatever they return, tuple or tensor, is the real thing). With
    ``stop_at_first`` the first block records its hidden states and aborts the forward;
    otherwise each block is moved to ``device`` for its own call only and runs normally. A
    block whose weights are not loaded (meta, a streamed model) runs on meta copies of its
    arguments, which gives the next block's call at no cost; the forward stops after the last.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device, stop_at_first: bool):
        self.blocks, self.device, self.stop = blocks, device, stop_at_first
        self.calls: dict[int, BlockCall] = {}
        self.hidden: list[torch.Tensor] = []
        self.handles: list = []
        self.homes: dict[int, torch.device] = {}

    def _pre(self, index: int):
        def hook(block, args, kwargs):
            hidden, call = _split_call(block, args, kwargs)
            if self.stop:
                self.hidden.append(hidden)
                raise _StopForward
            self.calls[index] = call
            params = next(block.parameters(), None)
            if params is not None and params.is_meta:
                return _map_tensors(args, _to_meta), _map_tensors(kwargs, _to_meta)
            self.homes[index] = params.device if params is not None else self.device
            block.to(self.device)

        return hook

    def _post(self, index: int):
        def hook(block, _args, _output):
            if index in self.homes:
                block.to(self.homes.pop(index))
            elif index == len(self.blocks) - 1:  # the stack ran on meta: nothing more to see
                raise _StopForward

        return hook

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            if not self.stop:
                self.handles.append(block.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for index, home in self.homes.items():  # a block whose forward raised
            self.blocks[index].to(home)


class _Swapped:
    """Context manager: temporarily replace every block with ``make(index)``."""

    def __init__(self, blocks: nn.ModuleList, make):
        self.blocks, self.make, self.saved = blocks, make, list(blocks)

    def __enter__(self):
        for i in range(len(self.blocks)):
            self.blocks[i] = self.make(i)

    def __exit__(self, *exc):
        for i, block in enumerate(self.saved):
            self.blocks[i] = block


def _meta_experts(blocks: nn.ModuleList) -> contextlib.AbstractContextManager:
    """Blocks not loaded (streamed, on meta) run their experts as ``batched_mm`` while their
    calls are recorded: the grouped kernel has no meta version for every dtype, the eager loop
    needs the routing's values."""
    if not any(p.is_meta for p in blocks.parameters()):
        return contextlib.nullcontext()
    modules = [m for m in blocks.modules() if expert_layout(m) is not None]
    return experts_implementation(modules, "batched_mm")


def non_block_modules_to(model: nn.Module, blocks: nn.ModuleList, device: torch.device):
    """Move everything but the blocks (embeddings, rotary tables, norms, head) to ``device``."""
    with _Swapped(blocks, lambda i: nn.Identity()):
        model.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
    allocate: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run the model's embedding stage and record what each block receives.

    Args:
        windows: token ids ``[n, seq]``.
        device: where the non-block modules run during capture (moved back afterwards).
        allocate: ``(shape, dtype) -> tensor`` giving the ``[n, seq, d]`` buffer the hidden
            states are written into batch by batch (e.g. a memory-mapped file), so the whole
            set never sits in memory twice; default an empty tensor on ``device``.

    Returns:
        ``(hidden, calls)``: the first block's input hidden states ``[n, seq, d]`` and, per
        block, the other arguments it receives (recorded with batch size 1; they broadcast).
    """
    _, blocks = find_blocks(model)
    if allocate is None:

        def allocate(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=device)

    host = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout would make the recorded inputs random
    non_block_modules_to(model, blocks, device)
    try:
        calls = _record_calls(model, blocks, windows[:1].to(device), device)
        hidden = None
        with _Recording(blocks, device, stop_at_first=True) as recording:
            for part in iter_batches(windows, batch_size):
                with contextlib.suppress(_StopForward):
                    model(windows[part].to(device), use_cache=False)
                if not recording.hidden:
                    raise BlockDiscoveryError(
                        f"the forward of {type(model).__name__} never reached its first block"
                    )
                chunk = recording.hidden.pop()
                if hidden is None:
                    hidden = allocate(torch.Size((len(windows), *chunk.shape[1:])), chunk.dtype)
                hidden[part].copy_(chunk)
    finally:
        non_block_modules_to(model, blocks, host)
        model.train(was_training)
    return hidden, [calls[i] for i in range(len(blocks))]


def _record_calls(
    model: nn.Module, blocks: nn.ModuleList, window: torch.Tensor, device: torch.device
) -> dict[int, BlockCall]:
    """Each block's call (its arguments besides the hidden states) in one forward of the
    model over ``window`` ``[1, seq]``."""
    with (
        _meta_experts(blocks),
        _Recording(blocks, device, stop_at_first=False) as recording,
        contextlib.suppress(_StopForward),
    ):
        model(window, use_cache=False)
    missing = [i for i in range(len(blocks)) if i not in recording.calls]
    if missing:
        raise BlockDiscoveryError(
            f"the forward of {type(model).__name__} never called block(s) {missing} of "
            "its decoder stack"
        )
    return recording.calls


def iter_batches(tensor: torch.Tensor, batch_size: int) -> Iterator[slice]:
    """Slices of the first dimension of ``tensor`` in steps of ``batch_size``."""
    for start in range(0, tensor.shape[0], batch_size):
        yield slice(start, min(start + batch_size, tensor.shape[0]))

"""Recording what each decoder block receives, by running the model itself.

A block's input is its hidden states plus whatever the model passes besides them (masks,
rotary embeddings, position ids...): hooks on the real blocks record each call
(:class:`BlockCall`) in one forward of the model, then the first block's hidden states for
every calibration window (:func:`capture_block_inputs`); :func:`run_block` replays a call on
other hidden states. Nothing here knows model names.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from safe_llm.core.blocks import BlockDiscoveryError, find_blocks
from safe_llm.core.experts import expert_layout, experts_implementation


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


@dataclass
class BlockSpan:
    """Consecutive blocks with their recorded calls, the hidden states entering the first
    (``inputs``) and what the last should output on them (``targets``), both ``[n, seq, d]``.

    One block is what a method prunes (:class:`~safe_llm.methods.base.BlockContext`), several
    a joint window (:class:`~safe_llm.stages.prune.joint.Window`). The blocks and the calls
    are on ``device``; ``inputs`` and ``targets`` may live off it, :meth:`batch` copies
    windows of them there.
    """

    blocks: list[nn.Module]
    calls: list[BlockCall]
    inputs: torch.Tensor
    targets: torch.Tensor
    device: torch.device
    non_blocking: ClassVar[bool] = True  # how :meth:`batch` copies to ``device``

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The blocks in sequence on a device batch ``[b, seq, d]``; returns ``[b, seq, d]``."""
        for block, call in zip(self.blocks, self.calls, strict=True):
            hidden = run_block(block, hidden, call)
        return hidden

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows ``index``, on ``device``."""
        return (
            self.inputs[index].to(self.device, non_blocking=self.non_blocking),
            self.targets[index].to(self.device, non_blocking=self.non_blocking),
        )

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`batch` of every window, ``batch_size`` at a time, in order."""
        for part in iter_batches(self.inputs, batch_size):
            yield self.batch(part)

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of the blocks, block by block."""
        return [p for block in self.blocks for p in block.parameters()]


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

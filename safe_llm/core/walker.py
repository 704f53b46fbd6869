"""Walking a causal LM's decoder blocks one at a time: the scaffolding every stage that goes
block by block shares (the prune stage's engine, the profile stage's dense pass).

:class:`WalkOptions` say where and how (device, batch size, ignored layers, the activation
budget above which the ``[n, seq, d]`` streams are memory-mapped files); a
:class:`BlockSource` hands out the blocks (the model's own, or read from disk);
:func:`captured_inputs` records the first block's inputs and each block's call;
:func:`block_on_device` holds one block on the compute device; :func:`forward_batches` runs it
over a stream batch by batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from safe_llm.core.activations import Activations, CapturedStreams
from safe_llm.core.capture import BlockCall, capture_block_inputs, iter_batches, run_block
from safe_llm.core.memory import process_peak_bytes


@dataclass(frozen=True)
class WalkOptions:
    """How blocks are walked. ``activation_budget``: bytes above which the ``[n, seq, d]``
    streams are memory-mapped files in a temporary directory under ``spill_dir``."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 8
    ignore: tuple[str, ...] = ()
    progress: bool = True
    activation_budget: int | None = None
    spill_dir: str | Path | None = None


class BlockSource(Protocol):
    """Hands the engine one decoder block at a time (on the host) and takes it back."""

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int) -> None: ...


class ResidentBlocks:
    """The default source: blocks that stay in memory all along."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks

    def load(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release(self, index: int) -> None:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return process_peak_bytes()


@contextlib.contextmanager
def block_on_device(source: BlockSource, index: int, device: torch.device) -> Iterator[nn.Module]:
    """Block ``index`` of ``source``, moved to ``device`` for the ``with`` body; afterwards
    moved back to where it was (the CUDA cache emptied) and released to ``source``."""
    block = source.load(index)
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        source.release(index)


@contextlib.contextmanager
def captured_inputs(
    model: nn.Module, windows: torch.Tensor, streams: int, options: WalkOptions
) -> Iterator[tuple[torch.Tensor, list[BlockCall], Activations]]:
    """``(first-block inputs [n, seq, d], each block's call, the space of ``streams``
    streams)`` for the calibration windows ``[n, seq]``; the space is closed afterwards."""
    space = CapturedStreams(options.device, streams, options.activation_budget, options.spill_dir)
    try:
        hidden, calls = capture_block_inputs(
            model, windows, options.device, options.batch_size, allocate=space.allocate
        )
        yield hidden, calls, space.space
    finally:
        space.close()


def forward_batches(
    block: nn.Module,
    inputs: torch.Tensor,
    call: BlockCall,
    out: torch.Tensor | None,
    device: torch.device,
    batch_size: int,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice, block(inputs[slice]))`` batch by batch, storing results in ``out``.

    ``out`` may be ``inputs`` (in place) or None; results are on ``device``.
    """
    for window_slice in iter_batches(inputs, batch_size):
        with torch.no_grad():
            result = run_block(block, inputs[window_slice].to(device), call)
            if out is not None:
                out[window_slice] = result.to(out.device, out.dtype)
        yield window_slice, result

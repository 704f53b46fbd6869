"""The sequential block engine: prune a causal LM one transformer block at a time.

For block ``b`` with calibration inputs ``X_b`` ``[n, seq, d]``:

1. move the block to the compute device;
2. dense targets ``Y_b = block_b(X_b)`` (or, with ``dense_targets``, the block applied to the
   dense stream, "global propagation");
3. gather per-layer input statistics on the dense block;
4. ``method.prune_block(ctx)`` changes the block's weights in place to meet the pattern;
5. check the pattern, measure the reconstruction error, ``X_{b+1} = pruned_block_b(X_b)``;
6. move the block back to where it was.

Only one block is on the compute device at a time.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from safe_llm.blocks import (
    BlockCall,
    capture_block_inputs,
    find_blocks,
    iter_batches,
    prunable_layers,
    run_block,
    weight_matrix,
)
from safe_llm.errors import SafeLLMError
from safe_llm.layer_stats import InputStats, collect_input_stats
from safe_llm.methods.base import PruningMethod
from safe_llm.resume import EngineState, rng_state, set_rng_state
from safe_llm.sparsity import SparsityPattern, achieved_sparsity

log = logging.getLogger(__name__)


class NonFiniteError(SafeLLMError):
    """A method left NaN or Inf in a block: the run stops before anything of it is saved."""


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


class Activations:
    """Allocates the engine's ``[n, seq, d]`` streams: on ``storage``, or in memory-mapped
    files of a temporary directory under ``spill_root`` (removed by :meth:`close`)."""

    def __init__(self, storage: torch.device, spill_root: str | Path | None = None):
        self.storage = storage
        self.spill: Path | None = None
        if spill_root is not None:
            Path(spill_root).mkdir(parents=True, exist_ok=True)
            self.spill = Path(tempfile.mkdtemp(prefix=".safe_llm-activations-", dir=spill_root))
        self.count = 0

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self.spill is None:
            return torch.empty(shape, dtype=dtype, device=self.storage)
        self.count += 1
        path = self.spill / f"stream{self.count}.bin"
        flat = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
        return flat.view(shape)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.empty(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        return out

    def close(self) -> None:
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)


def _activations(
    storage: torch.device, stream_bytes: int, budget: int | None, spill_root: str | Path | None
) -> Activations:
    """Spill to disk when the streams (``stream_bytes`` in all) exceed ``budget`` bytes."""
    if budget is None or stream_bytes <= budget:
        return Activations(storage)
    log.info(
        "calibration activations (%.2f GB) exceed --max-activation-memory (%.2f GB): "
        "memory-mapping them",
        stream_bytes / 1e9,
        budget / 1e9,
    )
    return Activations(torch.device("cpu"), spill_root or tempfile.gettempdir())


class _CapturedStreams:
    """The :class:`Activations` of ``count`` ``[n, seq, d]`` streams, made when the capture
    knows their shape; its first buffer receives the captured first-block inputs batch by
    batch, so they are never held whole outside it (memory-mapped above ``budget`` bytes)."""

    def __init__(
        self, device: torch.device, count: int, budget: int | None, spill_dir: str | Path | None
    ):
        self.device, self.count, self.budget, self.spill_dir = device, count, budget, spill_dir
        self.space: Activations | None = None

    def allocate(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        one_stream = math.prod(shape) * dtype.itemsize
        storage = _storage_device(self.device, one_stream * self.count)
        self.space = _activations(storage, one_stream * self.count, self.budget, self.spill_dir)
        return self.space.empty(shape, dtype)

    def close(self) -> None:
        if self.space is not None:
            self.space.close()


@dataclass
class BlockContext:
    """Everything a method may use to prune one block.

    ``inputs`` and ``targets`` are ``[n, seq, d]`` and may live off the compute device;
    ``batches`` yields device copies. ``stats`` holds the dense block's layer-input statistics.
    """

    index: int
    block: nn.Module
    layers: dict[str, nn.Module]
    pattern: SparsityPattern
    inputs: torch.Tensor
    targets: torch.Tensor
    call: BlockCall
    stats: dict[str, InputStats]
    device: torch.device
    batch_size: int
    seed: int

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block on a device batch ``[b, seq, d]`` with the recorded arguments."""
        return run_block(self.block, hidden, self.call)

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows ``index``, on the compute device."""
        return (
            self.inputs[index].to(self.device, non_blocking=True),
            self.targets[index].to(self.device, non_blocking=True),
        )

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for window_slice in iter_batches(self.inputs, self.batch_size):
            yield self.batch(window_slice)

    def matrix(self, name: str) -> torch.Tensor:
        """Layer ``name``'s weight as an ``[out, in]`` view."""
        return weight_matrix(self.layers[name])


@dataclass
class BlockReport:
    index: int
    seconds: float
    reconstruction_error: float
    layer_sparsity: dict[str, float]
    layer_error: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class PruneReport:
    blocks: list[BlockReport]
    seconds: float
    peak_memory_bytes: int
    overall_sparsity: float
    resumed_from_block: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _forward_batches(
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


@torch.no_grad()
def _apply(block, inputs, call, out, device, batch_size) -> None:
    """``out[i] = block(inputs[i])`` for every window."""
    for _ in _forward_batches(block, inputs, call, out, device, batch_size):
        pass


@torch.no_grad()
def _advance(block, hidden, targets, call, device, batch_size) -> float:
    """Replace ``hidden`` by the pruned block's outputs and return their relative error
    ``||block(X) - Y||^2 / ||Y||^2`` against ``targets`` (one pass for both)."""
    num = den = 0.0
    for window_slice, out in _forward_batches(block, hidden, call, None, device, batch_size):
        y = targets[window_slice].to(device).float()
        num += float((out.float() - y).square().sum())
        den += float(y.square().sum())
        hidden[window_slice] = out.to(hidden.device, hidden.dtype)
    return num / max(den, 1e-30)


def _layer_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` through the Hessian ``2 X^T X / n``."""
    delta = (dense - pruned.detach()).float()
    num = (delta @ hessian * delta).sum()
    den = (dense.float() @ hessian * dense.float()).sum()
    return float(num / den.clamp_min(1e-30))


def _storage_device(device: torch.device, bytes_needed: int) -> torch.device:
    """Keep activations on the compute device when they take under half its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if bytes_needed < free // 2 else torch.device("cpu")


def prune_model(
    model: nn.Module,
    windows: torch.Tensor,
    method: PruningMethod,
    pattern: SparsityPattern,
    *,
    device: torch.device,
    batch_size: int = 8,
    ignore: tuple[str, ...] = (),
    dense_targets: bool = False,
    layer_errors: bool = True,
    seed: int = 0,
    max_blocks: int | None = None,
    progress: bool = True,
    on_block: Callable[[BlockReport], None] | None = None,
    resume: EngineState | None = None,
    on_state: Callable[[EngineState, nn.Module], None] | None = None,
    block_patterns: Sequence[SparsityPattern] | None = None,
    source: BlockSource | None = None,
    activation_budget: int | None = None,
    spill_dir: str | Path | None = None,
) -> PruneReport:
    """Prune every decoder block of ``model`` in place.

    Args:
        windows: calibration token ids ``[n, seq]``.
        method: the pruning method applied to each block.
        pattern: the sparsity pattern every prunable layer must meet.
        dense_targets: take targets from the dense stream (global propagation).
        layer_errors: also report each layer's relative output error (needs ``X^T X``).
        max_blocks: prune only the first ``max_blocks`` blocks (timing and quick studies).
        resume: continue from this state; its blocks must already hold their pruned weights
            (:meth:`safe_llm.resume.WorkArea.load` puts them there).
        on_state: called after each block with the state to continue from and the pruned
            block (to save it); a run resumed from that state gives the same bits.
        block_patterns: one pattern per block (a non-uniform profile), else ``pattern`` for all.
        source: where blocks come from and go back to (default: the model's own blocks);
            :class:`safe_llm.streaming.DiskBlocks` reads each from disk.
        activation_budget: bytes above which the ``[n, seq, d]`` streams are memory-mapped
            files in a temporary directory under ``spill_dir``.
    """
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, blocks = find_blocks(model)
    source = source or ResidentBlocks(blocks)
    patterns = list(block_patterns) if block_patterns is not None else [pattern] * len(blocks)
    if len(patterns) != len(blocks):
        raise SafeLLMError(f"{len(patterns)} block sparsities given for {len(blocks)} blocks")
    for block, block_pattern in zip(blocks, patterns, strict=True):
        for name, layer in prunable_layers(block, ignore).items():
            block_pattern.check_shape(tuple(weight_matrix(layer).shape), name)
    streams = _CapturedStreams(device, 3 if dense_targets else 2, activation_budget, spill_dir)
    try:
        hidden, calls = capture_block_inputs(
            model, windows, device, batch_size, allocate=streams.allocate
        )
        return _run_blocks(
            model, blocks, source, patterns, hidden, calls, streams.space, start, method, device,
            batch_size, ignore, dense_targets, layer_errors, seed, max_blocks, progress,
            on_block, resume, on_state,
        )  # fmt: skip
    finally:
        streams.close()


def _run_blocks(
    model, blocks, source, patterns, captured, calls, space, start, method, device, batch_size,
    ignore, dense_targets, layer_errors, seed, max_blocks, progress, on_block, resume, on_state,
) -> PruneReport:  # fmt: skip
    """The block loop of :func:`prune_model`."""
    pattern = patterns[0] if len(set(patterns)) == 1 else "per-block sparsity"
    hidden, dense_stream, reports, first = _initial_state(captured, space, dense_targets, resume)
    del captured
    targets = space.empty(hidden.shape, hidden.dtype)
    count = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    bar = tqdm(
        range(first, count),
        desc=f"pruning ({method.name}, {pattern})",
        disable=not progress,
        initial=first,
        total=count,
    )
    for index in bar:
        block = source.load(index)
        report = _prune_block(
            index,
            block,
            hidden,
            dense_stream,
            targets,
            calls[index].to(device),
            method,
            patterns[index],
            device,
            batch_size,
            ignore,
            layer_errors,
            seed,
        )
        if dense_stream is not None:
            dense_stream, targets = targets, dense_stream
        reports.append(report)
        bar.set_postfix(err=f"{report.reconstruction_error:.3g}")
        log.info(
            "block %d/%d: %.1fs, reconstruction error %.4g, sparsity %.4f",
            index + 1,
            len(blocks),
            report.seconds,
            report.reconstruction_error,
            sum(report.layer_sparsity.values()) / max(len(report.layer_sparsity), 1),
        )
        if on_block is not None:
            on_block(report)
        if on_state is not None:
            state = EngineState(
                index + 1, hidden, dense_stream, [asdict(r) for r in reports], rng_state()
            )
            on_state(state, block)
        source.release(index)
    return PruneReport(
        blocks=reports,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory_bytes(device),
        overall_sparsity=_overall_sparsity(blocks, reports, ignore),
        resumed_from_block=first,
    )


def _initial_state(
    captured: torch.Tensor,
    space: Activations,
    dense_targets: bool,
    resume: EngineState | None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[BlockReport], int]:
    """``(hidden, dense_stream, reports, first_block)``: the captured first-block inputs
    ``[n, seq, d]`` (already a buffer of ``space``), or a saved state (whose RNG state is
    restored here) copied into it."""
    if resume is None:
        return captured, (space.copy(captured) if dense_targets else None), [], 0
    if resume.hidden.shape != captured.shape:
        raise SafeLLMError(
            f"saved hidden states have shape {tuple(resume.hidden.shape)}, this run's "
            f"{tuple(captured.shape)}: the work area belongs to another run"
        )
    if dense_targets and resume.dense_stream is None:
        raise SafeLLMError("the saved state has no dense stream but --dense-targets is on")
    hidden = captured.copy_(resume.hidden)
    dense = space.copy(resume.dense_stream.to(captured.dtype)) if dense_targets else None
    set_rng_state(resume.rng)
    log.info("resuming at block %d", resume.next_block)
    return hidden, dense, [BlockReport(**r) for r in resume.reports], resume.next_block


def _prune_block(
    index,
    block,
    hidden,
    dense_stream,
    targets,
    call,
    method,
    pattern,
    device,
    batch_size,
    ignore,
    layer_errors,
    seed,
) -> BlockReport:
    start = time.perf_counter()
    home = next(block.parameters()).device
    block.to(device)
    layers = prunable_layers(block, ignore)
    if dense_stream is not None:  # targets from the dense stream take a pass of their own
        _apply(block, dense_stream, call, targets, device, batch_size)
    # one pass over the dense block gathers the layer statistics (and the targets)
    target_out = None if dense_stream is not None else targets
    stats = collect_input_stats(
        layers,
        lambda: _forward_batches(block, hidden, call, target_out, device, batch_size),
        hessian=method.needs_hessian or layer_errors,
    )
    dense = (
        {name: weight_matrix(layer).detach().clone() for name, layer in layers.items()}
        if layer_errors
        else {}
    )
    ctx = BlockContext(
        index,
        block,
        layers,
        pattern,
        hidden,
        targets,
        call,
        stats,
        device,
        batch_size,
        seed + index,
    )
    extra = method.prune_block(ctx) or {}
    _check_finite(method.name, index, ctx)
    _positive_zeros(ctx)
    for name in layers:
        matrix = ctx.matrix(name)  # per row: Wanda rounds each row's kept count
        if not (pattern.satisfied_by(matrix) or pattern.satisfied_by(matrix, per_row=True)):
            raise RuntimeError(f"{method.name} left block {index} layer {name} off {pattern}")
    error = _advance(block, hidden, targets, call, device, batch_size)
    layer_error = {
        name: _layer_error(dense[name], ctx.matrix(name), stats[name].hessian) for name in dense
    }
    block.to(home)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return BlockReport(
        index=index,
        seconds=time.perf_counter() - start,
        reconstruction_error=error,
        layer_sparsity={n: achieved_sparsity(ctx.matrix(n)) for n in layers},
        layer_error=layer_error,
        extra=extra,
    )


@torch.no_grad()
def _positive_zeros(ctx: BlockContext) -> None:
    """Make every pruned entry ``+0.0``: a weight times a 0 mask is ``-0.0`` where the weight
    was negative, and the bitmask export keeps ``-0.0`` as a value (it is exact, bit for bit)."""
    for name in ctx.layers:
        matrix = ctx.matrix(name)
        matrix.masked_fill_(matrix == 0, 0.0)


def _check_finite(method: str, index: int, ctx: BlockContext) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter of the block with NaN/Inf."""
    for name, param in ctx.block.named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteError(
                f"{method} left NaN or Inf in block {ctx.index} ({name}); the run stopped "
                f"before saving block {index}: nothing with NaN/Inf was written"
            )


def _overall_sparsity(
    blocks: nn.ModuleList, reports: list[BlockReport], ignore: tuple[str, ...]
) -> float:
    """:func:`model_sparsity`, with blocks not in memory (streamed) counted from their
    reports (or as dense when they were not pruned)."""
    achieved = {r.index: r.layer_sparsity for r in reports}
    zeros = total = 0
    for index, block in enumerate(blocks):
        for name, layer in prunable_layers(block, ignore).items():
            numel = layer.weight.numel()
            total += numel
            if not layer.weight.is_meta:
                zeros += int((layer.weight == 0).sum())
            elif name in achieved.get(index, {}):
                zeros += round(achieved[index][name] * numel)
    return zeros / max(total, 1)


T = TypeVar("T")


@torch.no_grad()
def dense_pass(
    model: nn.Module,
    windows: torch.Tensor,
    visit: Callable[[int, dict[str, nn.Module], dict[str, InputStats]], T],
    *,
    device: torch.device,
    batch_size: int = 8,
    ignore: tuple[str, ...] = (),
    source: BlockSource | None = None,
    progress: bool = True,
    activation_budget: int | None = None,
    spill_dir: str | Path | None = None,
) -> list[T]:
    """Run the calibration windows ``[n, seq]`` through the dense model block by block and
    return ``visit(index, layers, stats)`` of every block, ``stats`` being its layers' input
    statistics (norms, no Hessian). One block is on ``device`` at a time; nothing changes.
    One ``[n, seq, d]`` stream, memory-mapped above ``activation_budget`` bytes."""
    _, blocks = find_blocks(model)
    source = source or ResidentBlocks(blocks)
    streams = _CapturedStreams(device, 1, activation_budget, spill_dir)
    try:
        hidden, calls = capture_block_inputs(
            model, windows, device, batch_size, allocate=streams.allocate
        )
        return _dense_blocks(
            blocks, source, hidden, calls, visit, device, batch_size, ignore, progress
        )
    finally:
        streams.close()


def _dense_blocks(blocks, source, hidden, calls, visit, device, batch_size, ignore, progress):
    """The block loop of :func:`dense_pass`: ``hidden`` is advanced in place."""
    results = []
    for index in tqdm(range(len(blocks)), desc="dense pass", disable=not progress):
        block = source.load(index)
        home = next(block.parameters()).device
        block.to(device)
        layers = prunable_layers(block, ignore)
        call = calls[index].to(device)
        stats = collect_input_stats(
            layers,
            lambda: _forward_batches(block, hidden, call, hidden, device, batch_size),  # noqa: B023
            hessian=False,
        )
        results.append(visit(index, layers, stats))
        block.to(home)
        source.release(index)
    return results


def model_sparsity(model: nn.Module, ignore: tuple[str, ...] = ()) -> float:
    """Fraction of zeros over all prunable layers of all blocks."""
    _, blocks = find_blocks(model)
    zeros = total = 0
    for block in blocks:
        for layer in prunable_layers(block, ignore).values():
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return zeros / max(total, 1)

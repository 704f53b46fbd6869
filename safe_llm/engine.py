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
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

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
    """
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, layer in prunable_layers(block, ignore).items():
            pattern.check_shape(tuple(weight_matrix(layer).shape), name)
    hidden, calls = capture_block_inputs(model, windows, device, batch_size)
    storage = _storage_device(device, hidden.numel() * hidden.element_size() * 3)
    hidden, dense_stream, reports, first = _initial_state(hidden, storage, dense_targets, resume)
    targets = torch.empty_like(hidden)
    count = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    bar = tqdm(
        range(first, count),
        desc=f"pruning ({method.name}, {pattern})",
        disable=not progress,
        initial=first,
        total=count,
    )
    for index in bar:
        report = _prune_block(
            index,
            blocks[index],
            hidden,
            dense_stream,
            targets,
            calls[index].to(device),
            method,
            pattern,
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
            on_state(state, blocks[index])
    return PruneReport(
        blocks=reports,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory_bytes(device),
        overall_sparsity=model_sparsity(model, ignore),
        resumed_from_block=first,
    )


def _initial_state(
    captured: torch.Tensor,
    storage: torch.device,
    dense_targets: bool,
    resume: EngineState | None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[BlockReport], int]:
    """``(hidden, dense_stream, reports, first_block)``: the captured first-block inputs
    ``[n, seq, d]``, or a saved state (whose RNG state is restored here)."""
    if resume is None:
        hidden = captured.to(storage)
        return hidden, (hidden.clone() if dense_targets else None), [], 0
    if resume.hidden.shape != captured.shape:
        raise SafeLLMError(
            f"saved hidden states have shape {tuple(resume.hidden.shape)}, this run's "
            f"{tuple(captured.shape)}: the work area belongs to another run"
        )
    if dense_targets and resume.dense_stream is None:
        raise SafeLLMError("the saved state has no dense stream but --dense-targets is on")
    hidden = resume.hidden.to(storage, captured.dtype)
    dense = resume.dense_stream.to(storage, captured.dtype) if dense_targets else None
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
        if not pattern.satisfied_by(ctx.matrix(name)):
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


def model_sparsity(model: nn.Module, ignore: tuple[str, ...] = ()) -> float:
    """Fraction of zeros over all prunable layers of all blocks."""
    _, blocks = find_blocks(model)
    zeros = total = 0
    for block in blocks:
        for layer in prunable_layers(block, ignore).values():
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return zeros / max(total, 1)

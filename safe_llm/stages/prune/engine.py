"""The sequential block engine: prune a causal LM one transformer block at a time.

For block ``b`` with calibration inputs ``X_b`` ``[n, seq, d]``:

1. move the block to the compute device;
2. dense targets ``Y_b = block_b(X_b)`` (or, with ``dense_targets``, the block applied to the
   dense stream, "global propagation");
3. gather per-layer input statistics on the dense block;
4. ``method.prune_block(ctx)`` changes the block's weights in place to meet the pattern;
5. check the pattern, measure the reconstruction error, ``X_{b+1} = pruned_block_b(X_b)``;
6. move the block back to where it was.

With ``joint.blocks = k > 1`` the blocks go in windows of ``k``: each is pruned as above, then
the window is reconstructed jointly, its masks frozen (:mod:`safe_llm.stages.prune.joint`), against the
dense window applied to the pruned stream entering it, and the stream is recomputed.

Only one block (one window) is on the compute device at a time; the walk's scaffolding
(:mod:`safe_llm.core.walker`) is shared with the dense pass of :mod:`safe_llm.stages.profile.owl`,
the reports' types (:mod:`safe_llm.core.reports`) with the run report.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core.activations import Activations
from safe_llm.core.blocks import (
    check_prunable,
    dense_block_weights,
    find_blocks,
    prunable_layers,
)
from safe_llm.core.capture import BlockCall
from safe_llm.core.layer_stats import collect_input_stats
from safe_llm.core.reports import BlockReport, PruneReport
from safe_llm.core.sparsity import SparsityPattern, achieved_sparsity
from safe_llm.core.walker import (
    BlockSource,
    ResidentBlocks,
    WalkOptions,
    block_on_device,
    captured_inputs,
    forward_batches,
    peak_memory_bytes,
)
from safe_llm.errors import SafeLLMError
from safe_llm.io.work_area import EngineState, rng_state, set_rng_state
from safe_llm.methods.base import BlockContext, PruningMethod
from safe_llm.stages.prune.joint import Window, reconstruct
from safe_llm.stages.prune.options import PruneOptions

log = logging.getLogger(__name__)


class NonFiniteError(SafeLLMError):
    """A method left NaN or Inf in a block: the run stops before anything of it is saved."""


@dataclass(frozen=True)
class EngineOptions(WalkOptions):
    """How the engine runs a model (everything but the model, the data, the method and the
    patterns): the walk's options and the prune stage's own."""

    dense_targets: bool = False  # targets from the dense stream (global propagation)
    # each layer's relative output error (needs X^T X); None: where the method gathers X^T X
    # anyway (it needs the Hessian), off otherwise
    layer_errors: bool | None = None
    seed: int = 0
    max_blocks: int | None = None  # prune only the first max_blocks blocks
    joint: PruneOptions = PruneOptions()  # windows of consecutive blocks reconstructed jointly
    moe_every_token: bool = False  # experts' statistics from every token, not the routed ones

    def __post_init__(self):  # joint windows train on the run's batch size unless told
        if self.joint.batch_size is None:
            object.__setattr__(self, "joint", replace(self.joint, batch_size=self.batch_size))


@torch.no_grad()
def _apply(block, inputs, call, out, device, batch_size) -> None:
    """``out[i] = block(inputs[i])`` for every window."""
    for _ in forward_batches(block, inputs, call, out, device, batch_size):
        pass


@torch.no_grad()
def _advance(block, hidden, targets, call, device, batch_size) -> float:
    """Replace ``hidden`` by the pruned block's outputs and return their relative error
    ``||block(X) - Y||^2 / ||Y||^2`` against ``targets`` (one pass for both)."""
    num = den = 0.0
    for window_slice, out in forward_batches(block, hidden, call, None, device, batch_size):
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


@dataclass
class _Run:
    """One :func:`prune_model` call: the method, the options and the ``[n, seq, d]`` streams
    (``hidden``: the pruned stream feeding the next block; ``targets``: the current block's
    targets; ``dense``: the dense stream, with dense targets only)."""

    method: PruningMethod
    options: EngineOptions
    calls: list[BlockCall]
    hidden: torch.Tensor
    targets: torch.Tensor
    dense: torch.Tensor | None
    reports: list[BlockReport]
    first: int  # the first block this call prunes (after a resume, not 0)
    window_inputs: torch.Tensor | None = None  # the pruned stream entering the joint window
    window_targets: torch.Tensor | None = None  # the dense window's outputs on it (so far)


def prune_model(
    model: nn.Module,
    windows: torch.Tensor,
    method: PruningMethod,
    pattern: SparsityPattern,
    options: EngineOptions | None = None,
    *,
    block_patterns: Sequence[SparsityPattern] | None = None,
    source: BlockSource | None = None,
    resume: EngineState | None = None,
    on_state: Callable[[EngineState, dict[int, nn.Module]], None] | None = None,
    checked: bool = False,
) -> PruneReport:
    """Prune every decoder block of ``model`` in place.

    Args:
        windows: calibration token ids ``[n, seq]``.
        method: the pruning method applied to each block.
        pattern: the sparsity pattern every prunable layer must meet.
        options: how to run (:class:`EngineOptions`; default: its defaults).
        block_patterns: one unstructured pattern per block (a non-uniform profile), else
            ``pattern`` for all.
        source: where blocks come from and go back to (default: the model's own blocks);
            :class:`safe_llm.io.streaming.DiskBlocks` reads each from disk.
        resume: continue from this state; its blocks must already hold their pruned weights
            (:meth:`safe_llm.io.work_area.WorkArea.load` puts them there).
        on_state: called after each block (after each joint window) with the state to
            continue from and the blocks pruned since the last call, ``{index: block}`` (to
            save them); a run resumed from that state gives the same bits.
        checked: the caller already ran :func:`~safe_llm.core.blocks.check_prunable` on the
            model's blocks with ``pattern`` and ``options.ignore`` (a run does, before
            calibration); else it runs here, before the inputs are captured.
    """
    options = options or EngineOptions()
    if options.layer_errors is None:
        options = replace(options, layer_errors=method.needs_hessian)
    start = time.perf_counter()
    if options.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(options.device)
    _, blocks = find_blocks(model)
    if not checked:
        check_prunable(blocks, pattern, options.ignore)
    patterns = _block_patterns(len(blocks), pattern, block_patterns)
    streams = 2 + options.dense_targets + 2 * options.joint.active
    with captured_inputs(model, windows, streams, options) as (
        hidden,
        calls,
        space,
    ):
        run = _start(method, options, calls, hidden, space, resume)
        _run_blocks(run, source or ResidentBlocks(blocks), patterns, on_state)
    return PruneReport(
        blocks=run.reports,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory_bytes(options.device),
        resumed_from_block=run.first,
        layer_errors=options.layer_errors,
        **_sparsity(blocks, run.reports, options.ignore),
    )


def _block_patterns(
    count: int, pattern: SparsityPattern, given: Sequence[SparsityPattern] | None
) -> list[SparsityPattern]:
    """One pattern per block: ``given`` or ``pattern`` for all. Only ``pattern`` is checked
    against the matrices' shapes (:func:`~safe_llm.core.blocks.check_prunable`): a profile's
    patterns are unstructured, which every matrix can take."""
    if given is None:
        return [pattern] * count
    if len(given) != count:
        raise SafeLLMError(f"{len(given)} block sparsities given for {count} blocks")
    if any(p.is_nm for p in given):
        raise SafeLLMError("block patterns are unstructured; an N:M pattern is one for all blocks")
    return list(given)


def _run_blocks(
    run: _Run,
    source: BlockSource,
    patterns: list[SparsityPattern],
    on_state: Callable[[EngineState, dict[int, nn.Module]], None] | None,
) -> None:
    """The block loop of :func:`prune_model`, one window of ``joint.blocks`` consecutive
    blocks at a time (one block without joint reconstruction); the state is saved after
    each window."""
    count = len(patterns) if run.options.max_blocks is None else run.options.max_blocks
    count, first = min(count, len(patterns)), run.first
    name = patterns[0] if len(set(patterns)) == 1 else "per-block sparsity"
    bar = tqdm(
        desc=f"pruning ({run.method.name}, {name})",
        disable=not run.options.progress,
        initial=first,
        total=count,
    )
    size = run.options.joint.blocks
    with bar:
        for start in range(first, count, size):
            indices = range(start, min(start + size, count))
            with contextlib.ExitStack() as stack:
                blocks = {
                    i: stack.enter_context(block_on_device(source, i, run.options.device))
                    for i in indices
                }
                _run_window(run, blocks, patterns, bar)
                if on_state is not None:
                    on_state(_state(run, indices.stop), blocks)


def _run_window(
    run: _Run, blocks: dict[int, nn.Module], patterns: list[SparsityPattern], bar: tqdm
) -> None:
    """Prune the window's blocks one by one, advancing the streams, then (a window of more
    than one block with joint reconstruction on) reconstruct them jointly."""
    joint = _open_window(run, len(blocks))
    for index, block in blocks.items():
        report = _prune_block(index, block, patterns[index], run, joint)
        if run.dense is not None:  # the targets just made are the next block's dense input
            run.dense, run.targets = run.targets, run.dense
        run.reports.append(report)
        bar.update(1)
        bar.set_postfix(err=f"{report.reconstruction_error:.3g}")
        _log_block(report, len(patterns))
    if joint:
        run.reports[-1].extra.update(_reconstruct_window(run, blocks))


def _open_window(run: _Run, size: int) -> bool:
    """Start a joint window of ``size`` blocks: its inputs and (growing) targets are the
    pruned stream entering it. False when there is nothing to reconstruct jointly."""
    if run.window_inputs is None or size < 2:
        return False
    run.window_inputs.copy_(run.hidden)
    run.window_targets.copy_(run.hidden)
    return True


def _reconstruct_window(run: _Run, blocks: dict[int, nn.Module]) -> dict[str, float]:
    """Train the window's blocks jointly (masks frozen), check them, and replace the pruned
    stream by the window's outputs."""
    opts = run.options
    first = min(blocks)
    window = Window(
        first=first,
        blocks=list(blocks.values()),
        calls=[run.calls[i].to(opts.device) for i in blocks],
        inputs=run.window_inputs,
        targets=run.window_targets,
        pruned=list(
            {
                id(layer.param): layer.param
                for block in blocks.values()
                for layer in prunable_layers(block, opts.ignore).values()
            }.values()
        ),
        device=opts.device,
    )
    extra = reconstruct(window, opts.joint, opts.seed + first)
    for index, block in blocks.items():
        _check_finite("joint reconstruction", index, block)
    if extra["joint_kept"]:  # else the stream already holds the block-by-block window's output
        run.hidden.copy_(run.window_inputs)
        for block, call in zip(window.blocks, window.calls, strict=True):
            _apply(block, run.hidden, call, run.hidden, opts.device, opts.batch_size)
    return extra


def _start(
    method: PruningMethod,
    options: EngineOptions,
    calls: list[BlockCall],
    captured: torch.Tensor,
    space: Activations,
    resume: EngineState | None,
) -> _Run:
    """The run's streams: the captured first-block inputs ``[n, seq, d]`` (already a buffer
    of ``space``), or a saved state (whose RNG state is restored here) copied into them."""
    dense = space.copy(captured) if options.dense_targets and resume is None else None
    targets = space.empty(captured.shape, captured.dtype)
    run = _Run(method, options, calls, captured, targets, dense, reports=[], first=0)
    if options.joint.active:
        run.window_inputs = space.empty(captured.shape, captured.dtype)
        run.window_targets = space.empty(captured.shape, captured.dtype)
    if resume is None:
        return run
    if resume.hidden.shape != captured.shape:
        raise SafeLLMError(
            f"saved hidden states have shape {tuple(resume.hidden.shape)}, this run's "
            f"{tuple(captured.shape)}: the work area belongs to another run"
        )
    if options.dense_targets and resume.dense_stream is None:
        raise SafeLLMError("the saved state has no dense stream but --dense-targets is on")
    run.hidden.copy_(resume.hidden)
    if options.dense_targets:
        run.dense = space.copy(resume.dense_stream.to(captured.dtype))
    set_rng_state(resume.rng)
    log.info("resuming at block %d", resume.next_block)
    run.reports = [BlockReport(**r) for r in resume.reports]
    run.first = resume.next_block
    return run


def _state(run: _Run, next_block: int) -> EngineState:
    """What a resumed run needs to continue with block ``next_block``."""
    reports = [asdict(r) for r in run.reports]
    return EngineState(next_block, run.hidden, run.dense, reports, rng_state())


def _log_block(report: BlockReport, total: int) -> None:
    log.info(
        "block %d/%d: %.1fs, reconstruction error %.4g, sparsity %.4f",
        report.index + 1,
        total,
        report.seconds,
        report.reconstruction_error,
        sum(report.layer_sparsity.values()) / max(len(report.layer_sparsity), 1),
    )


def _prune_block(
    index: int, block: nn.Module, pattern: SparsityPattern, run: _Run, joint: bool = False
) -> BlockReport:
    """Statistics of the dense block, the method, the checks, the pruned pass: one block
    (``joint``: the dense block first extends the joint window's targets)."""
    start = time.perf_counter()
    opts, method = run.options, run.method
    call = run.calls[index].to(opts.device)
    if joint:
        _apply(block, run.window_targets, call, run.window_targets, opts.device, opts.batch_size)
    ctx = _context(index, block, pattern.counting_per_row(method.per_row), call, run)
    dense = {n: ctx.matrix(n).detach().clone() for n in ctx.layers} if opts.layer_errors else {}
    extra = {**_expert_counts(ctx), **(method.prune_block(ctx) or {})}
    _check_finite(method.name, index, block)
    _positive_zeros(ctx)
    _check_pattern(method.name, ctx)
    error = _advance(block, run.hidden, run.targets, call, opts.device, opts.batch_size)
    return BlockReport(
        index=index,
        seconds=time.perf_counter() - start,
        reconstruction_error=error,
        layer_sparsity={n: achieved_sparsity(ctx.matrix(n)) for n in ctx.layers},
        layer_error={n: _layer_error(dense[n], ctx.matrix(n), ctx.stats[n].hessian) for n in dense},
        extra=extra,
    )


def _context(
    index: int, block: nn.Module, pattern: SparsityPattern, call: BlockCall, run: _Run
) -> BlockContext:
    """The :class:`BlockContext` of the dense block ``index``: its targets (from the pruned
    stream, or a pass of their own over the dense stream) and its layers' input statistics,
    gathered in one pass over the dense block."""
    opts = run.options
    layers = prunable_layers(block, opts.ignore)
    if run.dense is not None:
        _apply(block, run.dense, call, run.targets, opts.device, opts.batch_size)
    target_out = None if run.dense is not None else run.targets
    stats = collect_input_stats(
        layers,
        lambda: forward_batches(block, run.hidden, call, target_out, opts.device, opts.batch_size),
        hessian=run.method.needs_hessian or opts.layer_errors,
        every_token=opts.moe_every_token,
    )
    return BlockContext(
        index=index,
        block=block,
        layers=layers,
        pattern=pattern,
        inputs=run.hidden,
        targets=run.targets,
        call=call,
        stats=stats,
        device=opts.device,
        batch_size=opts.batch_size,
        seed=opts.seed + index,
    )


def _expert_counts(ctx: BlockContext) -> dict[str, float]:
    """For a block with experts: how many experts it has, how many received no calibration
    token (pruned by ``|W|``, :meth:`~safe_llm.core.layer_stats.InputStats.fallback`) and the
    fewest tokens an expert that did received."""
    experts: dict[tuple[int, int], list] = {}
    for name, layer in ctx.layers.items():
        if layer.expert is not None:
            experts.setdefault((id(layer.module), layer.expert), []).append(ctx.stats[name])
    if not experts:
        return {}
    empty = [key for key, stats in experts.items() if all(s.is_fallback for s in stats)]
    seen = [max(s.tokens for s in stats) for key, stats in experts.items() if key not in empty]
    return {
        "experts": float(len(experts)),
        "experts_without_tokens": float(len(empty)),
        "expert_tokens_min": float(min(seen, default=0)),
    }


@torch.no_grad()
def _positive_zeros(ctx: BlockContext) -> None:
    """Make every pruned entry ``+0.0``: a weight times a 0 mask is ``-0.0`` where the weight
    was negative, and the bitmask export keeps ``-0.0`` as a value (it is exact, bit for bit)."""
    for name in ctx.layers:
        matrix = ctx.matrix(name)
        matrix.masked_fill_(matrix == 0, 0.0)


def _check_finite(what: str, index: int, block: nn.Module) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter of the block with NaN/Inf."""
    for name, param in block.named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteError(
                f"{what} left NaN or Inf in block {index} ({name}); the run stopped "
                f"before saving block {index}: nothing with NaN/Inf was written"
            )


def _check_pattern(method: str, ctx: BlockContext) -> None:
    """Raise unless every layer meets ``ctx.pattern`` (counted as the method counts)."""
    for name in ctx.layers:
        if not ctx.pattern.satisfied_by(ctx.matrix(name)):
            raise RuntimeError(f"{method} left block {ctx.index} layer {name} off {ctx.pattern}")


def _sparsity(blocks: nn.ModuleList, reports: list[BlockReport], ignore: tuple[str, ...]) -> dict:
    """The report's sparsities: over the pruned matrices (``overall_sparsity``) and over every
    block weight of 2+ dimensions, with the names of the weights left dense."""
    zeros, total = _overall_sparsity(blocks, reports, ignore)
    dense_zeros, dense_total, dense_names = dense_block_weights(blocks, ignore)
    return {
        "overall_sparsity": zeros / max(total, 1),
        "all_block_weights_sparsity": (zeros + dense_zeros) / max(total + dense_total, 1),
        "unpruned_block_weights": dense_names,
    }


def _overall_sparsity(
    blocks: nn.ModuleList, reports: list[BlockReport], ignore: tuple[str, ...]
) -> tuple[int, int]:
    """``(zeros, weights)`` of :func:`model_sparsity`, with blocks not in memory (streamed)
    counted from their reports (or as dense when they were not pruned)."""
    achieved = {r.index: r.layer_sparsity for r in reports}
    zeros = total = 0
    for index, block in enumerate(blocks):
        for name, layer in prunable_layers(block, ignore).items():
            numel = layer.weight.numel()
            total += numel
            if not layer.param.is_meta:
                zeros += int((layer.weight == 0).sum())
            elif name in achieved.get(index, {}):
                zeros += round(achieved[index][name] * numel)
    return zeros, total

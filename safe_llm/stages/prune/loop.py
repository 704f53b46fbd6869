"""The prune stage's run: the engine's options from the run context, the per-block sparsity
patterns from the profile stage, and the work area's saves and resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

from torch import nn

from safe_llm.core.reports import PruneReport
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.io.work_area import EngineState, Interrupted
from safe_llm.stages.base import RunContext
from safe_llm.stages.prune.engine import EngineOptions, prune_model


def engine_options(context: RunContext) -> EngineOptions:
    """The engine's options: the run's walk and the prune stage's own options."""
    config = context.config
    walk = {f.name: getattr(context.walk, f.name) for f in fields(context.walk)}
    return EngineOptions(
        **walk,
        dense_targets=config.dense_targets,
        moe_every_token=config.moe_every_token,
        joint=config.joint,
        layer_errors=config.layer_errors,
        seed=config.seed,
        max_blocks=config.max_blocks,
    )


def run_block_loop(model: nn.Module, context: RunContext) -> PruneReport:
    """Prune every block of ``model`` with the context's method and the profile's block
    sparsities, saving each finished block in the work area; returns the engine's report."""
    sparsities = context.results["profile"]["block_sparsity"]
    return prune_model(
        model,
        context.windows,
        context.method,
        context.pattern,
        engine_options(context),
        block_patterns=_patterns(context.pattern, sparsities),
        source=context.source,
        resume=_resume_state(context),
        on_state=_state_saver(context, context.blocks_to_prune),
        checked=True,  # run_prune checked the blocks against the pattern before calibration
    )


def restore_pruned_blocks(model: nn.Module, context: RunContext) -> None:
    """Put the finished run's pruned blocks from the work area into ``model`` (a resume that
    skips the finished prune stage; a streamed model's blocks stay in the work area)."""
    _resume_state(context)


def _patterns(pattern: SparsityPattern, sparsities: list[float]) -> list[SparsityPattern] | None:
    """One pattern per block for a non-uniform profile, else None (``pattern`` for all)."""
    if len(set(sparsities)) == 1 and sparsities[0] == pattern.sparsity:
        return None
    return [SparsityPattern.parse("unstructured", s) for s in sparsities]


def _resume_state(context: RunContext) -> EngineState | None:
    """The state a resumed run continues from (its finished blocks put into the model's,
    unless streamed: those stay in the work area), or None for a fresh run."""
    if context.work is None or context.fresh:
        return None
    return context.work.load(None if context.source is not None else context.blocks)


def _state_saver(
    context: RunContext, total: int
) -> Callable[[EngineState, dict[int, nn.Module]], None]:
    """The engine's ``on_state``: save the finished blocks and the state (the writing rank),
    then stop if a signal asked to."""
    work = context.work if context.writes else None

    def on_state(state: EngineState, blocks: dict[int, nn.Module]) -> None:
        if work is not None:
            context.start_work_area()
            work.save(state, blocks, total)
        signum = context.should_stop() if context.should_stop is not None else None
        if signum:
            raise Interrupted(signum, state.next_block, total, work.path if work else None)

    return on_state

"""The perplexity stages (declaration; torch-free): the dense model's perplexity on the
``--eval`` sources first, the pruned (and recovered) model's last, with the harness of
:mod:`safe_llm.evaluation.evaluate` (token perplexity, SparseGPT/Wanda protocol)."""

from __future__ import annotations

from safe_llm.stages.base import Stage, register_stage


def evaluate_sources(model, tokenizer, config, device, progress: bool) -> dict:
    """``{source: result}`` on each ``config.eval`` source, with ``model`` moved to
    ``device`` for the evaluation and back to where it was afterwards."""
    from safe_llm.evaluation.evaluate import evaluate_perplexity

    home = next(model.parameters()).device
    model.to(device)
    try:
        return evaluate_perplexity(
            model,
            tokenizer,
            config.eval,
            config.eval_seqlen or config.seqlen,
            batch_size=config.batch_size,
            device=device,
            max_windows=config.eval_max_windows,
            cache=config.eval_cache,
            text_column=config.text_column,
            progress=progress,
        )
    finally:
        model.to(home)


class _Perplexity(Stage):
    """Runs with ``--eval``; its result is ``{source: result}``, recorded in the report's
    ``evaluation[key]``."""

    key = ""

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.eval)

    def run(self, model, context) -> dict:
        return evaluate_sources(
            model, context.tokenizer, context.config, context.device, context.progress
        )

    def record(self, report, result: dict) -> None:
        report.evaluation[self.key] = result


@register_stage
class DensePerplexity(_Perplexity):
    name = "dense_perplexity"
    order = 10
    key = "dense"


@register_stage
class Perplexity(_Perplexity):
    name = "perplexity"
    order = 90
    key = "pruned"
    commands = ("prune", "recover")

"""The sparsity profile stage (declaration; torch-free): uniform, explicit
(``sparsity_per_block``) or OWL. The implementation is :mod:`safe_llm.stages.profile.owl`."""

from __future__ import annotations

from safe_llm.stages.base import Stage, register_stage
from safe_llm.stages.profile.options import ProfileOptions


@register_stage
class ProfileStage(Stage):
    """Each block's sparsity (and OWL's outlier ratios), recorded in the report's
    ``block_sparsity``, ``sparsity_profile``, ``sparsity`` and ``owl_outlier_ratios``."""

    name = "profile"
    order = 20
    Options = ProfileOptions

    def run(self, model, context) -> dict:
        from safe_llm.stages.profile.owl import run_profile

        return run_profile(model, context)

    def record(self, report, result: dict) -> None:
        report.block_sparsity = result["block_sparsity"]
        report.owl_outlier_ratios = result["owl_outlier_ratios"]
        report.sparsity = result["sparsity"]
        report.sparsity_profile = result["sparsity_profile"]

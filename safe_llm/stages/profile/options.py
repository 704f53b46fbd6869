"""The options of the sparsity profile stage (torch-free: the CLI reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from safe_llm.errors import SafeLLMError
from safe_llm.options import option

PROFILES = ("uniform", "owl")


@dataclass(frozen=True)
class ProfileOptions:
    """Recipe key ``profile``."""

    kind: str = option(
        "uniform",
        "how the sparsity is spread over blocks: uniform, or owl (outlier-weighted: blocks with "
        "more activation outliers keep more weights; the overall sparsity stays --sparsity)",
        flag="sparsity_profile",
        choices=PROFILES,
    )
    owl_m: float = option(5.0, "OWL: a score above M times its block's mean is an outlier")
    owl_lambda: float = option(0.08, "OWL: block sparsities range over --sparsity -/+ lambda")
    per_block: list[float] | None = option(
        None,
        "explicit sparsity of every decoder block, in order (unstructured only)",
        flag="sparsity_per_block",
        nargs="*",
    )

    def __post_init__(self):
        if self.kind not in PROFILES:
            raise SafeLLMError(
                f"--sparsity-profile {self.kind!r} is not one of: {', '.join(PROFILES)}"
            )
        if self.per_block is not None:
            if self.kind != "uniform":
                raise SafeLLMError(
                    "give either --sparsity-profile owl or sparsity_per_block, not both"
                )
            if not self.per_block:
                raise SafeLLMError("sparsity_per_block is empty: give one sparsity per block")
            bad = [(i, s) for i, s in enumerate(self.per_block) if not 0.0 < s < 1.0]
            if bad:
                raise SafeLLMError(
                    f"block {bad[0][0]} would get sparsity {bad[0][1]:.4g}, outside (0, 1); "
                    "fix sparsity_per_block"
                )
        if not (math.isfinite(self.owl_m) and self.owl_m > 0):
            raise SafeLLMError(f"--owl-m must be > 0, got {self.owl_m}")
        if not 0 <= self.owl_lambda < 0.5:
            raise SafeLLMError(f"--owl-lambda must be in [0, 0.5), got {self.owl_lambda}")

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform" and self.per_block is None

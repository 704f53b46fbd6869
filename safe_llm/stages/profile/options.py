"""The options of the sparsity profile stage (torch-free: the CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safe_llm.options import ConfigError, check_fields, option

PROFILES = ("uniform", "owl")


@dataclass(frozen=True)
class ProfileOptions:
    """Recipe key ``profile``; flags without a prefix (``--sparsity-profile``, ``--owl-m``)."""

    flag_prefix: ClassVar[str] = ""

    kind: str = option(
        "uniform",
        "how the sparsity is spread over blocks: uniform, or owl (outlier-weighted: blocks with "
        "more activation outliers keep more weights; the overall sparsity stays --sparsity)",
        flag="sparsity_profile",
        choices=PROFILES,
    )
    owl_m: float = option(5.0, "OWL: a score above M times its block's mean is an outlier", above=0)
    owl_lambda: float = option(
        0.08, "OWL: block sparsities range over --sparsity -/+ lambda", at_least=0, below=0.5
    )
    per_block: list[float] | None = option(
        None,
        "explicit sparsity of every decoder block, in order (unstructured only)",
        flag="sparsity_per_block",
        nargs="*",
        above=0,
        below=1,
    )

    def __post_init__(self):
        check_fields(self)
        if self.per_block is not None:
            if self.kind != "uniform":
                raise ConfigError(
                    "give either --sparsity-profile owl or --sparsity-per-block, not both"
                )
            if not self.per_block:
                raise ConfigError("--sparsity-per-block is empty: give one sparsity per block")

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform" and self.per_block is None

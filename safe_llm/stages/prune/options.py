"""The options of the prune stage's joint windows (torch-free: the CLI reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from safe_llm.errors import SafeLLMError
from safe_llm.options import option

AUTOCAST = ("auto", "bf16", "off")


@dataclass(frozen=True)
class JointOptions:
    """How a window of ``blocks`` consecutive blocks is reconstructed (``blocks == 1``: off).
    Recipe key ``joint``, CLI flags ``--joint-<name>``."""

    blocks: int = option(
        1,
        "after the method has pruned each block of a window of N consecutive blocks, train the "
        "window jointly against the dense window's outputs, masks frozen (1 = off)",
    )
    epochs: float = option(1.0, "joint windows: passes over the calibration windows")
    lr: float = option(
        2.5e-3, "joint windows: Adam learning rate, a fraction of each tensor's RMS per step"
    )
    batch_size: int | None = option(
        None, "joint windows: calibration windows per step (default: --batch-size)"
    )
    holdout: float = option(
        0.125,
        "joint windows: fraction of the calibration windows held out; of the window before "
        "and after training, the one with the lower held-out error is kept",
    )
    autocast: str = option(
        "auto",
        "joint windows: bf16 autocast of the training, fp32 master weights: auto (where the "
        "device computes bf16 natively), bf16, off",
        choices=AUTOCAST,
    )

    def __post_init__(self):
        if self.blocks < 1:
            raise SafeLLMError(f"--joint-blocks must be at least 1, got {self.blocks}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise SafeLLMError(f"--joint-epochs must be a number > 0, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise SafeLLMError(f"--joint-lr must be a number >= 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SafeLLMError(f"--joint-batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.holdout < 1:
            raise SafeLLMError(f"--joint-holdout must be in [0, 1), got {self.holdout}")
        if self.autocast not in AUTOCAST:
            raise SafeLLMError(
                f"--joint-autocast takes {', '.join(AUTOCAST)}, got {self.autocast!r}"
            )

    @property
    def active(self) -> bool:
        return self.blocks > 1

"""The prune stage's options, :class:`PruneOptions`: today its joint windows (torch-free: the
CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safe_llm.options import check_fields, option

AUTOCAST = ("auto", "bf16", "off")


@dataclass(frozen=True)
class PruneOptions:
    """The prune stage's options (recipe key ``joint``, CLI flags ``--joint-<name>``): how a
    window of ``blocks`` consecutive blocks is reconstructed jointly (``blocks == 1``: off)."""

    flag_prefix: ClassVar[str] = "joint_"

    blocks: int = option(
        1,
        "after the method has pruned each block of a window of N consecutive blocks, train the "
        "window jointly against the dense window's outputs, masks frozen (1 = off)",
        at_least=1,
    )
    epochs: float = option(1.0, "joint windows: passes over the calibration windows", above=0)
    lr: float = option(
        2.5e-3,
        "joint windows: Adam learning rate, a fraction of each tensor's RMS per step",
        at_least=0,
    )
    batch_size: int | None = option(
        None, "joint windows: calibration windows per step (default: --batch-size)", at_least=1
    )
    holdout: float = option(
        0.125,
        "joint windows: fraction of the calibration windows held out; of the window before "
        "and after training, the one with the lower held-out error is kept",
        at_least=0,
        below=1,
    )
    autocast: str = option(
        "auto",
        "joint windows: bf16 autocast of the training, fp32 master weights: auto (where the "
        "device computes bf16 natively), bf16, off",
        choices=AUTOCAST,
    )

    def __post_init__(self):
        check_fields(self)

    @property
    def active(self) -> bool:
        return self.blocks > 1


JointOptions = PruneOptions  # its name before issue 26 (they are the prune stage's options)

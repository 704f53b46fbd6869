"""Recovery's settings: :class:`RecoverOptions` (recipe key ``recover``, CLI flags
``--recover`` and ``--recover-<name>``) and their validation. No torch here: the CLI reads these fields to build
its flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from safe_llm.errors import SafeLLMError
from safe_llm.options import option

TRAINABLE_GROUPS = ("weights", "norms")


class RecoveryError(SafeLLMError):
    """Recovery could not run or produced unusable weights; nothing was saved."""


@dataclass
class RecoverOptions:
    """Recovery settings: recipe key ``recover``, CLI flags ``--recover-<name>``; ``enabled``
    (``--recover``) switches the stage on in ``safe-llm prune``."""

    enabled: bool = option(
        False,
        "after the block loop, train the whole pruned model end to end with its mask frozen "
        "to match the dense model's next-token distribution (KL distillation; see the "
        "recover stage options)",
        flag="recover",
    )

    dataset: str | None = option(None, "recovery text (default: the calibration --dataset)")
    nsamples: int | None = option(None, "recovery windows (default: --nsamples)")
    seqlen: int | None = option(None, "tokens per recovery window (default: --seqlen)")
    seed: int | None = option(
        None,
        "seed of the recovery windows and their order (default: --seed, i.e. the "
        "calibration windows themselves)",
    )
    tokens: int | None = option(
        None, "training budget in tokens (rounded up to whole steps; default: one pass)"
    )
    steps: int | None = option(None, "training budget in optimiser steps (overrides tokens)")
    lr: float = option(
        2.5e-3,
        "Adam learning rate (peak); with step_scale relative (default), in units of each "
        "tensor's RMS",
    )
    step_scale: str = option(
        "relative",
        "relative: each tensor steps lr x its RMS at the start (the steps do not depend on the "
        "weights' scale); absolute: every tensor steps lr",
        choices=("absolute", "relative"),
    )
    warmup_steps: int = option(4, "linear warm-up steps; then linear decay to 0")
    batch_size: int = option(2, "windows per optimiser step")
    train: list[str] = option(
        None,
        factory=lambda: ["weights", "norms"],
        help="what trains: weights (the kept weights and biases of the pruned layers), "
        "norms (every other block parameter and the final norm); embeddings and lm_head never",
        nargs="+",
    )
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0: no clipping)")
    kl_chunk: int = option(
        128,
        "tokens per chunk of the vocabulary-sized KL (memory bound: about 6 x chunk x vocab x 4 "
        "bytes; 512 before issue 22, 0.58 GiB on SmolLM2's 49k vocabulary)",
    )
    gradient_checkpointing: bool = option(True, "recompute block activations in the backward")
    autocast: str = option(
        "auto",
        "bf16 autocast of the forward and backward, fp32 master weights and Adam state: auto "
        "(where the device computes bf16 natively: CUDA, CPUs with AVX-512-BF16/AMX), bf16, off",
        choices=("auto", "bf16", "off"),
    )
    teacher_cache: bool = option(
        True,
        "run the teacher once over the windows and keep its final hidden states [n, seq, d] "
        "(its logits still come chunk by chunk); off: run the teacher at every step",
    )
    hidden_weight: float = option(
        0.0,
        "weight of the hidden-state term added to the KL: the sum over blocks of each token's "
        "squared error to the teacher's block output, divided by that output's squared norm "
        "(SquareHead-style, Kurtic et al. 2023); 0: KL only. Above 0 the teacher runs at "
        "every step (its block outputs are not cached)",
    )
    save_every: int = option(25, "with an output: save the training state every N steps")
    lean: bool = option(
        True,
        "memory-lean optimiser state, same steps: Adam moments of the kept weights only, each "
        "gradient packed to its kept entries as autograd finishes it, masks as bits, no "
        "cached bf16 weight copies under checkpointing, and (in safe-llm prune/recover) the "
        "teacher's unshared tensors freed once its hidden states are cached. Off: "
        "torch.optim.Adam over whole tensors (--recover-fsdp always uses it)",
    )
    memory_check: bool = option(
        True,
        "estimate recovery's peak memory before loading the teacher and stop at once, with "
        "what would fit, when it exceeds the device's free memory",
    )
    fsdp: bool = option(
        False,
        "under torchrun: shard the decoder blocks' weights, gradients and Adam state over the "
        "ranks (FSDP2) instead of keeping a whole copy on each: for models whose weights and "
        "optimiser state do not fit one device",
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("nsamples", "seqlen", "tokens", "steps", "batch_size", "kl_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecoveryError(f"--recover-{name.replace('_', '-')} must be at least 1")
        if self.seqlen is not None and self.seqlen < 2:
            raise RecoveryError("--recover-seqlen must be at least 2")
        if self.save_every < 1:
            raise RecoveryError("--recover-save-every must be at least 1")
        for name in ("lr", "hidden_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                flag = f"--recover-{name.replace('_', '-')}"
                raise RecoveryError(f"{flag} must be a finite number >= 0, got {value}")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices:
                flag = f"--recover-{f.name.replace('_', '-')}"
                raise RecoveryError(f"{flag} takes {', '.join(choices)}, got {value!r}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise RecoveryError("--recover-warmup-steps and --recover-grad-clip must be >= 0")
        unknown = set(self.train) - set(TRAINABLE_GROUPS)
        if unknown or not self.train:
            raise RecoveryError(
                f"--recover-train takes one or more of {', '.join(TRAINABLE_GROUPS)}, "
                f"got {self.train}"
            )

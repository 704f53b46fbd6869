"""Recovery's settings: :class:`RecoverOptions` (recipe key ``recover``, CLI flags
``--recover`` and ``--recover-<name>``), each checked where it is declared. No torch here: the
CLI reads these fields to build its flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safe_llm.errors import SafeLLMError
from safe_llm.options import ConfigError, check_fields, option, parse_count

TRAINABLE_GROUPS = ("weights", "norms")


class RecoveryError(SafeLLMError):
    """Recovery could not run or produced unusable weights; nothing was saved."""


@dataclass
class RecoverOptions:
    """Recovery settings: recipe key ``recover``, CLI flags ``--recover-<name>``; ``enabled``
    (``--recover``) switches the stage on in ``safe-llm prune``."""

    flag_prefix: ClassVar[str] = "recover_"

    enabled: bool = option(
        False,
        "after the block loop, train the whole pruned model end to end with its mask frozen "
        "to match the dense model's next-token distribution (KL distillation; see the "
        "recover stage options)",
        flag="recover",
    )

    dataset: str | None = option(
        None,
        "recovery text (default: the calibration --dataset); self: windows sampled from the "
        "dense model (--self-temperature, --self-top-p, --self-top-k)",
    )
    nsamples: int | None = option(None, "recovery windows (default: --nsamples)", at_least=1)
    seqlen: int | None = option(None, "tokens per recovery window (default: --seqlen)", at_least=2)
    seed: int | None = option(
        None,
        "seed of the recovery windows and their order (default: --seed, i.e. the "
        "calibration windows themselves)",
    )
    tokens: int | None = option(
        None,
        "training budget in tokens, e.g. 65536, 500k, 2M (k/M/G: 10^3/10^6/10^9; rounded up "
        "to whole steps): recovery then streams that many fresh windows (text tokenized "
        "lazily, or the self-generated windows from disk) instead of holding windows and "
        "the teacher's states in memory; default: one pass over --recover-nsamples windows",
        at_least=1,
        flag_type=str,
    )
    steps: int | None = option(
        None,
        "training budget in optimiser steps (overrides tokens; with tokens, steps x "
        "batch-size windows are streamed)",
        at_least=1,
    )
    lr: float = option(
        2.5e-3,
        "Adam learning rate (peak); with step_scale relative (default), in units of each "
        "tensor's RMS",
        at_least=0,
    )
    step_scale: str = option(
        "relative",
        "relative: each tensor steps lr x its RMS at the start (the steps do not depend on the "
        "weights' scale); absolute: every tensor steps lr",
        choices=("absolute", "relative"),
    )
    warmup_steps: int = option(4, "linear warm-up steps; then linear decay to 0", at_least=0)
    batch_size: int = option(2, "windows per optimiser step", at_least=1)
    train: list[str] = option(
        None,
        factory=lambda: ["weights", "norms"],
        help="what trains: weights (the kept weights and biases of the pruned layers), "
        "norms (every other block parameter and the final norm); embeddings and lm_head never",
        nargs="+",
        choices=TRAINABLE_GROUPS,
    )
    grad_clip: float = option(
        1.0, "clip the gradient's global norm to this (0: no clipping)", at_least=0
    )
    kl_chunk: int = option(
        128,
        "tokens per chunk of the vocabulary-sized KL (the memory planner counts 2 x chunk x "
        "vocab x 4 bytes: the chunk's student and teacher logits in float32; 50 MB on "
        "SmolLM2's 49k vocabulary)",
        at_least=1,
    )
    gradient_checkpointing: bool | None = option(
        None,
        "recompute block activations in the backward (less memory, one more forward per "
        "step). Default: on unless the faster plan fits (see --recover-lean)",
    )
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
        at_least=0,
    )
    save_every: int = option(
        25, "with an output: save the training state every N steps", at_least=1
    )
    lean: bool | None = option(
        None,
        "memory-lean optimiser state, same steps: Adam moments of the kept weights only, each "
        "gradient packed to its kept entries as autograd finishes it, masks as bits, no "
        "cached bf16 weight copies under checkpointing, and (in safe-llm prune/recover) the "
        "teacher's unshared tensors freed once its hidden states are cached. Off: "
        "torch.optim.Adam over whole tensors (--recover-fsdp always uses it). Default: both "
        "this and checkpointing off where that plan's peak is at most half the device's free "
        "memory (1.5x the tokens/s on SmolLM2, CPU), else on",
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
        if isinstance(self.tokens, str):  # "2M" from a flag or a recipe
            self.tokens = parse_count(self.tokens, "--recover-tokens")
        check_fields(self)
        if not self.train:
            raise ConfigError(
                f"--recover-train takes one or more of {', '.join(TRAINABLE_GROUPS)}, got none"
            )

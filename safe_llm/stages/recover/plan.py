"""Recovery's peak memory, estimated before the teacher is loaded.

:func:`plan_recovery` adds up, from the pruned student (its parameter counts, kept entries,
vocabulary, width and depth), the recovery options and the batch, what recovery holds at its
two peaks:

* the teacher phase: the student, the dense teacher as loaded (whole, before its embeddings
  and head are shared with the student's), the masks and the teacher's cached hidden states;
* the training phase: the student, the masks, the gradients, the Adam moments, the bf16
  weight copies of autocast, the teacher's blocks (unless freed after the cache), the cache,
  the activations and the vocabulary-sized tensors of one KL chunk.

Bytes above a bare ``import torch, transformers`` process (on a CPU) or of the device's
allocator (CUDA). ``KL_TENSORS``, ``BLOCK_ACTIVATIONS`` and ``MLP_ACTIVATIONS`` count the
live tensors of one KL chunk and of one block's forward; they were set from measured peaks
(``eval/recovery_memory.py``, tests/stages/test_recovery_plan.py pins the estimate to a
measured peak).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from safe_llm.core import distributed
from safe_llm.core.blocks import find_blocks, prunable_layers
from safe_llm.core.throughput import FLOPS_PER_TOKEN_PER_PARAMETER
from safe_llm.stages.recover.state import saved_lean

log = logging.getLogger(__name__)

KL_TENSORS = 2  # the chunk's logits (student, teacher), float32; the rest is in place
BLOCK_ACTIVATIONS = 12  # residual-width tensors alive in one block's forward and backward
MLP_ACTIVATIONS = 4  # intermediate-width tensors (gate, up, their product, its gradient)
RUNTIME = 135 * 2**20  # safe-llm's imports above a bare import torch, transformers (measured)
FAST_SHARE = 0.5  # the fast state is taken when its peak is at most this share of free memory
MEMORY_MODES = ("lean", "gradient_checkpointing")  # the options that trade speed for memory


@dataclass
class ModelCounts:
    """What the estimate needs from the student."""

    parameters: int  # every parameter, once (tied embeddings counted once)
    block_parameters: int  # the decoder blocks'
    prunable: int  # entries of the blocks' linear weights
    kept: int  # of those, non-zero
    held: int  # kept entries whose gradient cannot wait in the pruned ones (under 50% sparse)
    largest: int  # entries of the largest linear weight (its whole gradient exists a moment)
    other_trainable: int  # norms and biases of the blocks, the final norm
    shared: int  # embeddings and lm_head (the teacher's point at the student's)
    itemsize: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    eager_attention: bool = False  # attention weights materialised (not SDPA / flash)

    @classmethod
    def of(cls, model: nn.Module) -> ModelCounts:
        prefix, blocks = find_blocks(model)
        unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
        prunable = kept = held = largest = widest = 0
        for weight in _prunable_parameters(blocks):
            nonzero = int(torch.count_nonzero(weight))
            prunable, kept = prunable + weight.numel(), kept + nonzero
            if 2 * nonzero > weight.numel() or weight.dtype != torch.float32:
                held += nonzero
            largest = max(largest, weight.numel())
            widest = max(widest, *weight.shape)
        in_blocks = sum(p.numel() for n, p in unique if n.startswith(prefix + "."))
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        shared = head.numel() + (0 if embed is head else embed.numel())
        total = sum(p.numel() for _, p in unique)
        config = model.config
        return cls(
            parameters=total,
            block_parameters=in_blocks,
            prunable=prunable,
            kept=kept,
            held=held,
            largest=largest,
            other_trainable=total - shared - prunable,
            shared=shared,
            itemsize=head.element_size(),
            vocab=head.shape[0],
            hidden=head.shape[1],
            intermediate=getattr(config, "intermediate_size", None) or widest,
            layers=len(blocks),
            heads=getattr(config, "num_attention_heads", 1) or 1,
            eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        )


def _prunable_parameters(blocks: nn.ModuleList) -> list[torch.Tensor]:
    """The blocks' pruned parameters, each once: linear weights and whole fused expert
    tensors (recovery masks and steps them whole)."""
    unique = {}
    for block in blocks:
        for layer in prunable_layers(block).values():
            unique.setdefault(id(layer.param), layer.param.detach())
    return list(unique.values())


@dataclass
class RecoveryPlan:
    """The estimate: ``parts`` (bytes, training phase), the teacher phase's total, the peak,
    and the device's free memory (None where unknown)."""

    parts: dict[str, int]
    teacher_phase: int
    available: int | None
    parameters: int
    suggestions: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)  # tokens, matmul rate, seconds at best

    @property
    def training_phase(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        return max(self.training_phase, self.teacher_phase)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def to_dict(self) -> dict:
        return {
            "peak_bytes": self.peak,
            "bytes_per_parameter": self.peak / self.parameters,
            "teacher_phase_bytes": self.teacher_phase,
            "training_phase_bytes": self.training_phase,
            "parts": dict(self.parts),
            "available_bytes": self.available,
            **self.timing,
        }

    def time_line(self) -> str:
        """The budget and the least time it can take ("" before :meth:`add_time`)."""
        if not self.timing:
            return ""
        return (
            f"{self.timing['tokens']} tokens take at least {self.timing['seconds_at_best']:.0f} s "
            f"at this device's dense matmul rate ({self.timing['matmul_flops_per_second'] / 1e9:.1f}"
            " GFLOP/s, 6 x parameters FLOPs per token); the loop's time is estimated after its "
            "first steps"
        )

    def add_time(self, tokens: int, matmul_rate: float) -> None:
        """Record the budget of ``tokens`` and the device's matmul rate (FLOP/s)."""
        self.timing = {
            "tokens": tokens,
            "matmul_flops_per_second": matmul_rate,
            "seconds_at_best": seconds_at_best(self.parameters, tokens, matmul_rate),
        }

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.parts.items() if v)
        free = "unknown" if self.available is None else f"{self.available / 2**30:.1f} GiB"
        return (
            f"recovery needs about {self.peak / 2**30:.2f} GiB "
            f"({self.peak / self.parameters:.1f} bytes per parameter; teacher phase "
            f"{self.teacher_phase / 2**30:.2f}, training {self.training_phase / 2**30:.2f}: "
            f"{parts}) of {free} free"
        )

    def refusal(self) -> str:
        """One line: what does not fit and what would."""
        fixes = "; ".join(self.suggestions) or "a device with more memory"
        return f"{self.summary()}: it will not fit. What would fit: {fixes}"


def _activations(
    counts: ModelCounts, windows: int, seqlen: int, checkpointing: bool, bf16: bool
) -> int:
    """Bytes of the student's activations in one step: each block's (bf16 under autocast),
    one at a time under checkpointing, which keeps each block's input (float32)."""
    tokens = windows * seqlen
    block = tokens * (BLOCK_ACTIVATIONS * counts.hidden + MLP_ACTIVATIONS * counts.intermediate)
    if counts.eager_attention:
        block += 2 * windows * counts.heads * seqlen * seqlen  # attention weights, gradient
    block *= 2 if bf16 else 4
    inputs = counts.layers * tokens * counts.hidden * 4  # each block's saved input
    return inputs + block if checkpointing else counts.layers * block


def estimate(
    counts: ModelCounts,
    options,
    windows: int,
    seqlen: int,
    nwindows: int,
    bf16: bool,
    world: int = 1,
    teacher_released: bool = True,
) -> RecoveryPlan:
    """The :class:`RecoveryPlan` of recovering a student with ``counts`` under ``options``
    (:class:`~safe_llm.stages.recover.options.RecoverOptions`), ``windows`` per step of ``seqlen`` tokens on
    each of ``world`` ranks, ``nwindows`` windows cached, bf16 autocast or not. A lean state
    or checkpointing left to auto (None) is counted on: the least memory it can take."""
    on = {name: getattr(options, name) is not False for name in MEMORY_MODES}
    options = replace(options, **on)
    size = counts.itemsize
    lean = options.lean and not options.fsdp
    shard = world if options.fsdp else 1  # FSDP: the blocks' tensors are split over ranks
    trainable = counts.prunable + counts.other_trainable
    kept = counts.kept + counts.other_trainable
    if lean:
        held = (counts.held + counts.other_trainable + 3 * counts.largest) * 4
        state = {"masks": counts.prunable // 8, "gradients": held, "moments": kept * 8}
    else:
        state = {
            "masks": 2 * counts.prunable,
            "gradients": trainable * size // shard,
            "moments": 2 * trainable * size // shard,
        }
    keeps_teacher = not (lean and teacher_released and options.teacher_cache)
    keeps_teacher = keeps_teacher or options.hidden_weight > 0
    teacher_blocks = counts.block_parameters * size // shard
    cache = nwindows * seqlen * counts.hidden * 4 if options.teacher_cache else 0
    kl = min(options.kl_chunk, windows * seqlen) * counts.vocab * 4 * KL_TENSORS
    copies = bf16 and not (lean and options.gradient_checkpointing)
    student = (counts.parameters - counts.block_parameters) * size
    student += counts.block_parameters * size // shard
    parts = {
        "runtime": RUNTIME,
        "student": student,
        **state,
        "autocast copies": trainable * 2 // shard if copies else 0,
        "teacher": (teacher_blocks + counts.hidden * size) if keeps_teacher else 0,
        "teacher cache": cache,
        "activations": _activations(counts, windows, seqlen, options.gradient_checkpointing, bf16),
        "kl chunk": kl,
    }
    teacher_phase = RUNTIME + student + state["masks"] + cache + teacher_blocks
    teacher_phase += counts.shared * size  # loaded whole, shared with the student after
    return RecoveryPlan(parts, teacher_phase, None, counts.parameters)


PROBE_STEPS = 3  # steps timed (after one warm-up step) before the loop's time is estimated


def estimate_seconds(step_seconds: list[float], steps_left: int, elapsed: float) -> float:
    """The step loop's whole time: ``elapsed`` so far plus ``steps_left`` steps of the median
    of the measured ``step_seconds`` (the median: one step slowed by the machine does not
    move it)."""
    median = sorted(step_seconds)[len(step_seconds) // 2]
    return elapsed + steps_left * median


def seconds_at_best(parameters: int, tokens: int, matmul_rate: float) -> float:
    """The least time ``tokens`` of training can take: ``6 x parameters`` FLOPs per token at
    the device's dense matmul rate (FLOP/s), i.e. a flop fraction of 1."""
    return FLOPS_PER_TOKEN_PER_PARAMETER * parameters * tokens / matmul_rate


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the host's ``MemAvailable`` plus what
    this process holds now above a bare ``import torch`` (the student, already loaded)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_recovery(
    student: nn.Module,
    options,
    windows: int,
    seqlen: int,
    nwindows: int,
    device: torch.device,
    bf16: bool,
    world: int = 1,
) -> RecoveryPlan:
    """The plan of recovering ``student`` on ``device`` (free memory measured now) with what
    would fit when it does not (:attr:`RecoveryPlan.suggestions`). On a CPU the student is
    already resident: its bytes are added to the free memory."""
    counts = ModelCounts.of(student)
    per_rank = math.ceil(windows / world)
    plan = estimate(counts, options, per_rank, seqlen, nwindows, bf16, world)
    free = available_bytes(device)
    if free is not None and device.type == "cpu":
        free += counts.parameters * counts.itemsize
    plan.available = free
    if not plan.fits:
        plan.suggestions = _suggestions(counts, options, windows, seqlen, nwindows, bf16, free)
    return plan


def resolve_memory_modes(
    student: nn.Module,
    options,
    windows: int,
    seqlen: int,
    nwindows: int,
    device: torch.device,
    bf16: bool,
    state_dir=None,
):
    """``options`` with ``lean`` and ``gradient_checkpointing`` decided where they are None
    (auto): a lean state saved in ``state_dir`` is resumed as saved; otherwise both are off
    where the plan without them peaks at most :data:`FAST_SHARE` of the device's free memory
    (the fast state: no gradient packing, no recompute; measured 1.5x the tokens/s on SmolLM2,
    CPU), else both on (the least memory; also where the free memory is unknown). Every
    torchrun rank takes the same decision; it is logged."""
    if options.lean is None:
        options = replace(options, lean=saved_lean(state_dir))
    auto = [name for name in MEMORY_MODES if getattr(options, name) is None]
    if not auto:
        return options
    world = distributed.world_size()
    fast = replace(options, **dict.fromkeys(auto, False))
    plan = plan_recovery(
        student, fast, windows, seqlen, nwindows, torch.device(device), bf16, world
    )
    roomy = plan.available is not None and plan.peak <= FAST_SHARE * plan.available
    tight = torch.tensor([0.0 if roomy else 1.0], device=device)
    distributed.all_reduce_sum_([tight])  # every rank decides alike: fast only if all have room
    on = bool(tight.item() > 0)
    log.info(
        "recovery: %s %s (auto: the faster plan %s half the free memory)",
        " and ".join(name.replace("_", " ") for name in auto),
        "on" if on else "off",
        "needs more than, or cannot measure," if on else "fits in",
    )
    return replace(options, **dict.fromkeys(auto, on))


def _suggestions(counts, options, windows, seqlen, nwindows, bf16, free) -> list[str]:
    """The changes (each alone) whose estimate fits in ``free`` bytes."""
    candidates = [
        ("--recover-lean", replace(options, lean=True, fsdp=False), windows, 1),
        (
            "--recover-gradient-checkpointing",
            replace(options, gradient_checkpointing=True),
            windows,
            1,
        ),
        ("--recover-batch-size 1", options, 1, 1),
        ("--recover-kl-chunk 128", replace(options, kl_chunk=128), windows, 1),
        ("--no-recover-teacher-cache", replace(options, teacher_cache=False), windows, 1),
    ]
    for ranks in (2, 4, 8, 16):
        sharded = replace(options, fsdp=True, gradient_checkpointing=True)
        candidates.append(
            (f"--recover-fsdp over {ranks} ranks (torchrun)", sharded, windows, ranks)
        )
    fits = []
    for label, changed, batch, ranks in candidates:
        if changed == options and batch == windows and ranks == 1:
            continue
        per_rank = math.ceil(batch / ranks)
        plan = estimate(counts, changed, per_rank, seqlen, nwindows, bf16, ranks)
        if plan.peak <= free:
            fits.append(f"{label} (about {plan.peak / 2**30:.1f} GiB)")
            if ranks > 1:
                break  # the fewest ranks that fit
    return fits

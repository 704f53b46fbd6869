"""Sparse recovery: train the whole pruned model end to end, its mask frozen, to match the
dense model's next-token distribution (knowledge distillation).

The block loop reconstructs one block at a time against calibration data; whatever error it
leaves compounds through the depth of the model. Recovery trains every kept weight (and,
optionally, the norms) of the pruned *student* through the whole model so that its
next-token distribution matches the dense *teacher*'s:

    loss = mean over tokens t of  KL( p_teacher(. | x_<t) || p_student(. | x_<t) )

plus, with ``hidden_weight`` > 0, that weight times the sum over blocks of each token's block
output error ``||s - t||^2 / ||t||^2`` (measured on SmolLM2: it did not help; off by default).

* The sparsity mask is frozen: with the lean state (default, :mod:`safe_llm.lean_adam`) only
  the kept entries have a gradient and Adam moments, and the pruned ones end every step at
  exactly +0.0; with ``lean`` off the gradient is masked before each ``torch.optim.Adam`` step
  and the mask re-applied after it. The mask is checked again before anything is saved.
* The teacher's logits are computed on the fly without gradients. Neither model's full
  ``[batch, seq, vocab]`` logits are ever held: the student's last hidden state is cut from the
  graph, the KL is computed and back-propagated chunk by chunk of tokens, and the gradient
  reaching the hidden state is then sent back through the blocks once.
* Embeddings and ``lm_head`` are frozen, and the teacher uses the student's tensors where the
  two hold the same ones (they are never pruned), so they are in memory once.
* Gradient checkpointing (on by default) keeps one block's activations at a time.
* A non-finite loss or gradient stops the run with an error before the step is taken.
* With ``state_dir`` the optimiser, the trained weights and the RNG are saved every
  ``save_every`` steps (each file written atomically); a rerun continues from there and ends
  with the same weights bit for bit (on CPU).
* Under ``torchrun`` each rank takes its share of each batch's windows; the gradients are
  summed over ranks, so every rank takes the same step as a single process would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from safe_llm import distributed, fsdp, precision
from safe_llm.blocks import find_blocks, prunable_layers
from safe_llm.errors import SafeLLMError
from safe_llm.lean_adam import BitMask, MaskedAdam
from safe_llm.memory import (
    StagePeaks,
    drop_file_pages,
    return_freed_memory,
    serve_large_buffers_from_mmap,
)
from safe_llm.options import option
from safe_llm.recovery_plan import RecoveryPlan, plan_recovery
from safe_llm.resume import atomic_write, rng_state, set_rng_state

log = logging.getLogger(__name__)

RECOVERY_METHODS = ("distill",)
RECOVERY_MMAP_THRESHOLD = 128 * 2**10  # glibc serves buffers from here on by mmap (recovery)
TRAINABLE_GROUPS = ("weights", "norms")


class RecoveryError(SafeLLMError):
    """Recovery could not run or produced unusable weights; nothing was saved."""


@dataclass
class RecoverOptions:
    """Recovery settings: recipe key ``recover_options``, CLI flags ``--recover-<name>``."""

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


def recover_options(values: dict | None = None) -> RecoverOptions:
    """:class:`RecoverOptions` from a mapping (a recipe's ``recover_options``), validated."""
    names = {f.name for f in dataclasses.fields(RecoverOptions)}
    unknown = set(values or {}) - names
    if unknown:
        raise RecoveryError(
            f"unknown recovery option(s): {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(names))}"
        )
    options = RecoverOptions(**(values or {}))
    options.validate()
    return options


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


def kl_chunk_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student) for logits ``[tokens, vocab]`` (float32)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def chunked_kl_backward(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    chunk: int,
    scale: float,
) -> tuple[float, torch.Tensor]:
    """``(scale * sum of per-token KL, gradient w.r.t. student_hidden)``.

    ``student_hidden`` / ``teacher_hidden``: final hidden states ``[batch, seq, d]``; the heads
    map them to logits. Only ``chunk`` tokens' logits exist at a time, and autograd
    back-propagates only the head's product: the log-softmax, the KL and its gradient w.r.t.
    the student's logits are taken in place, :data:`KL_ROWS` tokens at a time
    (:func:`_kl_rows_`), so a chunk holds its two ``[chunk, vocab]`` float32 logit tensors
    and nothing else of that size. The heads run outside autocast, in their weights' dtype: a
    bf16 autocast would cast the whole frozen vocabulary matrix again for every chunk (57 MB
    for SmolLM2, the student's copy held until the backward).
    """
    dtype = next(student_head.parameters()).dtype
    hidden = student_hidden.detach().reshape(-1, student_hidden.shape[-1])
    target = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    grad = torch.empty_like(hidden)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            piece = slice(start, start + chunk)
            with torch.no_grad():
                teacher = teacher_head(target[piece].to(dtype)).float()
            leaf = hidden[piece].detach().to(dtype).requires_grad_()
            logits = student_head(leaf)
            with torch.no_grad():  # in place on the logits: the product does not keep them
                student = logits.detach().float()
                total += _kl_rows_(student, teacher, scale)
                del teacher
            logits.backward(student.to(logits.dtype))
            grad[piece] = leaf.grad
            del logits, student, leaf  # before the next chunk's logits exist
    return float(total), grad.view_as(student_hidden)


KL_ROWS = 16  # tokens whose vocabulary-sized temporaries exist at once in _kl_rows_


def _kl_rows_(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * sum over tokens of KL(softmax(teacher) || softmax(student))`` for logits
    ``[tokens, vocab]`` (float32, float64 result); ``student`` is overwritten with the
    gradient w.r.t. itself, ``scale * (softmax(student) - softmax(teacher))``, and
    ``teacher`` with scratch. :data:`KL_ROWS` tokens at a time: no temporary of the whole."""
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    for start in range(0, student.shape[0], KL_ROWS):
        rows = slice(start, start + KL_ROWS)
        log_q = student[rows].sub_(torch.logsumexp(student[rows], -1, keepdim=True))
        log_p = teacher[rows].sub_(torch.logsumexp(teacher[rows], -1, keepdim=True))
        p = log_p.exp()  # the KL's terms as F.kl_div(log_q, log_p, log_target=True) takes them
        total += log_p.sub_(log_q).mul_(p).sum().double()
        log_q.exp_().sub_(p).mul_(scale)
    return total * scale


# --------------------------------------------------------------------------------------------
# the model's parts
# --------------------------------------------------------------------------------------------


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(the model without its head, lm_head)``: body(input_ids)[0] is the final hidden state."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise RecoveryError(
            f"{type(model).__name__} has no separate base model and output embeddings; "
            "recovery needs a transformers causal LM"
        )
    if getattr(model.config, "final_logit_softcapping", None) or hasattr(model, "logit_scale"):
        raise RecoveryError(
            f"{type(model).__name__} transforms its logits after lm_head (soft-capping or "
            "scaling); recovery does not support it yet"
        )
    return body, head


def sparsity_masks(model: nn.Module, wrap=None) -> dict:
    """``{parameter name: weight == 0}`` (bool, True where pruned) for every prunable parameter
    of the decoder blocks: linear layers' weights and fused expert parameters (every expert's
    mask at once). ``wrap`` turns each mask into what the caller keeps (e.g. a
    :class:`BitMask`)."""
    prefix, blocks = find_blocks(model)
    masks = {}
    for index, block in enumerate(blocks):
        for layer in prunable_layers(block).values():
            name = f"{prefix}.{index}.{layer.param_name}"
            if name not in masks:
                mask = layer.param.detach() == 0
                masks[name] = mask if wrap is None else wrap(mask)
    return masks


def trainable_parameters(
    model: nn.Module, masks: dict[str, torch.Tensor], groups: list[str]
) -> dict[str, nn.Parameter]:
    """The parameters recovery trains, by name: ``weights`` = the pruned layers' weights and
    biases, ``norms`` = every other parameter of the blocks plus the final norm. Embeddings
    and the output head never train; everything returned has ``requires_grad`` set, the rest
    not."""
    prefix, blocks = find_blocks(model)
    layer_names = {name.rsplit(".", 1)[0] for name in masks}  # their modules (experts too)
    head = model.get_output_embeddings()
    frozen = {id(model.get_input_embeddings().weight), id(head.weight)}
    chosen: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        owner = name.rsplit(".", 1)[0]
        in_layer = owner in layer_names
        in_blocks = name.startswith(prefix + ".")
        outside_norm = not in_blocks and param.dim() == 1 and not name.startswith("lm_head")
        if id(param) in frozen:
            continue
        group = "weights" if in_layer else "norms" if in_blocks or outside_norm else None
        if group in groups:
            chosen[name] = param
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen


def share_frozen_tensors(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Point the teacher's embeddings and lm_head at the student's where they are equal (both
    frozen, never pruned): one copy in memory. Returns what was shared."""
    shared = []
    pairs = (
        ("input embeddings", student.get_input_embeddings(), teacher.get_input_embeddings()),
        ("lm_head", student.get_output_embeddings(), teacher.get_output_embeddings()),
    )
    for label, mine, theirs in pairs:
        if mine is None or theirs is None or mine.weight is theirs.weight:
            continue
        if mine.weight.shape == theirs.weight.shape and torch.equal(mine.weight, theirs.weight):
            drop_file_pages(theirs.weight)  # mapped from a file, it would stay resident
            theirs.weight = mine.weight
            shared.append(label)
    return shared


@torch.no_grad()
def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Raise :class:`RecoveryError` if a pruned entry is no longer exactly zero."""
    params = dict(model.named_parameters())
    for name, pruned in masks.items():
        pruned = pruned.unpack() if isinstance(pruned, BitMask) else pruned
        if torch.count_nonzero(params[name].masked_select(pruned)):
            raise RecoveryError(
                f"{name}: pruned entries are non-zero after recovery (the mask moved); "
                "nothing was saved"
            )


def check_finite_parameters(params: dict[str, nn.Parameter], step: int) -> None:
    for name, param in params.items():
        if not torch.isfinite(param).all():
            raise RecoveryError(
                f"recovery step {step}: {name} holds NaN/Inf; nothing was saved. Lower "
                "--recover-lr or --recover-grad-clip"
            )


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------


@dataclass
class RecoveryReport:
    method: str
    dataset: str
    nsamples: int
    seqlen: int
    seed: int
    steps: int
    tokens: int
    lr: float
    warmup_steps: int
    step_scale: str
    batch_size: int
    train: list[str]
    hidden_weight: float
    fsdp: bool
    autocast_bf16: bool
    optimizer: str
    trainable_parameters: int
    shared_with_teacher: list[str]
    losses: list[float]
    seconds: float
    resumed_from_step: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def total_steps(options: RecoverOptions, nsamples: int, seqlen: int) -> int:
    """Optimiser steps of the budget: ``steps``, else ``tokens`` / (batch x seqlen) rounded
    up, else one pass over the windows."""
    if options.steps is not None:
        return options.steps
    per_step = options.batch_size * seqlen
    tokens = options.tokens if options.tokens is not None else nsamples * seqlen
    return max(1, math.ceil(tokens / per_step))


def _batch_indices(step: int, nwindows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Windows of step ``step``: consecutive slices of one seeded permutation per pass (a pure
    function of the step, so a resumed run draws the same batches)."""
    per_pass = max(1, nwindows // batch_size)
    epoch, offset = divmod(step, per_pass)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(nwindows, generator=generator)
    return order[offset * batch_size : (offset + 1) * batch_size]


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _state_files(state_dir: Path, sharded: bool = False) -> tuple[Path, Path, Path]:
    """The progress record, the weights and the optimiser state; sharded (FSDP) runs keep
    one weights and one optimiser file per rank, each with that rank's shards."""
    suffix = f".rank{distributed.rank()}-of-{distributed.world_size()}" if sharded else ""
    return (
        state_dir / "recovery_progress.json",
        state_dir / f"recovery_weights{suffix}.safetensors",
        state_dir / f"recovery_optimizer{suffix}.pt",
    )


def _sharded(params: dict[str, nn.Parameter]) -> bool:
    return any(fsdp.is_sharded(p) for p in params.values())


def _save_state(state_dir, step, params, optimizer, losses) -> None:
    """Save the training state (every rank its own shards under FSDP; the progress record,
    written last, by the writer after every rank's files are complete)."""
    sharded = _sharded(params)
    if not (sharded or distributed.is_writer()):
        return  # every rank holds the same state: the writer saves it
    progress, weights, optim = _state_files(state_dir, sharded)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        n: fsdp.local(p.detach()).to("cpu", copy=True).contiguous() for n, p in params.items()
    }
    tensors.update(rng_state())
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
    state = _map_state(optimizer.state_dict(), fsdp.local)
    atomic_write(optim, lambda tmp: torch.save(state, tmp))
    if sharded:
        distributed.barrier()
    if distributed.is_writer():
        record = {"step": step, "losses": losses}
        atomic_write(progress, lambda tmp: tmp.write_text(json.dumps(record)))


def _load_state(state_dir, params, optimizer) -> tuple[int, list[float]]:
    """``(step to continue from, losses so far)``; ``(0, [])`` when nothing was saved."""
    sharded = _sharded(params)
    progress, weights, optim = _state_files(state_dir, sharded)
    if not progress.is_file():
        return 0, []
    if not weights.is_file():
        raise RecoveryError(
            f"the recovery state in {state_dir} has no {weights.name}: it was saved by a run "
            "with another number of processes or without --recover-fsdp; resume it the same way"
        )
    record = json.loads(progress.read_text())
    tensors = load_file(str(weights))
    with torch.no_grad():
        for name, param in params.items():
            fsdp.local(param).copy_(tensors[name])
    state = torch.load(optim, weights_only=True)
    if bool(state.get("lean")) != isinstance(optimizer, MaskedAdam):
        raise RecoveryError(
            f"the recovery state in {state_dir} was saved "
            f"{'with' if state.get('lean') else 'without'} the lean optimiser state; resume "
            "it with the same --recover-lean / --no-recover-lean"
        )
    ordered = list(params.values())  # the optimiser's parameter order (one group each)
    for index, values in state["state"].items():
        param = ordered[index]
        if fsdp.is_sharded(param):
            state["state"][index] = _map_state(values, lambda t, p=param: _like(t, p))
    optimizer.load_state_dict(state)
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")})
    return int(record["step"]), list(record["losses"])


def _map_state(value, fn):
    """``value`` (an optimiser state dict or part of it) with ``fn`` applied to every tensor
    of more than one element (Adam's moments; its step counters stay as they are)."""
    if isinstance(value, dict):
        return {k: _map_state(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_state(v, fn) for v in value]
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return fn(value)
    return value


def _like(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local shard as a ``DTensor`` sharded like ``param``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard.to(param.device), param.device_mesh, param.placements)


@torch.no_grad()
def teacher_hidden_states(
    teacher: nn.Module, windows: torch.Tensor, batch_size: int, device, progress: bool = False
) -> torch.Tensor:
    """The teacher's final hidden states of every window, ``[n, seq, d]`` on ``device``."""
    body, _ = _body_and_head(teacher)
    out = []
    for start in tqdm(
        range(0, windows.shape[0], batch_size), desc="teacher", unit="batch", disable=not progress
    ):
        ids = windows[start : start + batch_size].to(device)
        out.append(body(input_ids=ids, use_cache=False)[0])
    return torch.cat(out)


def _step_loss(student, teacher, windows, batch, options, device, cache) -> float:
    """Forward both models on ``windows[batch]`` (this rank's share), back-propagate the
    chunked KL (plus the hidden-state term) scaled by 1 / (tokens of the whole batch); returns
    this rank's loss share. ``cache``: the teacher's final hidden states of every window, or
    None to run the teacher."""
    body, head = _body_and_head(student)
    teacher_body, teacher_head = _body_and_head(teacher)
    mine = distributed.shard(batch)
    ids = windows[mine].to(device)
    scale = 1.0 / (len(batch) * windows.shape[1])
    with _block_outputs(teacher, options.hidden_weight > 0) as teacher_blocks:
        if cache is not None:
            teacher_hidden = cache[mine.to(cache.device)]
        else:
            with torch.no_grad():
                teacher_hidden = teacher_body(input_ids=ids, use_cache=False)[0]
    with _block_outputs(student, options.hidden_weight > 0) as student_blocks:
        hidden = body(input_ids=ids, use_cache=False)[0]
    loss, grad = chunked_kl_backward(
        hidden, teacher_hidden, head, teacher_head, options.kl_chunk, scale
    )
    if not student_blocks:
        hidden.backward(grad)
        return loss
    term = options.hidden_weight * scale * hidden_state_error(student_blocks, teacher_blocks)
    torch.autograd.backward([hidden, term], [grad, torch.ones_like(term)])
    return loss + float(term.detach())


def hidden_state_error(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Sum over blocks and tokens of ``||s - t||^2 / ||t||^2`` for block outputs
    ``[batch, seq, d]`` (float32 scalar). Normalised per token, so it adds up over ranks and the
    few tokens with huge activations (attention sinks) do not outweigh the rest."""
    total = torch.zeros((), dtype=torch.float32, device=student[0].device)
    for mine, theirs in zip(student, teacher, strict=True):
        theirs = theirs.detach().float()
        error = (mine.float() - theirs).pow(2).sum(-1)
        total = total + (error / theirs.pow(2).sum(-1).clamp_min(1e-12)).sum()
    return total


@contextlib.contextmanager
def _block_outputs(model: nn.Module, on: bool):
    """Within the context, every decoder block's output is appended to the yielded list
    (nothing when ``on`` is false). The hooks are gone when the context exits, so a
    checkpointed block recomputed in the backward is not recorded twice."""
    outputs: list[torch.Tensor] = []
    if not on:
        yield outputs
        return

    def record(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    _, blocks = find_blocks(model)
    handles = [block.register_forward_hook(record) for block in blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def recover(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    options: RecoverOptions,
    *,
    device: torch.device | str = "cpu",
    dataset: str = "",
    seed: int = 0,
    state_dir: str | Path | None = None,
    progress: bool = True,
    release_teacher: bool = False,
) -> RecoveryReport:
    """Distil ``teacher`` into the pruned ``student`` on ``windows`` ``[n, seqlen]``, in place.

    The student's zeros (its sparsity mask) are frozen. Both models must be on ``device``;
    with ``options.fsdp`` they may be on the host: their blocks are sharded onto ``device``.
    ``seed`` orders the windows; ``state_dir`` makes the run resumable (see the module doc).
    ``release_teacher`` (with the lean state and the teacher cache): free the teacher's tensors
    but the shared ones once its hidden states are cached; the teacher cannot run after.
    Raises :class:`RecoveryError` on a non-finite loss, gradient or weight, or a moved mask.
    """
    start = time.perf_counter()
    options.validate()
    masks = _masks(student, _lean(options))
    teacher.requires_grad_(False).eval()
    shared = share_frozen_tensors(student, teacher)
    steps = total_steps(options, windows.shape[0], windows.shape[1])
    batch_size = min(options.batch_size, windows.shape[0])
    state_path = Path(state_dir) if state_dir is not None else None
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    with (
        fsdp.sharded_blocks(student, torch.device(device), on=options.fsdp),
        fsdp.sharded_blocks(teacher, torch.device(device), on=options.fsdp, keep=False),
    ):
        training = _training(student, options, masks, (steps, batch_size, seed), state_path, bf16)
        release = student if release_teacher else None
        cache = _teacher_cache(teacher, windows, options, batch_size, device, bf16, release,
                               progress)  # fmt: skip
        _train(student, teacher, windows, training, options, device, cache, state_path, progress)
        names = set(training.params)
    params = {n: p for n, p in student.named_parameters() if n in names}
    check_finite_parameters(params, steps)
    check_masks(student, masks)
    return RecoveryReport(
        method="distill",
        dataset=dataset,
        nsamples=int(windows.shape[0]),
        seqlen=int(windows.shape[1]),
        seed=seed,
        steps=steps,
        tokens=steps * batch_size * int(windows.shape[1]),
        **_settings(options, batch_size),
        autocast_bf16=bf16,
        trainable_parameters=sum(p.numel() for p in params.values()),
        shared_with_teacher=shared,
        losses=training.losses,
        seconds=time.perf_counter() - start,
        resumed_from_step=training.first,
    )


def _teacher_cache(teacher, windows, options, batch_size, device, bf16, release, progress):
    """The teacher's final hidden states ``[n, seq, d]`` of every window, or None where the
    teacher runs at every step (``--no-recover-teacher-cache``, or the hidden-state term).
    ``release``: the student, whose tensors the teacher keeps, the rest of the teacher freed
    once its states are cached (with the lean state), or None."""
    if not options.teacher_cache or options.hidden_weight > 0:
        return None
    with precision.bf16_autocast(device, bf16):
        cache = teacher_hidden_states(teacher, windows, batch_size, device, progress)
    if release is not None and _lean(options):
        _release_teacher(teacher, release)
    return cache


def _training(student, options, masks, schedule, state_path, bf16) -> _Training:
    """The trainable parameters (shards of them under FSDP), their optimiser and masks, and
    the step to start from (from the saved state when there is one). ``masks``: the
    student's (:func:`_masks`); ``schedule``: ``(steps, batch size, seed)``."""
    steps, batch_size, seed = schedule
    if options.fsdp:  # the blocks were replaced by sharded copies: their masks, sharded
        masks = sparsity_masks(student)
    params = trainable_parameters(student, masks, options.train)
    groups = _param_groups(params, options.step_scale)
    if _lean(options):
        pruned = [masks.get(name) for name in params]
        optimizer = MaskedAdam(groups, pruned, lr=options.lr, betas=(0.9, 0.95))
        masked = []  # MaskedAdam leaves every pruned entry at +0.0 after each step
    else:
        optimizer = torch.optim.Adam(groups, lr=options.lr, betas=(0.9, 0.95))
        masked = [(params[n], m) for n, m in masks.items() if n in params]
    first, losses = _resume_point(state_path, params, optimizer, steps)
    return _Training(params, optimizer, masked, first, steps, batch_size, seed, losses, bf16)


def _lean(options: RecoverOptions) -> bool:
    """Whether the lean state is used: ``--recover-lean`` (default) without FSDP (sharded
    runs keep torch.optim.Adam over their shards)."""
    return options.lean and not options.fsdp


def _masks(student: nn.Module, lean: bool) -> dict:
    """The student's pruned masks: bool tensors, or :class:`BitMask` with the lean state (one
    tensor unpacked at a time)."""
    return sparsity_masks(student, BitMask if lean else None)


@torch.no_grad()
def _release_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Free every tensor of ``teacher`` that is not one of ``student``'s (its blocks and final
    norm; the shared embeddings and head stay): each is replaced by a meta tensor. A model
    loaded from safetensors is memory-mapped, and the file's pages stay resident until every
    tensor read from it is gone."""
    keep = {id(t) for t in (*student.parameters(), *student.buffers())}
    for module in teacher.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in keep:
                    meta = tensor.to("meta")
                    table[name] = nn.Parameter(meta, False) if name in module._parameters else meta
    return_freed_memory()


def _param_groups(params: dict[str, nn.Parameter], step_scale: str) -> list[dict]:
    """One Adam group per tensor with its ``scale``: the step is ``lr * scale`` (1 with
    absolute steps; with relative steps the tensor's RMS now, or 1 for an all-zero tensor)."""
    groups = []
    for param in params.values():
        scale = 1.0
        if step_scale == "relative":
            rms = float(fsdp.full(param.detach()).float().pow(2).mean().sqrt())
            scale = rms if rms > 0 else 1.0
        groups.append({"params": [param], "scale": scale})
    return groups


def _resume_point(state_path: Path | None, params, optimizer, steps: int) -> tuple[int, list]:
    """``(first step, losses so far)``: from the saved state when there is one."""
    first, losses = _load_state(state_path, params, optimizer) if state_path else (0, [])
    if first:
        log.info("recovery: resuming at step %d of %d", first, steps)
    return first, losses


def _settings(options: RecoverOptions, batch_size: int) -> dict:
    """The recovery settings a :class:`RecoveryReport` records."""
    return {
        "lr": options.lr,
        "warmup_steps": options.warmup_steps,
        "step_scale": options.step_scale,
        "batch_size": batch_size,
        "train": list(options.train),
        "hidden_weight": options.hidden_weight,
        "fsdp": options.fsdp,
        "optimizer": "lean" if _lean(options) else "adam",
    }


@dataclass
class _Training:
    """What the step loop works on: trainable parameters, their optimiser, the pruned
    ``(parameter, mask)`` pairs, the step range and batch size, the seed ordering the windows,
    and the losses so far (appended to)."""

    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    masked: list
    first: int
    steps: int
    batch_size: int
    seed: int
    losses: list[float]
    bf16: bool = False


def _train(
    student, teacher, windows, training: _Training, options, device, hidden, state_path, progress
) -> None:
    """The recovery's step loop; the state is saved every ``options.save_every`` steps."""
    params, optimizer, masked = training.params, training.optimizer, training.masked
    first, steps, batch_size, seed = (
        training.first,
        training.steps,
        training.batch_size,
        training.seed,
    )
    losses = training.losses
    was_training = student.training
    if options.gradient_checkpointing:
        _checkpointing(student, True)
    student.train()
    lean = isinstance(optimizer, MaskedAdam)
    if lean:
        optimizer.attach()
    # the lean state under checkpointing: no bf16 copy of every weight for the whole step
    cache = not (lean and options.gradient_checkpointing)
    bar = tqdm(range(first, steps), desc="recovery", unit="step", disable=not progress)
    try:
        for step in bar:
            for group in optimizer.param_groups:
                factor = _lr_factor(step, steps, options.warmup_steps)
                group["lr"] = options.lr * factor * group["scale"]
            batch = _batch_indices(step, windows.shape[0], batch_size, seed)
            # autocast per step: its cache of bf16 weight copies must not outlive the update
            with precision.bf16_autocast(device, training.bf16, cache):
                loss = _step_loss(student, teacher, windows, batch, options, device, hidden)
            _finish_step(optimizer, params, masked, options, step, loss)
            return_freed_memory()  # the step's freed temporaries, wherever they lie in the heap
            losses.append(_global_loss(loss, device))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if _save_due(state_path, step + 1, steps, options.save_every):
                _save_state(state_path, step + 1, params, optimizer, losses)
    finally:
        bar.close()
        if lean:
            optimizer.close()  # hooks removed, pruned entries zero again after an error
        student.train(was_training)
        if options.gradient_checkpointing:
            _checkpointing(student, False)
        for param in params.values():
            param.requires_grad_(False)


def _save_due(state_path: Path | None, done: int, steps: int, every: int) -> bool:
    """Whether the training state is due after ``done`` steps (:func:`_save_state` decides
    which ranks write it)."""
    return state_path is not None and done % every == 0 and done < steps


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn transformers' activation (gradient) checkpointing on or off, non-reentrant."""
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _global_loss(loss: float, device) -> float:
    """The whole batch's loss (the sum of every rank's share)."""
    if not distributed.active():
        return loss
    total = torch.tensor([loss], dtype=torch.float64, device=device)
    distributed.all_reduce_sum_([total])
    return float(total)


def _finish_step(optimizer, params, masked, options, step, loss) -> None:
    """Sum gradients over ranks (FSDP has summed the sharded ones), mask them, check them,
    step, re-apply the mask."""
    if isinstance(optimizer, MaskedAdam):
        _finish_lean_step(optimizer, options, step, loss)
        return
    grads = [p.grad for p in params.values() if p.grad is not None]
    distributed.all_reduce_sum_([g for g in grads if not fsdp.is_sharded(g)])
    with torch.no_grad():
        for param, pruned in masked:
            if param.grad is not None:
                param.grad.masked_fill_(pruned, 0.0)
        limit = options.grad_clip if options.grad_clip > 0 else math.inf
        if _sharded(params):
            norm = _clip_sharded(grads, limit)
        else:
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), limit)
    _check_finite_step(step, loss, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for param, pruned in masked:
            param.masked_fill_(pruned, 0.0)  # +0.0, never -0.0


def _finish_lean_step(optimizer: MaskedAdam, options, step, loss) -> None:
    """The lean state's :func:`_finish_step`: its packed gradients summed over ranks, clipped
    to the global norm, checked, then the step (pruned entries end exactly zero)."""
    if distributed.active():
        optimizer.all_reduce_(distributed.all_reduce_sum_)
    norm = optimizer.clip_grad_norm_(options.grad_clip if options.grad_clip > 0 else math.inf)
    _check_finite_step(step, loss, norm)
    optimizer.step()


def _check_finite_step(step: int, loss: float, norm: torch.Tensor) -> None:
    if not math.isfinite(loss) or not torch.isfinite(norm):
        raise RecoveryError(
            f"recovery step {step}: the loss ({loss}) or gradient norm ({float(norm)}) is not "
            "finite; nothing was saved. Lower --recover-lr, or check the teacher and windows"
        )


@torch.no_grad()
def _clip_sharded(grads: list[torch.Tensor], limit: float) -> torch.Tensor:
    """Clip gradients, some of them FSDP shards, to the global norm ``limit``; return the
    norm before clipping (the same on every rank)."""
    device = fsdp.local(grads[0]).device
    shard_sum = torch.zeros((), device=device)
    whole_sum = torch.zeros((), device=device)
    for g in grads:
        part = fsdp.local(g).float().square().sum()
        if fsdp.is_sharded(g):
            shard_sum += part
        else:
            whole_sum += part
    distributed.all_reduce_sum_([shard_sum])
    norm = (shard_sum + whole_sum).sqrt()
    factor = (limit / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        fsdp.local(g).mul_(factor)
    return norm


# --------------------------------------------------------------------------------------------
# running it: after the block loop, or on a saved checkpoint
# --------------------------------------------------------------------------------------------


def recovery_windows(tokenizer, config, options: RecoverOptions) -> tuple[torch.Tensor, dict]:
    """The recovery windows ``[n, seqlen]`` drawn like calibration windows
    (:func:`safe_llm.data.calibration_windows`; by default the calibration windows
    themselves), and ``{dataset, seed}`` as used."""
    from safe_llm import data

    dataset = options.dataset or config.dataset
    seed = options.seed if options.seed is not None else config.seed
    windows = data.calibration_windows(
        tokenizer,
        dataset,
        options.nsamples or config.nsamples,
        options.seqlen or config.seqlen,
        seed,
        text_column=config.text_column,
    )
    return windows, {"dataset": dataset, "seed": seed}


def run_recovery(
    model: nn.Module,
    tokenizer,
    config,
    device: torch.device,
    *,
    state_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Recover ``model`` (pruned, on the host) in place against the dense ``config.model``
    (loaded here as the teacher, in the model's dtype) with ``config.recover_options``;
    returns the recovery report as a dict. The model is back on the host afterwards."""
    from safe_llm.models import load_model

    options = recover_options(config.recover_options)
    # freed gradients and temporaries go back to the OS: from 128 KiB, not 1 MiB, as the lean
    # state's packed gradients, moments and indices of the narrow projections (SmolLM2's k/v:
    # 0.2-0.9 MB) otherwise fragment the heap (peak +0.1 GB over 4 steps)
    serve_large_buffers_from_mmap(RECOVERY_MMAP_THRESHOLD)
    windows, drawn = recovery_windows(tokenizer, config, options)
    return_freed_memory()  # the text and its encodings
    log.info(
        "recovery: %d windows x %d tokens from %s; teacher %s",
        *windows.shape,
        drawn["dataset"],
        config.model,
    )
    plan = _memory_plan(model, options, windows, device)
    dtype = next(model.parameters()).dtype
    teacher, _, _ = load_model(config.model, dtype, config.trust_remote_code)
    home = next(model.parameters()).device
    if not options.fsdp:  # under FSDP only the shards and what is not in a block go there
        model.to(device)
        teacher.to(device)
    try:
        report = recover(
            model,
            teacher,
            windows,
            options,
            device=device,
            dataset=drawn["dataset"],
            seed=drawn["seed"],
            state_dir=state_dir,
            progress=progress,
            release_teacher=True,
        )
    finally:
        model.to(home)
        del teacher
    log.info(
        "recovery: %d steps, %d tokens, KL %.4f -> %.4f in %.0f s",
        report.steps,
        report.tokens,
        report.losses[0] if report.losses else float("nan"),
        report.losses[-1] if report.losses else float("nan"),
        report.seconds,
    )
    return {**report.to_dict(), "memory_plan": plan.to_dict()}


def _memory_plan(model, options: RecoverOptions, windows: torch.Tensor, device) -> RecoveryPlan:
    """Recovery's estimated peak memory (logged); a :class:`RecoveryError` in one line, with
    what would fit, when it exceeds the device's free memory (unless ``memory_check`` is off)."""
    bf16 = precision.reduced_precision(options.autocast, torch.device(device), "recovery autocast")
    batch = min(options.batch_size, windows.shape[0])
    plan = plan_recovery(
        model, options, batch, windows.shape[1], windows.shape[0], torch.device(device), bf16,
        distributed.world_size(),
    )  # fmt: skip
    log.info("recovery: %s", plan.summary())
    if options.memory_check and not plan.fits:
        raise RecoveryError(plan.refusal() + " (--no-recover-memory-check runs it anyway)")
    return plan


def _load_pruned(checkpoint: Path, dtype: str | None, trust_remote_code: bool):
    """``(model, tokenizer)`` of a pruned checkpoint, in the dtype it was pruned in."""
    from safe_llm.models import DTYPES, load_model

    model, tokenizer, _ = load_model(
        str(checkpoint), DTYPES.get(dtype or "", torch.float32), trust_remote_code
    )
    return model, tokenizer


def _evaluation_after_recovery(model, tokenizer, config, device, previous: dict, progress) -> dict:
    """The checkpoint's evaluation with its pruned scores kept as ``before_recovery`` and,
    with ``config.eval``, the recovered model's as ``pruned``."""
    from safe_llm.pipeline import evaluate_sources

    evaluation = dict(previous.get("evaluation") or {})
    evaluation["before_recovery"] = evaluation.pop("pruned", {})
    if config.eval:
        model.to(device)
        evaluation["pruned"] = evaluate_sources(model, tokenizer, config, device, progress)
        model.to("cpu")
    return evaluation


def _read_checkpoint_record(checkpoint: Path) -> tuple[dict, dict]:
    """``(recipe.yaml, report.json)`` of a checkpoint written by safe-llm."""
    import yaml

    recipe_file, report_file = checkpoint / "recipe.yaml", checkpoint / "report.json"
    if not recipe_file.is_file() or not report_file.is_file():
        raise RecoveryError(
            f"{checkpoint} is not a safe-llm checkpoint (no recipe.yaml / report.json): "
            "recover needs the recipe to know the dense model (the teacher)"
        )
    return yaml.safe_load(recipe_file.read_text()) or {}, json.loads(report_file.read_text())


def _with_peaks(report, peaks: StagePeaks):
    """``report`` with ``peaks``' stages added to its per-stage peak memory."""
    report.stage_peak_memory_bytes = {**(report.stage_peak_memory_bytes or {}), **peaks.bytes}
    return report


def _recovery_state_dir(output: str, resume: bool) -> Path:
    """The recovery state's directory in ``output``'s work area, emptied unless resuming
    (by the writing rank, before any rank reads it)."""
    from safe_llm.resume import work_dir

    state_dir = work_dir(output) / "recovery"
    if not resume and state_dir.exists() and distributed.is_writer():
        shutil.rmtree(state_dir)
    distributed.barrier()
    return state_dir


def recover_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    options: dict,
    *,
    overwrite: bool = False,
    resume: bool = False,
    device: str | None = None,
    evaluate: list[str] | None = None,
    eval_max_windows: int | None = None,
    command_line: str | None = None,
    progress: bool = True,
):
    """Recover an existing pruned checkpoint into ``output``: the teacher is the dense model
    named in its ``recipe.yaml``; ``options`` are recovery settings (``recover_options``) on
    top of the recipe's. The checkpoint is written like ``safe-llm prune`` writes one
    (atomically), with the recovery in ``report.json``, ``recipe.yaml`` and the model card.
    Returns the :class:`~safe_llm.pipeline.PruneResult` it wrote."""
    from safe_llm.checkpoint import save_checkpoint
    from safe_llm.config import make_config
    from safe_llm.models import resolve_device
    from safe_llm.pipeline import PruneResult
    from safe_llm.run_report import RunReport  # (imported here: they import this module)

    start, checkpoint = time.perf_counter(), Path(checkpoint).expanduser()
    distributed.init_from_env()
    if Path(output).expanduser().resolve() == checkpoint.resolve():
        raise RecoveryError("--output is the input checkpoint; choose another directory")
    recipe, previous = _read_checkpoint_record(checkpoint)
    overrides = {
        "output": str(output),
        "overwrite": overwrite,
        "resume": resume,
        "recover": "distill",
        "recover_options": options,
        "command_line": command_line,
        "device": device,
        "eval": evaluate,
        "eval_max_windows": eval_max_windows,
    }
    config = make_config(recipe, {k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(config.seed)
    target = distributed.local_device(resolve_device(config.device))
    model, tokenizer = _load_pruned(checkpoint, previous.get("dtype"), config.trust_remote_code)
    state_dir = _recovery_state_dir(config.output, resume)
    progress = progress and distributed.is_writer()
    peaks = StagePeaks(target)
    with peaks.stage("recovery"):
        recovery = run_recovery(model, tokenizer, config, target, state_dir=state_dir,
                                progress=progress)  # fmt: skip
    report = _with_peaks(RunReport.from_dict(previous), peaks)
    report.evaluation = _evaluation_after_recovery(
        model, tokenizer, config, target, previous, progress
    )
    recovery.update(command=command_line, from_checkpoint=str(checkpoint))
    report.recovery = {**recovery, "total_seconds": time.perf_counter() - start}
    result = PruneResult(model, tokenizer, config, report)
    if distributed.is_writer():  # under torchrun rank 0 alone writes
        save_checkpoint(result)  # replaces the output directory, its work area included
    return result

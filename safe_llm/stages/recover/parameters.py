"""What recovery trains and what it must leave alone: the sparsity masks, the trainable
parameters, the frozen tensors shared with the teacher, and the checks that the masks held
and the weights stayed finite."""

from __future__ import annotations

import torch
from torch import nn

from safe_llm.core.blocks import find_blocks, prunable_layers
from safe_llm.stages.recover.options import RecoveryError
from safe_llm.train.masked_adam import BitMask


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

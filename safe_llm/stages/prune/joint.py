"""Joint reconstruction of a window of consecutive pruned blocks, their masks frozen.

After the method has pruned blocks ``s..e`` one at a time, the window is trained as one unit
on the local objective of the whole window::

    min_W  mean || window(X_s; W) - T ||^2,     T = dense window(X_s)

``X_s`` ``[n, seq, d]`` is the pruned stream entering block ``s`` and ``T`` the dense blocks
``s..e`` applied to it (the engine builds ``T`` block by block before pruning each one). An
error made in block ``s`` can then be compensated in block ``s+1``, which block-by-block
reconstruction cannot do (Shin et al. 2024 reconstruct several blocks jointly).

Adam (0.9/0.95) trains every parameter of the window; the pruned matrices keep their exact
zeros (set to +0.0 again after every step). Steps are relative, as SAFE's:
``lr`` is a fraction of each tensor's RMS per step, decaying linearly to 0; bf16 autocast
where the device computes it natively, fp32 master weights. Of the window before and after
training, the one with the lower error on the held-out windows is kept, so the stage never
makes the window worse on data it did not train on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from safe_llm.core import distributed, precision
from safe_llm.core.blocks import BlockCall, run_block
from safe_llm.errors import SafeLLMError
from safe_llm.stages.prune.options import JointOptions

log = logging.getLogger(__name__)


class NonFiniteJointLossError(SafeLLMError):
    """A window's loss turned NaN/Inf: the run stops before the window is saved."""


@dataclass
class Window:
    """Blocks ``first..first + len(blocks) - 1`` with their calls, the pruned stream that
    enters the first (``inputs``) and the dense window's outputs on it (``targets``), both
    ``[n, seq, d]`` and possibly off ``device``."""

    first: int
    blocks: list[nn.Module]
    calls: list[BlockCall]
    inputs: torch.Tensor
    targets: torch.Tensor
    pruned: list[nn.Parameter]  # the pruned weights, whose zeros stay zeros
    device: torch.device

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The window on a device batch ``[b, seq, d]``."""
        for block, call in zip(self.blocks, self.calls, strict=True):
            hidden = run_block(block, hidden, call)
        return hidden

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index].to(self.device), self.targets[index].to(self.device)

    def parameters(self) -> list[nn.Parameter]:
        return [p for block in self.blocks for p in block.parameters()]

    @torch.no_grad()
    def error(self, indices: torch.Tensor, batch_size: int) -> float:
        """Relative error ``||window(X) - T||^2 / ||T||^2`` on the windows ``indices``
        (fp32, no autocast; the same on every rank)."""
        num = den = 0.0
        for part in indices.split(batch_size):
            x, y = self.batch(part)
            out = self.forward(x.float()).float()
            num += float((out - y.float()).square().sum())
            den += float(y.float().square().sum())
        return num / max(den, 1e-30)


def reconstruct(window: Window, options: JointOptions, seed: int) -> dict[str, float]:
    """Train the window in place (masks frozen) and keep the better of before and after on
    the held-out windows; return the window's errors for the report."""
    home = [p.dtype for p in window.parameters()]
    for block in window.blocks:
        block.float()  # fp32 master weights
    try:
        return _reconstruct(window, options, seed)
    finally:
        for p, dtype in zip(window.parameters(), home, strict=True):
            p.data = p.data.to(dtype)


def _reconstruct(window: Window, options: JointOptions, seed: int) -> dict[str, float]:
    n = window.inputs.shape[0]
    held_count = min(max(round(options.holdout * n), 1), n - 1) if options.holdout else 0
    train, held = torch.arange(n - held_count), torch.arange(n - held_count, n)
    before = {
        i: {k: v.clone() for k, v in b.state_dict().items()} for i, b in enumerate(window.blocks)
    }
    check = held if held_count else train
    error_before = window.error(check, options.batch_size)
    loss = _train(window, options, train, seed)
    error_after = window.error(check, options.batch_size)
    kept = error_after < error_before
    if not kept:
        for index, block in enumerate(window.blocks):
            block.load_state_dict(before[index])
    last = window.first + len(window.blocks) - 1
    log.info(
        "joint reconstruction of blocks %d-%d: %s error %.4g -> %.4g, keeping %s",
        window.first,
        last,
        "held-out" if held_count else "training",
        error_before,
        error_after,
        "the trained window" if kept else "the block-by-block result",
    )
    return {
        "joint_first_block": float(window.first),
        "joint_error_before": error_before,
        "joint_error_after": error_after,
        "joint_kept": float(kept),
        "joint_loss": loss,
    }


def _train(window: Window, options: JointOptions, train: torch.Tensor, seed: int) -> float:
    """Adam on the window's parameters over ``train``; returns the last epoch's mean loss."""
    params = window.parameters()
    masks = [(weight, weight != 0) for weight in window.pruned]
    optimizer = _adam(params, options.lr)
    steps_per_epoch = math.ceil(len(train) / options.batch_size)
    total = max(int(round(options.epochs * steps_per_epoch)), 1)
    bf16 = precision.reduced_precision(options.autocast, window.device, "joint autocast")
    generator = torch.Generator().manual_seed(seed)
    step, loss_sum, loss_count = 0, torch.zeros((), device=window.device), 0
    while step < total:
        order = train[torch.randperm(len(train), generator=generator)]
        loss_sum, loss_count = loss_sum.zero_(), 0
        for batch in order.split(options.batch_size):
            if step == total:
                break
            loss, grads = _loss_and_grads(window, params, batch, bf16)
            for group in optimizer.param_groups:
                group["lr"] = options.lr * group["unit"] * (total - step) / total
            _masked_step(optimizer, params, grads, masks)
            loss_sum += loss
            loss_count += 1
            step += 1
        mean = float(loss_sum) / max(loss_count, 1)
        if not math.isfinite(mean):
            raise NonFiniteJointLossError(
                f"joint reconstruction of the window from block {window.first}: the loss "
                f"became {mean}; nothing of the run was saved. Lower --joint-lr"
            )
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return mean


def _loss_and_grads(
    window: Window, params: list[nn.Parameter], batch: torch.Tensor, bf16: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean squared error of the batch and its gradients (data-parallel: each rank takes its
    share of the batch and the sums are all-reduced)."""
    local = distributed.shard(batch)
    if len(local) == 0:
        grads = [torch.zeros_like(p) for p in params]
        loss = torch.zeros((), device=window.device)
    else:
        x, y = window.batch(local)
        with precision.bf16_autocast(window.device, bf16):
            out = window.forward(x.float())
        count = len(batch) * y[0].numel()
        loss = nn.functional.mse_loss(out.float(), y.float(), reduction="sum") / count
        grads = list(torch.autograd.grad(loss, params))
        loss = loss.detach()
    distributed.all_reduce_sum_([loss, *grads])
    return loss, grads


@torch.no_grad()
def _masked_step(optimizer, params, grads, masks) -> None:
    """One Adam step, after which the pruned entries are set to +0.0 again (Adam is
    elementwise: what it does on them never reaches the kept entries)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
    for weight, kept in masks:
        weight.masked_fill_(~kept, 0.0)


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with one group per tensor whose ``unit`` is the tensor's RMS (the mean RMS for an
    all-zero tensor): the group's learning rate is ``lr * unit``."""
    rms = [float(p.detach().float().square().mean().sqrt()) for p in params]
    nonzero = [r for r in rms if r > 0]
    fill = sum(nonzero) / max(len(nonzero), 1) or 1.0
    for p in params:
        p.requires_grad_(True)
    groups = [
        {"params": [p], "unit": r if r > 0 else fill} for p, r in zip(params, rms, strict=True)
    ]
    return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

"""Memory-lean Adam for sparse recovery: state for the kept entries only.

Recovery freezes every pruned weight at exactly zero, so its gradient and both its Adam moments
carry nothing. :class:`MaskedAdam` takes the same steps as ``torch.optim.Adam`` (no weight
decay, one group per tensor) on a masked gradient, but

* keeps ``exp_avg`` / ``exp_avg_sq`` of a pruned layer's weight as 1-D tensors of its kept
  entries only (half the entries at 50% or 2:4), allocated at the first step;
* takes each gradient as autograd finishes it (``register_post_accumulate_grad_hook``), keeps
  its kept entries (packed, in fp32) and frees the whole ``.grad`` at once, so no whole-model
  gradient is ever held: only the packed one, which the step needs since the global-norm
  clipping and the sum over data-parallel ranks need every gradient before any step;
* holds the masks as bits (1/8 byte per entry), unpacked one tensor at a time.

Pruned entries are never written: they stay exactly (+)0.0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BITS = (1, 2, 4, 8, 16, 32, 64, 128)


class BitMask:
    """A bool tensor stored as bits; :meth:`unpack` gives it back."""

    def __init__(self, mask: torch.Tensor):
        self.shape, self.numel = mask.shape, mask.numel()
        flat = mask.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        weights = torch.tensor(BITS, dtype=torch.uint8, device=mask.device)
        self.bits = (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)

    def unpack(self) -> torch.Tensor:
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        flat = (self.bits.unsqueeze(-1) >> shifts) & 1
        return flat.view(-1)[: self.numel].view(self.shape).bool()

    def count(self) -> int:
        """How many entries are set."""
        return int(self.unpack().sum())


class _Slot:
    """One tensor's state: its pruned mask (None: every entry trains), moments, packed grad."""

    def __init__(self, param: nn.Parameter, pruned: BitMask | None):
        self.param, self.pruned = param, pruned
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.step = 0

    def kept(self) -> torch.Tensor | None:
        return None if self.pruned is None else ~self.pruned.unpack()

    def pack(self, whole: torch.Tensor) -> torch.Tensor:
        """``whole``'s entries where this tensor trains: 1-D (a copy) when it is masked,
        else ``whole`` itself."""
        kept = self.kept()
        return whole.detach() if kept is None else whole.detach().masked_select(kept)


class MaskedAdam:
    """Adam (``betas``, ``eps``, no weight decay) over ``groups`` (``[{"params": [p],
    "scale": s}]``, one tensor each, like :func:`torch.optim.Adam`'s groups; their ``lr`` is
    set before each step), with ``pruned[i]`` the :class:`BitMask` of group ``i``'s frozen
    zeros or None. Gradients are taken by hooks (:meth:`attach`, :meth:`detach`)."""

    def __init__(self, groups: list[dict], pruned: list, lr: float, betas=(0.9, 0.95), eps=1e-8):
        self.param_groups = [{**g, "lr": lr} for g in groups]
        self.betas, self.eps = betas, eps
        self.slots = [_Slot(g["params"][0], m) for g, m in zip(groups, pruned, strict=True)]
        self._by_param = {id(s.param): s for s in self.slots}
        self._handles: list = []
        with torch.no_grad():
            for slot in self.slots:
                if slot.pruned is not None:  # exact +0.0 (a product by 0 may leave -0.0)
                    slot.param.masked_fill_(slot.pruned.unpack(), 0.0)

    def attach(self) -> None:
        """Take each gradient as it is accumulated: pack it, free ``.grad``."""
        self.detach()
        self._handles = [s.param.register_post_accumulate_grad_hook(self._take) for s in self.slots]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _take(self, param: nn.Parameter) -> None:
        slot = self._by_param[id(param)]
        packed = slot.pack(param.grad).float()
        param.grad = None
        slot.grad = packed if slot.grad is None else slot.grad.add_(packed)

    def grads(self) -> list[torch.Tensor]:
        """The packed gradients taken since the last step (created as zeros where none)."""
        for slot in self.slots:
            if slot.grad is None:
                slot.grad = slot.pack(torch.zeros_like(slot.param, dtype=torch.float32))
        return [s.grad for s in self.slots]

    @torch.no_grad()
    def clip_grad_norm_(self, limit: float) -> torch.Tensor:
        """Scale the packed gradients to global 2-norm ``limit`` at most, like
        :func:`torch.nn.utils.clip_grad_norm_`; returns the norm before clipping."""
        grads = self.grads()
        norms = torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads])
        total = torch.linalg.vector_norm(norms, 2.0)
        factor = torch.clamp(limit / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(factor)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every tensor from its packed gradient (then dropped)."""
        for group, slot in zip(self.param_groups, self.slots, strict=True):
            self._step_one(slot, group["lr"])
            slot.grad = None

    def _step_one(self, slot: _Slot, lr: float) -> None:
        """``torch.optim.Adam``'s single-tensor update, on the kept entries."""
        beta1, beta2 = self.betas
        grad = slot.grad
        if slot.exp_avg is None:
            slot.exp_avg, slot.exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
        slot.step += 1
        slot.exp_avg.lerp_(grad, 1 - beta1)
        slot.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**slot.step)
        denom = (slot.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**slot.step)).add_(self.eps)
        kept = slot.kept()
        if kept is None:
            slot.param.addcdiv_(slot.exp_avg.to(slot.param.dtype), denom, value=-step_size)
            return
        values = slot.param.masked_select(kept).float()
        values.addcdiv_(slot.exp_avg, denom, value=-step_size)
        slot.param.masked_scatter_(kept, values.to(slot.param.dtype))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.slots:
            slot.grad = None
            slot.param.grad = None

    def state_dict(self) -> dict:
        """``{"lean": True, "state": {i: {step, exp_avg, exp_avg_sq}}}`` (moments packed)."""
        state = {
            i: {"step": s.step, "exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq}
            for i, s in enumerate(self.slots)
            if s.exp_avg is not None
        }
        return {"lean": True, "state": state}

    def load_state_dict(self, state: dict) -> None:
        for index, values in state["state"].items():
            slot = self.slots[int(index)]
            slot.step = int(values["step"])
            slot.exp_avg, slot.exp_avg_sq = values["exp_avg"], values["exp_avg_sq"]

    def state_bytes(self) -> int:
        """Bytes of the moments and masks held now."""
        total = 0
        for slot in self.slots:
            for t in (slot.exp_avg, slot.exp_avg_sq, slot.pruned and slot.pruned.bits):
                total += 0 if t is None else t.numel() * t.element_size()
        return total

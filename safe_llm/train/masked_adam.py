"""Memory-lean Adam for sparse recovery: state for the kept entries only.

Recovery freezes every pruned weight at exactly zero, so its gradient and both its Adam moments
carry nothing. :class:`MaskedAdam` takes the same steps as ``torch.optim.Adam`` (no weight
decay, one group per tensor) on a masked gradient, but

* keeps ``exp_avg`` / ``exp_avg_sq`` of a pruned layer's weight as 1-D tensors of its kept
  entries only (half the entries at 50% or 2:4), allocated at the first step;
* takes each gradient as autograd finishes it (``register_post_accumulate_grad_hook``), keeps
  its kept entries (packed, in fp32) and frees the whole ``.grad`` at once, so no whole-model
  gradient is ever held. The packed gradient must wait for the step (the global-norm clipping
  and the sum over data-parallel ranks need every gradient before any step); a pruned layer's
  waits in the weight's own pruned entries, exact, where they are at least as many as the
  kept ones (50% and 2:4), so it takes no memory; others (norms, biases) are held;
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
    """One tensor's state: its pruned mask (None: every entry trains), its moments, and its
    gradient since the last step (kept entries only)."""

    def __init__(self, param: nn.Parameter, pruned: BitMask | None):
        self.param, self.pruned = param, pruned
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        self.step = 0
        self._grad: torch.Tensor | None = None
        self.has_grad = False
        self.norm = torch.zeros(())  # the 2-norm of the gradient held
        # the kept entries' gradient fits in the pruned entries of the weight itself (at 50%
        # sparsity and above): it waits there, exact in float32, until the step
        self.zeros = 0 if pruned is None else pruned.count()
        fits = pruned is not None and param.numel() - self.zeros <= self.zeros
        self.stash = fits and param.dtype == torch.float32

    def index(self, pruned: bool = False) -> torch.Tensor:
        """Flat positions of the kept (or the pruned) entries, ascending (transient: the
        compaction costs about as much as a masked_select, the gathers after it far less)."""
        mask = self.pruned.unpack().view(-1)
        return (mask if pruned else ~mask).nonzero().squeeze(1)

    def pack(self, whole: torch.Tensor) -> torch.Tensor:
        """``whole``'s entries where this tensor trains: 1-D (a copy) when it is masked,
        else ``whole`` itself."""
        if self.pruned is None:
            return whole.detach()
        return whole.detach().reshape(-1).index_select(0, self.index())

    def put(self, grad: torch.Tensor) -> None:
        """Hold ``grad`` (packed, float32) until the step; its norm is kept beside it."""
        self.has_grad = True
        self.norm = torch.linalg.vector_norm(grad, 2.0)
        if not self.stash:
            self._grad = grad
            return
        where = self.index(pruned=True)[: grad.numel()]
        self.param.detach().view(-1).index_copy_(0, where, grad)

    def get(self) -> torch.Tensor:
        """The gradient held (packed, float32; zeros when none came)."""
        if not self.has_grad:
            return self.pack(torch.zeros_like(self.param, dtype=torch.float32))
        if not self.stash:
            return self._grad
        where = self.index(pruned=True)[: self.param.numel() - self.zeros]
        return self.param.detach().view(-1).index_select(0, where)

    def clear(self) -> None:
        """Drop the gradient held (a stashed one: the pruned entries are zero again)."""
        if self.stash and self.has_grad:
            self.param.detach().masked_fill_(self.pruned.unpack(), 0.0)
        self._grad, self.has_grad, self.norm = None, False, torch.zeros(())


class MaskedAdam:
    """Adam (``betas``, ``eps``, no weight decay) over ``groups`` (``[{"params": [p],
    "unit": s}]``, one tensor each, like :func:`torch.optim.Adam`'s groups; their ``lr`` is
    set before each step), with ``pruned[i]`` the :class:`BitMask` of group ``i``'s frozen
    zeros or None. Gradients are taken by hooks (:meth:`attach`, :meth:`close`).

    A pruned layer's packed gradient waits for the step in the weight's own pruned entries
    (where they are at least half of it, in float32): no memory at all. Between the backward
    and the step those entries hold it; :meth:`close` (after an error too) zeroes them."""

    def __init__(self, groups: list[dict], pruned: list, lr: float, betas=(0.9, 0.95), eps=1e-8):
        self.param_groups = [{**g, "lr": lr} for g in groups]
        self.betas, self.eps = betas, eps
        self.slots = [_Slot(g["params"][0], m) for g, m in zip(groups, pruned, strict=True)]
        self._by_param = {id(s.param): s for s in self.slots}
        self._handles: list = []
        self._factor: torch.Tensor | None = None
        with torch.no_grad():
            for slot in self.slots:
                if slot.pruned is not None:  # exact +0.0 (a product by 0 may leave -0.0)
                    slot.param.masked_fill_(slot.pruned.unpack(), 0.0)

    def attach(self) -> None:
        """Take each gradient as it is accumulated: pack it, free ``.grad``."""
        self.close()
        self._handles = [s.param.register_post_accumulate_grad_hook(self._take) for s in self.slots]

    def close(self) -> None:
        """Remove the hooks and drop any gradient held."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.zero_grad()

    @torch.no_grad()
    def _take(self, param: nn.Parameter) -> None:
        slot = self._by_param[id(param)]
        packed = slot.pack(param.grad).float()
        param.grad = None
        if slot.has_grad:
            packed = packed.add(slot.get())
        slot.put(packed)

    @torch.no_grad()
    def all_reduce_(self, reduce) -> None:
        """Apply ``reduce`` (a sum over ranks, in place, of a list of tensors) to every
        gradient held, one tensor at a time."""
        for slot in self.slots:
            grad = slot.get().clone()
            reduce([grad])
            slot.put(grad)

    @torch.no_grad()
    def clip_grad_norm_(self, limit: float) -> torch.Tensor:
        """Scale the gradients to global 2-norm ``limit`` at most (at the step), like
        :func:`torch.nn.utils.clip_grad_norm_`; returns the norm before clipping."""
        norms = torch.stack([s.norm.to(self.slots[0].param.device) for s in self.slots])
        total = torch.linalg.vector_norm(norms, 2.0)
        self._factor = torch.clamp(limit / (total + 1e-6), max=1.0)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every tensor from its gradient (then dropped)."""
        for group, slot in zip(self.param_groups, self.slots, strict=True):
            grad = slot.get()
            if self._factor is not None:
                grad.mul_(self._factor)
            slot.clear()
            self._step_one(slot, grad, group["lr"])
        self._factor = None

    def _step_one(self, slot: _Slot, grad: torch.Tensor, lr: float) -> None:
        """``torch.optim.Adam``'s single-tensor update, on the kept entries."""
        beta1, beta2 = self.betas
        if slot.exp_avg is None:
            slot.exp_avg, slot.exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
        slot.step += 1
        slot.exp_avg.lerp_(grad, 1 - beta1)
        slot.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**slot.step)
        denom = (slot.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**slot.step)).add_(self.eps)
        if slot.pruned is None:
            slot.param.addcdiv_(slot.exp_avg.to(slot.param.dtype), denom, value=-step_size)
            return
        kept, flat = slot.index(), slot.param.detach().view(-1)
        values = flat.index_select(0, kept).float()
        values.addcdiv_(slot.exp_avg, denom, value=-step_size)
        flat.index_copy_(0, kept, values.to(slot.param.dtype))

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.slots:
            slot.clear()
            slot.param.grad = None
        self._factor = None

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

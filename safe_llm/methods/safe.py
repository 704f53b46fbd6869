"""SAFE and SAFE+ (Lee et al., ICML 2025): sparse *and* flat block reconstruction.

Per block, with calibration inputs ``X`` and dense targets ``Y`` (both ``[n, seq, d]``)::

    min_W max_{||e|| <= rho} f(W + e) + lam/2 ||W - Z + U||^2,   Z in the sparse set,
    f(W) = mean || block(X; W) - Y ||^2

solved by an augmented-Lagrangian (ADMM) split. One step on a mini-batch:

1. ``g = grad f(W)``; SAM ascent ``e = rho g / ||g||`` (global norm over the block);
2. ``g' = grad f(W + e)`` on the same batch; restore ``W``;
3. ``g' += lam (W - Z + U)`` on the pruned matrices (at the unperturbed ``W``, as the paper);
4. Adam step (betas 0.9/0.95, no weight decay) with linear warm-up then linear decay;
5. every ``interval`` steps: ``Z = Proj(W + U)``, ``U += W - Z``.

At the end ``W = Proj(W)`` gives exact zeros. SAFE projects by ``|W|``; SAFE+ by the
activation-weighted score ``|W_ij| ||X_j||`` (projection in the ``diag(X^T X)`` norm).

Beyond the reference: ``step_scale="relative"`` (default) measures ``lr`` and ``rho`` in units
of each tensor's RMS at the block's start and ``lam`` relative to the block's output power, so
that a function-preserving rescaling of the weights changes nothing (``"absolute"`` is the
paper's); ``holdout`` keeps some calibration windows out of the optimisation and keeps, of the
warm start and each epoch's projection, the one with the lowest error on them (never worse
than the warm start on held-out data); ``init`` starts from a one-shot Wanda or SparseGPT
solution, ``lam_schedule`` lets the penalty grow so the final projection removes little,
``final_epochs`` retrains the kept weights after the projection, ``patience`` stops a block
whose loss has plateaued, and ``grad_accum`` accumulates gradients with each micro-batch's own
targets. The defaults are the SmolLM2 CPU recipes' (SparseGPT start, 2 epochs, the SAM ascent
from the previous step); ``recipes/llama*-safe*-paper.yaml`` hold the paper's settings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from safe_llm.core import precision
from safe_llm.errors import SafeLLMError
from safe_llm.methods import register
from safe_llm.methods.base import BlockContext, PruningMethod
from safe_llm.methods.sparsegpt import sparsegpt_prune
from safe_llm.options import check_fields, option
from safe_llm.train import holdout, relative_adam
from safe_llm.train.data_parallel import mse_loss_and_grads

log = logging.getLogger(__name__)


class NonFiniteLossError(SafeLLMError):
    """The block's loss stayed NaN/Inf after the retries with smaller learning rates."""


@dataclass(frozen=True)
class SAFEOptions:
    lr: float = option(
        2.5e-3,
        "SAFE: Adam learning rate (relative steps: a fraction of each tensor's RMS)",
        at_least=0,
    )
    epochs: float = option(
        2, "SAFE: passes over the calibration windows per block (paper: 30)", at_least=0
    )
    train_batch_size: int = option(8, "SAFE: windows per optimisation step", at_least=1)
    grad_accum: int = option(1, "SAFE: micro-batches accumulated per step", at_least=1)
    lam: float = option(
        2e-6,
        "SAFE: augmented-Lagrangian penalty lambda (start value; paper: 1e-3 absolute)",
        at_least=0,
    )
    lam_schedule: str = option(
        "constant",
        "SAFE: lambda schedule: constant, cosine or linear (both rise from --lam to --lam-max)",
        choices=("constant", "linear", "cosine"),
    )
    lam_max: float = option(1e-1, "SAFE: final lambda of a rising schedule", at_least=0)
    rho: float = option(
        1e-3, "SAFE: SAM perturbation radius (0 = plain ADMM; paper: 2e-4 absolute)", at_least=0
    )
    interval: int = option(
        2, "SAFE: steps between ADMM projection/dual updates (paper: 32)", at_least=1
    )
    warmup_epochs: float = option(
        0, "SAFE: epochs of linear learning-rate warm-up (paper: 2)", at_least=0
    )
    init: str = option(
        "sparsegpt",
        "SAFE: starting weights: dense (paper), wanda or sparsegpt (one-shot solution)",
        choices=("dense", "wanda", "sparsegpt"),
    )
    final_epochs: float = option(
        0,
        "SAFE: epochs of masked reconstruction of the kept weights after the projection",
        at_least=0,
    )
    patience: int = option(
        0,
        "SAFE: stop a block after this many epochs without 0.5%% improvement of the loss "
        "(of the held-out error with --holdout) (0 = off)",
        at_least=0,
    )
    autocast: str = option(
        "auto",
        "SAFE: bf16 autocast with fp32 master weights: auto (where the device computes bf16 "
        "natively: CUDA, CPUs with AVX-512-BF16/AMX), bf16, off",
        choices=("auto", "bf16", "off"),
    )
    sam_ascent: str = option(
        "previous",
        "SAFE: SAM ascent direction: exact (this batch's gradient, two passes a step) or "
        "previous (the last step's gradient, one pass a step; paper: exact)",
        choices=("exact", "previous"),
    )
    nan_retries: int = option(
        2, "SAFE: retries of a block whose loss turns NaN/Inf (lr / 10 each)", at_least=0
    )
    train_others: bool = option(
        True, "SAFE: also train the block's norms and biases (unconstrained)"
    )
    step_scale: str = option(
        "relative",
        "SAFE: relative (lr and rho in units of each tensor's RMS at the block's start, lam "
        "relative to the block's output power: the same steps on any weight scale) or absolute "
        "(the paper's: lr, rho and lam as absolute lengths)",
        choices=("relative", "absolute"),
    )
    holdout: float = option(
        0.125,
        "SAFE: fraction of the calibration windows held out of each block's optimisation; on "
        "them the result is compared with its warm start and with each epoch's projection, "
        "and the best is kept (0 = off)",
        at_least=0,
        below=1,
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class _Split:
    """ADMM state of one pruned parameter, in the parameter's own layout: a linear layer's
    weight (one matrix) or a fused expert parameter (one matrix per expert, each projected on
    its own)."""

    param: torch.nn.Parameter
    names: list[str]  # its matrices: ctx.as_matrix turns the layout into [out, in]
    importance: dict[str, torch.Tensor | None]
    Z: torch.Tensor = None
    U: torch.Tensor = None


class _Schedule(relative_adam.LinearSchedule):
    """The shared learning-rate schedule (:class:`~safe_llm.train.relative_adam.LinearSchedule`,
    ``warmup_epochs`` of warm-up); lambda per ``lam_schedule``."""

    def __init__(self, opts: SAFEOptions, lr: float, total_steps: int, steps_per_epoch: int):
        super().__init__(lr, total_steps, int(round(opts.warmup_epochs * steps_per_epoch)))
        self.opts = opts

    def lam(self, step: int) -> float:
        o, t = self.opts, step / self.total
        if o.lam_schedule == "constant":
            return o.lam
        if o.lam_schedule == "linear":
            return o.lam + (o.lam_max - o.lam) * t
        if o.lam_schedule == "cosine":
            return o.lam_max + (o.lam - o.lam_max) * (1 + math.cos(math.pi * t)) / 2
        raise ValueError(f"unknown lam_schedule {o.lam_schedule!r}: constant, cosine, linear")


class _Steps:
    """The unit ``s`` of each trainable tensor's steps and the proximal weights.

    Adam runs on ``W / s``: it is fed ``s * grad`` and its step is multiplied by ``s``, so
    that ``lr`` is a fraction of ``s`` per step; the SAM radius ``rho`` is a length in the same
    coordinates (adaptive SAM). Relative steps take ``s`` = the tensor's RMS at the block's
    start and weigh the proximal term by ``P / s^2``, ``P`` the mean square of the block's
    targets: a function-preserving rescaling of the weights (or of the block's outputs)
    leaves every step, in these units, unchanged. Absolute steps (the paper's) take ``s = 1``
    and ``P = 1``.
    """

    def __init__(self, units: list[float], pruned: int, power: float):
        self.units, self.power = units, power
        self.pruned_units = units[:pruned]

    @classmethod
    @torch.no_grad()
    def measure(cls, method: SAFE, ctx: BlockContext, splits, train: torch.Tensor) -> _Steps:
        params = method._trainable(ctx, splits)
        relative = method.options.step_scale == "relative"
        units = relative_adam.step_units(params, relative, f"block {ctx.index}")
        if not relative:
            return cls(units, len(splits), 1.0)
        total = count = 0.0
        for part in train.split(ctx.batch_size):
            y = ctx.targets[part].float()
            total, count = total + float(y.square().sum()), count + y.numel()
        return cls(units, len(splits), total / max(count, 1) or 1.0)

    def proximal(self, lam: float) -> list[float]:
        """The proximal weight of each pruned matrix for penalty ``lam``."""
        return [lam * self.power / (s * s) for s in self.pruned_units]


class _Selection:
    """Scores candidate blocks on the held-out windows and keeps the best
    (:class:`~safe_llm.train.holdout.KeepBest`).

    The first candidate is the warm start (the initial weights, projected); the solver then
    offers each epoch's projection and its final result. :meth:`keep_best` loads the winner
    and reports the choice. Inactive (no held-out windows): the solver's result is kept.
    """

    def __init__(self, method: SAFE, ctx: BlockContext, splits, held: torch.Tensor):
        self.method, self.ctx, self.splits, self.held = method, ctx, splits, held
        self.active = len(held) > 0
        names = {id(p): n for n, p in ctx.block.named_parameters()}
        self.keys = {name: names[id(split.param)] for name, split in splits.items()}
        self.best = holdout.KeepBest()
        self.latest = 0
        if self.active:
            self.warm_error = self.offer(0, projected=True)

    def error(self) -> float:
        """The block's relative error ``||block(X) - Y||^2 / ||Y||^2`` on the held-out windows."""
        ctx = self.ctx
        return holdout.relative_error(ctx.forward, ctx.batch, self.held, ctx.batch_size)

    @torch.no_grad()
    def offer(self, epoch: int, projected: bool = False) -> float:
        """Score the block as it is (``projected``: its weights' projection onto the pattern,
        the block itself left unchanged); return the held-out error."""
        if not self.active:
            return float("nan")
        block = self.ctx.block
        current = {k: v.detach().clone() for k, v in block.state_dict().items()}
        candidate = dict(current)
        if projected:
            for name, split in self.splits.items():
                value = self.method._project(self.ctx, split, split.param.detach())
                candidate[self.keys[name]] = value
            block.load_state_dict(candidate)
        error = self.error()
        if projected:
            block.load_state_dict(current)
        self.latest = epoch
        self.best.offer(error, epoch, candidate)
        return error

    def restore_best(self) -> None:
        """Load the best candidate so far into the block."""
        if self.active and self.best.label != self.latest:
            self.ctx.block.load_state_dict(self.best.state)
            self.latest = self.best.label

    def keep_best(self) -> dict[str, float]:
        """Load the best candidate; log and return the choice for the block's report."""
        if not self.active:
            return {}
        self.restore_best()
        error, epoch = self.best.error, self.best.label
        warm = epoch == 0
        log.info(
            "%s block %d: held-out error %.4g (warm start %.4g): keeping %s",
            self.method.name,
            self.ctx.index,
            error,
            self.warm_error,
            f"the warm start ({self.method.options.init})" if warm else f"epoch {epoch}",
        )
        return {
            "holdout_error": error,
            "holdout_error_warm_start": self.warm_error,
            "holdout_best_epoch": float(epoch),
            "kept_warm_start": float(warm),
        }


class SAFE(PruningMethod):
    """Sharpness-aware ADMM block solver; projection by ``|W|``."""

    name = "safe"
    Options = SAFEOptions
    weighted_projection = False

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.options.init == "sparsegpt"

    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        """Solve the block; on a non-finite loss retry from the dense block with a tenth of
        the learning rate (``nan_retries`` times), then stop with the block named."""
        snapshot = {k: v.detach().clone() for k, v in ctx.block.state_dict().items()}
        lr = self.options.lr
        for attempt in range(self.options.nan_retries + 1):
            try:
                return self._solve(ctx, lr)
            except FloatingPointError as exc:
                ctx.block.load_state_dict(snapshot)
                if attempt == self.options.nan_retries:
                    raise NonFiniteLossError(
                        f"{self.name}: the loss of block {ctx.index} stayed non-finite after "
                        f"{attempt} retries (last lr {lr:g}); lower --lr or --rho"
                    ) from exc
                log.warning("%s; retrying block %d with lr %g", exc, ctx.index, lr / 10)
                lr /= 10
        raise AssertionError("unreachable")

    def _solve(self, ctx: BlockContext, lr: float) -> dict[str, float]:
        opts = self.options
        home_dtype = next(ctx.block.parameters()).dtype
        ctx.block.float()  # fp32 master weights
        try:
            splits = self._splits(ctx)
            train, held = holdout.split_windows(ctx.inputs.shape[0], opts.holdout)
            steps = _Steps.measure(self, ctx, splits, train)
            self._initialise(ctx, splits)
            selection = _Selection(self, ctx, splits, held)
            main = self._optimise(ctx, splits, steps, train, opts.epochs, lr, True, selection)
            residuals = main["residuals"] or [self._residual(splits)]
            self._project_final(ctx, splits)
            selection.offer(main["epochs"])
            selection.restore_best()
            final = self._optimise(ctx, splits, steps, train, opts.final_epochs, lr, False)
            if final["steps"]:
                selection.offer(main["epochs"] + final["epochs"])
            kept = selection.keep_best()
        finally:
            ctx.block.to(home_dtype)
        return {
            "steps": main["steps"] + final["steps"],
            "loss": final["loss"] if final["steps"] else main["loss"],
            "primal_residual_first": residuals[0],
            "primal_residual": residuals[-1],
            **kept,
        }

    # -- set-up -----------------------------------------------------------------------------

    def _splits(self, ctx: BlockContext) -> dict[str, _Split]:
        """One split per pruned parameter (keyed by its name in the block), in the order of
        ``ctx.layers``."""
        splits: dict[str, _Split] = {}
        for name, layer in ctx.layers.items():
            importance = ctx.stats[name].norms if self.weighted_projection else None
            split = splits.setdefault(layer.param_name, _Split(layer.param, [], {}))
            split.names.append(name)
            split.importance[name] = importance
        return splits

    def _project(self, ctx: BlockContext, split: _Split, value: torch.Tensor) -> torch.Tensor:
        """``Proj(value)`` onto the pattern, matrix by matrix, ``value`` in the parameter's
        layout."""
        out = value.clone()
        for name in split.names:
            matrix = ctx.as_matrix(name, value)
            ctx.as_matrix(name, out).copy_(ctx.pattern.project(matrix, split.importance[name]))
        return out

    @torch.no_grad()
    def _initialise(self, ctx: BlockContext, splits: dict[str, _Split]) -> None:
        init = self.options.init
        for name in ctx.layers:
            if init == "sparsegpt":
                solved = sparsegpt_prune(ctx.matrix(name), ctx.stats[name].hessian, ctx.pattern)
                ctx.matrix(name).copy_(solved)
            elif init == "wanda":
                ctx.matrix(name).copy_(
                    ctx.pattern.project(ctx.matrix(name), ctx.stats[name].norms, per_row=True)
                )
        for split in splits.values():
            split.Z = self._project(ctx, split, split.param.detach())
            split.U = torch.zeros_like(split.Z)

    # -- optimisation -----------------------------------------------------------------------

    def _loss_and_grads(self, ctx, params, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean squared error summed over micro-batches, with each micro-batch's targets
        (data-parallel: :func:`~safe_llm.train.data_parallel.mse_loss_and_grads`)."""
        bf16 = precision.reduced_precision(self.options.autocast, ctx.device, "SAFE autocast")
        return mse_loss_and_grads(
            ctx.forward, ctx.batch, params, batch, bf16, ctx.device, self.options.grad_accum
        )

    def _sam_grads(
        self, ctx, params, steps: _Steps, batch, previous
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss and gradient at the SAM-perturbed weights ``W + rho s^2 g / ||s g||``.

        ``s`` is each tensor's step unit (:class:`_Steps`; 1 with absolute steps, which gives
        the paper's ``rho g / ||g||``; its RMS with relative steps, adaptive SAM). ``g`` is this
        batch's gradient (two passes), or with ``sam_ascent="previous"`` the previous step's
        gradient ``previous`` (one pass: the ascent reuses the last step's work).
        """
        rho = self.options.rho
        if rho == 0:
            return self._loss_and_grads(ctx, params, batch)
        if previous is None:
            loss, previous = self._loss_and_grads(ctx, params, batch)
        scaled = torch._foreach_mul(previous, steps.units)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        eps = torch._foreach_mul(torch._foreach_mul(scaled, steps.units), rho / (norm + 1e-12))
        with torch.no_grad():
            torch._foreach_add_(params, eps)
        sharp_loss, sharp_grads = self._loss_and_grads(ctx, params, batch)
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        return (sharp_loss if self.options.sam_ascent == "previous" else loss), sharp_grads

    def _trainable(self, ctx: BlockContext, splits: dict[str, _Split]) -> list[torch.nn.Parameter]:
        pruned = [s.param for s in splits.values()]
        if not self.options.train_others:
            return pruned
        ids = {id(p) for p in pruned}
        return pruned + [p for p in ctx.block.parameters() if id(p) not in ids]

    def _optimise(
        self,
        ctx: BlockContext,
        splits: dict[str, _Split],
        steps: _Steps,
        train: torch.Tensor,
        epochs: float,
        lr: float,
        admm: bool,
        selection: _Selection | None = None,
    ) -> dict:
        """Adam on the windows ``train``: ADMM (``admm``) or masked reconstruction of the kept
        weights. With a ``selection`` every epoch's projection is scored on the held-out
        windows; ``patience`` then counts epochs without improvement there."""
        opts = self.options
        n = len(train)
        steps_per_epoch = math.ceil(n / opts.train_batch_size)
        total = int(round(epochs * steps_per_epoch))
        if total == 0:
            return {"steps": 0, "epochs": 0, "loss": float("nan"), "residuals": []}
        params = self._trainable(ctx, splits)
        weights = [] if admm else [s.param for s in splits.values()]
        masked = [(w, relative_adam.pruned_mask(w)) for w in weights] or None
        optimizer = relative_adam.adam(relative_adam.trainable_groups(params, steps.units), opts.lr)
        schedule = _Schedule(opts, lr, total, steps_per_epoch)
        residuals = []
        generator = torch.Generator().manual_seed(ctx.seed)
        zero = torch.zeros((), device=ctx.device)
        reuse = opts.sam_ascent == "previous"
        epoch_loss, best, stale, step, epoch, previous = zero, float("inf"), 0, 0, 0, None
        while step < total:
            order = train[torch.randperm(n, generator=generator)]
            epoch_start = step
            for batch in order.split(opts.train_batch_size):
                if step == total:
                    break
                loss, grads = self._sam_grads(ctx, params, steps, batch, previous)
                if reuse:
                    previous = [g.clone() for g in grads]
                self._adam_step(splits, steps, optimizer, grads, schedule, step, masked)
                step += 1
                if admm and step % opts.interval == 0:
                    self._dual_update(ctx, splits)
                    residuals.append(self._residual(splits))
                epoch_loss = epoch_loss + loss
            epoch += 1
            mean_loss = float(epoch_loss) / (step - epoch_start)  # one host sync per epoch
            epoch_loss = zero
            self._check_loss(mean_loss, ctx)
            watched = mean_loss
            if selection is not None and selection.active and step < total:
                watched = selection.offer(epoch, projected=True)
            if opts.patience:
                stale = 0 if watched < best * (1 - 5e-3) else stale + 1
                best = min(best, watched)
                if stale >= opts.patience:
                    break
        relative_adam.release(params)
        return {"steps": step, "epochs": epoch, "loss": mean_loss, "residuals": residuals}

    @torch.no_grad()
    def _adam_step(self, splits, steps, optimizer, grads, schedule, step, masked) -> None:
        """One Adam step with the gradients ``grads`` of the trainable tensors: plus the
        proximal term (ADMM, ``masked`` None), or masked to the kept weights (``masked``:
        ``(weight, pruned mask)`` pairs, :func:`~safe_llm.train.relative_adam.masked_step`)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if masked is None:
            self._add_proximal(splits, grads, steps.proximal(schedule.lam(step)))
        torch._foreach_mul_(grads, steps.units)  # Adam sees d f / d (W / s)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        schedule.apply(optimizer, step)
        relative_adam.masked_step(optimizer, masked or [])

    def _check_loss(self, mean_loss: float, ctx: BlockContext) -> None:
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"{self.name}: loss became {mean_loss} in block {ctx.index}; lower --lr or --rho"
            )

    @torch.no_grad()
    def _add_proximal(self, splits: dict[str, _Split], grads: list, lam: list[float]) -> None:
        """``grad += lam_i (W - Z + U)``, ``lam_i`` per pruned matrix (:class:`_Steps`)."""
        for split, grad, weight in zip(splits.values(), grads, lam, strict=False):
            grad.add_(split.param - split.Z + split.U, alpha=weight)

    @torch.no_grad()
    def _dual_update(self, ctx: BlockContext, splits: dict[str, _Split]) -> None:
        for split in splits.values():
            split.Z = self._project(ctx, split, split.param + split.U)
            split.U.add_(split.param - split.Z)

    @staticmethod
    @torch.no_grad()
    def _residual(splits: dict[str, _Split]) -> float:
        """Relative primal residual ``||W - Z|| / ||W||`` over all pruned matrices."""
        num = sum(float((s.param - s.Z).square().sum()) for s in splits.values())
        den = sum(float(s.param.square().sum()) for s in splits.values())
        return math.sqrt(num / max(den, 1e-30))

    @torch.no_grad()
    def _project_final(self, ctx: BlockContext, splits: dict[str, _Split]) -> None:
        for split in splits.values():
            split.param.copy_(self._project(ctx, split, split.param))


@register
class SAFEPlus(SAFE):
    """SAFE with the activation-weighted projection ``|W_ij| ||X_j||``."""

    name = "safe+"
    weighted_projection = True


register(SAFE)

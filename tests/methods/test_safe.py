"""SAFE / SAFE+ block solver on small blocks: ADMM behaviour, exact patterns, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from safe_llm.config import make_method
from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.core.capture import BlockCall
from safe_llm.core.layer_stats import InputStats
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.methods.base import BlockContext
from safe_llm.methods.safe import NonFiniteLossError
from safe_llm.stages.prune.engine import EngineOptions, prune_model

CPU = torch.device("cpu")
HALF = SparsityPattern.parse("unstructured", 0.5)
TWO_FOUR = SparsityPattern.parse("2:4")


def _least_squares_context(
    seed: int = 0,
    n: int = 1,
    seq: int = 64,
    d_in: int = 16,
    d_out: int = 8,
    norms=None,
    noise: float = 0.5,
) -> BlockContext:
    """A one-linear "block" whose reconstruction is least squares: ``Y = X W*^T`` with a 50%
    sparse ``W*``; the block starts at ``W*`` plus ``noise`` times Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, d_in, generator=gen) * torch.linspace(0.2, 2.0, d_in)
    target_weight = HALF.project(torch.randn(d_out, d_in, generator=gen))  # a sparse truth
    block = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    with torch.no_grad():
        block[0].weight.copy_(target_weight + noise * torch.randn(d_out, d_in, generator=gen))
    stats = InputStats(d_in, CPU, hessian=True)
    stats.add(x)
    if norms is not None:
        stats.sq_sum = norms.square()
    return BlockContext(
        index=0,
        block=block,
        layers={"0": block[0]},
        pattern=HALF,
        inputs=x,
        targets=x @ target_weight.T,
        call=BlockCall(),
        stats={"0": stats},
        device=CPU,
        batch_size=n,
        seed=0,
    )


def _admm_options(**overrides) -> dict:
    options = dict(
        lr=3e-2,
        epochs=40,
        train_batch_size=1,
        lam=0.5,
        rho=0.0,
        interval=4,
        warmup_epochs=0,
        autocast="off",
        train_others=False,
        init="dense",
        sam_ascent="exact",
        step_scale="absolute",  # the steps of the hand-written ADMM below
        holdout=0.0,
    )
    options.update(overrides)
    return options


def _direct_admm(ctx: BlockContext, opts: dict) -> torch.Tensor:
    """ADMM written out by hand: Adam on f + lam/2 ||W - Z + U||^2, linear lr decay,
    ``Z = Proj(W + U); U += W - Z`` every ``interval`` steps, hard projection at the end."""
    x, y = ctx.inputs, ctx.targets
    weight = ctx.block[0].weight.detach().clone().requires_grad_(True)
    z = HALF.project(weight.detach())
    u = torch.zeros_like(z)
    optimizer = torch.optim.Adam([weight], lr=opts["lr"], betas=(0.9, 0.95))
    total = opts["epochs"]
    for step in range(total):
        optimizer.param_groups[0]["lr"] = opts["lr"] * (total - step) / total
        loss = nn.functional.mse_loss(x @ weight.T, y)
        (grad,) = torch.autograd.grad(loss, [weight])
        grad.add_(weight.detach() - z + u, alpha=opts["lam"])
        weight.grad = grad
        optimizer.step()
        if (step + 1) % opts["interval"] == 0:
            with torch.no_grad():
                z = HALF.project(weight + u)
                u += weight - z
    return HALF.project(weight.detach())


def test_with_rho_zero_safe_is_the_admm_written_out_by_hand():
    opts = _admm_options()
    ctx = _least_squares_context()
    expected = _direct_admm(copy.deepcopy(ctx), opts)
    make_method("safe", opts).prune_block(ctx)
    torch.testing.assert_close(ctx.block[0].weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert HALF.satisfied_by(expected)


def test_admm_primal_residual_falls_over_the_run():
    ctx = _least_squares_context(seed=1)
    extra = make_method("safe", _admm_options(lam=1.0, epochs=80)).prune_block(ctx)
    assert extra["primal_residual"] < 0.6 * extra["primal_residual_first"]


def test_safe_beats_one_shot_magnitude_on_least_squares():
    ctx = _least_squares_context(seed=2)
    x, y = ctx.inputs, ctx.targets
    magnitude = HALF.project(ctx.block[0].weight.detach())
    make_method("safe", _admm_options(rho=1e-3, epochs=120)).prune_block(ctx)
    solved = ctx.block[0].weight.detach()
    assert (x @ solved.T - y).square().mean() < (x @ magnitude.T - y).square().mean()


def test_safe_plus_with_equal_activation_norms_equals_safe():
    opts = _admm_options(rho=1e-3)
    plain = _least_squares_context(seed=3, norms=torch.full((16,), 3.0))
    weighted = copy.deepcopy(plain)
    make_method("safe", opts).prune_block(plain)
    make_method("safe+", opts).prune_block(weighted)
    assert torch.equal(plain.block[0].weight, weighted.block[0].weight)


def test_safe_plus_projection_follows_activation_norms():
    """With one input feature silent, SAFE+ prunes its column first; SAFE does not know."""
    norms = torch.ones(16)
    norms[0] = 1e-6
    ctx = _least_squares_context(seed=4, norms=norms)
    with torch.no_grad():
        ctx.block[0].weight[:, 0] = 10.0  # the largest weights, on a silent input
    make_method("safe+", _admm_options(epochs=8)).prune_block(ctx)
    assert (ctx.block[0].weight[:, 0] == 0).all()


def _prune_tiny(make_tiny_llama, method: str, pattern: SparsityPattern, **options):
    model = make_tiny_llama(seed=5)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(6))
    opts = dict(epochs=2, interval=2, train_batch_size=2, lr=1e-3, **options)
    report = prune_model(
        model,
        windows,
        make_method(method, opts),
        pattern,
        EngineOptions(device=CPU, progress=False),
    )
    return model, report


@pytest.mark.parametrize(
    ("method", "pattern", "init"),
    [
        ("safe", HALF, "dense"),
        ("safe+", HALF, "sparsegpt"),
        ("safe", TWO_FOUR, "wanda"),
        ("safe+", TWO_FOUR, "dense"),
        ("safe+", TWO_FOUR, "sparsegpt"),
    ],
    ids=[
        "safe-50-dense",
        "safe+-50-sparsegpt",
        "safe-2:4-wanda",
        "safe+-2:4-dense",
        "safe+-2:4-sparsegpt",
    ],
)
def test_final_weights_meet_the_pattern_exactly(make_tiny_llama, method, pattern, init):
    model, report = _prune_tiny(make_tiny_llama, method, pattern, init=init, final_epochs=1)
    for block in find_blocks(model)[1]:
        for name, layer in prunable_layers(block).items():
            weight = weight_matrix(layer).detach()
            assert torch.isfinite(weight).all()
            if pattern.is_nm:
                groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
                assert (groups == 2).all(), name
            else:
                assert int((weight == 0).sum()) * 2 == weight.numel(), name
    assert all(b.extra["steps"] == 6 for b in report.blocks)  # 2 ADMM epochs + 1 masked


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_fixed_seed_gives_bitwise_identical_results_on_cpu(make_tiny_llama, autocast):
    first, _ = _prune_tiny(make_tiny_llama, "safe+", HALF, rho=1e-2, autocast=autocast)
    second, _ = _prune_tiny(make_tiny_llama, "safe+", HALF, rho=1e-2, autocast=autocast)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_masked_final_phase_keeps_the_support_and_lowers_the_loss():
    ctx = _least_squares_context(seed=7)
    opts = _admm_options(epochs=8)
    without = copy.deepcopy(ctx)
    make_method("safe", opts).prune_block(without)
    extra = make_method("safe", {**opts, "final_epochs": 40}).prune_block(ctx)
    kept = without.block[0].weight != 0
    assert torch.equal(ctx.block[0].weight != 0, kept)
    x, y = ctx.inputs, ctx.targets

    def loss(w):
        return float((x @ w.detach().T - y).square().mean())

    assert loss(ctx.block[0].weight) < loss(without.block[0].weight)
    assert extra["steps"] == 48


def test_gradient_accumulation_uses_each_micro_batch_with_its_own_targets():
    """Accumulating two micro-batches of one window equals one batch of two windows."""
    ctx = _least_squares_context(seed=8, n=2)
    opts = _admm_options(train_batch_size=2, epochs=6)
    accumulated = copy.deepcopy(ctx)
    make_method("safe", opts).prune_block(ctx)
    make_method("safe", {**opts, "grad_accum": 2}).prune_block(accumulated)
    torch.testing.assert_close(
        accumulated.block[0].weight, ctx.block[0].weight, rtol=1e-4, atol=1e-5
    )


def test_a_loss_that_turns_nan_is_retried_with_a_smaller_lr_then_stops_with_the_block_named(
    caplog,
):
    ctx = _least_squares_context(seed=9)
    dense = ctx.block[0].weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="block 0"):
        make_method("safe", _admm_options(lr=1e30, nan_retries=2)).prune_block(ctx)
    assert caplog.text.count("retrying block 0") == 2
    assert torch.equal(ctx.block[0].weight, dense)  # the block is left as it came


def test_a_block_that_recovers_with_a_smaller_lr_is_finished(monkeypatch, caplog):
    from safe_llm.methods import safe

    ctx = _least_squares_context(seed=10)
    method = make_method("safe", _admm_options(epochs=4))
    real = safe.SAFE._solve
    lrs = []

    def solve(self, ctx, lr):
        lrs.append(lr)
        if len(lrs) == 1:
            raise FloatingPointError("safe: loss became nan in block 0")
        return real(self, ctx, lr)

    monkeypatch.setattr(safe.SAFE, "_solve", solve)
    method.prune_block(ctx)
    assert lrs == [3e-2, pytest.approx(3e-3)]
    assert HALF.satisfied_by(ctx.block[0].weight)


def _forward_count(ctx: BlockContext) -> list[int]:
    calls = [0]
    ctx.block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(("ascent", "passes"), [("exact", 16), ("previous", 9)])
def test_sam_ascent_from_the_previous_step_costs_one_pass_a_step(ascent, passes):
    ctx = _least_squares_context(seed=11)
    calls = _forward_count(ctx)
    make_method("safe", _admm_options(epochs=8, rho=1e-2, sam_ascent=ascent)).prune_block(ctx)
    assert calls[0] == passes


def test_previous_step_ascent_still_beats_one_shot_magnitude():
    ctx = _least_squares_context(seed=2)
    x, y = ctx.inputs, ctx.targets
    magnitude = HALF.project(ctx.block[0].weight.detach())
    options = _admm_options(rho=1e-2, epochs=120, sam_ascent="previous")
    make_method("safe", options).prune_block(ctx)
    solved = ctx.block[0].weight.detach()
    assert (x @ solved.T - y).square().mean() < (x @ magnitude.T - y).square().mean()


def test_a_block_worse_than_its_warm_start_on_held_out_windows_returns_the_warm_start(caplog):
    """Steps of the weights' own size wreck the block: the SparseGPT start is kept, logged
    and reported."""
    from safe_llm.methods.sparsegpt import sparsegpt_prune

    ctx = _least_squares_context(seed=12, n=8, noise=0.2)
    warm = sparsegpt_prune(ctx.block[0].weight.detach(), ctx.stats["0"].hessian, HALF)
    options = _admm_options(init="sparsegpt", lr=1.0, epochs=4, step_scale="relative")
    with caplog.at_level("INFO", logger="safe_llm.methods.safe"):
        extra = make_method("safe", {**options, "holdout": 0.25}).prune_block(ctx)
    assert extra["kept_warm_start"] == 1.0
    assert extra["holdout_error"] == extra["holdout_error_warm_start"]
    assert torch.equal(ctx.block[0].weight, warm)
    assert "keeping the warm start (sparsegpt)" in caplog.text


def test_a_block_better_than_its_warm_start_keeps_the_solver_result():
    ctx = _least_squares_context(seed=13, n=8, noise=0.2)
    options = _admm_options(init="wanda", epochs=20, step_scale="relative", lr=1e-2)
    extra = make_method("safe", {**options, "holdout": 0.25}).prune_block(ctx)
    assert extra["kept_warm_start"] == 0.0
    assert extra["holdout_error"] < extra["holdout_error_warm_start"]
    assert extra["holdout_best_epoch"] >= 1


def test_held_out_windows_are_not_trained_on(monkeypatch):
    from safe_llm.methods import safe

    trained = set()
    real = safe.SAFE._loss_and_grads

    def record(self, ctx, params, batch):
        trained.update(int(i) for i in batch)
        return real(self, ctx, params, batch)

    monkeypatch.setattr(safe.SAFE, "_loss_and_grads", record)
    ctx = _least_squares_context(seed=14, n=8)
    options = {**_admm_options(epochs=4, train_batch_size=2, rho=1e-2), "holdout": 0.25}
    make_method("safe", options).prune_block(ctx)
    assert trained == set(range(6))  # the last 2 of 8 windows are held out

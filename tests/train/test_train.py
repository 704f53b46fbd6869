"""The training primitives SAFE, joint windows and recovery share (``safe_llm.train``)."""

from __future__ import annotations

import pytest
import torch

from safe_llm.train import holdout, relative_adam
from safe_llm.train.data_parallel import mse_loss_and_grads
from safe_llm.train.masked_adam import BitMask


def test_a_tensors_step_unit_is_its_rms():
    t = torch.tensor([3.0, -4.0])
    assert relative_adam.step_units([t]) == [pytest.approx((12.5) ** 0.5)]


def test_an_all_zero_tensor_steps_in_the_mean_rms_of_the_others(caplog):
    a, b, zero = torch.full((4,), 2.0), torch.full((3,), 4.0), torch.zeros(5)
    with caplog.at_level("WARNING"):
        units = relative_adam.step_units([a, zero, b], where="block 7")
    assert units == [2.0, 3.0, 4.0]
    assert "block 7: 1 tensor(s) are all zeros" in caplog.text


def test_all_zero_tensors_alone_step_in_unit_one_and_absolute_steps_always():
    assert relative_adam.step_units([torch.zeros(3), torch.zeros(2)]) == [1.0, 1.0]
    assert relative_adam.step_units([torch.full((2,), 5.0)], relative=False) == [1.0]


def test_the_schedule_ramps_over_the_warm_up_then_decays_linearly():
    schedule = relative_adam.LinearSchedule(1.0, total=10, warmup=4)
    rates = [schedule.rate(s) for s in range(10)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]  # (step + 1) / warmup: the peak at warmup - 1
    assert rates[4:] == [6 / 6, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # (total - step) / (total - w)


def test_without_warm_up_the_first_step_is_the_peak_and_the_last_a_fraction_of_it():
    schedule = relative_adam.LinearSchedule(2.0, total=8)
    assert schedule.rate(0) == 2.0
    assert schedule.rate(7) == 2.0 / 8


def test_a_warm_up_as_long_as_the_run_is_capped_so_the_run_reaches_the_peak():
    schedule = relative_adam.LinearSchedule(1.0, total=3, warmup=10)
    assert schedule.warmup == 2
    assert [schedule.rate(s) for s in range(3)] == [0.5, 1.0, 1.0]


def test_each_group_steps_at_the_schedules_rate_times_its_unit():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    optimizer = relative_adam.adam(relative_adam.trainable_groups(params, [0.5, 2.0]), lr=1.0)
    relative_adam.LinearSchedule(0.1, total=4).apply(optimizer, 1)
    assert [g["lr"] for g in optimizer.param_groups] == [
        pytest.approx(0.075 * 0.5),
        pytest.approx(0.075 * 2.0),
    ]
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "bitmask"])
def test_masked_steps_leave_pruned_entries_at_plus_zero_and_kept_ones_as_plain_adam(packed):
    torch.manual_seed(0)
    start = torch.randn(6, 8)
    start[start.abs() < 0.6] = 0.0
    masked_weight, plain_weight = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start)
    pruned = relative_adam.pruned_mask(masked_weight)
    masked = [(masked_weight, BitMask(pruned) if packed else pruned)]
    optimizers = [
        relative_adam.adam(relative_adam.trainable_groups([w], [1.0]), lr=0.1)
        for w in (masked_weight, plain_weight)
    ]
    for _ in range(3):
        grad = torch.randn(6, 8)
        masked_weight.grad, plain_weight.grad = -grad.abs(), -grad.abs()  # pushes zeros to > 0
        relative_adam.masked_step(optimizers[0], masked)
        optimizers[1].step()
    assert torch.equal(masked_weight[pruned], torch.zeros(int(pruned.sum())))
    assert not torch.signbit(masked_weight[pruned]).any()
    assert torch.equal(masked_weight[~pruned], plain_weight[~pruned])  # Adam is elementwise


def test_released_tensors_need_no_gradient_and_hold_none():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    relative_adam.release([p])
    assert not p.requires_grad and p.grad is None


@pytest.mark.parametrize(
    ("n", "fraction", "held"),
    [(16, 0.125, [14, 15]), (8, 0.01, [7]), (2, 0.9, [1]), (8, 0.0, [])],
)
def test_the_held_out_windows_are_the_last_ones_at_least_one_never_all(n, fraction, held):
    train, out = holdout.split_windows(n, fraction)
    assert out.tolist() == held
    assert sorted(train.tolist() + out.tolist()) == list(range(n))  # disjoint, complete
    assert set(train.tolist()).isdisjoint(out.tolist())
    assert torch.equal(holdout.split_windows(n, fraction)[1], out)  # the same every time


def test_the_relative_error_is_the_squared_error_over_the_targets_power():
    x = torch.randn(5, 3, 4)
    y = 2 * x + 0.1 * torch.randn(5, 3, 4)
    index = torch.tensor([0, 2, 4])
    error = holdout.relative_error(lambda h: 2 * h, lambda i: (x[i], y[i]), index, batch_size=2)
    expected = (2 * x[index] - y[index]).square().sum() / y[index].square().sum()
    assert error == pytest.approx(float(expected), rel=1e-6)


def test_keep_best_keeps_the_lowest_error_and_the_earlier_of_a_tie():
    best = holdout.KeepBest()
    assert best.offer(0.5, "warm start", "w")  # the first is the best so far
    assert not best.offer(0.7, 1)
    assert best.offer(0.3, 2, "e2")
    assert not best.offer(0.3, 3, "e3")
    assert (best.error, best.label, best.state) == (0.3, 2, "e2")


def test_the_micro_batched_loss_is_the_mean_squared_error_of_the_whole_batch():
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    forward = lambda h: h @ weight  # noqa: E731
    index = torch.arange(8)
    loss, grads = mse_loss_and_grads(
        forward, lambda i: (x[i], y[i]), [weight], index, False, torch.device("cpu"), 4
    )
    whole = torch.nn.functional.mse_loss(x @ weight, y)
    (expected,) = torch.autograd.grad(whole, [weight])
    assert float(loss) == pytest.approx(float(whole.detach()), rel=1e-6)
    assert torch.allclose(grads[0], expected, rtol=1e-5, atol=1e-7)

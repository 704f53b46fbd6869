"""Sparsity patterns: exact counts, N:M groups, importance weighting and input validation."""

from __future__ import annotations

import pytest
import torch

from safe_llm.core.sparsity import PatternError, SparsityPattern, achieved_sparsity


def _scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("shape", [(8, 16), (7, 9), (5, 5), (1, 3), (13, 1)])
def test_unstructured_keeps_exact_count_of_whole_matrix(shape, sparsity):
    pattern = SparsityPattern.parse("unstructured", sparsity)
    scores = _scores(*shape)
    keep = pattern.keep_mask(scores)
    numel = scores.numel()
    assert int(keep.sum()) == round((1 - sparsity) * numel)
    if keep.any() and (~keep).any():  # and it is the largest scores that survive
        assert scores[keep].min() >= scores[~keep].max()


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
@pytest.mark.parametrize("shape", [(6, 16), (5, 9), (3, 7), (4, 1)])
def test_unstructured_per_row_keeps_exact_count_in_every_row(shape, sparsity):
    pattern = SparsityPattern.parse("unstructured", sparsity)
    scores = _scores(*shape, seed=3)
    keep = pattern.keep_mask(scores, per_row=True)
    want = round((1 - sparsity) * shape[1])
    assert keep.sum(dim=1).tolist() == [want] * shape[0]
    for row in range(shape[0]):
        kept, dropped = scores[row][keep[row]], scores[row][~keep[row]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("shape", [(4, 8), (3, 5), (7, 11)])
def test_all_equal_scores_still_give_exact_counts(shape, per_row):
    """Ties must not make a threshold keep everything or nothing."""
    pattern = SparsityPattern.parse("unstructured", 0.5)
    scores = torch.ones(shape)
    keep = pattern.keep_mask(scores, per_row=per_row)
    if per_row:
        assert keep.sum(dim=1).tolist() == [round(0.5 * shape[1])] * shape[0]
    else:
        assert int(keep.sum()) == round(0.5 * scores.numel())


def test_heavily_tied_scores_keep_exact_count_and_respect_order():
    pattern = SparsityPattern.parse("unstructured", 0.5)
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0, 2.0]])
    keep = pattern.keep_mask(scores)
    assert int(keep.sum()) == 6
    assert keep[0, 0] and keep[1, 5]
    assert not keep[1, 3] and not keep[1, 4]


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.95, 0.999])
def test_unstructured_selection_keeps_the_same_entries_as_a_full_topk(sparsity):
    pattern = SparsityPattern.parse("unstructured", sparsity)
    scores = _scores(64, 96, seed=7).abs()
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[scores.flatten().topk(pattern.kept_count(scores.numel())).indices] = True
    assert torch.equal(pattern.keep_mask(scores), expected.reshape(scores.shape))


@pytest.mark.parametrize("k", [1, 5, 48, 95])
@pytest.mark.parametrize("tied", [False, True])
def test_both_threshold_selections_give_the_same_value(k, tied):
    from safe_llm.core.sparsity import _kth_largest

    flat = _scores(8, 12, seed=k).abs().flatten()
    if tied:
        flat = (flat * 4).round()  # many equal values
    expected = flat.sort(descending=True).values[k - 1]
    assert _kth_largest(flat, k, by_topk=True) == expected
    assert _kth_largest(flat, k, by_topk=False) == expected


def test_scores_tied_at_the_threshold_are_kept_first_by_position():
    pattern = SparsityPattern.parse("unstructured", 0.5)
    scores = torch.tensor([[0.0, 2.0, 1.0, 1.0], [1.0, 1.0, 5.0, 0.0]])  # keep 4: 5, 2, 1, 1
    keep = pattern.keep_mask(scores)
    assert keep.tolist() == [[False, True, True, True], [False, False, True, False]]


@pytest.mark.parametrize("structure", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("shape", [(3, 16), (5, 8), (1, 24)])
def test_n_m_keeps_exactly_n_of_every_m_consecutive_inputs(structure, shape):
    pattern = SparsityPattern.parse(structure)
    n, m = pattern.n, pattern.m
    scores = _scores(*shape, seed=7)
    for per_row in (False, True):
        keep = pattern.keep_mask(scores, per_row=per_row)
        groups = keep.reshape(shape[0], shape[1] // m, m)
        assert (groups.sum(dim=2) == n).all()
        grouped_scores = scores.reshape(shape[0], shape[1] // m, m)
        kept_min = torch.where(groups, grouped_scores, torch.inf).amin(dim=2)
        dropped_max = torch.where(~groups, grouped_scores, -torch.inf).amax(dim=2)
        assert (kept_min >= dropped_max).all()


def test_two_four_keeps_exactly_two_of_every_four_inputs_with_ties():
    pattern = SparsityPattern.parse("2:4")
    keep = pattern.keep_mask(torch.zeros(3, 12))
    assert (keep.reshape(3, 3, 4).sum(dim=2) == 2).all()


@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
def test_project_zeroes_exactly_the_dropped_entries(structure):
    pattern = SparsityPattern.parse(structure, 0.5 if structure == "unstructured" else None)
    weight = _scores(6, 16, seed=11)
    projected = pattern.project(weight)
    keep = pattern.keep_mask(weight.abs())
    assert torch.equal(projected, weight * keep)
    assert pattern.satisfied_by(projected)
    assert achieved_sparsity(projected) == pytest.approx(1 - int(keep.sum()) / keep.numel())


@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
def test_project_with_importance_uses_wanda_score(structure):
    pattern = SparsityPattern.parse(structure, 0.5 if structure == "unstructured" else None)
    weight = _scores(6, 16, seed=12)
    norms = torch.rand(16, generator=torch.Generator().manual_seed(13)) * 10
    projected = pattern.project(weight, norms, per_row=True)
    wanda_score = weight.abs() * norms.unsqueeze(0)
    keep = torch.zeros_like(weight, dtype=torch.bool)
    if pattern.is_nm:
        groups = wanda_score.reshape(6, 4, 4)
        idx = groups.topk(2, dim=2).indices
        keep = keep.reshape(6, 4, 4).scatter(2, idx, True).reshape(6, 16)
    else:
        keep.scatter_(1, wanda_score.topk(8, dim=1).indices, True)
    assert torch.equal(projected, weight * keep)
    # the importance changes the decision compared with plain magnitude
    assert not torch.equal(projected, pattern.project(weight, per_row=True))


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5, float("nan"), None])
def test_unstructured_sparsity_outside_open_unit_interval_is_rejected(sparsity):
    with pytest.raises(PatternError, match="between 0 and 1"):
        SparsityPattern.parse("unstructured", sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 2.0])
def test_direct_construction_validates_sparsity(sparsity):
    with pytest.raises(PatternError):
        SparsityPattern(sparsity)


@pytest.mark.parametrize("structure", ["4:4", "5:4", "0:4", "3:0"])
def test_n_must_be_below_m(structure):
    with pytest.raises(PatternError, match="0 < N < M"):
        SparsityPattern.parse(structure)


@pytest.mark.parametrize(
    "structure", ["", "2-4", "2:4:8", "a:b", "structured", "2:", ":4", "2.0:4"]
)
def test_malformed_structure_strings_are_rejected(structure):
    with pytest.raises(PatternError, match="unknown structure"):
        SparsityPattern.parse(structure)


def test_in_features_not_divisible_by_m_names_the_layer():
    pattern = SparsityPattern.parse("2:4")
    with pytest.raises(PatternError, match=r"mlp\.down_proj.*in_features=10.*M=4"):
        pattern.check_shape((8, 10), "mlp.down_proj")
    with pytest.raises(PatternError, match="not divisible"):
        pattern.keep_mask(torch.ones(2, 6))
    pattern.check_shape((8, 12), "fine")


@pytest.mark.parametrize(("structure", "sparsity"), [("2:4", 0.6), ("4:8", 0.25), ("1:4", 0.5)])
def test_sparsity_contradicting_n_m_is_rejected(structure, sparsity):
    with pytest.raises(PatternError, match="contradicts"):
        SparsityPattern.parse(structure, sparsity)


@pytest.mark.parametrize(("structure", "implied"), [("2:4", 0.5), ("1:4", 0.75), ("4:8", 0.5)])
def test_sparsity_agreeing_with_n_m_is_accepted(structure, implied):
    pattern = SparsityPattern.parse(structure, implied)
    assert pattern.sparsity == implied
    assert pattern == SparsityPattern.parse(f" {structure.upper()} ")


def test_satisfied_by_detects_a_matrix_with_too_few_zeros():
    pattern = SparsityPattern.parse("unstructured", 0.5)
    weight = _scores(4, 8)
    assert not pattern.satisfied_by(weight)
    pruned = pattern.project(weight)
    assert pattern.satisfied_by(pruned)
    row, col = (pruned == 0).nonzero()[0].tolist()
    pruned[row, col] = 1.0  # one zero too few
    assert not pattern.satisfied_by(pruned)
    nm = SparsityPattern.parse("2:4")
    bad = nm.project(weight)
    bad[0, :4] = 1.0
    assert not nm.satisfied_by(bad)


def test_a_pattern_counting_per_row_keeps_the_count_in_every_row_and_checks_it_so():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.4, 0.3, 0.2, 0.1]])
    pattern = SparsityPattern.parse("unstructured", 0.5)
    per_row = pattern.counting_per_row()
    assert per_row.per_row and not pattern.per_row and "per row" in str(per_row)
    assert torch.equal(per_row.keep_mask(scores), pattern.keep_mask(scores, per_row=True))
    whole = pattern.project(scores)  # the four largest: all in row 0
    assert pattern.satisfied_by(whole) and not per_row.satisfied_by(whole)
    assert per_row.satisfied_by(per_row.project(scores))

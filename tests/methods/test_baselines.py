"""Magnitude / Wanda / SparseGPT on tiny problems: quality order, numerics, ignored layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from safe_llm.config import make_method
from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.core.layer_stats import collect_input_stats
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from safe_llm.stages.prune.engine import EngineOptions, prune_model

CPU = torch.device("cpu")
PATTERNS = {
    "unstructured": SparsityPattern.parse("unstructured", 0.5),
    "2:4": SparsityPattern.parse("2:4"),
}


def _llama_with_uneven_features(make_tiny_llama):
    """Tiny Llama whose norms give the layer inputs features of very different scales."""
    model = make_tiny_llama(seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in find_blocks(model)[1]:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.copy_(torch.exp(torch.randn(norm.weight.shape, generator=gen)))
    return model


def _zipf_windows(n: int = 8, seq: int = 32, vocab: int = 128) -> torch.Tensor:
    """Token ids with a Zipf-like (not uniform) distribution."""
    probs = 1.0 / torch.arange(1, vocab + 1).float()
    gen = torch.Generator().manual_seed(2)
    return torch.multinomial(probs, n * seq, replacement=True, generator=gen).reshape(n, seq)


def _exact_zeros(weight: torch.Tensor, pattern: SparsityPattern) -> bool:
    zeros = weight == 0
    if pattern.is_nm:
        rows, cols = weight.shape
        per_group = zeros.reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
        return bool((per_group == pattern.m - pattern.n).all())
    return int(zeros.sum()) == weight.numel() - pattern.kept_count(weight.numel())


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_layer_error_orders_sparsegpt_below_wanda_below_magnitude(make_tiny_llama, structure):
    pattern = PATTERNS[structure]
    windows = _zipf_windows()
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        model = _llama_with_uneven_features(make_tiny_llama)
        report = prune_model(
            model,
            windows,
            make_method(name),
            pattern,
            EngineOptions(device=CPU, batch_size=4, layer_errors=True, progress=False),
        )
        errors[name] = [block.layer_error for block in report.blocks]
    for index, per_layer in enumerate(errors["magnitude"]):
        assert per_layer, "the engine reported no layer errors"
        for layer, magnitude_error in per_layer.items():
            sparsegpt_error = errors["sparsegpt"][index][layer]
            wanda_error = errors["wanda"][index][layer]
            where = f"block {index} {layer}"
            assert sparsegpt_error < wanda_error, where
            assert wanda_error <= magnitude_error, where


def _least_squares_problem(seed: int = 0, n: int = 512, d: int = 32, out: int = 16):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=gen) @ mixing  # correlated input features
    weight = torch.randn(out, d, generator=gen)
    return x, weight, 2 * x.T @ x / n


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_least_squares_better_than_magnitude(structure):
    pattern = PATTERNS[structure]
    x, weight, hessian = _least_squares_problem()
    dense_out = x @ weight.T
    pruned = sparsegpt_prune(weight, hessian, pattern, blocksize=8)
    magnitude = pattern.project(weight)
    assert _exact_zeros(pruned, pattern)
    sparsegpt_error = (x @ pruned.T - dense_out).square().sum()
    magnitude_error = (x @ magnitude.T - dense_out).square().sum()
    assert sparsegpt_error < magnitude_error


def test_sparsegpt_n_m_groups_stay_whole_when_blocksize_is_not_a_multiple_of_m():
    pattern = PATTERNS["2:4"]
    _, weight, hessian = _least_squares_problem(seed=1)
    pruned = sparsegpt_prune(weight, hessian, pattern, blocksize=6)
    assert _exact_zeros(pruned, pattern)


def test_sparsegpt_accepts_a_transposed_weight_view():
    """GPT-2's Conv1D weights reach SparseGPT as a non-contiguous ``[out, in]`` view."""
    pattern = PATTERNS["unstructured"]
    _, weight, hessian = _least_squares_problem(seed=2)
    stored = weight.T.contiguous()  # Conv1D layout [in, out]
    view = stored.t()
    assert not view.is_contiguous()
    pruned = sparsegpt_prune(view, hessian, pattern, blocksize=8)
    torch.testing.assert_close(pruned, sparsegpt_prune(weight, hessian, pattern, blocksize=8))


def _singular_hessian(seed: int = 3, n: int = 256, d: int = 16):
    """Hessian of inputs whose features come in identical pairs (rank d / 2)."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randn(n, d // 2, generator=gen)
    x = torch.cat([half, half], dim=1)
    return x, 2 * x.T @ x / n


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_singular_hessian_without_damping_warns_and_still_prunes_exactly(structure):
    pattern = PATTERNS[structure]
    x, hessian = _singular_hessian()
    weight = torch.randn(8, hessian.shape[0], generator=torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match="raising the damping"):
        pruned = sparsegpt_prune(weight, hessian, pattern, damping=0.0, name="dup")
    assert torch.isfinite(pruned).all()
    assert _exact_zeros(pruned, pattern)
    # and the result is still a sensible reconstruction
    dense_out = x @ weight.T
    assert (x @ pruned.T - dense_out).square().sum() < dense_out.square().sum()


def test_forced_cholesky_failure_warns_and_retries_with_ten_times_the_damping(monkeypatch):
    _, _, hessian = _least_squares_problem(seed=5, d=8)
    expected = inverse_hessian_factor(hessian, 0.1, "reference")
    real = torch.linalg.cholesky_ex
    calls = []

    def failing_once(matrix, *args, **kwargs):
        factor, info = real(matrix, *args, **kwargs)
        calls.append(matrix)
        return (factor, torch.ones_like(info)) if len(calls) == 1 else (factor, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_once)
    with pytest.warns(RuntimeWarning, match=r"layer x.*raising the damping to 0\.1"):
        upper = inverse_hessian_factor(hessian, 0.01, "layer x")
    torch.testing.assert_close(upper, expected)


def test_cholesky_failing_at_every_damping_raises(monkeypatch):
    _, _, hessian = _least_squares_problem(seed=6, d=8)
    real = torch.linalg.cholesky_ex

    def always_failing(matrix, *args, **kwargs):
        factor, info = real(matrix, *args, **kwargs)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", always_failing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="not positive definite"):
            inverse_hessian_factor(hessian, 0.01, "layer y")


def test_engine_sparsegpt_with_zero_damping_on_repetitive_data_warns_and_stays_exact(
    make_tiny_llama,
):
    """Four distinct tokens give rank-deficient Hessians; zero damping cannot factor them."""
    model = make_tiny_llama(seed=1)
    windows = torch.tensor([[3, 7, 11, 5] * 4] * 2)
    pattern = PATTERNS["unstructured"]
    with pytest.warns(RuntimeWarning, match="raising the damping"):
        prune_model(
            model,
            windows,
            make_method("sparsegpt", {"damping": 0.0}),
            pattern,
            EngineOptions(device=CPU, progress=False),
        )
    for block in find_blocks(model)[1]:
        for layer in prunable_layers(block).values():
            weight = weight_matrix(layer).detach()
            assert torch.isfinite(weight).all()
            assert _exact_zeros(weight, pattern)


def test_prunable_layers_honours_fnmatch_ignore_patterns(make_tiny_llama):
    block = find_blocks(make_tiny_llama())[1][0]
    every = set(prunable_layers(block))
    assert {"self_attn.q_proj", "mlp.down_proj"} <= every
    assert set(prunable_layers(block, ("mlp.*",))) == {n for n in every if not n.startswith("mlp.")}
    kept = set(prunable_layers(block, ("*.q_proj", "self_attn.[kv]_proj")))
    assert kept == every - {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    assert set(prunable_layers(block, ("nothing*",))) == every


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_engine_leaves_ignored_layers_dense(make_tiny_llama, method):
    model = make_tiny_llama(seed=2)
    ignore = ("mlp.down_proj", "*.o_proj")
    blocks = find_blocks(model)[1]
    before = {
        (i, name): weight_matrix(layer).detach().clone()
        for i, block in enumerate(blocks)
        for name, layer in prunable_layers(block).items()
    }
    report = prune_model(
        model,
        _zipf_windows(n=2, seq=16),
        make_method(method),
        PATTERNS["2:4"],
        EngineOptions(device=CPU, ignore=ignore, progress=False),
    )
    for i, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            weight = weight_matrix(layer).detach()
            if name in ("mlp.down_proj", "self_attn.o_proj"):
                assert torch.equal(weight, before[i, name]), f"ignored {name} was changed"
                assert name not in report.blocks[i].layer_sparsity
            else:
                assert _exact_zeros(weight, PATTERNS["2:4"]), name


def test_input_stats_cover_a_layer_the_block_never_calls():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(6, 4)

        def forward(self, x):
            return self.used(x)

    block = Block()
    x = torch.randn(3, 5, 4)
    stats = collect_input_stats(dict(block.named_children()), lambda: [block(x)], hessian=True)
    torch.testing.assert_close(stats["used"].norms, x.reshape(-1, 4).norm(dim=0))
    assert stats["unused"].tokens == 0
    assert stats["unused"].hessian.shape == (6, 6)

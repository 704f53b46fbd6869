"""The CUDA path: every method through the engine on a GPU, bf16 included.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``pytest tests/stages/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from safe_llm.config import make_method
from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.stages.prune.engine import EngineOptions, prune_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
FAST_SAFE = dict(
    init="sparsegpt",
    epochs=2,
    interval=2,
    lr=5e-4,
    lam=1e-3,
    rho=2e-4,
    sam_ascent="exact",
    warmup_epochs=0,
    step_scale="absolute",
    holdout=0.0,
)


def _windows(vocab: int, n: int = 16, seq: int = 64) -> torch.Tensor:
    return torch.randint(vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def _prune(model, method: str, structure: str, options=None, **kw):
    pattern = SparsityPattern.parse(structure, 0.5)
    return prune_model(
        model,
        _windows(model.config.vocab_size),
        make_method(method, options),
        pattern,
        EngineOptions(device=CUDA, progress=False, **kw),
    )


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize(
    "method, options",
    [
        ("magnitude", None),
        ("wanda", None),
        ("sparsegpt", None),
        ("safe", FAST_SAFE),
        ("safe+", FAST_SAFE),
        ("safe+", dict(epochs=1, interval=2)),
    ],
)
def test_every_method_prunes_a_bf16_model_on_cuda_to_the_exact_pattern(
    make_tiny_llama, method, options, structure
):
    model = make_tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA, torch.bfloat16)
    report = _prune(model, method, structure, options)
    pattern = SparsityPattern.parse(structure, 0.5)
    for block in find_blocks(model)[1]:
        for name, layer in prunable_layers(block).items():
            matrix = weight_matrix(layer)
            assert matrix.device.type == "cuda" and matrix.dtype == torch.bfloat16, name
            assert pattern.satisfied_by(matrix) or pattern.satisfied_by(matrix, per_row=True)
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(b.reconstruction_error)) for b in report.blocks)
    assert report.peak_memory_bytes > 0
    logits = model(_windows(model.config.vocab_size, n=2).to(CUDA)).logits
    assert torch.isfinite(logits).all()


def test_sparsegpt_on_cuda_matches_the_cpu_solution(make_tiny_llama):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    gpu_model = make_tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA)
    windows = _windows(cpu_model.config.vocab_size)
    method, pattern = make_method("sparsegpt"), SparsityPattern.parse("unstructured", 0.5)
    for model, device in [(cpu_model, torch.device("cpu")), (gpu_model, CUDA)]:
        prune_model(
            model,
            windows,
            method,
            pattern,
            EngineOptions(device=device, progress=False),
        )
    for (name, cpu_param), gpu_param in zip(
        cpu_model.named_parameters(), gpu_model.parameters(), strict=True
    ):
        gpu_param = gpu_param.detach().cpu()
        same_mask = ((cpu_param != 0) == (gpu_param != 0)).float().mean().item()
        assert same_mask > 0.99, name
        assert torch.allclose(cpu_param, gpu_param, atol=1e-3, rtol=1e-2), name


def test_safe_plus_on_cuda_reconstructs_better_than_its_sparsegpt_start(make_tiny_llama):
    errors = {}
    for method, options in [("sparsegpt", None), ("safe+", dict(FAST_SAFE, epochs=8))]:
        model = make_tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA, torch.bfloat16)
        report = _prune(model, method, "unstructured", options, max_blocks=1)
        errors[method] = report.blocks[0].reconstruction_error
    assert errors["safe+"] < errors["sparsegpt"]


def test_fixed_seed_gives_the_same_safe_result_twice_on_cuda(make_tiny_llama):
    results = []
    for _ in range(2):
        model = make_tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA, torch.bfloat16)
        _prune(model, "safe", "unstructured", dict(epochs=2, interval=2), max_blocks=1)
        results.append([p.detach().clone() for p in find_blocks(model)[1][0].parameters()])
    for first, second in zip(*results, strict=True):
        assert torch.allclose(first.float(), second.float(), atol=1e-2, rtol=0)

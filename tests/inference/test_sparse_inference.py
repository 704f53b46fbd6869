"""Sparse inference: the compressed format, the kernel's paths against F.linear, load_sparse
against the dense model, safe-llm generate, and (slow) the real SmolLM2 decoding the same
tokens sparse and dense. The C++ extension builds on first use (torch's extensions cache)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from safe_llm.cli import main
from safe_llm.inference import kernel
from safe_llm.inference.format import compress, from_export
from safe_llm.inference.linear import SparseLinear
from safe_llm.inference.load import load_dense, load_sparse, sparsify, weight_bytes
from safe_llm.io.export import export_bitmask, pack_tensor

PATTERNS = ["0.5", "0.7", "2:4", "4:8"]


def pruned(out: int, width: int, pattern: str, dtype=torch.float32, seed: int = 0):
    """A random ``[out, width]`` weight pruned to ``pattern`` (a sparsity or ``n:m``)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=generator)
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        groups = weight.view(out, -1, m)
        drop = groups.abs().topk(m - n, dim=-1, largest=False).indices
        groups.scatter_(2, drop, 0.0)
    else:
        weight[torch.rand(out, width, generator=generator) < float(pattern)] = 0.0
    return weight.to(dtype)


def shapes(pattern: str):
    """Random-ish shapes; N:M needs whole groups (and the kernel whole bytes)."""
    return [(24, 64), (40, 136)] if ":" in pattern else [(7, 13), (33, 61), (24, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compressed_form_round_trips_bit_for_bit_from_dense_and_from_export(pattern, dtype):
    for seed, (out, width) in enumerate(shapes(pattern)):
        weight = pruned(out, width, pattern, dtype, seed)
        matrix = compress(weight)
        assert matrix.kind == ("bitmask" if ":" not in pattern else pattern)
        assert matrix.dtype == dtype and torch.equal(matrix.to_dense(), weight)
        assert torch.equal(matrix.rows(2, 5), weight[2:5])
        values, mask = pack_tensor(weight)
        exported = from_export(values, mask, (out, width), dtype)
        assert exported.kind == matrix.kind
        assert torch.equal(exported.to_dense(), weight)


def test_nm_form_is_smaller_than_dense_and_a_much_sparser_matrix_stays_a_bitmask():
    half = compress(pruned(64, 128, "2:4"))
    assert half.kind == "2:4" and half.codes.shape == (64, 128 // 8 + 4)  # 1 bit per weight
    assert half.nbytes < 0.6 * 64 * 128 * 4
    assert compress(pruned(64, 128, "4:8")).codes.shape == (64, 128 * 3 // 16 + 4)
    assert compress(pruned(64, 128, "0.95")).kind == "bitmask"  # fits 2:4, but sparser


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), weight.double()).to(x.dtype)


@pytest.mark.parametrize("path", kernel.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_linear_equals_f_linear_on_the_decompressed_weight(path, dtype, pattern):
    if path not in kernel.cpu_paths():
        pytest.skip(f"this CPU runs {kernel.cpu_paths()}, not {path}")
    generator = torch.Generator().manual_seed(1)
    for seed, (out, width) in enumerate(shapes(pattern)):
        weight = pruned(out, width, pattern, dtype, seed)
        bias = torch.randn(out, generator=generator).to(dtype)
        layer = SparseLinear(compress(weight), bias, path=path, tile_bytes=width * 4 * 5)
        for rows in (1, 2, 5, 8, 19):  # decode shapes, then the tiled prefill
            x = torch.randn(rows, width, generator=generator).to(dtype)
            expected = _reference(x, weight) + bias
            if dtype == torch.float32:
                torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            else:  # the kernel sums in fp32 and rounds once: within bf16's own tolerance
                scale = float(expected.float().abs().max())
                torch.testing.assert_close(layer(x), expected, rtol=1.6e-2, atol=1e-2 * scale)
        x3 = torch.randn(2, 3, width, generator=generator).to(dtype)  # [batch, seq, in]
        assert layer(x3).shape == (2, 3, out)


def test_a_missing_compiler_is_one_warning_and_the_torch_path(monkeypatch, caplog):
    monkeypatch.setattr(kernel, "missing_tools", lambda: ["a C++ compiler (c++; apt-get ...)"])
    kernel.extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="safe_llm"):
            assert kernel.cpu_paths() == ["torch"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "a C++ compiler" in warnings[0]
        assert "pure-PyTorch" in warnings[0]
        with pytest.raises(kernel.KernelError, match="does not run here"):
            kernel.resolve_path("scalar")
        with pytest.raises(kernel.KernelError, match="missing a C\\+\\+ compiler"):
            kernel.build()  # what scripts/setup.sh runs: a loud failure, not a fallback
    finally:
        kernel.extension.cache_clear()


def _prune_model(model, pattern: str):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() == 2:
                param.copy_(pruned(*param.shape, pattern, param.dtype, seed=len(name)))
    return model


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_load_sparse_gives_the_dense_models_logits_from_checkpoint_and_export(
    pattern, save_tiny_model, tmp_path
):
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model("dense")
    model = _prune_model(AutoModelForCausalLM.from_pretrained(directory), pattern).eval()
    model.save_pretrained(directory)
    export_bitmask(directory, tmp_path / "packed")
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.inference_mode():
        expected = model(ids).logits
        for source in (directory, tmp_path / "packed"):
            sparse = load_sparse(source, policy="sparse", progress=False)
            layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
            assert len(layers) == 7 * model.config.num_hidden_layers
            assert {m.matrix.kind for m in layers} == {"bitmask" if ":" not in pattern else "2:4"}
            torch.testing.assert_close(sparse(ids).logits, expected, rtol=1e-5, atol=1e-5)
            one = sparse(ids[:1, :1]).logits  # one decode row through the kernel
            torch.testing.assert_close(one, model(ids[:1, :1]).logits, rtol=1e-5, atol=1e-5)
            assert weight_bytes(sparse) < weight_bytes(model)
        dense = load_dense(tmp_path / "packed")
        torch.testing.assert_close(dense(ids).logits, expected, rtol=0, atol=0)


def test_auto_policy_measures_each_shape_and_keeps_outputs_equal(save_tiny_model):
    directory = save_tiny_model("auto")
    sparse = load_sparse(directory, progress=False)  # unpruned: nothing is worth compressing
    assert not any(isinstance(m, SparseLinear) for m in sparse.modules())
    from transformers import AutoModelForCausalLM

    model = _prune_model(AutoModelForCausalLM.from_pretrained(directory), "0.7").eval()
    model.save_pretrained(directory)
    sparse = load_sparse(directory, progress=False)
    summary = sparse.sparse_summary
    assert summary.decisions and all(d["sparse_ms"] > 0 for d in summary.decisions)
    chosen = {d["key"][0]: d["sparse"] for d in summary.decisions}
    for module in sparse.modules():
        if isinstance(module, SparseLinear):
            assert chosen[module.matrix.shape]
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama4"])
def test_sparse_experts_give_the_dense_moe_models_logits(arch):
    from moe_models import make_moe, make_windows

    model = make_moe(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name and param.dim() == 3:
                param[torch.rand_like(param) < 0.5] = 0.0
    ids = make_windows(2, 8)
    with torch.inference_mode():
        expected = model(ids).logits
        sparsify(model, policy="sparse")
        assert model.sparse_summary.sparse["bitmask"] > 0
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_load_sparse_reads_an_moe_checkpoint_stored_per_expert_through_transformers(
    tmp_path, caplog
):
    from moe_models import make_moe, make_windows

    model = make_moe("qwen3_moe")  # transformers writes its experts per expert
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name and param.dim() == 3:
                param[torch.rand_like(param) < 0.5] = 0.0
    model.save_pretrained(tmp_path / "moe")
    ids = make_windows(2, 8)
    with caplog.at_level(logging.WARNING, logger="safe_llm"):
        sparse = load_sparse(tmp_path / "moe", policy="sparse", progress=False)
    assert "per-expert" in caplog.text and "peak memory is the dense model" in caplog.text
    assert sparse.sparse_summary.sparse["bitmask"] == 3 * 2 * 8  # layers x parameters x experts
    with torch.inference_mode():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_generate_cli_prints_the_same_greedy_text_sparse_and_dense(save_tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model("gen")
    model = _prune_model(AutoModelForCausalLM.from_pretrained(directory), "0.5")
    model.save_pretrained(directory)
    args = [str(directory), "--prompt", "the cat", "--max-new-tokens", "12", "--quiet"]
    assert main(["generate", *args, "--policy", "sparse"]) == 0
    sparse = capsys.readouterr()
    assert main(["generate", *args, "--dense"]) == 0
    dense = capsys.readouterr()
    assert sparse.out == dense.out and sparse.out.strip()
    assert "tokens/s" in sparse.err and "sparse" in sparse.err and "dense" in dense.err
    sampled = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    assert main(["generate", *args, *sampled]) == 0
    first = capsys.readouterr().out
    assert main(["generate", *args, *sampled]) == 0
    assert capsys.readouterr().out == first  # reproducible from the seed


def _rows_per_step(model, tokenizer, tokens: int) -> list[int]:
    """The sequence length each call of the first sparse layer saw while generating."""
    from safe_llm.inference.generate import generate

    seen = []
    layer = next(m for m in model.modules() if isinstance(m, SparseLinear))
    handle = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2]))
    try:
        generate(model, tokenizer, "the cat sat", max_new_tokens=tokens)
    finally:
        handle.remove()
    return seen


def test_a_pruned_checkpoint_generates_with_its_kv_cache_sparse_and_through_transformers(
    save_tiny_model, fast_prune_argv, tiny_tokenizer, tmp_path
):
    """The run turns the KV cache off for its forward passes; the checkpoint must not keep that
    (without the cache every step recomputes the whole sequence)."""
    import json

    output = tmp_path / "pruned"
    assert main(fast_prune_argv(save_tiny_model(), output, "--sparsity", "0.5")) == 0
    assert json.loads((output / "config.json").read_text())["use_cache"] is True
    steps = _rows_per_step(load_sparse(output, policy="sparse", progress=False), tiny_tokenizer, 6)
    assert len(steps) == 6 and steps[0] > 1 and set(steps[1:]) == {1}

    config = json.loads((output / "config.json").read_text())  # as earlier checkpoints were
    (output / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    steps = _rows_per_step(load_sparse(output, policy="sparse", progress=False), tiny_tokenizer, 6)
    assert set(steps[1:]) == {1}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
    ],
)
def test_generate_cli_rejects_bad_input_before_loading(extra, message, save_tiny_model, capsys):
    directory = save_tiny_model("bad")
    assert main(["generate", str(directory), "--prompt", "hi", *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_cli_rejects_a_path_that_is_no_model(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_pruned_decodes_the_same_64_greedy_tokens_sparse_and_dense(smollm2_cache, tmp_path):
    import safe_llm
    from safe_llm.inference.generate import generate
    from safe_llm.io.models import load_tokenizer

    output = tmp_path / "smollm2-50"
    safe_llm.prune(
        "smollm2-135m",
        method="magnitude",
        sparsity=0.5,
        dataset="builtin-c4",
        nsamples=2,
        seqlen=64,
        output=str(output),
    )
    tokenizer = load_tokenizer(str(output), "smollm2")
    prompt = "The capital of France is"
    dense = generate(load_dense(output), tokenizer, prompt, max_new_tokens=64)
    sparse_model = load_sparse(output, policy="sparse", progress=False)
    assert sum(isinstance(m, SparseLinear) for m in sparse_model.modules()) == 7 * 30
    sparse = generate(sparse_model, tokenizer, prompt, max_new_tokens=64)
    assert len(dense.tokens) == 64 or dense.tokens[-1] == tokenizer.eos_token_id
    assert sparse.tokens == dense.tokens

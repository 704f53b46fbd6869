"""Sparse inference: the compressed format, the kernel's paths against F.linear, load_sparse
against the dense model, safe-llm generate, and (slow) the real SmolLM2 decoding the same
tokens sparse and dense. The C++ extension builds on first use (torch's extensions cache)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from safe_llm.cli import main
from safe_llm.errors import SafeLLMError
from safe_llm.inference import autotune, kernel
from safe_llm.inference.format import TILE, compress, from_export
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
    """Random-ish shapes: odd widths and partial tiles; N:M needs whole groups. The last is
    large enough for at::parallel_for to split its tiles over two threads."""
    if ":" in pattern:
        return [(24, 64), (40, 136), (100, 2048)]
    return [(7, 13), (33, 61), (24, 64), (100, 2051)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compressed_form_round_trips_bit_for_bit_from_dense_and_from_export(pattern, dtype):
    for seed, (out, width) in enumerate(shapes(pattern)):
        weight = pruned(out, width, pattern, dtype, seed)
        matrix = compress(weight)  # PyTorch ops
        assert matrix.kind == ("bitmask" if ":" not in pattern else pattern)
        compiled = kernel.compress(weight)  # the extension's one pass: the same layout
        assert compiled.kind == matrix.kind and compiled.kept == matrix.kept
        for name in ("values", "mask", "tile_offsets"):
            assert torch.equal(getattr(compiled, name), getattr(matrix, name)), name
        assert matrix.dtype == dtype and torch.equal(matrix.to_dense(), weight)
        if out > TILE:  # the second tile alone, in PyTorch and compiled (prefill's band)
            second = weight[TILE : 2 * TILE]
            assert torch.equal(matrix.dense_tiles(1, 2), second)
            assert torch.equal(kernel.dense_tiles(matrix, 1, 2), second)
        values, mask = pack_tensor(weight)
        exported = from_export(values, mask, (out, width), dtype)
        assert exported.kind == matrix.kind
        assert torch.equal(exported.to_dense(), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_form_holds_the_kept_values_and_one_bit_per_weight(dtype):
    for pattern in ("2:4", "4:8", "0.7"):
        matrix = compress(pruned(64, 128, pattern, dtype))
        assert matrix.mask.numel() * 8 == 64 * 128  # one bit per weight, N:M included
        kept = matrix.values.numel() - 32  # PAD
        assert kept == matrix.kept == int((matrix.to_dense() != 0).sum())
        size = kept * matrix.values.element_size() + 64 * 128 // 8 + 8 * (64 // TILE + 1)
        assert matrix.nbytes == size + 32 * matrix.values.element_size()
    assert compress(pruned(64, 128, "2:4")).kind == "2:4"
    assert compress(pruned(64, 128, "4:8")).kind == "4:8"
    assert compress(pruned(64, 128, "0.95")).kind == "bitmask"  # fits 2:4, but much sparser


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), weight.double()).to(x.dtype)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", kernel.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_linear_equals_f_linear_on_the_decompressed_weight(path, dtype, pattern, threads):
    if path not in kernel.cpu_paths():
        pytest.skip(f"this CPU runs {kernel.cpu_paths()}, not {path}")
    generator = torch.Generator().manual_seed(1)
    for seed, (out, width) in enumerate(shapes(pattern)):
        weight = pruned(out, width, pattern, dtype, seed)
        bias = torch.randn(out, generator=generator).to(dtype)
        layer = SparseLinear(kernel.compress(weight), bias, path=path, tile_bytes=width * 4 * 20)
        for rows in (1, 2, 5, 8, 19):  # decode shapes, then the tiled prefill
            x = torch.randn(rows, width, generator=generator).to(dtype)
            expected = _reference(x, weight) + bias
            scale = max(1.0, float(expected.float().abs().max()))  # sums of ~width terms
            if dtype == torch.float32:
                torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6 * scale)
            else:  # the kernel sums in fp32 and rounds once: within bf16's own tolerance
                torch.testing.assert_close(layer(x), expected, rtol=1.6e-2, atol=1e-2 * scale)
        x3 = torch.randn(2, 3, width, generator=generator).to(dtype)  # [batch, seq, in]
        assert layer(x3).shape == (2, 3, out)


@pytest.mark.parametrize("path", ["avx512", "avx512-load"])
def test_avx512_bf16_without_dpbf16_multiplies_the_two_fp32_halves(path, threads):
    """What an AVX-512 CPU without AVX-512-BF16 runs for bf16 values (turned on here by
    switching dpbf16 off where the CPU has it)."""
    if path not in kernel.cpu_paths():
        pytest.skip(f"this CPU runs {kernel.cpu_paths()}, not {path}")
    module = kernel.extension()
    before = module.use_dpbf16(False)
    try:
        assert not module.native_bf16()
        generator = torch.Generator().manual_seed(2)
        for seed, (out, width) in enumerate(shapes("0.5")):
            weight = pruned(out, width, "0.5", torch.bfloat16, seed)
            layer = SparseLinear(kernel.compress(weight), path=path)
            for rows in (1, 3, 8):
                x = torch.randn(rows, width, generator=generator).to(torch.bfloat16)
                expected = _reference(x, weight)
                scale = max(1.0, float(expected.float().abs().max()))
                torch.testing.assert_close(layer(x), expected, rtol=1.6e-2, atol=1e-2 * scale)
    finally:
        module.use_dpbf16(before)


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
            kernel.check_path("scalar")
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
            sparse = load_sparse(source, dtype="float32", policy="sparse", progress=False)
            layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
            assert len(layers) == 7 * model.config.num_hidden_layers
            assert {m.matrix.kind for m in layers} == {"bitmask" if ":" not in pattern else "2:4"}
            torch.testing.assert_close(sparse(ids).logits, expected, rtol=1e-5, atol=1e-5)
            one = sparse(ids[:1, :1]).logits  # one decode row through the kernel
            torch.testing.assert_close(one, model(ids[:1, :1]).logits, rtol=1e-5, atol=1e-5)
            assert weight_bytes(sparse) < weight_bytes(model)
        dense = load_dense(tmp_path / "packed", torch.float32)
        torch.testing.assert_close(dense(ids).logits, expected, rtol=0, atol=0)


def test_auto_policy_measures_each_shape_and_keeps_outputs_equal(save_tiny_model):
    directory = save_tiny_model("auto")
    sparse = load_sparse(directory, dtype="float32", progress=False)  # unpruned: nothing saved
    assert not any(isinstance(m, SparseLinear) for m in sparse.modules())
    from transformers import AutoModelForCausalLM

    model = _prune_model(AutoModelForCausalLM.from_pretrained(directory), "0.7").eval()
    model.save_pretrained(directory)
    sparse = load_sparse(directory, dtype="float32", progress=False)
    summary = sparse.sparse_summary
    decisions = {d["key"]: d for d in summary.decisions}
    assert decisions and all(d["ms"]["dense"] > 0 for d in decisions.values())
    for decision in decisions.values():  # the fastest of what was measured, or dense
        timings = decision["ms"]
        paths = [p for p in timings if p != "dense"]
        assert set(paths) == set(autotune.candidate_paths("auto"))
        best = min(paths, key=timings.get)
        expected = best if timings[best] <= autotune.PAY_MARGIN * timings["dense"] else "dense"
        assert decision["choice"] == expected
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    threads = torch.get_num_threads()
    for layer in layers:
        assert decisions[autotune.matrix_key(layer.matrix, threads)]["choice"] == layer.path
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    again = load_sparse(directory, dtype="float32", progress=False)  # from the timing cache
    assert [d["ms"] for d in again.sparse_summary.decisions] == [d["ms"] for d in summary.decisions]


def _pruned_checkpoint(
    save_tiny_model, name: str, pattern: str = "0.7", dtype=torch.float32, **overrides
):
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model(name, **overrides)
    model = _prune_model(AutoModelForCausalLM.from_pretrained(directory), pattern).eval()
    model.to(dtype).save_pretrained(directory)
    return directory


def _cache_timings(directory, dtype: str, sparse_ms: float, dense_ms: float) -> None:
    """Write the timing cache as if every kernel path had been measured at ``sparse_ms``."""
    import json

    sparse = load_sparse(directory, dtype=dtype, policy="sparse", progress=False)
    threads = torch.get_num_threads()
    entries = {}
    for layer in sparse.modules():
        if isinstance(layer, SparseLinear):
            timings = {p: sparse_ms for p in autotune.candidate_paths("auto")}
            entries[autotune.matrix_key(layer.matrix, threads)] = {**timings, "dense": dense_ms}
    autotune.timings_file().write_text(json.dumps(entries))


def test_auto_keeps_a_matrix_dense_when_its_measured_sparse_time_is_slower(save_tiny_model):
    directory = _pruned_checkpoint(save_tiny_model, "slower")
    _cache_timings(directory, "float32", sparse_ms=2e-3, dense_ms=1e-3)
    model = load_sparse(directory, dtype="float32", progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert not model.sparse_summary.sparse and sum(model.sparse_summary.dense.values()) == 14
    assert {d["choice"] for d in model.sparse_summary.decisions} == {"dense"}
    assert "0 of 14 prunable matrices sparse" in model.sparse_summary.describe()

    _cache_timings(directory, "float32", sparse_ms=0.5e-3, dense_ms=1e-3)
    model = load_sparse(directory, dtype="float32", progress=False)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "bf16", "torch.bfloat16"])
def test_load_sparse_takes_a_torch_dtype_or_its_name(dtype, save_tiny_model):
    directory = _pruned_checkpoint(save_tiny_model, "dtype")
    model = load_sparse(directory, dtype=dtype, policy="sparse", progress=False)
    layer = next(m for m in model.modules() if isinstance(m, SparseLinear))
    assert model.dtype == torch.bfloat16 and layer.matrix.dtype == torch.bfloat16
    with pytest.raises(SafeLLMError, match="float32 or bfloat16"):
        load_sparse(directory, dtype=torch.float16, progress=False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_exactly_where_the_cpu_computes_it_whatever_was_stored(
    native, save_tiny_model, monkeypatch
):
    from safe_llm.inference import load

    monkeypatch.setattr(load, "cpu_bf16_is_native", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    for stored in (torch.float32, torch.bfloat16):
        directory = _pruned_checkpoint(save_tiny_model, f"stored-{stored}", dtype=stored)
        model = load_sparse(directory, policy="sparse", progress=False)
        assert model.dtype == expected and model.sparse_summary.dtype == str(expected)[6:]
        assert load_dense(directory).dtype == expected


def test_reading_a_checkpoint_maps_none_of_its_files(save_tiny_model):
    """A mapped checkpoint keeps the pages it touched resident in the process: the loader reads
    every tensor into memory of its own instead."""
    from pathlib import Path

    from safe_llm.inference.source import TensorSource

    directory = _pruned_checkpoint(save_tiny_model, "unmapped")
    with TensorSource(directory) as tensors:
        loaded = [tensors.tensor(name) for name in tensors.names]
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        assert str(directory) not in maps
    assert loaded and all(t.untyped_storage().nbytes() == t.nbytes for t in loaded)
    model = load_sparse(directory, dtype="float32", policy="sparse", progress=False)
    reference = load_dense(directory, torch.float32)
    ids = torch.randint(0, 50, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_an_untied_input_embedding_is_mapped_and_the_rest_read(save_tiny_model):
    """Decoding reads one row of an untied input embedding per token: mapped (copy-on-write),
    only the rows read become resident; an output head (tied or not) is read whole."""
    untied = _pruned_checkpoint(save_tiny_model, "untied", tie_word_embeddings=False)
    model = load_sparse(untied, dtype="float32", policy="sparse", progress=False)
    embedding = model.get_input_embeddings().weight
    assert embedding.untyped_storage().nbytes() > embedding.nbytes  # a view of the file map
    head = model.get_output_embeddings().weight
    assert head.untyped_storage().nbytes() == head.nbytes
    reference = load_dense(untied, torch.float32)
    ids = torch.randint(0, 50, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert weight_bytes(model) < weight_bytes(reference)  # the map counted by its own bytes

    tied = _pruned_checkpoint(save_tiny_model, "tied", tie_word_embeddings=True)
    model = load_sparse(tied, dtype="float32", policy="sparse", progress=False)
    embedding = model.get_input_embeddings().weight
    assert embedding.untyped_storage().nbytes() == embedding.nbytes


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
        sparse = load_sparse(tmp_path / "moe", dtype="float32", policy="sparse", progress=False)
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

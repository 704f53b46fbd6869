"""Block discovery, input capture and pruning on tiny random models of every supported family."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from safe_llm.config import make_method
from safe_llm.core.blocks import BlockDiscoveryError, find_blocks, prunable_layers, weight_matrix
from safe_llm.core.capture import capture_block_inputs, run_block
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.options import ConfigError
from safe_llm.stages.prune.engine import EngineOptions, prune_model

CPU = torch.device("cpu")
SEQ = 24
WINDOW = 8  # sliding window, smaller than SEQ so local and global layers differ

_COMMON = dict(vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
_ROPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# name -> (config class, model class, config kwargs)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _ROPE),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_ROPE, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _ROPE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_ROPE, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_ROPE, "head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_ROPE, "head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **_ROPE,
            "num_hidden_layers": 3,
            "head_dim": 8,
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        },
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            ffn_dim=64,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_ROPE, "pad_token_id": 0}),
}


def _available() -> list[str]:
    transformers = importlib.import_module("transformers")
    return [
        name
        for name, (config_cls, model_cls, _) in ARCHITECTURES.items()
        if hasattr(transformers, config_cls) and hasattr(transformers, model_cls)
    ]


AVAILABLE = _available()


def make_model(arch: str, seed: int = 0) -> nn.Module:
    transformers = importlib.import_module("transformers")
    config_cls, model_cls, settings = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **settings})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    return model


def make_windows(n: int = 6, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, SEQ), generator=gen)


def _non_block_state(model: nn.Module) -> dict[str, torch.Tensor]:
    prefix, _ = find_blocks(model)
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if not name.startswith(prefix + ".")
    }


def _block_outputs_by_hook(model, block, windows):
    """Inputs and outputs of ``block`` during an ordinary forward of the whole model."""
    seen = {}

    def hook(_module, args, kwargs, output):
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        seen["output"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(windows, use_cache=False)
    finally:
        handle.remove()
    return seen["input"], seen["output"]


@pytest.mark.parametrize("arch", AVAILABLE)
def test_discovery_finds_every_decoder_block(arch):
    model = make_model(arch)
    _, blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert prunable_layers(blocks[0])


@pytest.mark.parametrize("arch", AVAILABLE)
def test_captured_inputs_reproduce_first_and_last_block_of_a_full_forward(arch):
    model = make_model(arch)
    windows = make_windows(5)
    _, blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, windows, CPU, batch_size=2)
    assert len(calls) == len(blocks)

    first_in, first_out = _block_outputs_by_hook(model, blocks[0], windows)
    torch.testing.assert_close(hidden, first_in, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(run_block(blocks[0], hidden, calls[0]), first_out)

    last_in, last_out = _block_outputs_by_hook(model, blocks[-1], windows)
    with torch.no_grad():
        torch.testing.assert_close(run_block(blocks[-1], last_in, calls[-1]), last_out)


def test_capture_writes_the_hidden_states_into_the_buffer_it_is_given():
    model = make_model(AVAILABLE[0])
    windows = make_windows(5)
    given = []

    def allocate(shape, dtype):
        given.append(torch.full(shape, float("nan"), dtype=dtype))
        return given[-1]

    expected, _ = capture_block_inputs(model, windows, CPU, batch_size=2)
    hidden, _ = capture_block_inputs(model, windows, CPU, batch_size=2, allocate=allocate)
    assert len(given) == 1 and hidden is given[0]
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", [a for a in ("gemma2", "gemma3") if a in AVAILABLE])
def test_sliding_window_layers_receive_their_own_mask(arch):
    model = make_model(arch)
    _, calls = capture_block_inputs(model, make_windows(2), CPU)
    types = model.config.layer_types
    local, full = types.index("sliding_attention"), types.index("full_attention")
    hidden = torch.randn(2, SEQ, model.config.hidden_size)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        own = run_block(blocks[local], hidden, calls[local])
        swapped = run_block(blocks[local], hidden, calls[full])
    assert not torch.allclose(own, swapped), "local and global layers got identical arguments"


def _assert_exact_pattern(name: str, weight: torch.Tensor, dense: torch.Tensor, pattern):
    zeros = weight == 0
    if pattern.is_nm:
        rows, cols = weight.shape
        per_group = zeros.reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
        already = (dense == 0).reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
        want = pattern.m - pattern.n
        assert (per_group >= want).all(), f"{name}: a group keeps more than {pattern.n}"
        extra = per_group > want
        assert (per_group[extra] <= want + already[extra]).all(), f"{name}: over-pruned group"
    else:
        numel = weight.numel()
        assert int(zeros.sum()) == numel - round(0.5 * numel), name


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", AVAILABLE)
def test_pruning_meets_pattern_exactly_and_leaves_the_rest_untouched(arch, method, structure):
    model = make_model(arch)
    windows = make_windows(4)
    pattern = SparsityPattern.parse(structure, 0.5 if structure == "unstructured" else None)
    _, blocks = find_blocks(model)
    dense = {
        (i, name): weight_matrix(layer).detach().clone()
        for i, block in enumerate(blocks)
        for name, layer in prunable_layers(block).items()
    }
    outside = _non_block_state(model)

    prune_model(
        model,
        windows,
        make_method(method),
        pattern,
        EngineOptions(device=CPU, batch_size=3, progress=False),
    )

    for i, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            weight = weight_matrix(layer).detach()
            _assert_exact_pattern(f"block {i} {name}", weight, dense[i, name], pattern)
            kept = weight != 0
            assert kept.any()
            if method != "sparsegpt":  # only SparseGPT may update the surviving weights
                torch.testing.assert_close(weight[kept], dense[i, name][kept], rtol=0, atol=0)
    for name, tensor in _non_block_state(model).items():
        assert torch.equal(tensor, outside[name]), f"{name} changed"
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits
    assert logits.shape == (*windows.shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()


class _Wrapped(nn.Module):
    """Looks like a causal LM (config, forward on ids) but has no stack of blocks."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = body

    def forward(self, input_ids, **_):
        return self.body(self.embed(input_ids))


@pytest.mark.parametrize(
    "body",
    [
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
        nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)]),
        nn.ModuleList([nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8))]),
        nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]),
    ],
    ids=["sequential", "list-without-linears", "list-of-different-modules", "bare-linears"],
)
def test_model_without_decoder_blocks_raises_block_discovery_error(body):
    model = _Wrapped(body)
    with pytest.raises(BlockDiscoveryError, match="_Wrapped has no decoder blocks"):
        find_blocks(model)
    pattern = SparsityPattern.parse("unstructured", 0.5)
    with pytest.raises(BlockDiscoveryError):
        prune_model(
            model,
            torch.zeros(1, 4, dtype=torch.long),
            make_method("magnitude"),
            pattern,
            EngineOptions(device=CPU, progress=False),
        )


@pytest.mark.parametrize(
    "ignore, message",
    [
        (("mlp.nothing",), "--ignore mlp.nothing matches no weight of any block"),
        (("*",), "--ignore excludes every layer of every block"),
    ],
)
def test_prune_model_on_its_own_checks_the_ignore_patterns_before_any_work(ignore, message):
    """Called outside a run, the engine runs the run's check itself (check_prunable)."""
    model = make_model("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    options = EngineOptions(device=CPU, ignore=ignore, progress=False)
    pattern = SparsityPattern.parse("unstructured", 0.5)
    with pytest.raises(ConfigError, match=message):
        prune_model(model, make_windows(2), make_method("magnitude"), pattern, options)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif("gpt2" not in AVAILABLE, reason="this transformers has no GPT-2")
@pytest.mark.parametrize("method", ["safe", "safe+"])
def test_safe_prunes_gpt2_conv1d_through_the_contexts_layout_conversion(method):
    """GPT-2 stores ``Conv1D`` weights ``[in, out]``; SAFE trains the stored parameter and
    projects through ``ctx.as_matrix``: the pattern holds on ``[out, in]``."""
    model = make_model("gpt2")
    pattern = SparsityPattern.parse("2:4")
    solver = {"epochs": 1, "warmup_epochs": 0, "train_batch_size": 3}
    options = EngineOptions(device=CPU, batch_size=3, progress=False)
    prune_model(model, make_windows(6), make_method(method, solver), pattern, options)
    for block in find_blocks(model)[1]:
        for name, layer in prunable_layers(block).items():
            matrix = weight_matrix(layer).detach()
            groups = (matrix != 0).reshape(matrix.shape[0], -1, 4).sum(dim=2)
            assert (groups <= 2).all(), name


def test_block_context_turns_a_conv1d_layout_into_out_in_and_back():
    from safe_llm.methods.base import BlockContext

    block = find_blocks(make_model("gpt2"))[1][0]
    layers = prunable_layers(block)
    ctx = BlockContext(
        0, block, layers, SparsityPattern.parse("2:4"), None, None, None, {}, CPU, 1, 0
    )  # noqa: E501
    for name, layer in layers.items():
        stored = torch.randn_like(layer.weight)
        before = stored.clone()
        matrix = ctx.as_matrix(name, stored)
        assert matrix.shape == ctx.matrix(name).shape  # [out, in]
        assert torch.equal(matrix, before.t() if ctx.layers[name].transposed else before)
        matrix.mul_(2)  # a view: writing it writes the stored tensor, in its own layout
        assert torch.equal(stored, 2 * before)

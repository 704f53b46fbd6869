"""Mixture-of-experts models: every expert's matrix is pruned, on its own statistics.

Tiny random models built with transformers' own classes (3 blocks, 8 experts, top-2): Qwen3-MoE
and Mixtral (fused ``[E, out, in]``), gpt-oss (transposed ``[E, in, out]``, interleaved
gate/up, clamped activation, biases), DeepSeek-V3 (shared + routed experts, a dense first
block) and two hybrids that build on CPU, Qwen3-Next (linear attention) and Granite-MoE-hybrid
(Mamba), and Llama-4 (transposed experts with no layout declaration: read from the shapes;
all experts multiplied at once).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from moe_models import ARCHS, EXPERTS, make_moe, make_windows
from safetensors import safe_open

from safe_llm import cli
from safe_llm.config import make_method
from safe_llm.core.blocks import CoverageError, check_prunable, find_blocks, prunable_layers
from safe_llm.core.capture import capture_block_inputs, run_block
from safe_llm.core.layer_stats import collect_input_stats
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.methods import get_method_class
from safe_llm.stages.prune.engine import EngineOptions, prune_model
from safe_llm.stages.recover.parameters import sparsity_masks, trainable_parameters

CPU = torch.device("cpu")
METHOD_OPTIONS = {"safe": {"epochs": 1, "train_batch_size": 4}, "safe+": {"epochs": 1}}


def _experts_modules(block):
    """The modules holding fused 3-D expert parameters (two or more: a convolution's one 3-D
    weight is not)."""
    return [
        m for m in block.modules() if sum(p.dim() == 3 for p in m.parameters(recurse=False)) >= 2
    ]


def _transposed(experts) -> bool:
    """The declared layout, or Llama-4's (``[E, in, out]``, undeclared)."""
    return getattr(experts, "is_transposed", True)


def _zeros_and_total(block, skip: set[str]) -> tuple[int, int]:
    """Zeros over every floating block parameter of 2+ dimensions except ``skip`` and the
    experts' per-expert biases, counted independently of the engine."""
    biases = {
        id(p) for m in _experts_modules(block) for p in m.parameters(recurse=False) if p.dim() == 2
    }
    zeros = total = 0
    for name, param in block.named_parameters():
        if param.dim() < 2 or name in skip or id(param) in biases:
            continue
        zeros += int((param == 0).sum())
        total += param.numel()
    return zeros, total


# --------------------------------------------------------------------------------------------
# every method x {50%, 2:4} on every architecture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "safe", "safe+"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_expert_matrix_is_pruned_and_the_report_counts_every_block_weight(
    arch, method, structure, tmp_path
):
    model = make_moe(arch)
    pattern = SparsityPattern.parse(structure, 0.5 if structure == "unstructured" else None)
    pruner = make_method(method, METHOD_OPTIONS.get(method))
    report = prune_model(
        model,
        make_windows(),
        pruner,
        pattern,
        EngineOptions(progress=False, batch_size=4),
    )

    _, blocks = find_blocks(model)
    counted = pattern.counting_per_row(get_method_class(method).per_row)
    moe_blocks = 0
    for index, block in enumerate(blocks):
        for experts in _experts_modules(block):
            moe_blocks += 1
            for name, param in experts.named_parameters(recurse=False):
                if param.dim() != 3:
                    continue
                for e in range(EXPERTS):  # each expert's [out, in] matrix meets the pattern
                    matrix = param[e].t() if _transposed(experts) else param[e]
                    assert counted.satisfied_by(matrix), f"block {index} {name}[{e}]"
                    assert (matrix == 0).sum() * 2 == matrix.numel(), f"block {index} {name}[{e}]"
    assert moe_blocks == (2 if arch == "deepseek_v3" else 3)

    dense_by_design = ARCHS[arch][3]
    assert set(report.unpruned_block_weights) == dense_by_design
    zeros = total = 0
    for block in blocks:
        z, t = _zeros_and_total(block, dense_by_design)
        zeros, total = zeros + z, total + t
    assert report.overall_sparsity == pytest.approx(zeros / total, abs=1e-12)
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-12)
    z, t = 0, 0
    for block in blocks:
        bz, bt = _zeros_and_total(block, set())
        z, t = z + bz, t + bt
    assert report.all_block_weights_sparsity == pytest.approx(z / t, abs=1e-12)
    assert 0.45 < report.all_block_weights_sparsity < 0.5

    _check_checkpoint(model, tmp_path / "ckpt")


def _check_checkpoint(model, path) -> None:
    """The checkpoint transformers writes (some layouts as per-expert keys) holds every zero
    and reloads in plain transformers to the same weights, with finite logits."""
    model.save_pretrained(path)
    on_disk = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = f.get_tensor(key)
            if tensor.dim() >= 2:
                on_disk += int((tensor == 0).sum())
    in_memory = sum(int((p == 0).sum()) for p in model.parameters() if p.dim() >= 2)
    assert on_disk == in_memory
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    mine, theirs = model.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    with torch.no_grad():
        logits = reloaded(make_windows(2, 16)).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# per-expert statistics
# --------------------------------------------------------------------------------------------


ROUTERS = {"qwen3_moe": "gate", "gpt_oss": "router", "deepseek_v3": "gate"}


def _routed(arch: str, block, hidden, call):
    """``(experts module, MoE input [tokens, d], top-k expert indices [tokens, k])``: the MoE
    module's input recorded by a hook of the test's own, the indices from calling the model's
    router on it ourselves."""
    experts = _experts_modules(block)[0]
    moe = next(m for m in block.modules() if experts in m.children())
    seen = {}

    def record(_module, args):
        seen["x"] = args[0].detach().clone()

    handle = moe.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            run_block(block, hidden, call)
    finally:
        handle.remove()
    x = seen["x"]
    with torch.no_grad():
        index = getattr(moe, ROUTERS.get(arch, "gate"))(x)[2]
    return experts, x.reshape(-1, x.shape[-1]), index.reshape(-1, index.shape[-1])


def _expected_intermediate(arch, experts, e, x):
    """The input of expert ``e``'s down projection, computed from its weights."""
    weight = experts.gate_up_proj[e]
    if arch == "gpt_oss":  # transposed, interleaved gate/up, biased, clamped
        gate_up = x @ weight + experts.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = (x @ weight.t()).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("every", [False, True])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_expert_statistics_equal_an_independent_computation_from_the_routers_top_k(arch, every):
    model = make_moe(arch)
    hidden, calls = capture_block_inputs(model, make_windows(4, 16), CPU)
    block = find_blocks(model)[1][1]
    layers = prunable_layers(block)
    with torch.no_grad():
        stats = collect_input_stats(
            layers, lambda: [run_block(block, hidden, calls[1])], hessian=True, every_token=every
        )
    experts, x, index = _routed(arch, block, hidden, calls[1])
    prefix = next(n for n in layers if "gate_up_proj[" in n).split("gate_up_proj[")[0]
    for e in range(EXPERTS):
        mine = x if every else x[(index == e).any(dim=-1)]
        assert len(mine) > 0
        with torch.no_grad():
            inner = _expected_intermediate(arch, experts, e, mine)
        for name, inputs in (("gate_up_proj", mine), ("down_proj", inner)):
            got = stats[f"{prefix}{name}[{e}]"]
            assert got.tokens == len(inputs)
            assert not got.is_fallback
            torch.testing.assert_close(got.sq_sum, inputs.square().sum(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got.xtx, inputs.t() @ inputs, rtol=1e-4, atol=1e-5)
    # the experts ran their eager loop for the statistics only: the model's setting is back
    assert model.config._experts_implementation != "eager"


def test_an_expert_without_calibration_tokens_is_pruned_by_magnitude_and_counted(caplog):
    model = make_moe("qwen3_moe")
    windows = make_windows(1, 2)  # 2 tokens, top-2 of 8: at most 4 experts per block see one
    hidden, calls = capture_block_inputs(model, windows, CPU)
    _, blocks = find_blocks(model)
    routed = []
    for i, block in enumerate(blocks):
        _, _, index = _routed("qwen3_moe", block, hidden, calls[i])
        routed.append(set(index.flatten().tolist()))
        with torch.no_grad():
            hidden = run_block(block, hidden, calls[i])
    dense = {
        (i, n): h.matrix().detach().clone()
        for i, b in enumerate(blocks)
        for n, h in prunable_layers(b).items()
    }
    pattern = SparsityPattern.parse("unstructured", 0.5)
    report = prune_model(
        model,
        windows,
        make_method("sparsegpt"),
        pattern,
        EngineOptions(progress=False, batch_size=1),
    )
    for i, block in enumerate(blocks):
        silent = EXPERTS - len(routed[i])
        assert silent >= 4
        assert report.blocks[i].extra["experts_without_tokens"] == silent
        assert report.blocks[i].extra["experts"] == EXPERTS
        for e in set(range(EXPERTS)) - routed[i]:  # the fallback: |W|, no update
            for name in (f"mlp.experts.gate_up_proj[{e}]", f"mlp.experts.down_proj[{e}]"):
                pruned = prunable_layers(block)[name].matrix()
                assert torch.isfinite(pruned).all()
                assert torch.equal(pruned, pattern.project(dense[(i, name)])), name
    assert "received no calibration token" in caplog.text


def test_every_token_option_gives_every_expert_the_whole_stream():
    model = make_moe("qwen3_moe")
    windows = make_windows(1, 2)
    pattern = SparsityPattern.parse("2:4")
    report = prune_model(
        model,
        windows,
        make_method("wanda"),
        pattern,
        EngineOptions(progress=False, moe_every_token=True),
    )
    for block_report in report.blocks:
        assert block_report.extra["experts_without_tokens"] == 0
        assert block_report.extra["expert_tokens_min"] == 2


# --------------------------------------------------------------------------------------------
# the guard: block weights the engine cannot interpret
# --------------------------------------------------------------------------------------------


class _Mixer(torch.nn.Module):
    """Four matrices in one 3-D parameter, applied by einsum: no layout declared."""

    def __init__(self, width: int):
        super().__init__()
        self.mixers = torch.nn.Parameter(torch.randn(4, width, width) / width**0.5)

    def forward(self, x):
        return torch.einsum("bsd,med->bse", x, self.mixers) / 4


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.mixer = _Mixer(width)

    def forward(self, x):
        return x + self.mixer(torch.relu(self.proj(x)))


class _Model(torch.nn.Module):
    """A causal-LM shape of our own: embedding, blocks with an uninterpretable weight, head."""

    def __init__(self, width: int = 16, vocab: int = 128):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(_Block(width) for _ in range(2))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_a_large_block_weight_the_engine_cannot_interpret_stops_the_run_with_its_name():
    model = _Model()
    pattern = SparsityPattern.parse("unstructured", 0.5)
    for run in (
        lambda: check_prunable(find_blocks(model)[1], pattern),
        lambda: prune_model(
            model,
            make_windows(2, 8),
            make_method("wanda"),
            pattern,
            EngineOptions(progress=False),
        ),
    ):
        with pytest.raises(CoverageError) as error:
            run()
        assert "mixer.mixers (79% of its block)" in str(error.value)
        assert "--ignore mixer.mixers" in str(error.value)
    assert not any((p == 0).any() for p in model.parameters() if p.dim() >= 2)


def test_ignore_names_the_weights_left_dense_and_the_run_goes_on():
    model = _Model()
    pattern = SparsityPattern.parse("unstructured", 0.5)
    check_prunable(find_blocks(model)[1], pattern, ("mixer.mixers",))
    report = prune_model(
        model,
        make_windows(2, 8),
        make_method("wanda"),
        pattern,
        EngineOptions(progress=False, ignore=("mixer.*",)),
    )
    assert report.overall_sparsity == 0.5
    assert report.unpruned_block_weights == {"mixer.mixers": 2 * 4 * 16 * 16}
    assert report.all_block_weights_sparsity == pytest.approx(0.5 * 256 / (256 + 1024))
    assert not (model.layers[0].mixer.mixers == 0).any()
    assert (model.layers[0].proj.weight == 0).sum() == 128


def test_ignore_takes_one_experts_matrix_or_every_experts_matrix_of_a_parameter():
    block = find_blocks(make_moe("qwen3_moe"))[1][0]
    every = set(prunable_layers(block))
    assert {f"mlp.experts.down_proj[{e}]" for e in range(EXPERTS)} <= every
    assert set(prunable_layers(block, ("mlp.experts.gate_up_proj[3]",))) == every - {
        "mlp.experts.gate_up_proj[3]"
    }
    kept = set(prunable_layers(block, ("mlp.experts.down_proj",)))
    assert kept == {n for n in every if not n.startswith("mlp.experts.down_proj")}


# --------------------------------------------------------------------------------------------
# SAFE, joint windows and recovery train the experts with their masks frozen
# --------------------------------------------------------------------------------------------


def test_safe_trains_the_experts_and_joint_windows_keep_their_masks():
    pattern = SparsityPattern.parse("2:4")
    windows = make_windows()
    one_shot = make_moe("gpt_oss")
    prune_model(
        one_shot,
        windows,
        make_method("sparsegpt"),
        pattern,
        EngineOptions(progress=False),
    )
    model = make_moe("gpt_oss")
    options = {"epochs": 2, "holdout": 0.0, "train_batch_size": 4}
    prune_model(
        model,
        windows,
        make_method("safe+", options),
        pattern,
        EngineOptions(progress=False),
    )
    mine = find_blocks(model)[1][0].mlp.experts.down_proj
    theirs = find_blocks(one_shot)[1][0].mlp.experts.down_proj
    assert not torch.equal(mine, theirs)  # trained beyond the SparseGPT start
    for e in range(EXPERTS):
        assert pattern.satisfied_by(mine[e].t())

    from safe_llm.stages.prune.joint import PruneOptions

    joint = make_moe("qwen3_moe")
    report = prune_model(
        joint,
        windows,
        make_method("sparsegpt"),
        pattern,
        EngineOptions(
            progress=False, joint=PruneOptions(blocks=3, epochs=1, lr=1e-3, batch_size=4)
        ),
    )
    assert "joint_kept" in report.blocks[-1].extra
    for block in find_blocks(joint)[1]:
        for name, handle in prunable_layers(block).items():
            assert pattern.satisfied_by(handle.matrix()), name


def test_recovery_masks_and_trains_the_fused_expert_parameters():
    model = make_moe("gpt_oss")
    pattern = SparsityPattern.parse("unstructured", 0.5)
    prune_model(
        model,
        make_windows(4, 16),
        make_method("magnitude"),
        pattern,
        EngineOptions(progress=False),
    )
    masks = sparsity_masks(model)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert masks[name].shape == (EXPERTS, 64, 64)
    assert int(masks[name].sum()) * 2 == masks[name].numel()
    chosen = trainable_parameters(model, masks, ["weights"])
    assert {name, f"{name}_bias", "model.layers.1.mlp.experts.down_proj"} <= set(chosen)
    assert "model.layers.1.mlp.router.weight" not in chosen


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def test_cli_prunes_a_saved_moe_model_and_its_report_says_what_stayed_dense(
    tmp_path, tiny_tokenizer, calibration_file, capsys
):
    model = make_moe("qwen3_moe")
    model.resize_token_embeddings(len(tiny_tokenizer))
    source = tmp_path / "moe"
    model.save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(source), "--dataset", str(calibration_file)]
    argv += ["--nsamples", "4", "--seqlen", "16", "--batch-size", "2", "--method", "sparsegpt"]
    assert cli.main([*argv, "--structure", "2:4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall sparsity 0.5000" in printed
    assert "left dense" in printed and "mlp.gate.weight" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.5)
    assert set(report["unpruned_block_weights"]) == {"mlp.gate.weight"}
    assert 0.45 < report["all_block_weights_sparsity"] < 0.5
    assert all(b["extra"]["experts"] == EXPERTS for b in report["blocks"])
    assert all("experts_without_tokens" in b["extra"] for b in report["blocks"])
    card = (out / "README.md").read_text()
    assert (
        "every expert's matrix" in card and "| Left dense in the blocks | `mlp.gate.weight`" in card
    )
    meta = json.loads((out / "config.json").read_text())["safe_llm_sparsity"]
    assert meta["unpruned_block_weights"] == ["mlp.gate.weight"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    experts = find_blocks(reloaded)[1][2].mlp.experts
    assert int((experts.gate_up_proj == 0).sum()) * 2 == experts.gate_up_proj.numel()


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_bitmask_export_packs_the_experts_and_loads_back_bit_for_bit(arch, tmp_path):
    from safe_llm.io.export import export_bitmask, load

    model = make_moe(arch)
    pattern = SparsityPattern.parse("2:4")
    prune_model(
        model,
        make_windows(4, 16),
        make_method("magnitude"),
        pattern,
        EngineOptions(progress=False),
    )
    model.save_pretrained(tmp_path / "ckpt")
    sizes = export_bitmask(tmp_path / "ckpt", tmp_path / "packed")
    # the experts hold most of the weights: packed, the file is well under the dense size
    assert sizes.exported_bytes < 0.75 * sizes.dense_bytes
    restored = load(tmp_path / "packed")
    mine, theirs = model.state_dict(), restored.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


def test_an_moe_run_stopped_after_a_block_resumes_to_the_same_bits(tmp_path):
    from safe_llm.io.work_area import EngineState, WorkArea

    pattern = SparsityPattern.parse("2:4")
    windows = make_windows(4, 16)
    method = make_method("safe+", {"epochs": 1, "train_batch_size": 2})
    reference = make_moe("gpt_oss")
    prune_model(
        reference,
        windows,
        method,
        pattern,
        EngineOptions(progress=False, batch_size=2),
    )

    work = WorkArea(tmp_path / "work")
    work.start({"seed": 0})

    class Stop(Exception):
        pass

    def save_then_stop(state: EngineState, blocks):
        work.save(state, blocks, 3)
        if state.next_block == 2:
            raise Stop

    with pytest.raises(Stop):
        options = EngineOptions(progress=False, batch_size=2)
        prune_model(make_moe("gpt_oss"), windows, method, pattern, options, on_state=save_then_stop)
    resumed = make_moe("gpt_oss")
    state = work.load(find_blocks(resumed)[1])
    report = prune_model(
        resumed, windows, method, pattern, EngineOptions(progress=False, batch_size=2), resume=state
    )
    assert report.resumed_from_block == 2
    assert report.overall_sparsity == 0.5
    assert [b.extra["experts"] for b in report.blocks] == [EXPERTS] * 3
    expected, got = reference.state_dict(), resumed.state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("lean", [True, False], ids=["lean-state", "torch-adam"])
def test_recovery_trains_the_experts_and_keeps_every_experts_zeros(tmp_path, lean):
    import copy

    from safe_llm.stages.recover import loop
    from safe_llm.stages.recover.options import RecoverOptions

    teacher = make_moe("qwen3_moe")
    student = copy.deepcopy(teacher)
    pattern = SparsityPattern.parse("2:4")
    prune_model(
        student,
        make_windows(4, 16),
        make_method("wanda"),
        pattern,
        EngineOptions(progress=False),
    )
    before = sparsity_masks(student)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    options = RecoverOptions(steps=4, lr=3e-3, batch_size=8, lean=lean)
    loop.recover(student, teacher, make_windows(), options, progress=False)
    for layer in range(3):
        name = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        assert torch.equal(sparsity_masks(student)[name], before[name])
        assert not torch.equal(student.get_parameter(name), weights[name])  # trained
    for block in find_blocks(student)[1]:
        for name, handle in prunable_layers(block).items():
            assert pattern.satisfied_by(handle.matrix()), name


class _EinsumExperts(_Mixer):
    """Declares the transformers experts layout but applies the fused parameter whole (one
    einsum), so no expert's input can be told apart."""

    def __init__(self, width: int):
        super().__init__(width)
        self.is_transposed, self.has_gate = False, True


def test_declared_experts_whose_inputs_cannot_be_seen_stop_the_run_instead_of_a_fallback():
    from safe_llm.errors import SafeLLMError

    model = _Model()
    for block in model.layers:
        block.mixer = _EinsumExperts(16)
    assert "mixer.mixers[3]" in prunable_layers(model.layers[0])
    pattern = SparsityPattern.parse("unstructured", 0.5)
    with pytest.raises(SafeLLMError, match="_EinsumExperts ran during calibration"):
        prune_model(
            model,
            make_windows(2, 8),
            make_method("wanda"),
            pattern,
            EngineOptions(progress=False),
        )


def _saved_moe(arch: str, path, tokenizer):
    model = make_moe(arch)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _prune_config(model_dir, calibration_file, output, **options):
    from safe_llm.config import make_config

    return make_config(
        overrides={
            "model": str(model_dir),
            "dataset": str(calibration_file),
            "nsamples": 4,
            "seqlen": 16,
            "batch_size": 2,
            "method": "sparsegpt",
            "output": str(output),
            **options,
        }
    )


def test_streaming_a_fused_expert_checkpoint_gives_the_fully_loaded_bits(
    tmp_path, tiny_tokenizer, calibration_file
):
    from safetensors.torch import load_file

    from safe_llm.io.checkpoint import save_checkpoint
    from safe_llm.pipeline import run_prune

    source = _saved_moe("gpt_oss", tmp_path / "moe", tiny_tokenizer)  # fused on disk too
    results = {}
    for name, stream in (("loaded", False), ("streamed", True)):
        config = _prune_config(source, calibration_file, tmp_path / name, stream_from_disk=stream)
        results[name] = run_prune(config, progress=False)
        save_checkpoint(results[name])
    expected = load_file(str(tmp_path / "loaded" / "model.safetensors"))
    got = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert results["streamed"].report.overall_sparsity == 0.5
    assert results["streamed"].report.unpruned_block_weights == {"mlp.router.weight": 3 * 512}


def test_streaming_a_per_expert_checkpoint_says_why_it_cannot(
    tmp_path, tiny_tokenizer, calibration_file
):
    from safe_llm.io.models import ModelError
    from safe_llm.pipeline import run_prune

    source = _saved_moe("qwen3_moe", tmp_path / "moe", tiny_tokenizer)  # per-expert keys
    config = _prune_config(source, calibration_file, tmp_path / "out", stream_from_disk=True)
    with pytest.raises(ModelError, match="stores the experts in another layout"):
        run_prune(config, progress=False)


def test_cli_moe_every_token_gives_each_expert_every_calibration_token(
    tmp_path, tiny_tokenizer, calibration_file
):
    import yaml

    source = _saved_moe("mixtral", tmp_path / "moe", tiny_tokenizer)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(source), "--dataset", str(calibration_file), "--quiet"]
    argv += ["--nsamples", "4", "--seqlen", "16", "--method", "wanda", "--moe-every-token"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for block in report["blocks"]:
        assert block["extra"]["expert_tokens_min"] == 4 * 16
        assert block["extra"]["experts_without_tokens"] == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["moe_every_token"] is True


def test_llama4_expert_statistics_are_the_router_scaled_rows_each_expert_receives():
    model = make_moe("llama4")
    hidden, calls = capture_block_inputs(model, make_windows(4, 16), CPU)
    block = find_blocks(model)[1][1]
    layers = prunable_layers(block)
    assert "feed_forward.router" not in layers  # an nn.Linear router stays dense
    with torch.no_grad():
        stats = collect_input_stats(layers, lambda: [run_block(block, hidden, calls[1])], True)
    moe = block.feed_forward
    seen = {}
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        run_block(block, hidden, calls[1])
        handle.remove()
        x = seen["x"].reshape(-1, 64)
        logits = x @ moe.router.weight.t()
        top, index = logits.topk(2, dim=-1)
        for e in range(EXPERTS):
            chosen = (index == e).any(dim=-1)
            score = torch.sigmoid(logits[chosen, e : e + 1])
            inputs = x[chosen] * score
            gate, up = (inputs @ moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
            inner = up * torch.nn.functional.silu(gate)
            for name, rows in (("gate_up_proj", inputs), ("down_proj", inner)):
                got = stats[f"feed_forward.experts.{name}[{e}]"]
                assert got.tokens == int(chosen.sum()) > 0
                torch.testing.assert_close(got.sq_sum, rows.square().sum(0), rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(got.xtx, rows.t() @ rows, rtol=1e-4, atol=1e-5)

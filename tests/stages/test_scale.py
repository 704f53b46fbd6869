"""Scaling past one device: non-uniform (OWL / explicit) sparsity, blocks streamed from disk,
activations memory-mapped, and data-parallel SAFE under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safe_llm.config import ConfigError, make_config
from safe_llm.core.sparsity import PatternError
from safe_llm.io.checkpoint import save_checkpoint
from safe_llm.pipeline import run_prune
from safe_llm.stages.profile.owl import owl_sparsities, weighted_sparsity

BLOCKS = 4


def _prune(model_dir, calibration_file, output=None, **options):
    config = make_config(
        overrides={
            "model": str(model_dir),
            "dataset": str(calibration_file),
            "nsamples": 8,
            "seqlen": 32,
            "batch_size": 4,
            "device": "cpu",
            "output": str(output) if output else None,
            **options,
        }
    )
    result = run_prune(config, progress=False)
    if output:
        save_checkpoint(result)
    return result


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _block_sparsity(report: dict) -> list[float]:
    return [sum(b["layer_sparsity"].values()) / len(b["layer_sparsity"]) for b in report["blocks"]]


# -- OWL and explicit profiles ---------------------------------------------------------------


def test_owl_profile_keeps_the_weighted_overall_sparsity_exact():
    sizes = [100, 300, 200, 400]
    sparsities = owl_sparsities([0.01, 0.05, 0.02, 0.03], sizes, 0.6, 0.08)
    assert weighted_sparsity(sparsities, sizes) == pytest.approx(0.6, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)


def test_owl_gives_blocks_with_more_outliers_lower_sparsity():
    ratios = [0.03, 0.01, 0.05, 0.02]
    sparsities = owl_sparsities(ratios, [1] * 4, 0.5, 0.1)
    by_ratio = sorted(range(4), key=ratios.__getitem__)
    assert [sparsities[i] for i in by_ratio] == sorted(sparsities, reverse=True)


def test_owl_with_equal_ratios_is_uniform():
    assert owl_sparsities([0.02] * 3, [5, 5, 5], 0.7, 0.08) == pytest.approx([0.7] * 3)


def test_owl_refuses_a_spread_outside_zero_one():
    with pytest.raises(PatternError, match="outside"):
        owl_sparsities([0.0, 1.0], [1, 100], 0.95, 0.2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"structure": "2:4", "sparsity_profile": "owl"}, "N:M"),
        ({"structure": "2:4", "sparsity_per_block": [0.5, 0.5]}, "N:M"),
        ({"sparsity_profile": "bogus"}, "--sparsity-profile takes uniform, owl"),
        ({"sparsity_profile": "owl", "sparsity_per_block": [0.5]}, "not both"),
        ({"sparsity_per_block": [0.5, 1.0]}, "--sparsity-per-block must be below 1"),
        ({"owl_lambda": 0.7}, "owl-lambda"),
        ({"stream_from_disk": True}, "needs --output"),
        ({"stream_from_disk": True, "output": "o", "eval": ["builtin-wiki"]}, "--eval cannot"),
        ({"max_activation_memory": "lots"}, "not a size"),
    ],
)
def test_profile_and_streaming_options_are_validated(options, message):
    with pytest.raises((ConfigError, PatternError), match=message):
        make_config(overrides={"model": "m", "dataset": "builtin-c4", **options})


def _outlier_model(save_tiny_model, name="model"):
    """A tiny Llama whose block 2 has a few input features 30x larger (activation outliers)."""
    path = save_tiny_model(name, num_hidden_layers=BLOCKS, hidden_size=64, intermediate_size=128)
    tensors = load_file(str(path / "model.safetensors"))
    for key in tensors:
        if key.startswith("model.layers.2.mlp.down_proj"):
            tensors[key][:, :6] *= 30.0
    from safetensors.torch import save_file

    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_owl_run_meets_the_overall_sparsity_and_spares_the_outlier_block(
    save_tiny_model, calibration_file, tmp_path
):
    model_dir = _outlier_model(save_tiny_model)
    result = _prune(
        model_dir,
        calibration_file,
        tmp_path / "out",
        method="wanda",
        sparsity=0.6,
        sparsity_profile="owl",
        owl_lambda=0.1,
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    ratios, targets = report["owl_outlier_ratios"], report["block_sparsity"]
    assert report["sparsity_profile"] == "owl" and len(targets) == BLOCKS
    assert len(set(targets)) > 1
    # the overall sparsity is the requested one, up to the per-row rounding of kept counts
    assert result.report["overall_sparsity"] == pytest.approx(0.6, abs=1 / 64)
    achieved = _block_sparsity(result.report)
    most = max(range(BLOCKS), key=ratios.__getitem__)
    assert achieved[most] == min(achieved)
    assert targets[most] == min(targets)
    for want, got in zip(targets, achieved, strict=True):
        assert got == pytest.approx(want, abs=1 / 64)


def test_explicit_block_sparsities_are_applied_block_by_block(save_tiny_model, calibration_file):
    model_dir = save_tiny_model(num_hidden_layers=BLOCKS, hidden_size=64, intermediate_size=128)
    given = [0.3, 0.5, 0.7, 0.5]
    result = _prune(model_dir, calibration_file, method="magnitude", sparsity_per_block=given)
    assert result.report["sparsity_profile"] == "explicit"
    assert result.report["sparsity"] == pytest.approx(0.5)
    assert _block_sparsity(result.report) == pytest.approx(given, abs=1 / 64)
    with pytest.raises(ConfigError, match="4 decoder blocks"):
        _prune(model_dir, calibration_file, method="magnitude", sparsity_per_block=[0.5] * 3)


# -- streaming from disk -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"method": "wanda"},
        {"method": "sparsegpt", "sparsity_profile": "owl", "max_shard_size": "40KB"},
        {"method": "magnitude", "max_blocks": 2, "max_activation_memory": "1KB"},
    ],
    ids=["wanda", "sparsegpt-owl-sharded", "magnitude-max-blocks-spilled"],
)
def test_streamed_run_writes_the_same_checkpoint_as_the_fully_loaded_engine(
    save_tiny_model, calibration_file, tmp_path, options
):
    model_dir = save_tiny_model(num_hidden_layers=BLOCKS, hidden_size=64, intermediate_size=128)
    loaded = _prune(model_dir, calibration_file, tmp_path / "loaded", **options)
    streamed = _prune(
        model_dir, calibration_file, tmp_path / "streamed", stream_from_disk=True, **options
    )
    expected, got = _weights(tmp_path / "loaded"), _weights(tmp_path / "streamed")
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert streamed.report["overall_sparsity"] == loaded.report["overall_sparsity"]
    assert streamed.report["block_sparsity"] == loaded.report["block_sparsity"]
    assert not list(tmp_path.glob(".safe_llm-activations-*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")  # plain transformers loads it


def test_streamed_run_holds_one_block_at_a_time(save_tiny_model, calibration_file, tmp_path):
    from safe_llm.io import streaming

    seen = []
    original = streaming.DiskBlocks.load

    def load(self, index):
        loaded = [i for i, b in enumerate(self.blocks) if not next(b.parameters()).is_meta]
        seen.append(loaded)
        return original(self, index)

    model_dir = save_tiny_model(num_hidden_layers=BLOCKS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming.DiskBlocks, "load", load)
        _prune(model_dir, calibration_file, tmp_path / "out", stream_from_disk=True)
    assert len(seen) == BLOCKS and all(loaded == [] for loaded in seen)


def test_each_released_block_hands_its_freed_heap_back_to_the_os(
    save_tiny_model, calibration_file, tmp_path, monkeypatch
):
    import sys

    from safe_llm.core import memory

    if sys.platform == "linux":  # glibc: the trim is there to call
        assert memory.malloc_trim() is not None
    trims = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: lambda pad: trims.append(pad))
    model_dir = save_tiny_model(num_hidden_layers=BLOCKS)
    _prune(model_dir, calibration_file, tmp_path / "out", stream_from_disk=True)
    assert len(trims) >= BLOCKS  # one per released block, one per written shard


def test_streamed_run_resumes_from_its_work_area(save_tiny_model, calibration_file, tmp_path):
    from safe_llm.io.work_area import Interrupted

    model_dir = save_tiny_model(num_hidden_layers=BLOCKS)
    _prune(model_dir, calibration_file, tmp_path / "whole", stream_from_disk=True)
    config = make_config(
        overrides={
            "model": str(model_dir),
            "dataset": str(calibration_file),
            "nsamples": 8,
            "seqlen": 32,
            "batch_size": 4,
            "device": "cpu",
            "stream_from_disk": True,
            "output": str(tmp_path / "cut"),
        }
    )
    saved = []

    def stop_after_two_blocks() -> int | None:
        saved.append(1)
        return 15 if len(saved) == 2 else None  # SIGTERM after block 1 is saved

    with pytest.raises(Interrupted):
        run_prune(config, progress=False, should_stop=stop_after_two_blocks)
    resumed = _prune(
        model_dir, calibration_file, tmp_path / "cut", stream_from_disk=True, resume=True
    )
    assert resumed.report["resumed_from_block"] == 2
    expected, got = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# -- data-parallel SAFE --------------------------------------------------------------------------


def _safe_command(model_dir, calibration_file, output, extra=()) -> list[str]:
    return [
        "prune",
        "--quiet",
        "--model",
        str(model_dir),
        "--dataset",
        str(calibration_file),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--method",
        "safe+",
        "--epochs",
        "4",
        "--train-batch-size",
        "4",
        "--interval",
        "2",
        "--autocast",
        "off",
        "--output",
        str(output),
        *extra,
    ]


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize(
    "extra",
    [
        (),
        (
            "--joint-blocks",
            "2",
            "--joint-epochs",
            "2",
            "--joint-lr",
            "1e-2",
            "--joint-autocast",
            "off",
        ),
    ],
    ids=["block-by-block", "joint-window"],
)
def test_two_process_safe_equals_the_single_process_run(
    extra, save_tiny_model, calibration_file, torchrun_two, tmp_path
):
    model_dir = save_tiny_model(num_hidden_layers=2)
    single = tmp_path / "single"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "safe_llm.cli",
            *_safe_command(model_dir, calibration_file, single, extra),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    parallel = tmp_path / "parallel"
    run = torchrun_two(
        "-m", "safe_llm.cli", *_safe_command(model_dir, calibration_file, parallel, extra)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((parallel / "report.json").read_text())
    assert report["data_parallel_ranks"] == 2
    if extra:
        assert "joint_error_after" in report["blocks"][-1]["extra"]
    expected, got = _weights(single), _weights(parallel)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-4), key
        assert torch.equal(got[key] == 0, expected[key] == 0), key


def test_streams_over_the_activation_budget_are_memory_mapped_files(tmp_path):
    from safe_llm.core.activations import activations_for as _activations

    space = _activations(torch.device("cpu"), 4000, 1000, tmp_path)
    stream = space.copy(torch.arange(12.0).reshape(2, 3, 2))
    files = list(tmp_path.glob(".safe_llm-activations-*/*.bin"))
    assert len(files) == 1 and files[0].stat().st_size == 12 * 4
    assert torch.equal(stream, torch.arange(12.0).reshape(2, 3, 2))
    space.close()
    assert not list(tmp_path.iterdir())
    assert _activations(torch.device("cpu"), 4000, 8000, tmp_path).spill is None


def test_over_the_budget_the_first_block_inputs_are_captured_into_the_mapped_file(
    make_tiny_llama, tmp_path, monkeypatch
):
    from safe_llm.core import walker
    from safe_llm.core.sparsity import SparsityPattern
    from safe_llm.methods.magnitude import Magnitude
    from safe_llm.stages.prune import engine

    class Spy(Magnitude):
        def prune_block(self, ctx):
            files.append(ctx.inputs.untyped_storage().filename)
            return super().prune_block(ctx)

    def capture(*args, **kwargs):
        hidden, calls = real_capture(*args, **kwargs)
        files.append(hidden.untyped_storage().filename)
        return hidden, calls

    files, real_capture = [], walker.capture_block_inputs
    monkeypatch.setattr(walker, "capture_block_inputs", capture)
    model = make_tiny_llama()
    windows = torch.randint(model.config.vocab_size, (6, 16), generator=torch.Generator())
    options = engine.EngineOptions(
        device=torch.device("cpu"),
        batch_size=2,
        progress=False,
        activation_budget=1,
        spill_dir=tmp_path,
    )
    engine.prune_model(model, windows, Spy(), SparsityPattern.parse("unstructured", 0.5), options)
    assert len(files) == 3 and files[0] is not None  # capture + two blocks
    assert files[0] == files[1] == files[2]  # the blocks read the capture's own mapped file
    assert not list(tmp_path.iterdir())


def test_a_work_area_of_another_profile_is_not_resumed():
    from safe_llm.io.work_area import config_differences

    run = {"model": "m", "dataset": "builtin-c4"}
    current = make_config(overrides=run).decisive_options()
    owl = make_config(overrides={**run, "sparsity_profile": "owl"}).decisive_options()
    assert config_differences(current, current) == []
    assert config_differences(current, owl) == [
        "profile: {'kind': 'uniform', 'owl_m': 5.0, 'owl_lambda': 0.08, 'per_block': None} -> "
        "{'kind': 'owl', 'owl_m': 5.0, 'owl_lambda': 0.08, 'per_block': None}"
    ]

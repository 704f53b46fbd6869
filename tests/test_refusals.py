"""Bad input found while trying the tool: each refused in one line, exit 2, before long work."""

from __future__ import annotations

import pytest

from safe_llm import cli, pipeline
from safe_llm.evaluation import evaluate as evaluate_module
from safe_llm.io import models
from safe_llm.stages.prune import engine


@pytest.fixture
def base_args(save_tiny_model, calibration_file, tmp_path):
    """A fast prune run of the tiny model (256 positions) into tmp_path/out."""
    model = save_tiny_model()
    args = ["prune", "--model", str(model), "--dataset", str(calibration_file)]
    return args + ["--nsamples", "2", "--batch-size", "2", "--output", str(tmp_path / "out")]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model's weights fails the test: the refusal must come before it."""

    def fail(*args, **kwargs):
        pytest.fail("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_model", fail)
    monkeypatch.setattr(models, "load_model", fail)


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("safe-llm: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--seqlen", "257"], "--seqlen 257"),
        (["--seqlen", "16", "--eval", "builtin-wiki", "--eval-seqlen", "100000"], "--eval-seqlen"),
        (["--seqlen", "16", "--recover", "--recover-seqlen", "300"], "--recover-seqlen 300"),
    ],
)
def test_windows_longer_than_the_context_are_refused_from_the_config(
    base_args, no_weights, tmp_path, capsys, extra, flag
):
    assert cli.main([*base_args, *extra]) == 2
    line = _one_error_line(capsys)
    assert f"{flag}" in line and "maximum length 256" in line and "or less" in line
    assert not (tmp_path / "out").exists()


def test_windows_at_the_context_length_are_accepted(base_args, tmp_path):
    assert cli.main([*base_args, "--seqlen", "256", "--method", "magnitude", "--quiet"]) == 0


def test_eval_seqlen_longer_than_the_context_is_refused_before_the_weights_load(
    save_tiny_model, no_weights, monkeypatch, capsys
):
    monkeypatch.setattr(evaluate_module, "evaluate_perplexity", lambda *a, **k: pytest.fail())
    args = ["eval", "--model", str(save_tiny_model()), "--datasets", "builtin-wiki"]
    assert cli.main([*args, "--seqlen", "100000"]) == 2
    assert "--seqlen 100000 exceeds the model's maximum length 256" in _one_error_line(capsys)


@pytest.mark.parametrize("pattern", ["model.layers", "mlp.down", "self_attn.*.bias"])
def test_an_ignore_pattern_that_matches_no_weight_is_refused(
    base_args, tmp_path, capsys, monkeypatch, pattern
):
    monkeypatch.setattr(pipeline, "_calibration_windows", lambda *a: pytest.fail("calibrated"))
    assert cli.main([*base_args, "--seqlen", "16", "--ignore", pattern]) == 2
    line = _one_error_line(capsys)
    assert f"--ignore {pattern} matches no weight of any block" in line
    assert "mlp.down_proj" in line  # names what a pattern can match
    assert not (tmp_path / "out").exists()


def test_ignore_patterns_that_match_are_accepted(base_args):
    args = ["--seqlen", "16", "--method", "magnitude", "--quiet"]
    args += ["--ignore", "mlp.down_proj", "self_attn.*_proj"]
    assert cli.main([*base_args, *args]) == 0


@pytest.mark.parametrize("lr", ["0", "-1e-3"])
def test_recover_lr_zero_or_negative_is_refused_before_anything_loads(
    base_args, no_weights, tmp_path, capsys, lr
):
    assert cli.main([*base_args, "--seqlen", "16", "--recover", f"--recover-lr={lr}"]) == 2
    line = _one_error_line(capsys)
    assert "--recover-lr" in line
    assert not (tmp_path / "out").exists()


def test_a_run_checks_its_blocks_once_before_the_calibration_text_is_read(base_args, monkeypatch):
    """The pattern, --ignore and coverage checks (check_prunable) run once per run, before
    calibration, and not again in the block engine."""
    events = []
    check, calibration = pipeline.check_prunable, pipeline._calibration_windows

    def checked(*args):
        events.append("check")
        return check(*args)

    def calibrated(*args):
        events.append("calibration")
        return calibration(*args)

    monkeypatch.setattr(pipeline, "check_prunable", checked)
    monkeypatch.setattr(engine, "check_prunable", checked)
    monkeypatch.setattr(pipeline, "_calibration_windows", calibrated)
    assert cli.main([*base_args, "--seqlen", "16", "--method", "magnitude", "--quiet"]) == 0
    assert events == ["check", "calibration"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recover", "--recover-tokens", "0"], "--recover-tokens must be at least 1, got 0"),
        (["--recover", "--recover-tokens", "-5"], "--recover-tokens must be at least 1, got -5"),
        (["--recover", "--recover-tokens", "2X"], "--recover-tokens '2X' is not a count"),
        (
            ["--recover", "--recover-tokens", "10"],
            "--recover-tokens 10 is less than one recovery window of 16 tokens",
        ),
        (
            ["--recover", "--recover-tokens", "1k", "--recover-nsamples", "4"],
            "give one of them",
        ),
        (["--self-top-p", "1.5"], "--self-top-p must be at most 1, got 1.5"),
        (["--self-top-p", "0"], "--self-top-p must be above 0, got 0"),
        (["--self-temperature", "0"], "--self-temperature must be above 0, got 0"),
        (["--self-top-k", "-1"], "--self-top-k must be at least 0, got -1"),
        (["--dataset", "self", "--stream-from-disk"], "cannot run with --stream-from-disk"),
    ],
)
def test_a_bad_token_budget_or_sampling_setting_is_refused_before_the_model_loads(
    base_args, no_weights, tmp_path, capsys, extra, message
):
    assert cli.main([*base_args, "--seqlen", "16", *extra]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--dataset", "--recover-dataset"])
def test_self_data_from_a_model_that_cannot_generate_is_refused_before_any_window(
    base_args, tmp_path, capsys, monkeypatch, flag
):
    from transformers import LlamaForCausalLM

    from safe_llm.io.self_data import SelfWindows

    monkeypatch.setenv("SAFE_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(LlamaForCausalLM, "can_generate", classmethod(lambda cls: False))
    monkeypatch.setattr(SelfWindows, "_shard", lambda *a: pytest.fail("generated"))
    monkeypatch.setattr(engine, "_prune_block", lambda *a, **k: pytest.fail("pruned"))
    extra = ["--recover"] if flag == "--recover-dataset" else []
    assert cli.main([*base_args, "--seqlen", "16", *extra, flag, "self"]) == 2
    line = _one_error_line(capsys)
    assert f"{flag} self: LlamaForCausalLM cannot generate" in line and "text source" in line
    assert not (tmp_path / "out").exists()

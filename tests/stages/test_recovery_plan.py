"""The recovery planner: its estimate against a measured peak, and the refusal before the
teacher is loaded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from safe_llm import cli
from safe_llm.stages.recover import plan as recovery_plan

SHAPE = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
)  # 41M parameters


def _pruned_checkpoint(save_tiny_model, fast_prune_argv, tmp_path, **shape):
    model_dir = save_tiny_model(**shape)
    output = tmp_path / "pruned"
    assert cli.main(fast_prune_argv(model_dir, output, "--seqlen", "64")) == 0
    return output


def _recover_args(pruned, output, *extra) -> list[str]:
    return [
        "recover",
        "--quiet",
        str(pruned),
        "--output",
        str(output),
        "--eval",
        "--device",
        "cpu",
        "--recover-steps",
        "2",
        "--recover-batch-size",
        "2",
        "--recover-seqlen",
        "64",
        "--recover-nsamples",
        "4",
        *extra,
    ]


def _peak_rss(*command: str) -> int:
    """Peak resident set size (bytes) of ``python command...`` in a fresh process."""
    run = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, *command],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)
    return int(kib) * 1024


@pytest.mark.slow  # a 41M-parameter model pruned and recovered in subprocesses
@pytest.mark.skipif(not shutil.which("/usr/bin/time"), reason="needs /usr/bin/time -v")
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "adam"])
def test_the_planned_peak_is_within_a_quarter_of_the_measured_one(
    save_tiny_model, fast_prune_argv, tmp_path, lean
):
    """``safe-llm recover`` on a 41M-parameter model: the planner's peak against the process's
    peak RSS above a bare ``import torch, transformers`` process."""
    pruned = _pruned_checkpoint(save_tiny_model, fast_prune_argv, tmp_path, **SHAPE)
    state = "--recover-lean" if lean else "--no-recover-lean"
    args = _recover_args(pruned, tmp_path / "out", state, "--no-recover-gradient-checkpointing")
    measured = _peak_rss("-m", "safe_llm.cli", *args)
    measured -= _peak_rss("-c", "import torch, transformers")
    plan = json.loads((tmp_path / "out" / "report.json").read_text())["recovery"]["memory_plan"]
    assert plan["peak_bytes"] == pytest.approx(measured, rel=0.25), (plan, measured)


@pytest.mark.slow  # a 41M-parameter model pruned in a subprocess
def test_a_recovery_that_will_not_fit_stops_in_one_line_before_the_teacher_is_loaded(
    save_tiny_model, fast_prune_argv, tmp_path, monkeypatch, capsys
):
    from safe_llm.io import models
    from safe_llm.stages.recover.options import RecoverOptions

    pruned = _pruned_checkpoint(save_tiny_model, fast_prune_argv, tmp_path, **SHAPE)
    student, _, _ = models.load_model(str(pruned))
    counts = recovery_plan.ModelCounts.of(student)
    lean = recovery_plan.estimate(counts, RecoverOptions(lean=True), 2, 64, 4, bf16=False).peak
    adam = recovery_plan.estimate(counts, RecoverOptions(lean=False), 2, 64, 4, bf16=False).peak
    assert lean < 0.75 * adam
    loads, allowed = [], [1]
    real_load = models.load_model

    def load_model(name, *args, **kwargs):
        loads.append(name)
        assert len(loads) <= allowed[0], "the teacher was loaded"
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(recovery_plan, "available_bytes", lambda device: (lean + adam) // 2)
    args = _recover_args(pruned, tmp_path / "out", "--no-recover-lean", "--recover-autocast", "off")
    capsys.readouterr()
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "will not fit" in error, error
    assert "--recover-lean (about" in error and "--no-recover-memory-check" in error
    assert loads == [str(pruned)] and not (tmp_path / "out").exists()

    monkeypatch.setattr(recovery_plan, "available_bytes", lambda device: 1)
    loads.clear()
    assert cli.main(args) == 2
    assert "What would fit: a device with more memory" in capsys.readouterr().err
    loads.clear()
    allowed[0] = 2
    assert cli.main([*args, "--no-recover-memory-check", "--overwrite"]) == 0  # told to run
    assert len(loads) == 2


@pytest.mark.parametrize(("free_gib", "expected"), [(64.0, False), (0.02, True), (None, True)])
def test_auto_memory_modes_take_the_fast_state_only_where_it_fits_in_half_the_free_memory(
    make_tiny_llama, monkeypatch, free_gib, expected
):
    import torch

    from safe_llm.stages.recover.options import RecoverOptions

    free = None if free_gib is None else int(free_gib * 2**30)
    monkeypatch.setattr(recovery_plan, "available_bytes", lambda device: free)
    student = make_tiny_llama()
    cpu = torch.device("cpu")
    auto = RecoverOptions()
    chosen = recovery_plan.resolve_memory_modes(student, auto, 2, 64, 0, cpu, False)
    assert (chosen.lean, chosen.gradient_checkpointing) == (expected, expected)
    fast = recovery_plan.estimate(
        recovery_plan.ModelCounts.of(student),
        RecoverOptions(lean=False, gradient_checkpointing=False),
        2,
        64,
        0,
        bf16=False,
    ).peak
    if free is not None:  # the rule itself: the fast peak against half the free memory
        student_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
        assert (fast <= 0.5 * (free + student_bytes)) is not expected
    explicit = RecoverOptions(lean=True, gradient_checkpointing=False)
    kept = recovery_plan.resolve_memory_modes(student, explicit, 2, 64, 0, cpu, False)
    assert (kept.lean, kept.gradient_checkpointing) == (True, False)

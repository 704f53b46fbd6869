"""Recovery on a token budget (``--recover-tokens``): streamed windows, the time plan, the
throughput report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from safe_llm import cli
from safe_llm.io.data import TextWindows
from safe_llm.stages.recover import loop
from safe_llm.stages.recover.options import RecoverOptions


class _Stream:
    """Windows ``[n, seqlen]`` served in order, as a streamed source serves them."""

    def __init__(self, windows: torch.Tensor):
        self.windows, self.seqlen = windows, windows.shape[1]
        self.starts: list[int] = []

    def batches(self, start: int, size: int):
        self.starts.append(start)
        for first in range(start, len(self.windows), size):
            yield self.windows[first : first + size]


def _pair(make_tiny_llama, **shape):
    """(student, teacher): a tiny Llama at 50% by magnitude, and its dense copy with sharp
    logits."""
    teacher = make_tiny_llama(seed=0, **shape)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for module in student.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.mul_(w.abs() >= w.abs().flatten().median())
    return student, teacher


def test_streamed_recovery_equals_in_memory_recovery_on_the_same_windows(make_tiny_llama):
    windows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    held = RecoverOptions(steps=4, lr=1e-2, batch_size=2, autocast="off")
    in_memory, teacher = _pair(make_tiny_llama)
    loop.recover(in_memory, teacher, windows, held, seed=3, progress=False)
    # the in-memory run takes a seeded permutation of its windows; the stream serves them
    # in that order, one batch per step, and runs the teacher on each batch
    order = torch.cat([loop._batch_indices(s, 8, 2, 3) for s in range(4)])
    streamed, teacher = _pair(make_tiny_llama)
    budget = RecoverOptions(tokens=4 * 2 * 16, lr=1e-2, batch_size=2, autocast="off")
    report = loop.recover(
        streamed, teacher, _Stream(windows[order]), budget, seed=3, progress=False
    )
    assert report.streamed and report.steps == 4 and report.nsamples == 8
    moved = 0
    for name, param in in_memory.named_parameters():
        got = streamed.get_parameter(name)
        assert torch.allclose(got, param, rtol=1e-5, atol=1e-6), name
        moved += not torch.equal(param, teacher.get_parameter(name))
    assert moved > 0  # the weights trained


def test_a_stopped_streamed_recovery_resumes_from_its_window(
    make_tiny_llama, tiny_tokenizer, calibration_file, tmp_path
):
    options = RecoverOptions(tokens=6 * 2 * 16, lr=1e-2, batch_size=2, save_every=2)

    def stream():
        return TextWindows(tiny_tokenizer, str(calibration_file), 16, seed=5)

    whole, teacher = _pair(make_tiny_llama, vocab_size=len(tiny_tokenizer))
    loop.recover(whole, teacher, stream(), options, progress=False)
    killed, teacher = _pair(make_tiny_llama, vocab_size=len(tiny_tokenizer))
    calls, real = [], loop.finish_step

    def dies_at_step_five(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "finish_step", dies_at_step_five)
        with pytest.raises(KeyboardInterrupt):
            loop.recover(killed, teacher, stream(), options, state_dir=tmp_path, progress=False)
    resumed, teacher = _pair(make_tiny_llama, vocab_size=len(tiny_tokenizer))
    report = loop.recover(resumed, teacher, stream(), options, state_dir=tmp_path, progress=False)
    assert report.resumed_from_step == 4
    for name, param in whole.named_parameters():
        assert torch.equal(resumed.get_parameter(name), param), name


def test_text_windows_are_seeded_and_a_resumed_stream_skips_to_the_same_windows(
    tiny_tokenizer, calibration_file
):
    stream = TextWindows(tiny_tokenizer, str(calibration_file), 16, seed=5)
    batches = stream.batches(0, 3)
    first = torch.cat([next(batches) for _ in range(3)])
    assert first.shape == (9, 16) and len({tuple(w) for w in first.tolist()}) > 1
    later = next(TextWindows(tiny_tokenizer, str(calibration_file), 16, seed=5).batches(4, 5))
    assert torch.equal(later, first[4:9])
    other = next(TextWindows(tiny_tokenizer, str(calibration_file), 16, seed=6).batches(0, 9))
    assert not torch.equal(other, first)


def test_the_planned_time_is_within_30_percent_of_the_measured_loop(make_tiny_llama):
    """The plan times a few steps after a warm-up one and extrapolates with their median; on a
    shared machine a run is measured up to three times."""
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    windows = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    options = RecoverOptions(tokens=30 * 2 * 64, lr=1e-3, batch_size=2)
    ratios = []
    for _ in range(3):
        student, teacher = _pair(make_tiny_llama, **shape)
        report = loop.recover(student, teacher, _Stream(windows.repeat(15, 1)), options)
        assert report.steps == 30 and report.planned_seconds is not None
        ratios.append(report.planned_seconds / report.train_seconds)
        if abs(ratios[-1] - 1) <= 0.3:
            break
    assert abs(ratios[-1] - 1) <= 0.3, ratios
    assert report.tokens_per_second > 0 and 0 < report.flop_fraction < 1


def test_recover_tokens_streams_self_generated_windows_through_the_cli(
    save_tiny_model, fast_prune_argv, tmp_path, monkeypatch
):
    monkeypatch.setenv("SAFE_LLM_CACHE", str(tmp_path / "cache"))
    extra = ["--recover", "--recover-dataset", "self", "--recover-tokens", "0.128k"]
    extra += ["--recover-batch-size", "2", "--self-batch-size", "3"]
    assert cli.main(fast_prune_argv(save_tiny_model(), tmp_path / "out", *extra)) == 0
    recovery = json.loads((tmp_path / "out" / "report.json").read_text())["recovery"]
    assert recovery["streamed"] and recovery["dataset"] == "self"
    assert recovery["tokens"] == 128 and recovery["steps"] == 4 and recovery["nsamples"] == 8
    assert recovery["self_data"]["windows"] == 8
    assert len(list((tmp_path / "cache").rglob("windows_*"))) == 3  # 8 windows, 3 per shard
    assert recovery["memory_plan"]["tokens"] == 128
    assert recovery["memory_plan"]["parts"]["teacher cache"] == 0  # streamed: none held
    assert 0 < recovery["flop_fraction"] < 1 and recovery["matmul_flops_per_second"] > 0


def test_recover_tokens_streams_text_windows_through_the_cli(
    save_tiny_model, fast_prune_argv, tmp_path
):
    extra = ["--recover", "--recover-tokens", "96", "--recover-batch-size", "2"]
    assert cli.main(fast_prune_argv(save_tiny_model(), tmp_path / "out", *extra)) == 0
    recovery = json.loads((tmp_path / "out" / "report.json").read_text())["recovery"]
    assert recovery["streamed"] and recovery["tokens"] == 96 and recovery["steps"] == 3

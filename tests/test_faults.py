"""Bad input and faults: each ends with one clear line (exit 2), and never with a half-written
or NaN checkpoint, a changed source model or a lost earlier state.

Already covered elsewhere: calibration text shorter than one window and an N:M pattern the
layer shapes cannot take (tests/test_cli.py BAD_INPUTS), block discovery on odd module trees
(tests/core/test_architectures.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safe_llm import cli
from safe_llm.core import atomic
from safe_llm.io import work_area as resume
from safe_llm.io.work_area import WORK_DIR, WorkArea
from safe_llm.methods import METHODS, get_method_class, register
from safe_llm.methods.base import PruningMethod


@pytest.fixture
def model_dir(save_tiny_model):
    return save_tiny_model(num_hidden_layers=3)


@pytest.fixture
def prune_argv(calibration_file):
    def argv(model, output, *extra):
        return [
            "prune",
            "--model",
            str(model),
            "--dataset",
            str(calibration_file),
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--quiet",
            "--output",
            str(output),
            *extra,
        ]

    return argv


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("safe-llm: error: ")
    return lines[0]


def _digest(path: pathlib.Path) -> dict:
    return {
        p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# bad models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_safetensors_fails_with_one_line_naming_the_model(
    damage, model_dir, prune_argv, tmp_path, capsys
):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) // 2])
    out = tmp_path / "out"
    assert cli.main(prune_argv(model_dir, out)) == 2
    line = _one_error_line(capsys)
    assert str(model_dir) in line and "cannot load model" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["not GGUF at all", "GGUF without a model"])
def test_gguf_that_is_not_a_model_fails_with_one_line(
    kind, prune_argv, tmp_path, monkeypatch, capsys
):
    import gguf

    monkeypatch.setenv("SAFE_LLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data.gguf"
    if kind == "not GGUF at all":
        path.write_bytes(os.urandom(4096))
    else:
        writer = gguf.GGUFWriter(str(path), "notamodel")
        writer.add_string("general.name", "just a tensor")
        writer.add_tensor("some.tensor", np.ones((4, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    out = tmp_path / "out"
    assert cli.main(prune_argv(path, out)) == 2
    line = _one_error_line(capsys)
    assert f"{path} is not a loadable GGUF causal LM" in line
    assert not out.exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half cache


def test_model_without_tokenizer_fails_with_one_line(make_tiny_llama, prune_argv, tmp_path, capsys):
    bare = tmp_path / "bare"
    make_tiny_llama().save_pretrained(bare)
    assert cli.main(prune_argv(bare, tmp_path / "out")) == 2
    line = _one_error_line(capsys)
    assert "no usable tokenizer" in line and str(bare) in line


def test_model_with_no_decoder_blocks_fails_with_one_line_before_calibration(
    save_tiny_model, prune_argv, tmp_path, capsys, monkeypatch
):
    from safe_llm import pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration started for a model without blocks")

    monkeypatch.setattr(pipeline.data, "calibration_windows", forbidden)
    empty = save_tiny_model("no-blocks", num_hidden_layers=0)
    assert cli.main(prune_argv(empty, tmp_path / "out")) == 2
    assert "has no decoder blocks" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_pruning_never_modifies_the_source_model(model_dir, prune_argv, tmp_path):
    before = _digest(model_dir)
    assert cli.main(prune_argv(model_dir, tmp_path / "out", "--method", "sparsegpt")) == 0
    assert _digest(model_dir) == before


# --------------------------------------------------------------------------------------------
# a method that produces NaN
# --------------------------------------------------------------------------------------------


class _NaNInBlock1(PruningMethod):
    """Test-only: magnitude pruning, but block 1's up_proj comes out with a NaN."""

    name = "test-nan"

    @torch.no_grad()
    def prune_block(self, ctx):
        for name in ctx.layers:
            ctx.matrix(name).copy_(ctx.pattern.project(ctx.matrix(name)))
        if ctx.index == 1:
            ctx.matrix("mlp.up_proj")[0, 0] = float("nan")
        return {}


@pytest.fixture
def nan_method():
    register(_NaNInBlock1)
    yield _NaNInBlock1.name
    METHODS.pop(_NaNInBlock1.name)


def test_method_that_yields_nan_stops_naming_the_block_and_never_writes_nan(
    nan_method, model_dir, prune_argv, tmp_path, capsys
):
    out = tmp_path / "out"
    assert cli.main(prune_argv(model_dir, out, "--method", nan_method)) == 2
    line = _one_error_line(capsys)
    assert "block 1" in line and "mlp.up_proj" in line and "NaN or Inf" in line
    assert not (out / "model.safetensors").exists()
    work = WorkArea(out / WORK_DIR)
    assert work.finished_blocks() == 1  # block 0 kept, block 1 never saved
    for file in (out / WORK_DIR).glob("*.safetensors"):
        for name, tensor in load_file(file).items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (file, name)


# --------------------------------------------------------------------------------------------
# write errors: disk full, no permission
# --------------------------------------------------------------------------------------------


@pytest.fixture
def disk_full_on(monkeypatch):
    """disk_full_on(name): writing a file called ``name`` (Path.write_text) raises ENOSPC."""

    def arm(name: str):
        original = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)

    return arm


def test_disk_full_while_writing_the_checkpoint_keeps_the_previous_checkpoint(
    model_dir, prune_argv, tmp_path, capsys, disk_full_on
):
    out = tmp_path / "out"
    assert cli.main(prune_argv(model_dir, out, "--method", "magnitude")) == 0
    previous = _digest(out)
    disk_full_on("report.json")  # after the weights are in the temporary directory
    assert cli.main(prune_argv(model_dir, out, "--overwrite")) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and f"{out} keeps its previous files" in line
    kept = {k: v for k, v in _digest(out).items() if k.parts[0] != WORK_DIR}
    assert kept == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", "calibration.txt", "out"])


def test_disk_full_at_the_end_of_a_run_keeps_every_block_and_resume_only_writes(
    model_dir, prune_argv, tmp_path, capsys, disk_full_on, monkeypatch
):
    out = tmp_path / "out"
    disk_full_on("recipe.yaml")
    assert cli.main(prune_argv(model_dir, out)) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "--resume" in line
    assert WorkArea(out / WORK_DIR).finished_blocks() == 3
    monkeypatch.undo()
    method, pruned = get_method_class("safe+"), []  # the run's method (the default)
    original = method.prune_block
    monkeypatch.setattr(
        method, "prune_block", lambda self, ctx: pruned.append(ctx.index) or original(self, ctx)
    )
    assert cli.main(prune_argv(model_dir, out, "--resume")) == 0
    assert pruned == [] and (out / "model.safetensors").is_file()
    assert len(json.loads((out / "report.json").read_text())["blocks"]) == 3  # the saved ones


def test_disk_full_while_saving_a_block_keeps_the_blocks_before_it(
    model_dir, prune_argv, tmp_path, capsys, monkeypatch
):
    calls = []
    original = resume.save_file

    def save_file(tensors, path, *args):
        calls.append(path)
        if len(calls) == 3:  # block 0: weights, stream; block 1: weights -> disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return original(tensors, path, *args)

    monkeypatch.setattr(resume, "save_file", save_file)
    out = tmp_path / "out"
    assert cli.main(prune_argv(model_dir, out)) == 2
    line = _one_error_line(capsys)
    assert "cannot save block 1" in line and "No space left on device" in line
    assert "1 finished block(s) before it intact" in line
    work = WorkArea(out / WORK_DIR)
    assert work.finished_blocks() == 1
    assert not [p for p in (out / WORK_DIR).iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert cli.main(prune_argv(model_dir, out, "--resume")) == 0


def test_permission_denied_for_the_checkpoint_says_nothing_was_written(
    model_dir, prune_argv, tmp_path, capsys, monkeypatch
):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
    out = tmp_path / "new" / "out"
    assert cli.main(prune_argv(model_dir, out, "--method", "magnitude", "--max-blocks", "1")) == 2
    line = _one_error_line(capsys)
    assert "Permission denied" in line and "--resume" in line
    assert WorkArea(out / WORK_DIR).finished_blocks() == 1  # the pruned block is kept


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_parent_fails_with_one_line_and_writes_nothing(
    model_dir, prune_argv, tmp_path, capsys
):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert cli.main(prune_argv(model_dir, parent / "out", "--method", "magnitude")) == 2
        line = _one_error_line(capsys)
        assert "Permission denied" in line and "nothing of this run was saved" in line
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)

"""The bitmask export: packed bits, exact round trips, sizes, ``safe-llm export`` and
``safe_llm.load``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import safe_llm
from safe_llm import cli
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.io.export import (
    BITMASK_FILE,
    ExportError,
    export_bitmask,
    pack_bits,
    pack_state_dict,
    pack_tensor,
    unpack_bits,
    unpack_state_dict,
    unpack_tensor,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool((a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())


def _sparse(pattern: SparsityPattern, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` projected onto ``pattern`` with ``+0.0`` zeros (as the engine leaves them)."""
    projected = pattern.project(weight)
    return projected.masked_fill(projected == 0, 0.0)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_round_trips_any_length_and_uses_one_bit_per_entry(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_bits(packed, numel), mask)


def test_pack_bits_puts_entry_i_in_bit_i_mod_8_of_byte_i_div_8():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 3, 9]] = True
    assert pack_bits(mask).tolist() == [0b00001001, 0b00000010]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpacked_tensor_is_bitwise_identical_including_negative_zero_and_nan(dtype):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight = SparsityPattern.parse("2:4").project(weight)
    weight[0, 0], weight[0, 1], weight[1, 1] = -0.0, float("nan"), float("inf")
    values, mask = pack_tensor(weight)
    restored = unpack_tensor(values, mask, list(weight.shape), dtype)
    assert _bits_equal(restored, weight)
    assert torch.signbit(restored[0, 0]) and restored[0, 0] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "structure, sparsity", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.75)]
)
def test_packed_matrix_takes_one_minus_s_of_dense_plus_one_bit_per_value(
    dtype, structure, sparsity
):
    spec = SparsityPattern.parse(structure, sparsity)
    weight = _sparse(spec, torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
    stored, packed, sizes = pack_state_dict({"w": weight.to(dtype)})
    size = torch.finfo(dtype).bits // 8
    expected = (1 - spec.sparsity) + 1 / (8 * size)
    assert set(packed) == {"w"} and set(stored) == {"w::values", "w::mask"}
    assert sizes.packed_ratio == pytest.approx(expected, abs=1e-9)


def test_dense_vectors_and_integer_tensors_are_stored_as_they_are():
    tensors = {
        "dense": torch.randn(8, 8),
        "norm": torch.zeros(8),  # 1-D: never packed
        "ids": torch.zeros(4, 4, dtype=torch.int64),
        "sparse": _sparse(SparsityPattern.parse("2:4"), torch.randn(8, 8)),
    }
    stored, packed, _ = pack_state_dict(tensors)
    assert set(packed) == {"sparse"}
    assert {"dense", "norm", "ids"} <= set(stored)
    restored = unpack_state_dict(stored, packed)
    assert restored.keys() == tensors.keys()
    assert all(_bits_equal(restored[k], tensors[k]) for k in tensors)


def test_unpack_rejects_a_mask_that_does_not_match_the_values():
    values, mask = pack_tensor(_sparse(SparsityPattern.parse("2:4"), torch.randn(4, 8)))
    with pytest.raises(ExportError, match="set bits"):
        unpack_tensor(values[:-1], mask, [4, 8], torch.float32)


# --------------------------------------------------------------------------------------------
# a checkpoint: safe-llm export and safe_llm.load
# --------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(save_tiny_model, calibration_file, tmp_path):
    """A 2:4 bf16 checkpoint of a tiny Llama written by ``safe-llm prune`` (tied embeddings)."""
    model_dir = save_tiny_model(tie_word_embeddings=True)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--dataset", str(calibration_file)]
    argv += ["--nsamples", "2", "--seqlen", "16", "--structure", "2:4", "--dtype", "bfloat16"]
    assert cli.main([*argv, "--method", "magnitude", "--quiet", "--output", str(out)]) == 0
    return out


def _assert_same_model(model, checkpoint):
    expected = load_file(checkpoint / "model.safetensors")
    state = model.state_dict()
    for name, tensor in expected.items():
        assert _bits_equal(state[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("target", ["directory", "single file"])
def test_export_then_load_restores_the_exact_dense_model(checkpoint, tmp_path, target, capsys):
    output = tmp_path / ("exported" if target == "directory" else "model.safetensors")
    argv = ["export", "--format", "bitmask", str(checkpoint), "--output", str(output)]
    assert cli.main(argv) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    model = safe_llm.load(output)
    _assert_same_model(model, checkpoint)
    ids = torch.tensor([[1, 5, 9, 3]])
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_pruned_checkpoint_zeros_are_positive_so_the_mask_costs_one_bit_each(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    pruned = weights["model.layers.1.mlp.down_proj.weight"]
    assert (pruned == 0).float().mean() == 0.5
    assert not torch.signbit(pruned[pruned == 0]).any()


def test_exported_directory_keeps_config_tokenizer_and_card_but_no_dense_weights(
    checkpoint, tmp_path
):
    output = tmp_path / "exported"
    sizes = export_bitmask(checkpoint, output)
    names = {p.name for p in output.iterdir()}
    assert {BITMASK_FILE, "config.json", "tokenizer.json", "recipe.yaml", "README.md"} <= names
    assert "model.safetensors" not in names
    dense = (checkpoint / "model.safetensors").stat().st_size
    assert sizes.exported_bytes == (output / BITMASK_FILE).stat().st_size < dense
    assert sizes.packed_ratio == pytest.approx(0.5 + 1 / 16, abs=1e-9)  # 2:4 in bf16
    with safe_open(str(output / BITMASK_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["config"])["model_type"] == "llama"
    assert "model.layers.0.mlp.up_proj.weight" in json.loads(metadata["packed"])


def test_export_refuses_to_replace_an_existing_output_without_overwrite(checkpoint, tmp_path):
    output = tmp_path / "exported"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="--overwrite"):
        export_bitmask(checkpoint, output)
    assert (output / "keep.txt").read_text() == "precious"
    export_bitmask(checkpoint, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / BITMASK_FILE).is_file()


def test_loading_a_file_that_is_not_a_bitmask_export_says_so(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="not a safe-llm bitmask file"):
        safe_llm.load(checkpoint / "model.safetensors")
    with pytest.raises(ExportError, match="safe-llm export"):
        safe_llm.load(tmp_path / "nothing-here")


def test_export_of_a_directory_without_weights_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    argv = ["export", str(tmp_path / "empty"), "--output", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("safe-llm: error: ") and "no *.safetensors" in err
    assert not (tmp_path / "x").exists()


def test_sharded_checkpoint_is_read_whole(tmp_path):
    source = tmp_path / "sharded"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    first = _sparse(SparsityPattern.parse("2:4"), torch.randn(8, 8))
    save_file({"a": first}, str(source / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.randn(8, 8)}, str(source / "model-00002-of-00002.safetensors"))
    output = tmp_path / "one.safetensors"
    export_bitmask(source, output)
    from safe_llm.io.export import load_state_dict

    tensors, config = load_state_dict(output)
    assert set(tensors) == {"a", "b"} and torch.equal(tensors["a"], first)
    assert config == {"model_type": "llama"}


def test_a_failed_final_rename_keeps_the_previous_export_directory(
    checkpoint, tmp_path, monkeypatch
):
    output = tmp_path / "exported"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(f".{output.name}.tmp-"):
            raise OSError(28, "No space left on device", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(ExportError, match="nothing was changed"):
        export_bitmask(checkpoint, output, overwrite=True)
    assert (output / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

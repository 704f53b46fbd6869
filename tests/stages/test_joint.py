"""Joint reconstruction of windows of consecutive blocks (``--joint-blocks``), masks frozen."""

from __future__ import annotations

import pytest
import torch

from safe_llm.config import ConfigError, make_config
from safe_llm.core.blocks import find_blocks, prunable_layers
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.methods.magnitude import Magnitude
from safe_llm.stages.prune import engine
from safe_llm.stages.prune.joint import NonFiniteJointLossError, PruneOptions

PATTERNS = {
    "unstructured": SparsityPattern.parse("unstructured", 0.5),
    "2:4": SparsityPattern.parse("2:4", None),
}


def _windows(count: int = 16, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (count, seqlen), generator=torch.Generator().manual_seed(3))


def _prune(model, pattern, joint: PruneOptions | None = None):
    """Magnitude pruning (its masks do not depend on the data) with or without joint windows."""
    return engine.prune_model(
        model,
        _windows(),
        Magnitude(),
        pattern,
        engine.EngineOptions(
            device=torch.device("cpu"), batch_size=4, progress=False, joint=joint or PruneOptions()
        ),
    )


def _pruned_weights(model) -> dict[str, torch.Tensor]:
    _, blocks = find_blocks(model)
    return {
        f"{i}.{name}": layer.weight.detach().clone()
        for i, block in enumerate(blocks)
        for name, layer in prunable_layers(block).items()
    }


@pytest.mark.parametrize("structure", list(PATTERNS))
def test_joint_windows_keep_every_mask_bitwise_and_train_the_kept_weights(
    structure, make_tiny_llama
):
    pattern = PATTERNS[structure]
    alone = make_tiny_llama(num_hidden_layers=4)
    _prune(alone, pattern)
    jointly = make_tiny_llama(num_hidden_layers=4)
    report = _prune(jointly, pattern, PruneOptions(blocks=2, epochs=8, lr=1e-2, batch_size=4))

    windows = [b.extra for b in report.blocks if "joint_kept" in b.extra]
    assert [w["joint_first_block"] for w in windows] == [0.0, 2.0]
    assert any(w["joint_kept"] for w in windows), windows
    expected, got = _pruned_weights(alone), _pruned_weights(jointly)
    for name in expected:
        assert torch.equal(got[name] == 0, expected[name] == 0), name
        assert not torch.signbit(got[name][got[name] == 0]).any(), name  # +0.0 only
    changed = [n for n in expected if not torch.equal(got[n], expected[n])]
    assert changed, "the joint stage changed no weight"
    assert all(pattern.satisfied_by(w) for w in got.values())


def test_a_window_trained_with_lr_0_is_the_block_by_block_result_bit_for_bit(make_tiny_llama):
    pattern = PATTERNS["unstructured"]
    alone = make_tiny_llama(num_hidden_layers=4)
    _prune(alone, pattern)
    jointly = make_tiny_llama(num_hidden_layers=4)
    report = _prune(jointly, pattern, PruneOptions(blocks=2, lr=0.0, batch_size=4))

    assert [b.extra.get("joint_kept") for b in report.blocks] == [None, 0.0, None, 0.0]
    expected, got = alone.state_dict(), jointly.state_dict()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _last_block_outputs(model, windows: torch.Tensor) -> torch.Tensor:
    """The last decoder block's outputs ``[n, seq, d]`` (before the final norm)."""
    _, blocks = find_blocks(model)
    seen = []
    handle = blocks[-1].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(windows)
    handle.remove()
    return seen[0]


def test_the_window_is_scored_against_the_dense_window_on_the_held_out_windows(make_tiny_llama):
    """A window spanning the whole model: its inputs are the embeddings and its targets the
    dense model's last block outputs, so the errors can be written out independently."""
    pattern = PATTERNS["unstructured"]
    dense = make_tiny_llama(num_hidden_layers=2)
    pruned = make_tiny_llama(num_hidden_layers=2)
    _prune(pruned, pattern)
    jointly = make_tiny_llama(num_hidden_layers=2)
    options = PruneOptions(blocks=2, epochs=8, lr=1e-2, batch_size=4)
    extra = _prune(jointly, pattern, options).blocks[-1].extra

    held = _windows()[-2:]  # round(0.125 * 16) held-out windows: the last two
    target = _last_block_outputs(dense, held)

    def relative_error(model) -> float:
        out = _last_block_outputs(model, held)
        return float((out - target).square().sum() / target.square().sum())

    assert extra["joint_error_before"] == pytest.approx(relative_error(pruned), rel=1e-4)
    assert extra["joint_error_after"] == pytest.approx(relative_error(jointly), rel=1e-4)
    assert extra["joint_kept"] == 1.0
    assert extra["joint_error_after"] < extra["joint_error_before"]


class _RecordingMagnitude(Magnitude):
    """Magnitude pruning that keeps the inputs each block was given."""

    def __init__(self):
        super().__init__()
        self.inputs: dict[int, torch.Tensor] = {}

    def prune_block(self, ctx):
        self.inputs[ctx.index] = ctx.inputs.clone()
        return super().prune_block(ctx)


def test_the_block_after_a_window_reads_the_trained_windows_outputs(make_tiny_llama):
    model = make_tiny_llama(num_hidden_layers=3)
    method = _RecordingMagnitude()
    report = engine.prune_model(
        model,
        _windows(),
        method,
        PATTERNS["unstructured"],
        engine.EngineOptions(
            device=torch.device("cpu"),
            batch_size=4,
            progress=False,
            joint=PruneOptions(blocks=2, epochs=8, lr=1e-2, batch_size=4),
        ),
    )
    assert report.blocks[1].extra["joint_kept"] == 1.0
    _, blocks = find_blocks(model)
    seen = []
    handle = blocks[1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(_windows())
    handle.remove()
    trained_outputs = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    torch.testing.assert_close(method.inputs[2], trained_outputs, rtol=1e-5, atol=1e-5)


def test_a_window_whose_loss_turns_non_finite_stops_the_run_with_the_block_named(
    make_tiny_llama,
):
    model = make_tiny_llama(num_hidden_layers=2)
    with pytest.raises(NonFiniteJointLossError, match="from block 0.*--joint-lr"):
        _prune(model, PATTERNS["unstructured"], PruneOptions(blocks=2, lr=1e30, batch_size=4))


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"joint_blocks": 0}, "--joint-blocks"),
        ({"joint_blocks": 2, "joint_epochs": 0}, "--joint-epochs"),
        ({"joint_blocks": 2, "joint_lr": float("nan")}, "--joint-lr"),
        ({"joint_blocks": 2, "joint_lr": -1e-3}, "--joint-lr"),
    ],
)
def test_unusable_joint_options_are_refused_with_the_flag_named(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        make_config({"model": "x"}, overrides)

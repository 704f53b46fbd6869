"""BlockSpan: consecutive blocks with their calls and data, and the two spans built on it (a
method's one-block BlockContext, the joint reconstruction's Window)."""

import torch
from torch import nn

from safe_llm.core.capture import BlockCall, BlockSpan
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.methods.base import BlockContext
from safe_llm.stages.prune.joint import Window

CPU = torch.device("cpu")


def _blocks(count: int, d: int = 6) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(d, d) for _ in range(count)]


def _data(n: int = 7, seq: int = 3, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, seq, d, generator=gen), torch.randn(n, seq, d, generator=gen)


def test_a_span_runs_its_blocks_in_order_and_batches_its_windows_in_order():
    blocks, (x, y) = _blocks(3), _data()
    span = BlockSpan(blocks, [BlockCall()] * 3, x, y, CPU)
    with torch.no_grad():
        assert torch.equal(span.forward(x[:2]), blocks[2](blocks[1](blocks[0](x[:2]))))
    parts = list(span.batches(3))
    assert [len(inputs) for inputs, _ in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([inputs for inputs, _ in parts]), x)
    assert torch.equal(torch.cat([targets for _, targets in parts]), y)
    picked = torch.tensor([5, 0])
    assert all(
        torch.equal(a, b) for a, b in zip(span.batch(picked), (x[picked], y[picked]), strict=True)
    )
    assert span.parameters() == [p for block in blocks for p in block.parameters()]


def test_a_block_context_is_the_span_of_its_one_block():
    (block,), (x, y) = _blocks(1), _data()
    call = BlockCall()
    pattern = SparsityPattern.parse("unstructured", 0.5)
    ctx = BlockContext(0, block, {"w": block}, pattern, x, y, call, {}, CPU, 4, 0)
    assert isinstance(ctx, BlockSpan)
    assert ctx.blocks == [block] and ctx.block is block
    assert ctx.calls == [call] and ctx.call is call
    with torch.no_grad():
        assert torch.equal(ctx.forward(x), block(x))
    assert [len(inputs) for inputs, _ in ctx.batches()] == [4, 3]  # the context's batch size
    assert [len(inputs) for inputs, _ in ctx.batches(5)] == [5, 2]
    assert ctx.matrix("w").data_ptr() == block.weight.data_ptr()


def test_a_joint_window_is_a_span_of_several_blocks():
    blocks, (x, y) = _blocks(2), _data()
    window = Window(blocks, [BlockCall()] * 2, x, y, CPU, first=4, pruned=[])
    with torch.no_grad():
        assert torch.equal(window.forward(x), blocks[1](blocks[0](x)))
        # the relative error of the window against its own outputs is 0, against y not
        exact = Window(blocks, [BlockCall()] * 2, x, window.forward(x), CPU, first=4, pruned=[])
    every = torch.arange(len(x))
    assert exact.error(every, 3) < 1e-12  # batches of 3, not 7: rounding only
    assert window.error(every, 3) > 0.1

"""eval/bf16_quality.py's RoundedBF16: bf16 autocast's numerics for linear layers and
attention at fp32 speed, so the whole-model bf16-against-fp32 study can run on a CPU that
only emulates bf16."""

import torch
from bf16_quality import RoundedBF16
from torch.nn import functional as F


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 64, generator=generator, requires_grad=True)
    weight = torch.randn(48, 64, generator=generator, requires_grad=True)
    bias = torch.randn(48, generator=generator, requires_grad=True)
    return x, weight, bias


def test_linear_matches_real_bf16_autocast_and_not_fp32():
    x, weight, bias = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = F.linear(x, weight, bias)
    with RoundedBF16():
        emulated = F.linear(x, weight, bias)
    fp32 = F.linear(x, weight, bias)

    assert emulated.dtype == real.dtype == torch.bfloat16
    emulated_error = (emulated.float() - real.float()).abs().max()
    bf16_error = (fp32 - real.float()).abs().max()
    assert emulated_error <= 0.05 * bf16_error  # only the order of the fp32 sums differs


def test_gradients_flow_back_rounded_to_bf16():
    x, weight, bias = _inputs()
    with RoundedBF16():
        F.linear(x, weight, bias).float().square().sum().backward()

    assert weight.grad.dtype == torch.float32  # the master weights keep fp32 gradients
    assert torch.equal(weight.grad, weight.grad.to(torch.bfloat16).float())
    assert torch.equal(x.grad, x.grad.to(torch.bfloat16).float())


def test_attention_output_is_bf16_and_other_ops_are_untouched():
    q, k, v = (
        torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in (1, 2, 3)
    )
    with RoundedBF16():
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        product = q @ k.transpose(-1, -2)

    assert attention.dtype == torch.bfloat16
    reference = F.scaled_dot_product_attention(
        q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), is_causal=True
    )
    assert torch.equal(attention, reference.bfloat16())
    assert product.dtype == torch.float32
    assert torch.equal(product, q @ k.transpose(-1, -2))

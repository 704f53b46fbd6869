"""How fast the machine multiplies matrices, and what share of that a training run reaches.

A forward and backward pass of a transformer costs about ``6 x parameters`` FLOPs per token
(2 for the forward's matmuls, 4 for the backward's); :func:`flop_fraction` divides the FLOPs a
run achieved by the dense matmul rate of the same device and dtype, measured once
(:func:`matmul_flops`, a square matmul timed for a fraction of a second).
"""

from __future__ import annotations

import time

import torch

FLOPS_PER_TOKEN_PER_PARAMETER = 6  # forward 2 + backward 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def matmul_flops(
    device: torch.device | str, dtype: torch.dtype, size: int = 1024, seconds: float = 0.2
) -> float:
    """FLOP/s of ``[size, size] @ [size, size]`` matmuls in ``dtype`` on ``device``: one
    warm-up product, then products for about ``seconds``; ``2 size^3`` FLOPs each."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        count += 1
        if count % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * size**3 * count / elapsed


def flop_fraction(parameters: int, tokens_per_second: float, matmul_rate: float) -> float:
    """``6 x parameters x tokens/s`` over the matmul rate (FLOP/s): the share of the machine's
    dense matmul speed a forward + backward training run reaches."""
    return FLOPS_PER_TOKEN_PER_PARAMETER * parameters * tokens_per_second / matmul_rate

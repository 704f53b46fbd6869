"""The one decision about bf16: native hardware only, whatever the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from safe_llm.config import make_method
from safe_llm.core import precision
from safe_llm.io.models import resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Stub the CPU's capability check; returns a setter."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_is_native", lambda: native)
        precision._log_decision.cache_clear()
        precision._warn_emulated.cache_clear()

    return set_native


def _safe_autocast_dtype(choice: str) -> torch.dtype | None:
    """The dtype SAFE+'s training loss is computed in on the CPU with ``--autocast choice``
    (the reduced-precision flag SAFE hands the shared loss, turned into its autocast)."""
    from safe_llm.methods import safe

    seen = []
    method = make_method("safe+", {"autocast": choice})
    ctx = SimpleNamespace(device=CPU, forward=None, batch=None)
    original = safe.mse_loss_and_grads
    try:
        safe.mse_loss_and_grads = lambda *args: seen.append(args[4])
        method._loss_and_grads(ctx, [], None)
    finally:
        safe.mse_loss_and_grads = original
    with precision.bf16_autocast(CPU, seen[0]):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_bf16):
    cpu_bf16(False)
    assert precision.reduced_precision("auto", CPU, "test") is False
    assert _safe_autocast_dtype("auto") is None


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_bf16):
    cpu_bf16(True)
    assert precision.reduced_precision("auto", CPU, "test") is True
    assert _safe_autocast_dtype("auto") == torch.bfloat16


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(RuntimeWarning, match="no native bf16.*slower"):
        assert precision.reduced_precision("bf16", CPU, "SAFE autocast") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.reduced_precision("bf16", CPU, "SAFE autocast")  # once per process


def test_explicit_bf16_on_a_native_cpu_does_not_warn(cpu_bf16):
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.reduced_precision("bf16", CPU, "test") is True


def test_off_is_fp32_everywhere(cpu_bf16):
    cpu_bf16(True)
    assert precision.reduced_precision("off", CPU, "test") is False
    assert _safe_autocast_dtype("off") is None


def test_dtype_bfloat16_on_an_emulating_cpu_warns_and_auto_stays_fp32(cpu_bf16):
    cpu_bf16(False)
    assert resolve_dtype("auto", CPU) == torch.float32
    with pytest.warns(RuntimeWarning, match="--dtype bfloat16"):
        assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


def test_the_capability_check_runs_for_real_and_agrees_with_onednn():
    native = precision.cpu_bf16_is_native()
    assert isinstance(native, bool)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert native is False
    info = precision.describe(CPU)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["bf16_native"] is native


def test_a_cpu_limited_to_avx2_is_not_native():
    # the plain AVX2 machine, on any CPU: oneDNN and ATen held to AVX2
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = "from safe_llm.core import precision; print(precision.cpu_bf16_is_native())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"

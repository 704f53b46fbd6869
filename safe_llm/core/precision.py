"""The one decision about reduced precision: bf16 only where the hardware computes it.

On CUDA bf16 is always native. On a CPU it is native only with AVX-512-BF16 or AMX (x86)
or the ARM BF16 extension, and oneDNN must be able to use it; elsewhere torch emulates bf16
matmuls about 60x slower than fp32. Every ``auto`` (the model's ``--dtype``, SAFE's
``--autocast``) asks :func:`native_bf16` and so chooses fp32 on such a CPU; an explicit bf16
there still runs, after a one-line warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import warnings

import torch

log = logging.getLogger(__name__)

_X86 = ("x86_64", "amd64", "i386", "i686")


def cpu_capability() -> str:
    """Torch's report of the CPU's vector ISA, e.g. ``AVX2``, ``AVX512``, ``DEFAULT``."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def cpu_bf16_is_native() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (cached for the process).

    Decided from torch's own capability report, no timing: oneDNN must support bf16 on this
    CPU (``ONEDNN_MAX_CPU_ISA`` can forbid it), and on x86 the CPU must have AVX-512-BF16 or
    AMX tiles (plain AVX-512 only emulates bf16).
    """
    if not torch.backends.mkldnn.is_available():
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in _X86:
        return bool(
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
    return True


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (always on CUDA)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return cpu_bf16_is_native()
    return False


def reduced_precision(choice: str, device: torch.device, what: str) -> bool:
    """Resolve a ``auto``/``bf16``/``off`` choice for ``what`` (e.g. ``"SAFE autocast"``).

    ``auto`` is bf16 exactly where :func:`native_bf16` says so; the decision is logged once
    per ``(what, device)``. ``bf16`` on a device that emulates it warns once and stays bf16.
    """
    if choice == "off":
        return False
    native = native_bf16(device)
    if choice == "auto":
        _log_decision(what, str(device), native)
        return native
    if not native:
        _warn_emulated(what, str(device))
    return True


def bf16_autocast(device: torch.device | str, on: bool, cache: bool = True):
    """bf16 autocast on ``device`` when ``on`` (parameters stay in their dtype), else none.
    Enter it around one step: its cache of bf16 weight copies (``cache``) lives until it
    exits. Without the cache each use casts again (the same values): under activation
    checkpointing no bf16 copy of the whole model is held."""
    if not on:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=cache)


@functools.cache
def _log_decision(what: str, device: str, native: bool) -> None:
    if native:
        log.info("%s: bf16 on %s (computed natively)", what, device)
    else:
        log.info(
            "%s: fp32 on %s (CPU capability %s has no native bf16; bf16 would be emulated, "
            "about 60x slower)",
            what,
            device,
            cpu_capability(),
        )


@functools.cache
def _warn_emulated(what: str, device: str) -> None:
    warnings.warn(
        f"{what}: bf16 was asked for, but {device} (CPU capability {cpu_capability()}) has no "
        "native bf16: torch emulates it, typically 30-60x slower than fp32. Use 'auto' to let "
        "the toolkit pick fp32 here.",
        RuntimeWarning,
        stacklevel=3,
    )


def describe(device: torch.device) -> dict:
    """What the run's report records about the machine's precision support."""
    info = {"device": str(device), "bf16_native": native_bf16(device)}
    if device.type == "cpu":
        info["cpu_capability"] = cpu_capability()
    return info

"""The decode kernel: a C++ extension built on first use, and the path this CPU takes.

``csrc/sparse_linear.cpp`` is compiled by ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler; cached under torch's extensions directory, ``$TORCH_EXTENSIONS_DIR``, so a process
after the first loads it in a second). Paths, best first:

- ``avx512``: AVX-512 with VBMI2 (masked expand-loads decompress a row into registers);
- ``avx2``: 8-bit mask -> permutation table with ``_mm256_permutevar8x32_ps``;
- ``scalar``: plain C++ (ARM and any other CPU);
- ``torch``: no extension: decompress tile by tile and use the dense GEMM.

The CPU's own report decides (``__builtin_cpu_supports``), logged once. A missing compiler or
ninja, or a failed build, is one warning naming what is missing, then the ``torch`` path.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from safe_llm.core.precision import cpu_capability
from safe_llm.errors import SafeLLMError
from safe_llm.inference.format import INDEX_BITS, CompressedMatrix

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_linear.cpp"
NAME = "safe_llm_sparse_linear"
PATHS = ("avx512", "avx2", "scalar", "torch")
_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}
DECODE_ROWS = 8  # at most this many activation rows go through the kernel


class KernelError(SafeLLMError):
    """A kernel path that this machine cannot run was asked for."""


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks, each with how to get it."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler}; Debian/Ubuntu: apt-get install g++)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja, or apt-get install ninja-build)")
    return missing


def _compile():
    from torch.utils.cpp_extension import load

    return load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)


def build() -> list[str]:
    """Build the extension now (setup scripts: ``scripts/setup.sh``) and return the paths this
    CPU runs; :class:`KernelError` naming what is missing or why the build failed."""
    missing = missing_tools()
    if missing:
        raise KernelError(f"cannot build the sparse kernel: missing {' and '.join(missing)}")
    try:
        return [*_compile().cpu_paths(), "torch"]
    except Exception as exc:  # the build raises RuntimeError / CalledProcessError / OSError
        raise KernelError(f"building the sparse kernel failed: {exc}") from exc


@functools.cache
def extension():
    """The compiled extension module, or None after one warning saying why."""
    fallback = "sparse layers use the pure-PyTorch tile path (correct, slower to decode)"
    missing = missing_tools()
    if missing:
        log.warning(
            "cannot build the sparse kernel: missing %s; %s", " and ".join(missing), fallback
        )
        return None
    try:
        return _compile()
    except Exception as exc:  # the build raises RuntimeError / CalledProcessError / OSError
        detail = " ".join(str(exc).split())[-300:]
        log.warning("building the sparse kernel failed (%s); %s", detail, fallback)
        return None


def cpu_paths() -> list[str]:
    """The paths this machine can run, best first (``torch`` always)."""
    module = extension()
    return [*module.cpu_paths(), "torch"] if module is not None else ["torch"]


@functools.cache
def best_path() -> str:
    """The path ``auto`` takes here, logged once with what the CPU reports."""
    path = cpu_paths()[0]
    why = {
        "avx512": "the CPU has AVX-512 with VBMI2 (masked expand)",
        "avx2": "the CPU has AVX2 but not AVX-512 VBMI2: the permutation-table kernel",
        "scalar": "no AVX2 or AVX-512 here: the portable C++ kernel",
        "torch": "no compiled kernel: tile-by-tile decompression",
    }[path]
    log.info("sparse decode path: %s (%s; torch reports %s)", path, why, cpu_capability())
    return path


def resolve_path(path: str) -> str:
    """``auto`` -> :func:`best_path`; a named path must be one this machine runs."""
    if path == "auto":
        return best_path()
    if path not in PATHS:
        raise KernelError(f"unknown sparse kernel path {path!r}; choose auto, {', '.join(PATHS)}")
    if path not in cpu_paths():
        raise KernelError(
            f"sparse kernel path {path!r} does not run here (this machine runs "
            f"{', '.join(cpu_paths())}); use --kernel auto"
        )
    return path


def decoder(matrix: CompressedMatrix, path: str):
    """The compiled ``path``'s product for ``matrix`` (``avx512``, ``avx2`` or ``scalar``):
    a function ``x [rows <= DECODE_ROWS, in] -> x @ W.T [rows, out]`` in ``x``'s dtype, its
    weight arguments bound once (a decode step calls it for every layer)."""
    module, code = extension(), _CODES[path]
    if matrix.codes is None:
        args = (matrix.values, matrix.mask, matrix.row_offsets, code)
        return functools.partial(module.bitmask_matmul, *args)
    bits = INDEX_BITS[matrix.m]
    args = (matrix.values, matrix.codes, matrix.n, matrix.m, bits, code)
    return functools.partial(module.nm_matmul, *args)


def tiled(x: torch.Tensor, matrix: CompressedMatrix, tile_bytes: int) -> torch.Tensor:
    """``x [rows, in] @ W.T`` with W decompressed ``tile_bytes`` at a time into a dense tile
    and multiplied by the dense GEMM: nothing larger than one tile is ever dense."""
    out, width = matrix.shape
    step = max(1, tile_bytes // (width * x.element_size()))
    y = x.new_empty(x.shape[0], out)
    for first in range(0, out, step):
        last = min(first + step, out)
        y[:, first:last] = x @ matrix.rows(first, last).to(x.dtype).t()
    return y

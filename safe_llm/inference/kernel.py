"""The decode kernel: a C++ extension built on first use, and the path this CPU takes.

``csrc/sparse_linear.cpp`` is compiled by ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler; cached under torch's extensions directory, ``$TORCH_EXTENSIONS_DIR``, so a process
after the first loads it in a second). Paths (the layout they read: :mod:`safe_llm.inference.format`):

- ``avx512``: AVX-512 with VBMI2: a plain load, then the register-form expand fills a register
  with 16 output rows' weights; bf16 values multiply with ``_mm512_dpbf16_ps`` where the CPU
  has AVX-512-BF16, else as two fp32 halves;
- ``avx512-load``: the same with the memory-source expand-load (slow on some AMD CPUs, one
  instruction fewer elsewhere);
- ``avx2``: 8-bit mask -> permutation table with ``_mm256_permutevar8x32_ps``;
- ``scalar``: plain C++ (ARM and any other CPU);
- ``torch``: no extension: decompress tile by tile and use the dense GEMM.

Which paths the CPU can run is its own report (``__builtin_cpu_supports``); which one a
matrix takes is measured (:mod:`safe_llm.inference.autotune`). A missing compiler or ninja,
or a failed build, is one warning naming what is missing, then the ``torch`` path.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from safe_llm.errors import SafeLLMError
from safe_llm.inference import format as layout
from safe_llm.inference.format import TILE, CompressedMatrix

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_linear.cpp"
NAME = "safe_llm_sparse_linear"
PATHS = ("avx512", "avx512-load", "avx2", "scalar", "torch")
_CODES = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512-load": 3}
DECODE_ROWS = 8  # at most this many activation rows go through the kernel
# at::parallel_for is OpenMP in torch's CPU builds: without -fopenmp its pragma is ignored and
# every product runs on one thread
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_id() -> str:
    """What identifies a build of the kernel: its source, flags and torch's version."""
    import hashlib

    text = SOURCE.read_bytes() + " ".join([*CFLAGS, *LDFLAGS, torch.__version__]).encode()
    return hashlib.sha256(text).hexdigest()[:12]


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

    return load(
        name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False
    )


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
    """The paths this machine can run (``torch`` always, last)."""
    module = extension()
    return [*module.cpu_paths(), "torch"] if module is not None else ["torch"]


def native_bf16_kernel() -> bool:
    """Whether the ``avx512`` paths multiply bf16 with AVX-512-BF16's ``dpbf16``."""
    module = extension()
    return bool(module is not None and module.native_bf16())


def check_path(path: str) -> str:
    """``auto`` (measured per matrix) or a path this machine runs; :class:`KernelError`
    for anything else, naming what runs here."""
    if path == "auto":
        return path
    if path not in PATHS:
        raise KernelError(f"unknown sparse kernel path {path!r}; choose auto, {', '.join(PATHS)}")
    if path not in cpu_paths():
        raise KernelError(
            f"sparse kernel path {path!r} does not run here (this machine runs "
            f"{', '.join(cpu_paths())}); use --kernel auto"
        )
    return path


def default_path() -> str:
    """The path a matrix takes when nothing was measured: the first the CPU runs."""
    return cpu_paths()[0]


def decoder(matrix: CompressedMatrix, path: str):
    """The compiled ``path``'s product for ``matrix`` (any path but ``torch``): a function
    ``x [rows <= DECODE_ROWS, in] -> x @ W.T [rows, out]`` in ``x``'s dtype, its weight
    arguments bound once (a decode step calls it for every layer)."""
    args = (matrix.values, matrix.mask, matrix.tile_offsets, matrix.shape[0], _CODES[path])
    return functools.partial(extension().tiled_matmul, *args)


def compress(weight: torch.Tensor, dtype: torch.dtype | None = None) -> CompressedMatrix:
    """:func:`safe_llm.inference.format.compress`, compiled where the extension is."""
    return layout.compress(weight, dtype, extension())


def relayout(matrix: CompressedMatrix, dtype: torch.dtype) -> CompressedMatrix:
    """:func:`safe_llm.inference.format.relayout`, compiled where the extension is."""
    return layout.relayout(matrix, dtype, extension())


def dense_tiles(matrix: CompressedMatrix, first: int, last: int) -> torch.Tensor:
    """Rows ``[16 first, 16 last)`` of ``matrix`` dense: compiled where the extension is."""
    module = extension()
    if module is None:
        return matrix.dense_tiles(first, last)
    out, width = matrix.shape
    args = (matrix.values, matrix.mask, matrix.tile_offsets, out, width, first, last)
    return module.decompress_tiles(*args)


def tiled(x: torch.Tensor, matrix: CompressedMatrix, tile_bytes: int) -> torch.Tensor:
    """``x [rows, in] @ W.T`` with W decompressed about ``tile_bytes`` at a time into a dense
    band of rows and multiplied by the dense GEMM: nothing larger than one band is dense."""
    out, width = matrix.shape
    step = max(1, tile_bytes // (TILE * width * matrix.values.element_size()))
    y = x.new_empty(x.shape[0], out)
    for first in range(0, matrix.tiles, step):
        last = min(first + step, matrix.tiles)
        rows = slice(first * TILE, min(last * TILE, out))
        y[:, rows] = x @ dense_tiles(matrix, first, last).to(x.dtype).t()
    return y

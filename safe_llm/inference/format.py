"""The compressed form of one pruned ``[out, in]`` matrix, as the sparse kernels read it.

One layout for every pattern, the **tiled bitmask**: the rows are cut into tiles of
:data:`TILE` (16); a tile is walked along the input dimension in steps of ``G`` inputs (``G``
= 2 for bfloat16 values, 1 for float32) and each step has one mask word of ``16 * G`` bits,
bit ``G * r + i`` set where ``W[16 t + r, G s + i]`` is kept. ``values`` holds each tile's kept
values in the order of its set bits, tile after tile; ``tile_offsets [tiles + 1]`` locates
each tile's first value. One expand of a step's values therefore fills a SIMD register with
the weights of 16 output rows for ``G`` inputs in the order the multiply wants (for bfloat16,
the lane pairs of ``_mm512_dpbf16_ps``), and a tile's 16 row sums stay in one register across
the whole input dimension. ``mask`` is uint8 ``[tiles, steps * 2 * G]`` (each word
little-endian).

At sparsity ``s`` it holds ``(1 - s)`` of the dense value bytes plus one bit per weight. N:M
matrices use it too: an N:M index costs ``log2(m)`` bits per kept value (2:4: 1 bit per
weight, 4:8: 1.5), the bitmask one bit per weight, so the bitmask is never larger and one
kernel serves both; ``kind`` still says which pattern a matrix follows.

``values`` ends with :data:`PAD` zeros: the kernels load a whole register (up to 32 values)
from a step's first value. Built from a dense pruned weight (:func:`compress`) or from
``safe-llm export``'s values and flat bitmask (:func:`from_export`); the checkpoint formats on
disk are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safe_llm.io.export import pack_bits, stored_mask, unpack_bits

TILE = 16  # output rows per tile
PAD = 32  # zeros after the values: a kernel loads up to 32 values from a step's first one
NM_PATTERNS = ((2, 4), (4, 8))  # the patterns a matrix is labelled with when it fits one
NM_MIN_FILL = 0.9  # labelled N:M only when keeping at least this fraction of n / m
DTYPES = (torch.float32, torch.bfloat16)


def group(dtype: torch.dtype) -> int:
    """Inputs per tile step for values of ``dtype``: 2 for bfloat16 (a dpbf16 pair), else 1."""
    return 2 if dtype == torch.bfloat16 else 1


@dataclass
class CompressedMatrix:
    """One matrix in :mod:`this format <safe_llm.inference.format>`."""

    shape: tuple[int, int]
    values: torch.Tensor  # [kept + PAD], float32 or bfloat16
    kept: int
    mask: torch.Tensor  # uint8 [tiles, steps * 2 * G]
    tile_offsets: torch.Tensor  # int64 [tiles + 1]
    kind: str = "bitmask"  # or the N:M pattern the matrix follows ("2:4", "4:8")

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def tiles(self) -> int:
        return self.mask.shape[0]

    @property
    def density(self) -> float:
        """Non-zero fraction."""
        return self.kept / max(self.shape[0] * self.shape[1], 1)

    @property
    def nbytes(self) -> int:
        """Bytes held: values, mask and tile offsets."""
        tensors = (self.values, self.mask, self.tile_offsets)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_tiles(self, first: int, last: int) -> torch.Tensor:
        """Rows ``[16 first, min(16 last, out))`` dense, ``[rows, in]``: one prefill tile,
        in pure PyTorch (the compiled ``decompress_tiles`` does the same faster)."""
        out, width = self.shape
        g, count = group(self.dtype), last - first
        steps = self.mask.shape[1] // (2 * g)
        words = self.mask[first:last].reshape(-1)
        keep = unpack_bits(words, words.numel() * 8).view(count, steps, TILE * g)
        tiled = torch.zeros(count, steps, TILE * g, dtype=self.dtype)
        start, stop = int(self.tile_offsets[first]), int(self.tile_offsets[last])
        tiled[keep] = self.values[start:stop]
        dense = tiled.view(count, steps, TILE, g).permute(0, 2, 1, 3).reshape(count * TILE, -1)
        return dense[: min(last * TILE, out) - first * TILE, :width]

    def to_dense(self) -> torch.Tensor:
        """The whole matrix dense (tests and small matrices only)."""
        return self.dense_tiles(0, self.tiles)


def _tile_order(weight: torch.Tensor, g: int) -> torch.Tensor:
    """``[out, in]`` -> ``[tiles, steps, 16 * g]`` in the layout's order (zero-padded)."""
    out, width = weight.shape
    tiles, steps = -(-out // TILE), -(-width // g)
    padded = F.pad(weight, (0, steps * g - width, 0, tiles * TILE - out))
    return padded.view(tiles, TILE, steps, g).permute(0, 2, 1, 3).reshape(tiles, steps, -1)


def nm_kind(weight: torch.Tensor, density: float, compiled=None) -> str:
    """The N:M pattern a pruned ``weight [out, in]`` follows (``"2:4"``, ``"4:8"``), else
    ``"bitmask"``; a matrix much sparser than ``n / m`` fits 2:4 too but is not labelled."""
    width = weight.shape[1]
    for n, m in NM_PATTERNS:
        if width % m or density < NM_MIN_FILL * n / m:
            continue
        if compiled is not None:
            most = compiled.group_max_kept(weight, m)
        else:
            most = int(stored_mask(weight).view(weight.shape[0], -1, m).sum(-1).max())
        if most <= n:
            return f"{n}:{m}"
    return "bitmask"


def compress(
    weight: torch.Tensor, dtype: torch.dtype | None = None, compiled=None
) -> CompressedMatrix:
    """The compressed form of a dense ``[out, in]`` weight (zeros are the pruned entries),
    values cast to ``dtype`` (default: the weight's; float32 or bfloat16). ``compiled``: the
    kernel extension, whose ``compress_tiles`` builds the same layout in one pass over the
    weight (:func:`safe_llm.inference.kernel.compress` passes it); without it, PyTorch ops
    (slower, about two extra copies of the weight at peak)."""
    dtype = dtype or weight.dtype
    if dtype not in DTYPES:
        raise ValueError(f"sparse values must be float32 or bfloat16, not {dtype}")
    weight = weight.detach().to(dtype).contiguous()
    if compiled is not None:
        values, mask, offsets = compiled.compress_tiles(weight, PAD)
    else:
        values, mask, offsets = _compress_reference(weight)
    kept = int(offsets[-1])
    kind = nm_kind(weight, kept / max(weight.numel(), 1), compiled)
    return CompressedMatrix(tuple(weight.shape), values, kept, mask, offsets, kind)


def _compress_reference(weight: torch.Tensor):
    """``(values [kept + PAD], mask, tile_offsets)`` of ``weight`` in PyTorch ops."""
    tiled = _tile_order(weight, group(weight.dtype))
    keep = stored_mask(tiled).view(tiled.shape)
    offsets = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(keep.sum((1, 2)), 0, out=offsets[1:])
    return F.pad(tiled[keep], (0, PAD)), pack_bits(keep).view(keep.shape[0], -1), offsets


def export_dense(
    values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of ``safe-llm export``'s ``::values`` and flat
    ``::mask`` (:func:`safe_llm.io.export.pack_tensor`), in ``dtype``."""
    out, width = shape
    dense = torch.zeros(out * width, dtype=dtype)
    dense[unpack_bits(packed, out * width)] = values.to(dtype)
    return dense.view(out, width)


def from_export(
    values: torch.Tensor,
    packed: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype,
    compiled=None,
) -> CompressedMatrix:
    """The compressed matrix from an export's values and flat mask, through one dense copy of
    the matrix (the loader's "plus one tensor")."""
    return compress(export_dense(values, packed, shape, dtype), compiled=compiled)


def relayout(matrix: CompressedMatrix, dtype: torch.dtype, compiled=None) -> CompressedMatrix:
    """``matrix`` with its values in ``dtype`` (the layout depends on the dtype: a model's
    ``.to(dtype)``), rebuilt through its dense form."""
    if dtype == matrix.dtype:
        return matrix
    return compress(matrix.to_dense(), dtype, compiled)

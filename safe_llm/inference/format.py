"""The compressed form of one pruned ``[out, in]`` matrix, as the sparse kernels read it.

Two layouts, both with the kept values in the model's dtype, row-major:

- **bitmask** (unstructured): ``values [nnz]`` and ``mask [out, ceil(in / 8)]`` uint8, bit
  ``j % 8`` of byte ``j // 8`` of row ``r`` set where ``W[r, j]`` is kept (each row starts on a
  byte, so a row is decoded on its own); ``row_offsets [out + 1]`` locates each row's values.
  At sparsity ``s`` it takes ``(1 - s)`` of the dense bytes plus 1 bit per weight.
- **N:M** (2:4, 4:8): every group of ``m`` consecutive inputs keeps ``n``; ``values
  [out * in * n / m]`` (a group's values by ascending index) and ``codes [out, bytes]`` uint8,
  each group's ``n`` in-group indices as ``ceil(log2 m)``-bit numbers packed little-endian along
  the row (2:4: 1 bit per weight; 4:8: 1.5). A group with fewer than ``n`` non-zeros stores
  explicit zeros.

``values`` ends with :data:`PAD` zeros and every ``codes`` row with 4 zero bytes: the AVX2
kernel loads 8 values at a time and the N:M decoder reads 4 code bytes at a time.

Built from a dense pruned weight (:func:`compress`) or from ``safe-llm export``'s flat values
and bitmask (:func:`from_export`) without forming the dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safe_llm.io.export import pack_bits, stored_mask, unpack_bits

PAD = 32  # zeros after the values: the AVX2 kernel reads up to 7 past a row's last kept value
CODE_PAD = 4  # zero bytes after each codes row: the N:M decoder reads 4 bytes at a time
NM_PATTERNS = ((2, 4), (4, 8))  # tried in this order; a matrix that fits one is stored N:M
NM_MIN_FILL = 0.9  # N:M only for a matrix keeping at least this fraction of n / m
INDEX_BITS = {2: 1, 4: 2, 8: 3}  # bits of one in-group index for each m
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


@dataclass
class CompressedMatrix:
    """One matrix in :mod:`this format <safe_llm.inference.format>`; ``mask`` for the bitmask
    layout, ``codes`` (with ``n``, ``m``) for N:M."""

    shape: tuple[int, int]
    values: torch.Tensor  # [kept + PAD]
    kept: int
    mask: torch.Tensor | None = None  # uint8 [out, ceil(in / 8)]
    codes: torch.Tensor | None = None  # uint8 [out, code bytes + CODE_PAD]
    n: int = 0
    m: int = 0
    row_offsets: torch.Tensor | None = None  # int64 [out + 1], bitmask layout only

    @property
    def kind(self) -> str:
        return f"{self.n}:{self.m}" if self.codes is not None else "bitmask"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def density(self) -> float:
        """Non-zero fraction (for N:M the pattern's ``n / m``)."""
        return self.kept / max(self.shape[0] * self.shape[1], 1)

    @property
    def nbytes(self) -> int:
        """Bytes held: values, mask or codes, row offsets."""
        tensors = (self.values, self.mask, self.codes, self.row_offsets)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def rows(self, first: int, last: int) -> torch.Tensor:
        """The dense rows ``[first, last)``, ``[last - first, in]``: one tile, for the tiled
        GEMM and the pure-PyTorch path."""
        if self.codes is not None:
            return _nm_rows(self, first, last)
        count, width = last - first, self.shape[1]
        bits = unpack_bits(self.mask[first:last].reshape(-1), self.mask[first:last].numel() * 8)
        bits = bits.view(count, -1)[:, :width]
        dense = torch.zeros(count, width, dtype=self.dtype)
        start, stop = int(self.row_offsets[first]), int(self.row_offsets[last])
        dense[bits] = self.values[start:stop]
        return dense

    def to_dense(self) -> torch.Tensor:
        """The whole matrix dense (tests and small matrices only)."""
        return self.rows(0, self.shape[0])


def _nm_rows(matrix: CompressedMatrix, first: int, last: int) -> torch.Tensor:
    count, width = last - first, matrix.shape[1]
    n, m = matrix.n, matrix.m
    index = _unpack_indices(matrix.codes[first:last], width // m * n, INDEX_BITS[m])
    values = matrix.values[first * (width // m * n) : last * (width // m * n)]
    dense = torch.zeros(count, width // m, m, dtype=matrix.dtype)
    dense.scatter_(2, index.view(count, -1, n), values.view(count, -1, n))
    return dense.view(count, width)


def _unpack_indices(codes: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """uint8 ``[rows, bytes]`` -> int64 ``[rows, count]``: ``count`` ``bits``-bit numbers."""
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).view(codes.shape[0], -1)
    stream = stream[:, : count * bits].view(codes.shape[0], count, bits).long()
    return (stream << torch.arange(bits)).sum(-1)


def _pack_rows(bits: torch.Tensor, pad_bytes: int = 0) -> torch.Tensor:
    """Bool ``[rows, k]`` -> uint8 ``[rows, ceil(k / 8) + pad_bytes]``, each row from a byte."""
    rows, k = bits.shape
    bits = torch.nn.functional.pad(bits, (0, -k % 8 + 8 * pad_bytes))
    return pack_bits(bits).view(rows, -1)


def _fits(row_mask: torch.Tensor, n: int, m: int, width: int) -> bool:
    """Whether a row bitmask keeps at most ``n`` of every ``m`` (from byte popcounts)."""
    if width % 8 or width % m:
        return False
    if m == 8:
        counts = _POPCOUNT[row_mask.long()]
    else:  # m in (2, 4): the groups are bit fields of each byte
        fields = [(row_mask >> (m * i)) & ((1 << m) - 1) for i in range(8 // m)]
        counts = _POPCOUNT[torch.stack(fields).long()]
    return bool((counts <= n).all())


def _bitmask(row_mask: torch.Tensor, values: torch.Tensor, shape) -> CompressedMatrix:
    counts = _POPCOUNT[row_mask.long()].sum(1, dtype=torch.int64)
    offsets = torch.zeros(shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    padded = torch.nn.functional.pad(values, (0, PAD))
    return CompressedMatrix(
        tuple(shape), padded, values.numel(), mask=row_mask, row_offsets=offsets
    )


def _nm(keep: torch.Tensor, values: torch.Tensor, n: int, m: int) -> CompressedMatrix:
    """N:M form of a bool ``keep [out, in]`` (at most ``n`` per group) and its kept values:
    groups with fewer than ``n`` take their first dropped positions as explicit zeros."""
    out, width = keep.shape
    groups = keep.view(out, width // m, m)
    missing = n - groups.sum(-1, keepdim=True)
    extra = ~groups & ((~groups).cumsum(-1) <= missing)
    chosen = groups | extra
    full = torch.zeros(out * width // m * n, dtype=values.dtype)
    full[groups[chosen]] = values  # the kept ones among the chosen, in row-major order
    index = torch.arange(m).expand_as(chosen)[chosen].view(out, -1)
    bits = (index.unsqueeze(-1) >> torch.arange(INDEX_BITS[m])) & 1
    codes = _pack_rows(bits.view(out, -1).bool(), CODE_PAD)
    padded = torch.nn.functional.pad(full, (0, PAD))
    return CompressedMatrix((out, width), padded, full.numel(), codes=codes, n=n, m=m)


def from_mask(
    row_mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], nm: bool = True
) -> CompressedMatrix:
    """The compressed matrix from its row bitmask (uint8 ``[out, ceil(in / 8)]``) and kept
    values ``[nnz]``; N:M when the mask fits one of :data:`NM_PATTERNS` and ``nm``, and keeps
    close to ``n / m`` (a much sparser matrix fits 2:4 too, but is smaller as a bitmask)."""
    out, width = shape
    density = values.numel() / max(out * width, 1)
    for n, m in NM_PATTERNS if nm else ():
        if density >= NM_MIN_FILL * n / m and _fits(row_mask, n, m, width):
            keep = unpack_bits(row_mask.reshape(-1), out * width).view(out, width)
            return _nm(keep, values, n, m)
    return _bitmask(row_mask, values, shape)


def compress(weight: torch.Tensor, dtype: torch.dtype | None = None) -> CompressedMatrix:
    """The compressed form of a dense ``[out, in]`` weight (zeros are the pruned entries),
    values cast to ``dtype`` (default: the weight's)."""
    weight = weight.detach()
    keep = stored_mask(weight).view(weight.shape)
    values = weight[keep].to(dtype or weight.dtype)
    return from_mask(_pack_rows(keep), values, tuple(weight.shape))


def from_export(
    values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> CompressedMatrix:
    """The compressed matrix from ``safe-llm export``'s ``::values`` and flat ``::mask``
    (:func:`safe_llm.io.export.pack_tensor`) of an ``[out, in]`` matrix. When ``in`` is a
    multiple of 8 the export's mask already is the row bitmask (no copy); otherwise the bits
    are re-aligned to rows (a bool mask, never dense values)."""
    out, width = shape
    if width % 8 == 0:
        row_mask = packed[: out * width // 8].view(out, width // 8)
    else:
        row_mask = _pack_rows(unpack_bits(packed, out * width).view(out, width))
    return from_mask(row_mask, values.to(dtype), (out, width))

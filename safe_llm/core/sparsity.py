"""Sparsity patterns: which entries of a weight matrix survive, given an importance score.

Every method turns its importance scores into a keep-mask through :class:`SparsityPattern`,
so exact counts, N:M groups and per-row comparisons are implemented once.

Weights follow ``nn.Linear`` layout: ``[out_features, in_features]``; N:M groups run along the
input dimension (consecutive columns of a row), as sparse tensor cores expect.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from safe_llm.errors import SafeLLMError


class PatternError(SafeLLMError):
    """A sparsity pattern that cannot be built or cannot be applied to a matrix."""


@dataclass(frozen=True)
class SparsityPattern:
    """Target sparsity of one matrix.

    ``n``/``m`` set for N:M (keep ``n`` of every ``m`` consecutive inputs), else unstructured
    with fraction ``sparsity`` of entries set to zero. ``per_row``: an unstructured count is
    kept in every output row (Wanda's comparison group) instead of over the whole matrix
    (:meth:`counting_per_row`); N:M groups are per row anyway.
    """

    sparsity: float
    n: int | None = None
    m: int | None = None
    per_row: bool = False

    def __post_init__(self):
        if (self.n is None) != (self.m is None):
            raise PatternError(f"N:M needs both N and M, got n={self.n}, m={self.m}")
        if self.n is not None and not 0 < self.n < self.m:
            raise PatternError(f"N:M needs 0 < N < M, got {self.n}:{self.m}")
        if not 0.0 < self.sparsity < 1.0:  # also rejects NaN
            raise PatternError(
                f"sparsity must be strictly between 0 and 1, got {self.sparsity}; "
                "e.g. --sparsity 0.5 for 50%"
            )

    @classmethod
    def parse(cls, structure: str, sparsity: float | None = None) -> SparsityPattern:
        """Build from a CLI-style structure string: ``unstructured``, ``2:4``, ``4:8``..."""
        structure = structure.strip().lower()
        if structure == "unstructured":
            if sparsity is None or not 0.0 < sparsity < 1.0:
                raise PatternError(
                    f"sparsity must be strictly between 0 and 1, got {sparsity}; "
                    "e.g. --sparsity 0.5 for 50%"
                )
            return cls(sparsity=float(sparsity))
        match = re.fullmatch(r"(\d+):(\d+)", structure)
        if not match:
            raise PatternError(
                f"unknown structure {structure!r}; use 'unstructured' or N:M such as '2:4'"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise PatternError(f"N:M needs 0 < N < M, got {n}:{m}")
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise PatternError(
                f"--sparsity {sparsity} contradicts structure {n}:{m} (which means {implied:g}); "
                "drop --sparsity or make them agree"
            )
        return cls(sparsity=implied, n=n, m=m)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"{self.sparsity:.0%} unstructured" + (" per row" if self.per_row else "")

    @property
    def structure(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def counting_per_row(self, per_row: bool = True) -> SparsityPattern:
        """The same pattern, its unstructured count kept per row (or over the matrix)."""
        return dataclasses.replace(self, per_row=per_row)

    def check_shape(self, shape: tuple[int, ...], name: str = "matrix") -> None:
        """Raise :class:`PatternError` when a ``[out, in]`` matrix cannot take this pattern."""
        if len(shape) != 2:
            raise PatternError(f"{name}: expected a 2-D weight, got shape {tuple(shape)}")
        if self.is_nm and shape[1] % self.m:
            raise PatternError(
                f"{name}: in_features={shape[1]} is not divisible by M={self.m} for {self}; "
                "pick another N:M or exclude the layer with --ignore"
            )

    def kept_count(self, numel: int) -> int:
        """Entries kept out of ``numel`` for unstructured sparsity (exact, round-half-even)."""
        return int(round((1.0 - self.sparsity) * numel))

    def keep_mask(self, scores: torch.Tensor, per_row: bool | None = None) -> torch.Tensor:
        """Boolean keep-mask, same shape as ``scores`` ``[out, in]``; largest scores survive.

        Unstructured keeps exactly :meth:`kept_count` entries of the matrix (``per_row=False``)
        or of every row (``per_row=True``, Wanda's comparison group); ``None``: the pattern's
        own :attr:`per_row`. N:M keeps the ``n`` largest of each group of ``m`` consecutive
        columns; ``per_row`` does not change it. Counts are exact: entries tied with the last
        kept score are taken by position.
        """
        per_row = self.per_row if per_row is None else per_row
        self.check_shape(tuple(scores.shape))
        rows, cols = scores.shape
        scores = scores.float()
        if self.is_nm:
            groups = scores.reshape(rows, cols // self.m, self.m)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(2, groups.topk(self.n, dim=2).indices, True)
            return keep.reshape(rows, cols)
        if per_row:
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep.scatter_(1, scores.topk(self.kept_count(cols), dim=1).indices, True)
            return keep
        flat = scores.flatten()
        return _keep_largest(flat, self.kept_count(flat.numel())).reshape(rows, cols)

    def project(
        self,
        weight: torch.Tensor,
        importance: torch.Tensor | None = None,
        per_row: bool | None = None,
    ) -> torch.Tensor:
        """Projection onto the sparse set: zero all but the kept entries of ``weight``.

        ``importance`` is an optional per-input-feature weighting ``[in]`` (e.g. activation
        norms ``||X_j||``); the score is then ``|W_ij| * importance_j`` (SAFE+ / Wanda).
        """
        scores = weight.detach().abs().float()
        if importance is not None:
            scores = scores * importance.to(scores.device, torch.float32).unsqueeze(0)
        return weight * self.keep_mask(scores, per_row=per_row).to(weight.dtype)

    def satisfied_by(self, weight: torch.Tensor, per_row: bool | None = None) -> bool:
        """Whether ``weight`` has at least this pattern's zeros (counted as :meth:`keep_mask`
        keeps them: per row when ``per_row``, ``None`` meaning the pattern's own)."""
        per_row = self.per_row if per_row is None else per_row
        nonzero = weight.detach() != 0
        rows, cols = nonzero.shape
        if self.is_nm:
            per_group = nonzero.reshape(rows, cols // self.m, self.m).sum(dim=2)
            return bool((per_group <= self.n).all())
        if per_row:
            return bool((nonzero.sum(dim=1) <= self.kept_count(cols)).all())
        return int(nonzero.sum()) <= self.kept_count(nonzero.numel())


def _keep_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of ``flat`` ``[n]`` with exactly ``k`` entries set at its largest values;
    of the entries equal to the ``k``-th largest, the first by position fill the count (the
    same mask on every device).

    The ``k``-th largest value comes from ``kthvalue`` on a CPU (about 4x faster there than
    ``topk`` with ``k = n / 2``) and from ``topk`` elsewhere (on CUDA ``kthvalue`` was about
    100x slower than ``topk`` for a 4096 x 11008 matrix, measured on an H200)."""
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(flat, k > 0, dtype=torch.bool)
    threshold = _kth_largest(flat, k, by_topk=flat.device.type != "cpu")
    keep = flat > threshold  # fewer than k entries
    missing = k - int(keep.sum())
    keep[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    return keep


def _kth_largest(flat: torch.Tensor, k: int, by_topk: bool) -> torch.Tensor:
    """The ``k``-th largest value of ``flat`` (a 0-d tensor), by ``topk`` or ``kthvalue``."""
    if by_topk:
        return flat.topk(k, sorted=False).values.min()
    return flat.kthvalue(flat.numel() - k + 1).values


def achieved_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight == 0).sum()) / weight.numel()

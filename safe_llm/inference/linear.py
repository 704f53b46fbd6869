"""Modules that compute from a compressed weight: :class:`SparseLinear` for a linear layer,
:class:`SparseExperts` for a fused 3-D expert parameter. Inference only (no gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safe_llm.errors import SafeLLMError
from safe_llm.inference import kernel
from safe_llm.inference.format import CompressedMatrix

TILE_BYTES = 4 << 20  # the largest dense tile prefill forms (4 MiB)
_BUFFERS = ("values", "mask", "tile_offsets")


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W [out, in]`` held only in compressed form.

    Up to :data:`~safe_llm.inference.kernel.DECODE_ROWS` rows of ``x`` (decoding) go through
    the compiled kernel's ``path`` (``auto``: the first this CPU runs; ``load_sparse`` passes
    the one it measured fastest); more rows (prefill), and every call on the ``torch`` path,
    decompress ``tile_bytes`` of ``W`` at a time and use the dense GEMM.
    """

    def __init__(
        self,
        matrix: CompressedMatrix,
        bias: torch.Tensor | None = None,
        path: str = "auto",
        tile_bytes: int = TILE_BYTES,
    ):
        super().__init__()
        self.out_features, self.in_features = matrix.shape
        path = kernel.check_path(path)
        self.path = kernel.default_path() if path == "auto" else path
        self.tile_bytes = tile_bytes
        self.matrix = matrix
        for name in _BUFFERS:  # buffers: .to() / state_dict
            self.register_buffer(name, getattr(matrix, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._bind()

    def _bind(self) -> None:
        compiled = self.path != "torch"
        self._decode = kernel.decoder(self.matrix, self.path) if compiled else None

    def _apply(self, fn, recurse=True):
        layout_dtype = self.matrix.dtype
        super()._apply(fn, recurse)
        values = self._buffers["values"]
        if values.dtype != layout_dtype:  # the layout depends on the dtype: rebuild it
            self.matrix = kernel.relayout(self.matrix, values.dtype)
            for name in _BUFFERS:
                self._buffers[name] = getattr(self.matrix, name)
        for name in _BUFFERS:
            setattr(self.matrix, name, self._buffers[name])
        self._bind()
        return self

    @property
    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.matrix.nbytes + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``."""
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= kernel.DECODE_ROWS and self._decode is not None:
            y = self._decode(rows)
        else:
            y = kernel.tiled(rows, self.matrix, self.tile_bytes)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        m = self.matrix
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{m.kind}, density={m.density:.3f}, dtype={m.dtype}, path={self.path}"
        )


class ExpertMatrix:
    """One expert's matrix of a :class:`SparseExperts`, as the experts module's own forward
    sees ``param[e]``: ``F.linear(x, param[e])`` (layout ``[out, in]``) or ``x @ param[e]``
    (transposed layout ``[in, out]``) run its :class:`SparseLinear` (``__torch_function__``)."""

    def __init__(self, linear: SparseLinear, transposed: bool):
        self.linear, self.transposed = linear, transposed

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], cls) and not args[1].transposed:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = args[1].linear(args[0])
            return y if bias is None else y + bias
        products = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
        if func in products and isinstance(args[1], cls) and args[1].transposed:
            return args[1].linear(args[0])
        raise SafeLLMError(
            f"a sparse expert matrix was used in {getattr(func, '__name__', func)}; only "
            "F.linear(x, w) / x @ w are supported: load this model dense (--dense)"
        )


class SparseExperts(nn.Module):
    """A fused expert parameter ``[E, out, in]`` (or ``[E, in, out]``, ``transposed``) held as
    one :class:`SparseLinear` per expert; indexing gives an :class:`ExpertMatrix`, and an
    experts module that multiplies every expert at once (Llama-4's ``bmm(x [E, T, in],
    param)``) gets each expert's product, stacked."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        products = (torch.bmm, torch.matmul, torch.Tensor.__matmul__)
        if func in products and isinstance(args[1], cls) and args[1].transposed:
            x, experts = args[0], args[1].experts
            return torch.stack([expert(x[e]) for e, expert in enumerate(experts)])
        raise SafeLLMError(
            f"sparse experts were used in {getattr(func, '__name__', func)}; only "
            "bmm(x, param) is supported: load this model dense (--dense)"
        )

    def __init__(self, experts: list[SparseLinear], transposed: bool, shape: torch.Size):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.transposed = transposed
        self.shape = torch.Size(shape)

    def __getitem__(self, expert) -> ExpertMatrix:
        return ExpertMatrix(self.experts[int(expert)], self.transposed)

    def __len__(self) -> int:
        return len(self.experts)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts)

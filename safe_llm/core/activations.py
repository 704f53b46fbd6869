"""Where the engine's ``[n, seq, d]`` activation streams live: on the compute device, on the
host, or in memory-mapped files of a temporary directory (above a byte budget)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Activations:
    """Allocates the engine's ``[n, seq, d]`` streams: on ``storage``, or in memory-mapped
    files of a temporary directory under ``spill_root`` (removed by :meth:`close`)."""

    def __init__(self, storage: torch.device, spill_root: str | Path | None = None):
        self.storage = storage
        self.spill: Path | None = None
        if spill_root is not None:
            Path(spill_root).mkdir(parents=True, exist_ok=True)
            self.spill = Path(tempfile.mkdtemp(prefix=".safe_llm-activations-", dir=spill_root))
        self.count = 0

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self.spill is None:
            return torch.empty(shape, dtype=dtype, device=self.storage)
        self.count += 1
        path = self.spill / f"stream{self.count}.bin"
        flat = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype)
        return flat.view(shape)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.empty(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        return out

    def close(self) -> None:
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)


def activations_for(
    storage: torch.device, stream_bytes: int, budget: int | None, spill_root: str | Path | None
) -> Activations:
    """Spill to disk when the streams (``stream_bytes`` in all) exceed ``budget`` bytes."""
    if budget is None or stream_bytes <= budget:
        return Activations(storage)
    log.info(
        "calibration activations (%.2f GB) exceed --max-activation-memory (%.2f GB): "
        "memory-mapping them",
        stream_bytes / 1e9,
        budget / 1e9,
    )
    return Activations(torch.device("cpu"), spill_root or tempfile.gettempdir())


def storage_device(device: torch.device, bytes_needed: int) -> torch.device:
    """Keep activations on the compute device when they take under half its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if bytes_needed < free // 2 else torch.device("cpu")


class CapturedStreams:
    """The :class:`Activations` of ``count`` ``[n, seq, d]`` streams, made when the capture
    knows their shape; its first buffer receives the captured first-block inputs batch by
    batch, so they are never held whole outside it (memory-mapped above ``budget`` bytes)."""

    def __init__(
        self, device: torch.device, count: int, budget: int | None, spill_dir: str | Path | None
    ):
        self.device, self.count, self.budget, self.spill_dir = device, count, budget, spill_dir
        self.space: Activations | None = None

    def allocate(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        one_stream = math.prod(shape) * dtype.itemsize
        storage = storage_device(self.device, one_stream * self.count)
        self.space = activations_for(storage, one_stream * self.count, self.budget, self.spill_dir)
        return self.space.empty(shape, dtype)

    def close(self) -> None:
        if self.space is not None:
            self.space.close()

"""Reading a pruned model one tensor at a time: a checkpoint directory (safetensors, one file
or shards) or ``safe-llm export``'s bitmask file/directory, whose packed matrices are handed
over as values + mask without being expanded.

Files are read with plain reads into memory of each tensor's own, not mapped: a mapped
file's pages stay resident in the process (counted in its RSS) while the mapping lives, so a
loader that maps the checkpoint peaks at the stored file's size however small the model it
keeps (the format: an 8-byte little-endian header length, a JSON header, the tensors' bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import torch

from safe_llm.io.export import BITMASK_FILE, FORMAT, VERSION, ExportError, unpack_tensor

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """One ``.safetensors`` file's tensors by name, each read into a fresh tensor."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
        except (struct.error, ValueError) as exc:
            self._file.close()
            raise ExportError(f"cannot read {path}: not a safetensors file ({exc})") from exc
        self._metadata = header.pop("__metadata__", None) or {}
        self._entries, self._start = header, 8 + length

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict:
        return self._metadata

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ExportError(f"{self.path}: {name} has an unsupported dtype {entry['dtype']}")
        first, last = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
        self._file.seek(self._start + first)
        done = 0
        while done < last - first:
            count = self._file.readinto(buffer[done:])
            if not count:
                raise ExportError(f"{self.path} ends inside {name}: the file is truncated")
            done += count
        return tensor

    def mapped(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as a private (copy-on-write) map of the file: its pages become
        resident only as they are read (an input embedding: one row per token), or None
        where the tensor's offset does not suit its dtype."""
        entry = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        first, last = entry["data_offsets"]
        start = self._start + first
        if dtype is None or start % dtype.itemsize or last == first:
            return None
        size = start + last - first
        whole = torch.from_file(str(self.path), shared=False, size=size, dtype=torch.uint8)
        return whole[start:].view(dtype).view(entry["shape"])

    def close(self) -> None:
        self._file.close()


class TensorSource:
    """The tensors of a checkpoint or export by name, read on demand.

    ``config`` is the model's ``config.json`` as a dict; ``names`` every tensor's name as the
    model's state dict spells it; ``packed`` the export's packed matrices
    (``{name: {"shape", "dtype"}}``, empty for a plain checkpoint); ``directory`` where the
    tokenizer may be (None for a single exported file).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        bitmask = path / BITMASK_FILE if path.is_dir() else path
        if bitmask.is_file() and bitmask.suffix == ".safetensors":
            self._open_export(bitmask)
            self.directory = path if path.is_dir() else None
        elif (path / "config.json").is_file():
            self._open_checkpoint(path)
            self.directory = path
        else:
            raise ExportError(
                f"{path} is neither a checkpoint directory (config.json + *.safetensors) nor "
                f"a bitmask export ({BITMASK_FILE} or a .safetensors file from safe-llm export)"
            )

    def _open(self, file: Path) -> SafetensorsFile:
        try:
            handle = SafetensorsFile(file)
        except OSError as exc:
            raise ExportError(f"cannot read {file}: {exc}") from exc
        self._stack.callback(handle.close)
        return handle

    def _open_export(self, file: Path) -> None:
        handle = self._open(file)
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise ExportError(
                f"{file} is not a safe-llm bitmask file of version {VERSION} "
                f"(format {metadata.get('format')}, version {metadata.get('version')})"
            )
        self.config = json.loads(metadata["config"])
        self.packed = json.loads(metadata["packed"])
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            self._files[name.split("::")[0]] = handle

    def _open_checkpoint(self, directory: Path) -> None:
        self.config = json.loads((directory / "config.json").read_text())
        self.packed = {}
        files = [f for f in sorted(directory.glob("*.safetensors")) if f.name != BITMASK_FILE]
        if not files:
            raise ExportError(f"{directory} has no *.safetensors weights")
        for file in files:
            handle = self._open(file)
            for name in handle.keys():  # noqa: SIM118
                self._files[name] = handle

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` dense (a packed matrix is unpacked: one tensor at a time)."""
        if name in self.packed:
            values, mask = self.packed_parts(name)
            info = self.packed[name]
            return unpack_tensor(values, mask, info["shape"], getattr(torch, info["dtype"]))
        return self._files[name].get_tensor(name)

    def mapped(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` mapped from its file (:meth:`SafetensorsFile.mapped`) when it is
        stored in ``dtype``, else read as :meth:`tensor` does."""
        handle = self._files[name]
        if name not in self.packed and isinstance(handle, SafetensorsFile):
            tensor = handle.mapped(name)
            if tensor is not None and tensor.dtype == dtype:
                return tensor
        return self.tensor(name)

    def packed_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [nnz], flat packed mask)`` of an exported matrix."""
        handle = self._files[name]
        return handle.get_tensor(f"{name}::values"), handle.get_tensor(f"{name}::mask")

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

"""Reading a pruned model one tensor at a time: a checkpoint directory (safetensors, one file
or shards) or ``safe-llm export``'s bitmask file/directory, whose packed matrices are handed
over as values + mask without being expanded."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from safe_llm.io.export import BITMASK_FILE, FORMAT, VERSION, ExportError, unpack_tensor


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory of its own: a tensor safetensors maps from the file would keep
    the whole file's pages resident in the process (counted in its RSS) while it lives."""
    return tensor.clone()


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

    def _open(self, file: Path):
        try:
            return self._stack.enter_context(safe_open(str(file), framework="pt"))
        except Exception as exc:  # safetensors raises its own error types
            raise ExportError(f"cannot read {file}: {exc}") from exc

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

    def tensor(self, name: str, own: bool = True) -> torch.Tensor:
        """The tensor ``name`` dense (a packed matrix is unpacked: one tensor at a time);
        ``own=False``: possibly a view of the file, for a tensor only read and dropped."""
        if name in self.packed:
            values, mask = self.packed_parts(name)
            info = self.packed[name]
            return unpack_tensor(values, mask, info["shape"], getattr(torch, info["dtype"]))
        tensor = self._files[name].get_tensor(name)
        return _owned(tensor) if own else tensor

    def packed_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [nnz], flat packed mask)`` of an exported matrix."""
        handle = self._files[name]
        return _owned(handle.get_tensor(f"{name}::values")), _owned(
            handle.get_tensor(f"{name}::mask")
        )

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

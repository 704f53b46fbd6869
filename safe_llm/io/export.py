"""The compact bitmask format, and :func:`load` that restores the exact dense model from it.

A sparse matrix ``W`` (``numel`` entries, ``nnz`` of them non-zero) is stored as

- ``<name>::values``: its non-zero entries in row-major order, ``[nnz]``, in ``W``'s dtype;
- ``<name>::mask``: one bit per entry, packed little-endian into ``[ceil(numel / 8)]`` uint8.

"Non-zero" is decided on the bit pattern, so ``-0.0`` (and NaN) are values and the dense tensor
comes back bit for bit. Every floating tensor with two or more dimensions whose packed form is
smaller is packed; every other tensor is stored as it is. At sparsity ``s`` a packed matrix
takes ``(1 - s)`` of its dense bytes plus ``1 / (8 * bytes per value)`` for the mask (1/16 for
fp16/bf16, 1/32 for fp32).

The file is one safetensors file whose metadata holds ``format``, ``version``, the packed
tensors' shapes and dtypes (``packed``) and the model's ``config.json`` (``config``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safe_llm.core.atomic import atomic_directory, atomic_write
from safe_llm.errors import SafeLLMError

FORMAT = "safe_llm.bitmask"
VERSION = "1"
BITMASK_FILE = "model.bitmask.safetensors"
_BIT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


class ExportError(SafeLLMError):
    """A checkpoint that cannot be exported or a bitmask file that cannot be loaded."""


@dataclass
class ExportSizes:
    """Bytes of tensor data: the dense checkpoint's and the export's (file size)."""

    dense_bytes: int
    exported_bytes: int
    packed_dense_bytes: int  # the packed matrices, dense
    packed_bytes: int  # the packed matrices: values + masks

    @property
    def ratio(self) -> float:
        return self.exported_bytes / max(self.dense_bytes, 1)

    @property
    def packed_ratio(self) -> float:
        return self.packed_bytes / max(self.packed_dense_bytes, 1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[numel]`` -> uint8 ``[ceil(numel / 8)]``; bit ``i % 8`` of byte ``i // 8``."""
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[ceil(numel / 8)]`` -> bool ``[numel]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[:numel].bool()


def stored_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Bool ``[numel]``: entries whose bit pattern is not all zeros (``-0.0`` counts)."""
    flat = tensor.detach().reshape(-1)
    return flat.view(_BIT_VIEW[flat.element_size()]) != 0


def pack_tensor(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [nnz], packed mask [ceil(numel / 8)] uint8)`` of any tensor."""
    mask = stored_mask(tensor)
    return tensor.detach().reshape(-1)[mask].clone(), pack_bits(mask)


def unpack_tensor(
    values: torch.Tensor, packed: torch.Tensor, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The dense tensor ``shape`` back from :func:`pack_tensor`'s output, bit for bit."""
    numel = int(torch.Size(shape).numel())
    mask = unpack_bits(packed, numel)
    if int(mask.sum()) != values.numel():
        raise ExportError(f"mask has {int(mask.sum())} set bits but {values.numel()} values")
    dense = torch.zeros(numel, dtype=dtype, device=values.device)
    dense[mask] = values.to(dtype)
    return dense.view(shape)


def worth_packing(tensor: torch.Tensor) -> bool:
    """Floating, at least 2-D, and smaller packed: ``nnz * size + numel / 8 < numel * size``."""
    if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0:
        return False
    size = tensor.element_size()
    nnz = int(stored_mask(tensor).sum())
    return nnz * size + (tensor.numel() + 7) // 8 < tensor.numel() * size


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_state_dict(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict, ExportSizes]:
    """``(stored tensors, packed metadata {name: {shape, dtype}}, sizes)``."""
    stored, packed = {}, {}
    sizes = ExportSizes(0, 0, 0, 0)
    for name, tensor in tensors.items():
        sizes.dense_bytes += tensor.numel() * tensor.element_size()
        if "::" in name:
            raise ExportError(f"tensor name {name!r} contains '::', reserved by the format")
        if not worth_packing(tensor):
            stored[name] = tensor.contiguous()
            continue
        values, mask = pack_tensor(tensor)
        stored[f"{name}::values"], stored[f"{name}::mask"] = values, mask
        packed[name] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        sizes.packed_dense_bytes += tensor.numel() * tensor.element_size()
        sizes.packed_bytes += values.numel() * values.element_size() + mask.numel()
    return stored, packed, sizes


def unpack_state_dict(stored: dict[str, torch.Tensor], packed: dict) -> dict[str, torch.Tensor]:
    """The dense tensors back from :func:`pack_state_dict`'s first two results."""
    tensors = {name: t for name, t in stored.items() if "::" not in name}
    for name, info in packed.items():
        try:
            values, mask = stored[f"{name}::values"], stored[f"{name}::mask"]
        except KeyError as exc:
            raise ExportError(f"bitmask file lacks {exc.args[0]}") from exc
        tensors[name] = unpack_tensor(values, mask, info["shape"], getattr(torch, info["dtype"]))
    return tensors


def read_checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (one file or shards)."""
    files = sorted(checkpoint.glob("*.safetensors"))
    files = [f for f in files if f.name != BITMASK_FILE]
    if not files:
        raise ExportError(f"{checkpoint} has no *.safetensors weights to export")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensors[name] = handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise ExportError(f"cannot read {file}: {exc}") from exc
    return tensors


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; pass --overwrite to replace it")


def export_bitmask(
    checkpoint: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> ExportSizes:
    """Write ``checkpoint`` (a directory with ``config.json`` and safetensors weights) in the
    bitmask format: into directory ``output`` (with the other files: config, tokenizer, model
    card...) or, when ``output`` ends in ``.safetensors``, as that one file. Atomic."""
    checkpoint, output = Path(checkpoint).expanduser(), Path(output).expanduser()
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    _check_output(output, overwrite)
    stored, packed, sizes = pack_state_dict(read_checkpoint_tensors(checkpoint))
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "packed": json.dumps(packed),
        "config": (checkpoint / "config.json").read_text(),
    }
    try:
        if output.suffix == ".safetensors":
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(output, lambda tmp: save_file(stored, str(tmp), metadata))
        else:
            _write_directory(checkpoint, output, stored, metadata)
    except OSError as exc:
        raise ExportError(
            f"cannot write {output}: {exc.strerror or exc}; nothing was changed there"
        ) from exc
    file = output if output.suffix == ".safetensors" else output / BITMASK_FILE
    sizes.exported_bytes = file.stat().st_size
    return sizes


def _write_directory(checkpoint: Path, output: Path, stored: dict, metadata: dict) -> None:
    """The non-weight files of ``checkpoint`` plus the bitmask file, put in ``output``'s place
    only once complete (:func:`~safe_llm.core.atomic.atomic_directory`)."""

    def fill(tmp: Path) -> None:
        for path in checkpoint.iterdir():
            if path.is_file() and not any(path.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(path, tmp / path.name)
        save_file(stored, str(tmp / BITMASK_FILE), metadata)

    atomic_directory(output, fill)


def _bitmask_file(path: Path) -> Path:
    file = path / BITMASK_FILE if path.is_dir() else path
    if not file.is_file():
        raise ExportError(f"{path} has no {BITMASK_FILE}: write one with safe-llm export")
    return file


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(dense tensors, config.json as a dict)`` from a bitmask file or directory."""
    file = _bitmask_file(Path(path).expanduser())
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        stored = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"cannot read {file}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ExportError(
            f"{file} is not a safe-llm bitmask file (format {metadata.get('format')})"
        )
    if metadata.get("version") != VERSION:
        raise ExportError(
            f"{file} has bitmask format version {metadata.get('version')}; "
            f"this safe-llm reads version {VERSION}"
        )
    return unpack_state_dict(stored, json.loads(metadata["packed"])), json.loads(metadata["config"])


def _needs_conversion(tensors: dict[str, torch.Tensor], config_dict: dict) -> bool:
    """Whether the checkpoint stores some parameters in another layout than the model holds
    them (transformers writes some fused expert parameters as per-expert keys and fuses them
    again when it loads)."""
    from transformers import AutoConfig

    config = dict(config_dict)
    model_type = config.pop("model_type", None)
    if model_type is None:
        return False
    with torch.device("meta"):
        names = set(_empty_model(AutoConfig.for_model(model_type, **config)).state_dict())
    return not set(tensors) <= names


def _load_converted(tensors: dict[str, torch.Tensor], config_dict: dict):
    """The model through ``from_pretrained`` (which converts the stored layout), from the
    unpacked tensors written next to the config in a temporary directory: the conversions
    are copies, so every tensor keeps its bits."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="safe-llm-bitmask-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config_dict))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp, "model.safetensors"))
        )
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto")
    model.eval()
    return model


def _empty_model(config):
    """The model class of ``config`` with its parameters allocated but not initialised."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout: pay for the random initialisation
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config)


def load(path: str | os.PathLike):
    """The exact dense model (a ``transformers`` causal LM, eval mode, on the CPU) from a
    bitmask file or directory written by ``safe-llm export``; every tensor comes back with
    its bits and dtype."""
    from transformers import AutoConfig

    tensors, config_dict = load_state_dict(path)
    if _needs_conversion(tensors, config_dict):
        return _load_converted(tensors, config_dict)
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise ExportError(f"{path}: the embedded config.json has no model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = _empty_model(config)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    params = list(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params if name in tensors}
    missing = [name for name, p in params if name not in tensors and id(p) not in loaded]
    if missing or result.unexpected_keys:
        raise ExportError(
            f"{path} does not match its config: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.eval()
    return model

"""Models larger than host memory: an empty skeleton, blocks read from safetensors one at a time.

The skeleton is built on the meta device (accelerate's ``init_empty_weights``); everything
outside the decoder blocks (embeddings, final norm, head) is read into memory. The engine asks
:class:`DiskBlocks` for block ``i``: its tensors are read from the shards with ``safe_open``
and dropped again when the engine gives the block back, after the work area
(:meth:`safe_llm.io.work_area.WorkArea.save`) has written the pruned block. :func:`write_weights`
then assembles the checkpoint's shards from the work area, a few blocks at a time. Peak host
memory is one block + the calibration activations + the non-block modules, whatever the depth.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from safe_llm.core.atomic import atomic_write
from safe_llm.core.blocks import find_blocks
from safe_llm.core.experts import expert_layout
from safe_llm.core.memory import return_freed_memory
from safe_llm.io.models import ModelError, load_tokenizer, resolve_model_path
from safe_llm.io.work_area import WorkArea

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointFiles:
    """The tensors of a local safetensors checkpoint (one file or an indexed set of shards)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise ModelError(
                f"--stream-from-disk needs safetensors weights in {self.directory} "
                f"({SINGLE_FILE} or {INDEX_FILE}); convert the model with save_pretrained first"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        """Every tensor name, in the checkpoint's order."""
        return list(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Fresh host tensors of ``names``, each file opened once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.directory / file), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).clone()
        return out


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``module`` by ``value`` in the old one's dtype."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value.to(old.dtype), old.requires_grad)
    else:
        owner._buffers[attr] = value.to(owner._buffers[attr].dtype)


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(
                f"{where}: tensor {name} contains NaN or Inf; the checkpoint is corrupt"
            )


def load_skeleton(
    name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[nn.Module, object, CheckpointFiles]:
    """The model with empty (meta) decoder blocks and everything else loaded, its tokenizer
    and its checkpoint files. ``name`` must resolve to a local directory with safetensors."""
    from accelerate import init_empty_weights

    path, _ = resolve_model_path(name)
    if not Path(path).is_dir():
        raise ModelError(
            f"--stream-from-disk needs a local model directory, not {name!r}; download it "
            f"first (e.g. hf download {name} --local-dir DIR)"
        )
    files = CheckpointFiles(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    prefix, _ = find_blocks(model)
    outside = [
        k for k in model.state_dict(keep_vars=True) if not k.startswith(prefix + ".") and k in files
    ]
    tensors = files.read(outside)
    _check_finite(tensors, name)
    for key, value in tensors.items():
        _set_tensor(model, key, value)
    model.tie_weights()
    empty = [
        k
        for k, v in model.state_dict(keep_vars=True).items()
        if v.is_meta and not k.startswith(prefix + ".")
    ]
    if empty:
        raise ModelError(f"{name}: tensor {empty[0]} is not in its safetensors files")
    tokenizer = load_tokenizer(path, name, trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, files


class DiskBlocks:
    """A :class:`safe_llm.stages.prune.engine.BlockSource` that reads each block of a skeleton from disk."""

    def __init__(self, model: nn.Module, files: CheckpointFiles):
        self.prefix, self.blocks = find_blocks(model)
        self.files = files

    def keys(self, index: int) -> dict[str, str]:
        """``{checkpoint key: name inside the block}`` of block ``index``'s tensors."""
        names = self.blocks[index].state_dict(keep_vars=True)
        keys = {f"{self.prefix}.{index}.{n}": n for n in names}
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise ModelError(
                f"tensor {missing[0]} is not in the safetensors files"
                + (
                    "; the checkpoint stores the experts in another layout (per-expert keys, "
                    "which transformers fuses when it loads): --stream-from-disk reads only "
                    "the in-memory layout, prune this model without it"
                    if any(expert_layout(m) is not None for m in self.blocks[index].modules())
                    else ""
                )
            )
        return keys

    def load(self, index: int) -> nn.Module:
        block = self.blocks[index]
        keys = self.keys(index)
        tensors = self.files.read(keys)
        _check_finite(tensors, f"block {index}")
        for key, value in tensors.items():
            _set_tensor(block, keys[key], value)
        return block

    def release(self, index: int) -> None:
        block = self.blocks[index]
        for name, tensor in block.state_dict(keep_vars=True).items():
            _set_tensor(block, name, torch.empty_like(tensor, device="meta"))
        return_freed_memory()


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def write_weights(
    model: nn.Module,
    files: CheckpointFiles,
    work: WorkArea,
    pruned_blocks: int,
    directory: Path,
    max_shard_size: int,
) -> None:
    """Write the streamed model's ``config.json`` and safetensors shards into ``directory``.

    Blocks ``< pruned_blocks`` come from the work area, the rest (``--max-blocks``) from the
    input checkpoint; the keys are the input checkpoint's (tied weights stay tied). Shards hold
    whole blocks, up to ``max_shard_size`` bytes (or one block when a block is larger).
    """
    source = DiskBlocks(model, files)
    state = model.state_dict(keep_vars=True)
    outside = [k for k in files.names() if k in state and not k.startswith(source.prefix + ".")]
    groups: list[tuple[list[int], int]] = [([], _nbytes(state[k] for k in outside))]
    for index, block in enumerate(source.blocks):
        size = _nbytes(block.state_dict(keep_vars=True).values())
        if groups[-1][0] and groups[-1][1] + size > max_shard_size:
            groups.append(([], 0))
        groups[-1] = (groups[-1][0] + [index], groups[-1][1] + size)
    names = [
        SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        for i in range(len(groups))
    ]
    weight_map: dict[str, str] = {}
    for shard, (indices, _) in enumerate(groups):
        tensors = {k: state[k].detach().contiguous() for k in outside} if shard == 0 else {}
        for index in indices:
            tensors.update(_block_tensors(source, index, index < pruned_blocks, work))
        atomic_write(
            directory / names[shard],
            lambda tmp, t=tensors: save_file(t, str(tmp), metadata={"format": "pt"}),
        )
        weight_map.update(dict.fromkeys(tensors, names[shard]))
        del tensors
        return_freed_memory()
    if len(groups) > 1:
        index_data = {
            "metadata": {"total_size": sum(s for _, s in groups)},
            "weight_map": weight_map,
        }
        (directory / INDEX_FILE).write_text(json.dumps(index_data, indent=2))
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def _block_tensors(
    source: DiskBlocks, index: int, pruned: bool, work: WorkArea
) -> dict[str, torch.Tensor]:
    """Block ``index``'s tensors under their checkpoint keys: pruned from the work area, or
    the input's (in the skeleton's dtype)."""
    keys = source.keys(index)
    if not pruned:
        block = source.blocks[index].state_dict(keep_vars=True)
        return {k: v.to(block[keys[k]].dtype) for k, v in source.files.read(keys).items()}
    saved = load_file(str(work.block_file(index)))
    return {key: saved[name] for key, name in keys.items()}

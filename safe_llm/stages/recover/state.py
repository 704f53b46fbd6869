"""Recovery's resumable training state: the trained weights, the optimiser state and the RNG,
saved every few steps (each file atomically; one file per rank of FSDP shards) and loaded by a
rerun."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safe_llm.core import distributed
from safe_llm.io.work_area import atomic_write, rng_state, set_rng_state
from safe_llm.stages.recover import fsdp
from safe_llm.stages.recover.options import RecoveryError
from safe_llm.train.masked_adam import MaskedAdam


def _state_files(state_dir: Path, sharded: bool = False) -> tuple[Path, Path, Path]:
    """The progress record, the weights and the optimiser state; sharded (FSDP) runs keep
    one weights and one optimiser file per rank, each with that rank's shards."""
    suffix = f".rank{distributed.rank()}-of-{distributed.world_size()}" if sharded else ""
    return (
        state_dir / "recovery_progress.json",
        state_dir / f"recovery_weights{suffix}.safetensors",
        state_dir / f"recovery_optimizer{suffix}.pt",
    )


def any_sharded(params: dict[str, nn.Parameter]) -> bool:
    """Whether any of ``params`` is an FSDP shard (a run under ``--recover-fsdp``)."""
    return any(fsdp.is_sharded(p) for p in params.values())


def save_state(state_dir, step, params, optimizer, losses) -> None:
    """Save the training state (every rank its own shards under FSDP; the progress record,
    written last, by the writer after every rank's files are complete)."""
    sharded = any_sharded(params)
    if not (sharded or distributed.is_writer()):
        return  # every rank holds the same state: the writer saves it
    progress, weights, optim = _state_files(state_dir, sharded)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        n: fsdp.local(p.detach()).to("cpu", copy=True).contiguous() for n, p in params.items()
    }
    tensors.update(rng_state())
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
    state = _map_state(optimizer.state_dict(), fsdp.local)
    atomic_write(optim, lambda tmp: torch.save(state, tmp))
    if sharded:
        distributed.barrier()
    if distributed.is_writer():
        record = {"step": step, "losses": losses, "lean": isinstance(optimizer, MaskedAdam)}
        atomic_write(progress, lambda tmp: tmp.write_text(json.dumps(record)))


def saved_lean(state_dir) -> bool | None:
    """Whether the state saved in ``state_dir`` used the lean optimiser state (None: no state
    saved, or saved before this was recorded): an auto ``--recover-lean`` resumes that way."""
    if state_dir is None:
        return None
    progress = _state_files(Path(state_dir))[0]
    if not progress.is_file():
        return None
    return json.loads(progress.read_text()).get("lean")


def load_state(state_dir, params, optimizer) -> tuple[int, list[float]]:
    """``(step to continue from, losses so far)``; ``(0, [])`` when nothing was saved."""
    sharded = any_sharded(params)
    progress, weights, optim = _state_files(state_dir, sharded)
    if not progress.is_file():
        return 0, []
    if not weights.is_file():
        raise RecoveryError(
            f"the recovery state in {state_dir} has no {weights.name}: it was saved by a run "
            "with another number of processes or without --recover-fsdp; resume it the same way"
        )
    record = json.loads(progress.read_text())
    tensors = load_file(str(weights))
    with torch.no_grad():
        for name, param in params.items():
            fsdp.local(param).copy_(tensors[name])
    state = torch.load(optim, weights_only=True)
    if bool(state.get("lean")) != isinstance(optimizer, MaskedAdam):
        raise RecoveryError(
            f"the recovery state in {state_dir} was saved "
            f"{'with' if state.get('lean') else 'without'} the lean optimiser state; resume "
            "it with the same --recover-lean / --no-recover-lean"
        )
    ordered = list(params.values())  # the optimiser's parameter order (one group each)
    for index, values in state["state"].items():
        param = ordered[index]
        if fsdp.is_sharded(param):
            state["state"][index] = _map_state(values, lambda t, p=param: _like(t, p))
    optimizer.load_state_dict(state)
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")})
    return int(record["step"]), list(record["losses"])


def _map_state(value, fn):
    """``value`` (an optimiser state dict or part of it) with ``fn`` applied to every tensor
    of more than one element (Adam's moments; its step counters stay as they are)."""
    if isinstance(value, dict):
        return {k: _map_state(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_state(v, fn) for v in value]
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return fn(value)
    return value


def _like(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local shard as a ``DTensor`` sharded like ``param``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard.to(param.device), param.device_mesh, param.placements)

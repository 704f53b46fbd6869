""":func:`load_sparse`: a pruned model whose pruned matrices stay compressed in memory.

The model is built with empty (meta) parameters; every tensor is then read on its own from
the checkpoint or export (:class:`~safe_llm.inference.source.TensorSource`). The prunable
matrices are found from the model, as the pruning engine finds them (the decoder blocks'
linear layers and fused expert parameters, :func:`safe_llm.core.blocks.prunable_layers`), not
from names; each pruned one becomes a :class:`SparseLinear` (or, for experts, a
:class:`SparseExperts`) on the kernel path measured fastest for its kind, or stays dense where
no path beats dense (:mod:`~safe_llm.inference.autotune`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core.blocks import PrunableMatrix, find_blocks, prunable_layers
from safe_llm.core.memory import large_buffers_from_mmap, return_freed_memory
from safe_llm.core.precision import cpu_bf16_is_native, cpu_capability
from safe_llm.errors import SafeLLMError
from safe_llm.inference import kernel
from safe_llm.inference.autotune import (
    DENSE,
    TimingCache,
    candidate_paths,
    cpu_name,
    fastest,
    matrix_key,
)
from safe_llm.inference.format import DTYPES, CompressedMatrix, export_dense
from safe_llm.inference.linear import SparseExperts, SparseLinear
from safe_llm.inference.source import TensorSource

log = logging.getLogger(__name__)

POLICIES = ("auto", "sparse", "dense")
_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class SparseSummary:
    """What :func:`load_sparse` did: matrices made sparse (by layout) and on which path, kept
    dense (and why), the dtype, the weight bytes held against the dense model's, and the
    measured timings behind each ``auto`` decision (:mod:`~safe_llm.inference.autotune`)."""

    kernel: str  # what was asked: auto or a path
    dtype: str
    sparse: Counter = field(default_factory=Counter)  # layout -> matrices
    paths: Counter = field(default_factory=Counter)  # kernel path -> sparse matrices
    dense: Counter = field(default_factory=Counter)  # "layout (why)" -> matrices
    dense_bytes: int = 0  # the prunable matrices' bytes, were they all dense
    held_bytes: int = 0  # the prunable matrices' bytes as held (compressed or dense)
    decisions: list[dict] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The kernel path most sparse matrices take (``none`` when none is sparse)."""
        return self.paths.most_common(1)[0][0] if self.paths else "none"

    def describe(self) -> str:
        """One line: how many matrices are sparse, on which paths, and the bytes held."""
        total = sum(self.sparse.values()) + sum(self.dense.values())
        paths = ", ".join(f"{n} {p}" for p, n in self.paths.most_common()) or "no kernel"
        return (
            f"{sum(self.sparse.values())} of {total} prunable matrices sparse ({paths}), "
            f"{self.dtype}; they hold {self.held_bytes / 2**20:.1f} MiB "
            f"({self.dense_bytes / 2**20:.1f} MiB dense)"
        )


def decode_dtype(choice: str | torch.dtype, stored: str | None = None) -> torch.dtype:
    """The dtype a model decodes in: ``auto`` is bfloat16 wherever this CPU computes it
    natively (AVX-512-BF16 or AMX, :func:`~safe_llm.core.precision.cpu_bf16_is_native`),
    whatever dtype the checkpoint was written in (``stored``), else float32; a
    ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``, ``"torch.float32"``) as
    ``from_pretrained`` takes it."""
    if isinstance(choice, torch.dtype):
        dtype = choice
    elif str(choice).removeprefix("torch.") in _DTYPE_NAMES:
        dtype = _DTYPE_NAMES[str(choice).removeprefix("torch.")]
    elif choice == "auto":
        dtype = torch.bfloat16 if cpu_bf16_is_native() else torch.float32
        if stored and stored != str(dtype).removeprefix("torch."):
            log.info(
                "decoding in %s (stored as %s): this CPU %s bf16 natively",
                str(dtype).removeprefix("torch."),
                stored,
                "computes" if dtype == torch.bfloat16 else "does not compute",
            )
        return dtype
    else:
        raise SafeLLMError(
            f"unknown dtype {choice!r}; choose auto, float32 or bfloat16 (or a torch.dtype)"
        )
    if dtype not in DTYPES:
        raise SafeLLMError(f"sparse decoding runs in float32 or bfloat16, not {dtype}")
    return dtype


def _targets(model: nn.Module) -> dict[str, list[PrunableMatrix]]:
    """``{state-dict name of a prunable parameter: its matrices}`` (one per expert)."""
    blocks_name, blocks = find_blocks(model)
    targets: dict[str, list[PrunableMatrix]] = {}
    for index, block in enumerate(blocks):
        for handle in prunable_layers(block).values():
            targets.setdefault(f"{blocks_name}.{index}.{handle.param_name}", []).append(handle)
    return targets


def _choose(matrices, policy: str, timings: TimingCache, summary: SparseSummary) -> str:
    """The kernel path parameter ``matrices`` takes, or :data:`~autotune.DENSE`: ``auto``
    measures (or finds in the timing cache) every candidate path and dense and keeps the
    fastest; ``sparse`` the fastest kernel path wherever compression saves bytes."""
    first = matrices[0]
    if policy == "dense" or first.nbytes >= _dense_nbytes(first):
        return DENSE
    candidates = candidate_paths(summary.kernel)
    if not candidates:  # the torch path: nothing to measure
        return "torch"
    if policy == "sparse" and len(candidates) == 1:
        return candidates[0]
    measured, now = timings.timings(first, candidates)
    choice = fastest(measured, candidates)
    if policy == "sparse" and choice == DENSE:
        choice = min(candidates, key=lambda p: measured[p])
    _record(first, measured, choice, now, summary)
    return choice


def _record(matrix, measured: dict, choice: str, now: bool, summary: SparseSummary) -> None:
    key = matrix_key(matrix, torch.get_num_threads())
    if key in {d["key"] for d in summary.decisions}:
        return
    milliseconds = {name: seconds * 1e3 for name, seconds in measured.items()}
    summary.decisions.append({"key": key, "ms": milliseconds, "choice": choice})
    figures = ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(milliseconds.items()))
    log.info(
        "%s: %s ms per token (%s) -> %s",
        key,
        figures,
        "measured" if now else "cached",
        choice if choice != DENSE else "dense (no kernel path faster)",
    )


def _dense_nbytes(matrix: CompressedMatrix) -> int:
    return matrix.shape[0] * matrix.shape[1] * matrix.values.element_size()


def _make_eager(module: nn.Module) -> None:
    """The experts module runs transformers' eager loop (``F.linear(x, param[e])`` per expert),
    the form :class:`~safe_llm.inference.linear.ExpertMatrix` serves."""
    config = getattr(module, "config", None)
    if getattr(config, "_experts_implementation", "eager") != "eager":
        log.info("%s: experts run the eager loop (sparse experts)", type(module).__name__)
        config._experts_implementation = "eager"


def _install(model, name: str, handles, matrices, path: str) -> None:
    """Put the sparse form of parameter ``name`` in the model."""
    first = handles[0]
    if first.expert is None:
        owner, _, child = name.removesuffix(f".{first.attr}").rpartition(".")
        layer = SparseLinear(matrices[0], getattr(first.module, "bias", None), path)
        setattr(model.get_submodule(owner), child, layer)
        return
    shape = first.module._parameters[first.attr].shape
    experts = SparseExperts(
        [SparseLinear(m, None, path) for m in matrices], first.transposed, shape
    )
    del first.module._parameters[first.attr]
    first.module.add_module(first.attr, experts)
    _make_eager(first.module)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Set parameter or buffer ``name`` of the model to ``tensor`` (floating: as ``dtype``)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise SafeLLMError(f"{name} is not a parameter or buffer of the model")


def _place(model, name, handles, matrices, dense, policy, timings, summary) -> None:
    """Parameter ``name`` sparse on the path :func:`_choose` picks, else ``dense()``."""
    choice = _choose(matrices, policy, timings, summary)
    dense_size = sum(_dense_nbytes(m) for m in matrices)
    summary.dense_bytes += dense_size
    if choice != DENSE:
        _install(model, name, handles, matrices, choice)
        summary.sparse[matrices[0].kind] += len(matrices)
        summary.paths[choice] += len(matrices)
        summary.held_bytes += sum(m.nbytes for m in matrices)
    else:
        _assign(model, name, dense(), matrices[0].dtype)
        summary.dense[f"{matrices[0].kind} ({policy})"] += len(matrices)
        summary.held_bytes += dense_size


def _read_matrices(source: TensorSource, name: str, handles, dtype) -> list[CompressedMatrix]:
    """The compressed matrices of parameter ``name``, each through one dense copy of itself: an
    exported ``[out, in]`` matrix from its values and mask; anything else (a dense checkpoint's
    tensor, a fused expert parameter, a transposed ``Conv1D`` weight) read as the one dense
    tensor it is."""
    first = handles[0]
    if name in source.packed and first.expert is None and not first.transposed:
        values, mask = source.packed_parts(name)
        shape = tuple(source.packed[name]["shape"])
        return [kernel.compress(export_dense(values, mask, shape, dtype))]
    tensor = source.tensor(name)
    return [kernel.compress(h.matrix(tensor), dtype) for h in handles]


def _empty_model(config_dict: dict, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config_dict`` with meta parameters (buffers real: rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config_dict)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise SafeLLMError("the model's config.json has no model_type")
    from transformers.initialization import no_init_weights

    with no_init_weights(), init_empty_weights(include_buffers=False):  # nothing is touched
        return AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **config), dtype=dtype
        )


def load_dense(source: str | os.PathLike, dtype: str | torch.dtype = "auto") -> nn.Module:
    """The same checkpoint or export as an ordinary dense model (eval mode), in the dtype
    :func:`load_sparse` would use: the baseline it is compared with."""
    from transformers import AutoModelForCausalLM

    from safe_llm.io.export import load

    with TensorSource(source) as tensors:
        config, packed = tensors.config, bool(tensors.packed) or tensors.directory is None
        directory = tensors.directory
    torch_dtype = decode_dtype(dtype, config.get("dtype") or config.get("torch_dtype"))
    if packed:
        model = load(source).to(torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        directory = None  # from_pretrained has read generation_config.json
    ready_to_generate(model, directory)
    return model.eval().requires_grad_(False)


def sparsify(model: nn.Module, kernel_path: str = "auto", policy: str = "auto") -> nn.Module:
    """Replace, in place, the pruned matrices of an in-memory dense ``model`` by their sparse
    form (as :func:`load_sparse` does while loading); returns the model."""
    _check_policy(policy)
    summary = SparseSummary(kernel.check_path(kernel_path), str(model.dtype).removeprefix("torch."))
    timings = TimingCache()
    for name, handles in _targets(model).items():
        tensor = handles[0].param.detach()
        matrices = [kernel.compress(h.matrix(tensor)) for h in handles]
        _place(model, name, handles, matrices, lambda t=tensor: t, policy, timings, summary)
    model.sparse_summary = summary
    _log_summary(summary)
    return model.eval().requires_grad_(False)


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise SafeLLMError(f"unknown policy {policy!r}; choose {', '.join(POLICIES)}")


def _log_summary(summary: SparseSummary) -> None:
    sparse = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.sparse.items())) or "none"
    dense = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.dense.items())) or "none"
    log.info(
        "sparse matrices: %s; kept dense: %s; %s (%s, torch reports %s)",
        sparse,
        dense,
        summary.describe(),
        cpu_name(),
        cpu_capability(),
    )


@large_buffers_from_mmap()  # each matrix's temporaries go back to the OS when freed
def load_sparse(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    kernel_path: str = "auto",
    policy: str = "auto",
    progress: bool = True,
) -> nn.Module:
    """The ``transformers`` causal LM of a pruned checkpoint directory or ``safe-llm export``
    output, every pruned matrix compressed (:class:`SparseLinear`, experts
    :class:`SparseExperts`); eval mode, CPU, no gradients.

    ``dtype``: ``auto`` (bfloat16 where the CPU computes it natively, else float32, whatever
    the checkpoint's dtype), ``float32`` or ``bfloat16``, as a name or a ``torch.dtype``.
    ``kernel_path``: ``auto`` (each matrix kind on the path measured fastest here,
    :mod:`~safe_llm.inference.autotune`) or one of :data:`~safe_llm.inference.kernel.PATHS`.
    ``policy``: ``auto`` (sparse where a kernel path is measured faster than dense),
    ``sparse`` (every pruned matrix whose compressed form is smaller, for memory) or
    ``dense``. ``model.sparse_summary`` tells what was done. Every tensor is read on its own
    (no file mapping), so the load peaks at the model as held plus about one dense matrix.
    """
    _check_policy(policy)
    summary = SparseSummary(kernel.check_path(kernel_path), "")
    timings = TimingCache()
    with TensorSource(source) as tensors:
        config = tensors.config
        torch_dtype = decode_dtype(dtype, config.get("dtype") or config.get("torch_dtype"))
        summary.dtype = str(torch_dtype).removeprefix("torch.")
        model = _empty_model(config, torch_dtype)
        targets = _targets(model)
        if not _same_layout(tensors.names, targets, model):
            return _load_converted(source, dtype, kernel_path, policy)
        lookup_only = _untied_input_embedding(model)
        for name in tensors.names:
            if name in targets:
                continue
            if name == lookup_only:  # one row read per token: map it, pages come as read
                _assign(model, name, tensors.mapped(name, torch_dtype), torch_dtype)
            else:
                _assign(model, name, tensors.tensor(name), torch_dtype)
        model.tie_weights()
        for name, handles in tqdm(targets.items(), desc="sparse matrices", disable=not progress):
            matrices = _read_matrices(tensors, name, handles, torch_dtype)
            dense = lambda n=name: tensors.tensor(n)  # noqa: E731
            _place(model, name, handles, matrices, dense, policy, timings, summary)
        _check_loaded(model, source)
        ready_to_generate(model, tensors.directory)
    return_freed_memory()  # the per-matrix temporaries of reading and compressing
    model.sparse_summary = summary
    _log_summary(summary)
    return model.eval().requires_grad_(False)


def _untied_input_embedding(model: nn.Module) -> str | None:
    """The state-dict name of the input embedding when no other module shares its weight."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = model.config.get_text_config().tie_word_embeddings if hasattr(model, "config") else True
    if embedding is None or tied or getattr(output, "weight", None) is embedding.weight:
        return None
    names = [n for n, p in model.named_parameters() if p is embedding.weight]
    return names[0] if len(names) == 1 else None


def _same_layout(names: list[str], targets: dict, model: nn.Module) -> bool:
    """Whether the stored tensors are the model's own (transformers stores the experts of some
    MoE models per expert and fuses them while loading)."""
    return set(names) <= set(model.state_dict()) and set(targets) <= set(names)


def _load_converted(source, dtype, kernel_path: str, policy: str) -> nn.Module:
    log.warning(
        "%s stores its tensors in another layout than the model holds them (per-expert "
        "keys): loading it dense through transformers first, then compressing each matrix "
        "(the load's peak memory is the dense model's)",
        source,
    )
    model = sparsify(load_dense(source, dtype), kernel_path, policy)  # ready to generate
    return_freed_memory()
    return model


def ready_to_generate(model: nn.Module, directory: Path | None) -> None:
    """Generation settings as ``from_pretrained`` gives them (the checkpoint's
    ``generation_config.json`` where ``directory`` has one), with the KV cache on.

    Earlier checkpoints stored the pruning run's ``use_cache: false``; a model built from that
    config recomputes the whole sequence at every step, each step above 8 rows going through
    the tiled prefill path (SmolLM2 at 50%, one thread: 1.4 s a token instead of 0.07)."""
    from transformers import GenerationConfig

    if directory is not None and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True


def _check_loaded(model: nn.Module, source) -> None:
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise SafeLLMError(f"{source} lacks tensors the model needs: {empty[:3]}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: parameters and buffers, each once (the sparse
    layers' compressed buffers; tied embeddings, and a view of a mapped file, by their own
    bytes)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total

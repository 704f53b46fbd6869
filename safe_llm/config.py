"""Run configuration: one dataclass, filled from a YAML recipe and then from CLI flags.

Every field is a CLI flag (``--batch-size`` for ``batch_size``) and a recipe key. Method
hyperparameters sit under ``method_options`` in a recipe and are plain flags on the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from safe_llm.errors import SafeLLMError
from safe_llm.methods import build_method
from safe_llm.sparsity import SparsityPattern


class ConfigError(SafeLLMError):
    """An option or recipe that cannot be used; the message says what to change."""


def _opt(default, help: str, factory=None, **kw):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    model: str = _opt(
        None, "Hub id, local model directory, .gguf file or built-in name (smollm2-135m)"
    )
    method: str = _opt("wanda", "pruning method")
    sparsity: float | None = _opt(
        None, "fraction of weights set to zero in every pruned matrix (default 0.5; implied by N:M)"
    )
    structure: str = _opt("unstructured", "'unstructured' or N:M such as 2:4 or 4:8")
    dataset: str = _opt(
        "c4",
        "calibration text: c4, wikitext2, builtin-c4, builtin-wiki, a .txt/.jsonl/.parquet "
        "file, or a datasets id (name or name:config)",
    )
    text_column: str = _opt("text", "text column of a JSON/parquet/datasets source")
    nsamples: int = _opt(128, "number of calibration windows")
    seqlen: int = _opt(2048, "tokens per calibration window")
    seed: int = _opt(0, "random seed for calibration windows and the solver")
    device: str = _opt("auto", "compute device: auto, cpu, cuda or cuda:N")
    dtype: str = _opt(
        "auto", "compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"
    )
    batch_size: int = _opt(8, "calibration windows per forward batch")
    ignore: list[str] = _opt(
        None,
        factory=list,
        help="module-name patterns (fnmatch, relative to a block) never pruned, "
        "e.g. 'mlp.down_proj'",
        nargs="*",
    )
    dense_targets: bool = _opt(
        False,
        "targets from the dense model's stream (global propagation) instead of the pruned stream",
    )
    layer_errors: bool = _opt(True, "report each layer's relative output error (needs X^T X)")
    trust_remote_code: bool = _opt(False, "allow model code from the Hub (off unless asked)")
    output: str | None = _opt(None, "directory for the pruned checkpoint")
    overwrite: bool = _opt(False, "replace a non-empty output directory")
    max_shard_size: str = _opt("2GB", "largest safetensors shard")
    eval: list[str] = _opt(
        None,
        factory=list,
        help="evaluate dense and pruned perplexity on these sources "
        "(e.g. wikitext2 c4 builtin-wiki)",
        nargs="*",
    )
    eval_seqlen: int | None = _opt(None, "window length for --eval (default: --seqlen)")
    eval_max_windows: int | None = _opt(None, "evaluate on at most this many windows")
    method_options: dict = _opt(None, "method hyperparameters", factory=dict, cli=False)

    def pattern(self) -> SparsityPattern:
        if self.structure.strip().lower() == "unstructured" and self.sparsity is None:
            return SparsityPattern.parse("unstructured", 0.5)
        return SparsityPattern.parse(self.structure, self.sparsity)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe: a mapping of :class:`PruneConfig` keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value")
    return data


def make_config(recipe: dict | None = None, overrides: dict | None = None) -> PruneConfig:
    """Defaults < recipe < overrides; method options merge key by key. Validates the result."""
    values = dict(recipe or {})
    overrides = dict(overrides or {})
    options = {**values.pop("method_options", {}), **overrides.pop("method_options", {})}
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    config = PruneConfig(**values, method_options=options)
    validate(config)
    return config


def validate(config: PruneConfig) -> None:
    """Raise :class:`ConfigError` (or a more specific ValueError) for unusable values."""
    if not config.model:
        raise ConfigError("no model given: use --model (hub id, directory, .gguf or built-in)")
    config.pattern()
    build_method(config.method, config.method_options)
    for name in ("nsamples", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.seqlen < 2:
        raise ConfigError("--seqlen must be at least 2")
    if config.output:
        _check_output(Path(config.output), config.model, config.overwrite)


def _check_output(output: Path, model: str, overwrite: bool) -> None:
    model_dir = Path(model)
    if model_dir.exists() and output.resolve() == model_dir.resolve():
        raise ConfigError("--output is the input model's directory; choose another directory")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output {output} is not empty; pass --overwrite to replace it")

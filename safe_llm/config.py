"""Run configuration: one dataclass, filled from a YAML recipe and then from CLI flags.

Every field is a CLI flag (``--batch-size`` for ``batch_size``) and a recipe key. Method
hyperparameters sit under ``method_options`` in a recipe and are plain flags on the CLI.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from safe_llm.core.sparsity import SparsityPattern
from safe_llm.errors import SafeLLMError
from safe_llm.methods import build_method, method_options
from safe_llm.options import option
from safe_llm.stages.recover.options import RECOVERY_METHODS


class ConfigError(SafeLLMError):
    """An option or recipe that cannot be used; the message says what to change."""


@dataclass
class PruneConfig:
    """The options of a run. A field declared ``decisive=False`` does not change the pruned
    weights (where the checkpoint goes, evaluation, memory limits...): a ``--resume`` may
    change it; every other field must match the interrupted run's."""

    model: str = option(
        None, "Hub id, local model directory, .gguf file or built-in name (smollm2-135m)"
    )
    method: str = option(
        "safe+",
        "pruning method; the default SAFE+ (its default options: the measured CPU recipe) "
        "takes about 3x SparseGPT's time and cuts 10-20%% of SparseGPT's perplexity damage",
    )
    sparsity: float | None = option(
        None, "fraction of weights set to zero in every pruned matrix (default 0.5; implied by N:M)"
    )
    structure: str = option("unstructured", "'unstructured' or N:M such as 2:4 or 4:8")
    sparsity_profile: str = option(
        "uniform",
        "how the sparsity is spread over blocks: uniform, or owl (outlier-weighted: blocks with "
        "more activation outliers keep more weights; the overall sparsity stays --sparsity)",
    )
    owl_m: float = option(5.0, "OWL: a score above M times its block's mean is an outlier")
    owl_lambda: float = option(0.08, "OWL: block sparsities range over --sparsity -/+ lambda")
    sparsity_per_block: list[float] | None = option(
        None, "explicit sparsity of every decoder block, in order (unstructured only)", nargs="*"
    )
    dataset: str = option(
        "c4",
        "calibration text: c4, wikitext2, builtin-c4, builtin-wiki, a .txt/.jsonl/.parquet "
        "file, or a datasets id (name or name:config)",
    )
    text_column: str = option("text", "text column of a JSON/parquet/datasets source")
    nsamples: int = option(128, "number of calibration windows")
    seqlen: int = option(2048, "tokens per calibration window")
    seed: int = option(0, "random seed for calibration windows and the solver")
    device: str = option("auto", "compute device: auto, cpu, cuda or cuda:N")
    dtype: str = option(
        "auto",
        "dtype of the weights: auto (bf16 on CUDA, fp32 on CPU: the master copy; SAFE computes "
        "in bf16 where the CPU has native bf16), float32, bfloat16, float16",
    )
    batch_size: int = option(8, "calibration windows per forward batch")
    ignore: list[str] = option(
        None,
        factory=list,
        help="module- or parameter-name patterns (fnmatch, relative to a block) never pruned, "
        "e.g. 'mlp.down_proj', 'mlp.experts.down_proj' (every expert's), "
        "'mlp.experts.gate_up_proj[3]' (one expert's); also accepts a large block weight "
        "safe-llm cannot prune as dense",
        nargs="*",
    )
    moe_every_token: bool = option(
        False,
        "mixture-of-experts: gather each expert's calibration statistics from every token (as "
        "llm-compressor's MoE calibration) instead of the tokens the router sends it; for "
        "experts the router rarely picks. The block's targets keep the model's routing",
    )
    dense_targets: bool = option(
        False,
        "targets from the dense model's stream (global propagation) instead of the pruned stream",
    )
    joint_blocks: int = option(
        1,
        "after the method has pruned each block of a window of N consecutive blocks, train the "
        "window jointly against the dense window's outputs, masks frozen, in the precision of the "
        "method's --autocast (1 = off)",
    )
    joint_epochs: float = option(1.0, "joint windows: passes over the calibration windows")
    joint_lr: float = option(
        2.5e-3, "joint windows: Adam learning rate, a fraction of each tensor's RMS per step"
    )
    layer_errors: bool = option(True, "report each layer's relative output error (needs X^T X)")
    trust_remote_code: bool = option(
        False, "allow model code from the Hub (off unless asked)", decisive=False
    )
    output: str | None = option(None, "directory for the pruned checkpoint", decisive=False)
    overwrite: bool = option(False, "replace a non-empty output directory", decisive=False)
    resume: bool = option(
        False,
        "continue an interrupted run from the last block saved in --output's work area "
        "(the other options must be the same; starts from block 0 if nothing was saved)",
        decisive=False,
    )
    max_blocks: int | None = option(
        None,
        "prune only the first N decoder blocks (quick studies; the rest stay dense)",
        decisive=False,
    )
    max_shard_size: str = option("2GB", "largest safetensors shard", decisive=False)
    stream_from_disk: bool = option(
        False,
        "keep only one block in memory: load the model skeleton empty, read each block from the "
        "local safetensors files and write it pruned to --output (needs --output, no --eval)",
        decisive=False,
    )
    max_activation_memory: str | None = option(
        None,
        "calibration activations above this size (e.g. 4GB) spill to a memory-mapped file",
        decisive=False,
    )
    eval: list[str] = option(
        None,
        factory=list,
        help="evaluate dense and pruned perplexity on these sources "
        "(e.g. wikitext2 c4 builtin-wiki)",
        nargs="*",
        decisive=False,
    )
    eval_seqlen: int | None = option(
        None, "window length for --eval (default: --seqlen)", decisive=False
    )
    eval_max_windows: int | None = option(
        None, "evaluate on at most this many windows", decisive=False
    )
    eval_cache: bool = option(
        True,
        "reuse a perplexity computed before for bit-identical weights and windows (disk cache "
        "in $SAFE_LLM_CACHE/perplexity, default ~/.cache/safe_llm); --no-eval-cache recomputes",
        decisive=False,
    )
    push_to_hub: bool = option(
        False,
        "upload the checkpoint to the Hugging Face Hub repo --hub-repo-id when written",
        decisive=False,
    )
    hub_repo_id: str | None = option(
        None, "Hub repository for --push-to-hub (user/name)", decisive=False
    )
    hub_private: bool = option(False, "create the Hub repository private", decisive=False)
    hub_revision: str | None = option(None, "Hub branch to push to (default: main)", decisive=False)
    method_options: dict = option(None, "method hyperparameters", factory=dict, cli=False)
    recover: str | None = option(
        None,
        "after the block loop, train the whole pruned model end to end with its mask frozen: "
        "distill (match the dense model's next-token distribution; see recovery options)",
        choices=RECOVERY_METHODS,
    )
    recover_options: dict = option(None, "recovery settings", factory=dict, cli=False)
    command_line: str | None = option(
        None, "the command line that made the run", cli=False, decisive=False
    )

    def pattern(self) -> SparsityPattern:
        if self.structure.strip().lower() == "unstructured" and self.sparsity is None:
            return SparsityPattern.parse("unstructured", 0.5)
        return SparsityPattern.parse(self.structure, self.sparsity)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def weight_neutral_options() -> frozenset[str]:
    """The :class:`PruneConfig` fields declared ``decisive=False``."""
    return frozenset(
        f.name for f in dataclasses.fields(PruneConfig) if not f.metadata.get("decisive", True)
    )


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 numbers: ``2:4`` stays a string (YAML 1.1 reads it as the base-60 int 124)
    and ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_value(text: str):
    """A value written on the command line, read as a recipe value (``1e-3`` a float, ``2:4``
    a string, ``true`` a bool)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read the value {text!r}: {exc}") from exc


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe: a mapping of :class:`PruneConfig` keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}
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
    recovery = {**values.pop("recover_options", {}), **overrides.pop("recover_options", {})}
    values.update(overrides)
    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if not isinstance(options, dict):
        raise ConfigError("method_options must be a mapping of option: value")
    for name, value in values.items():
        values[name] = _check_type(name, value, fields[name])
    if values.get("eval"):
        from safe_llm.evaluation.evaluate import parse_list

        values["eval"] = parse_list(values["eval"])  # "wikitext2,c4" -> ["wikitext2", "c4"]
    if not isinstance(recovery, dict):
        raise ConfigError("recover_options must be a mapping of option: value")
    recovery = _check_recover_options(recovery)
    config = PruneConfig(**values, method_options=options, recover_options=recovery)
    method_fields = {f.name: f for f in method_options(config.method)}
    for name, value in options.items():
        if name in method_fields:  # unknown names are reported by validate()
            options[name] = _check_type(name, value, method_fields[name])
    validate(config)
    return config


def _check_recover_options(values: dict) -> dict:
    """``recover_options`` with each value checked against :class:`RecoverOptions`'s fields."""
    from safe_llm.stages.recover.options import RecoverOptions, recover_options

    fields = {f.name: f for f in dataclasses.fields(RecoverOptions)}
    checked = {n: _check_type(n, v, fields[n]) if n in fields else v for n, v in values.items()}
    recover_options(checked)  # unknown names and unusable values
    return checked


def _check_type(name: str, value, f: dataclasses.Field):
    """``value`` if it fits field ``f``'s annotation (ints pass as floats), else ConfigError."""
    annotation = f.type
    if isinstance(annotation, str):  # ``from __future__ import annotations``
        annotation = eval(annotation, vars(typing), {})
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if value is None:
        if optional or f.name == "model":
            return value
        raise ConfigError(f"option {name} needs a value")
    origin = typing.get_origin(annotation)
    if origin is list and typing.get_args(annotation)[0] is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            return [float(v) for v in value]
        raise ConfigError(f"option {name} must be a list of numbers, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"option {name} must be a list of strings, got {value!r}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"option {name} must be an integer, got {value!r}")
    if annotation is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # YAML reads ``max_shard_size: 500`` or ``model: 1234`` as numbers
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(
            f"option {name} must be of type {annotation.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


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
    if config.eval_seqlen is not None and config.eval_seqlen < 2:
        raise ConfigError("--eval-seqlen must be at least 2")
    if config.eval_max_windows is not None and config.eval_max_windows < 1:
        raise ConfigError("--eval-max-windows must be at least 1")
    for source in [config.dataset, *config.eval]:
        _check_source(source)
    if config.max_blocks is not None and config.max_blocks < 1:
        raise ConfigError("--max-blocks must be at least 1")
    _check_profile(config)
    _check_streaming(config)
    _check_recovery(config)
    _check_joint(config)
    if config.resume and not config.output:
        raise ConfigError("--resume needs --output (the directory of the interrupted run)")
    if config.push_to_hub and not (config.output and config.hub_repo_id):
        raise ConfigError("--push-to-hub needs --output and --hub-repo-id user/name")
    if config.output:
        _check_output(Path(config.output), config.model, config.overwrite, config.resume)


def _check_joint(config: PruneConfig) -> None:
    """Joint windows need a window size of at least 1, epochs > 0 and a finite lr >= 0."""
    from safe_llm.stages.prune.joint import JointOptions

    try:
        JointOptions(config.joint_blocks, config.joint_epochs, config.joint_lr)
    except SafeLLMError as exc:
        raise ConfigError(str(exc)) from exc


def _check_profile(config: PruneConfig) -> None:
    """A non-uniform profile needs unstructured sparsity and sane OWL parameters."""
    from safe_llm.stages.profiles import PROFILES, check_block_sparsities

    if config.sparsity_profile not in PROFILES:
        raise ConfigError(
            f"--sparsity-profile {config.sparsity_profile!r} is not one of: {', '.join(PROFILES)}"
        )
    non_uniform = config.sparsity_profile != "uniform" or config.sparsity_per_block is not None
    if non_uniform and config.pattern().is_nm:
        raise ConfigError(
            f"N:M ({config.structure}) is a fixed sparsity: --sparsity-profile "
            f"{config.sparsity_profile} / sparsity_per_block need --structure unstructured"
        )
    if config.sparsity_per_block is not None:
        if config.sparsity_profile != "uniform":
            raise ConfigError("give either --sparsity-profile owl or sparsity_per_block, not both")
        if not config.sparsity_per_block:
            raise ConfigError("sparsity_per_block is empty: give one sparsity per decoder block")
        check_block_sparsities(config.sparsity_per_block)
    if not config.owl_m > 0:
        raise ConfigError(f"--owl-m must be > 0, got {config.owl_m}")
    if not 0 <= config.owl_lambda < 0.5:
        raise ConfigError(f"--owl-lambda must be in [0, 0.5), got {config.owl_lambda}")


def _check_recovery(config: PruneConfig) -> None:
    if config.recover is not None and config.recover not in RECOVERY_METHODS:
        raise ConfigError(
            f"--recover {config.recover!r} is not one of: {', '.join(RECOVERY_METHODS)}"
        )
    if config.recover is not None and config.stream_from_disk:
        raise ConfigError(
            "--recover trains the whole model and cannot run with --stream-from-disk; prune "
            "first, then run safe-llm recover on the checkpoint"
        )
    if config.recover_options.get("dataset"):
        _check_source(config.recover_options["dataset"])
    if config.recover_options.get("fsdp") and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        from safe_llm.stages.recover.fsdp import NEEDS_RANKS

        raise ConfigError(NEEDS_RANKS)  # checked before any pruning; recover() checks again


def _check_streaming(config: PruneConfig) -> None:
    if config.max_activation_memory is not None:
        parse_size(config.max_activation_memory, "--max-activation-memory")
    if not config.stream_from_disk:
        return
    if not config.output:
        raise ConfigError(
            "--stream-from-disk needs --output: each pruned block is written there when done"
        )
    if config.eval:
        raise ConfigError(
            "--eval cannot run with --stream-from-disk (the model is never whole in memory); "
            "evaluate the written checkpoint with safe-llm eval"
        )


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes in a size such as ``4GB``, ``500MB``, ``2GiB`` or ``1024``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"{flag} {text!r} is not a size such as 4GB or 500MB")
    unit = (match.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    scale.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})
    return int(float(match.group(1)) * scale[unit])


def _check_source(source: str) -> None:
    """A text source that is plainly a local file must exist (checked before any loading)."""
    from safe_llm.io import data

    suffixes = data.TEXT_SUFFIXES + data.JSON_SUFFIXES + data.PARQUET_SUFFIXES
    if source in ("c4", "wikitext2") or source in data.BUILTIN_SOURCES:
        return
    looks_local = source.startswith((".", "/", "~")) or source.lower().endswith(suffixes)
    if looks_local and not Path(source).expanduser().exists():
        raise ConfigError(f"text source {source} does not exist")


def _check_output(output: Path, model: str, overwrite: bool, resume: bool = False) -> None:
    model_dir = Path(model).expanduser()
    if model_dir.exists():
        out, src = output.expanduser().resolve(), model_dir.resolve()
        if out == src:
            raise ConfigError("--output is the input model's directory; choose another directory")
        if out in src.parents:
            raise ConfigError(
                f"--output {output} contains the input model {model}; choose another directory"
            )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} exists and is not a directory")
    from safe_llm.io.work_area import WORK_DIR

    contents = {p.name for p in output.iterdir()} if output.is_dir() else set()
    if contents and not overwrite:
        if WORK_DIR in contents and not resume:
            raise ConfigError(
                f"--output {output} holds an unfinished run; pass --resume to continue it "
                "or --overwrite to start over"
            )
        if contents - {WORK_DIR}:
            raise ConfigError(f"--output {output} is not empty; pass --overwrite to replace it")

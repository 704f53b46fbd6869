"""``safe-llm`` command line: ``prune``, ``eval``, ``export`` and ``push``."""

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

from tqdm.auto import tqdm

from safe_llm import __version__
from safe_llm.config import PruneConfig, load_recipe, make_config
from safe_llm.errors import SafeLLMError
from safe_llm.methods import METHODS, available_methods

log = logging.getLogger("safe_llm")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> type:
    """``int | None`` -> int, ``list[str]`` -> str, ``bool`` -> bool."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # dataclass annotations are strings
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if origin is list:
        return args[0]
    return annotation


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, help_suffix: str = ""):
    kind = _base_type(f.type)
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = f.metadata.get("help", "") + help_suffix
    if default not in (None, [], {}):
        help_text += f" (default: {default})"
    kwargs: dict = {"default": argparse.SUPPRESS, "help": help_text}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = kind
        if "nargs" in f.metadata:
            kwargs["nargs"] = f.metadata["nargs"]
        if f.name == "method":
            kwargs["choices"] = available_methods()
        if f.name == "model":
            kwargs["metavar"] = "MODEL"
    parser.add_argument(_flag(f.name), dest=f.name, **kwargs)


def _method_option_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every method's option fields, with the methods that have each."""
    available_methods()
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name in sorted(METHODS):
        for f in dataclasses.fields(METHODS[name].Options):
            fields.setdefault(f.name, (f, []))[1].append(name)
    return fields


def _prune_parser(sub) -> None:
    parser = sub.add_parser(
        "prune",
        help="prune a causal LM block by block and write a sparse checkpoint",
        description="Prune every linear layer inside the decoder blocks of a causal LM "
        "(embeddings and lm_head are never pruned), block by block, and write a checkpoint "
        "that plain transformers loads. Options come from --recipe, then from flags.",
    )
    parser.add_argument(
        "--recipe", help="YAML recipe with any of the options below; flags override it"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or block lines")
    for f in dataclasses.fields(PruneConfig):
        if f.metadata.get("cli", True):
            _add_field(parser, f)
    group = parser.add_argument_group("method options (recipe key: method_options)")
    for f, owners in _method_option_fields().values():
        _add_field(group, f, f" [{', '.join(owners)}]")


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
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=None, help="at most this many windows")
    parser.add_argument("--batch-size", type=int, default=1, help="windows / examples per pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--text-column", default="text", help="text column of a file/dataset")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the Hub"
    )
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
        help="lm-eval tasks, e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
    )
    group.add_argument("--num-fewshot", type=int, default=0, help="examples in each prompt")
    group.add_argument(
        "--limit", type=int, default=None, help="at most this many examples per task (a preview)"
    )
    group.add_argument("--include-path", help="a directory of extra lm-eval task YAMLs")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safe-llm",
        description="Prune large language models to sparse and flat minima (SAFE, SAFE+) "
        "or with the magnitude, Wanda and SparseGPT baselines.",
    )
    parser.add_argument("--version", action="version", version=f"safe-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _push_parser(sub)
    _export_parser(sub)
    return parser


def _config_from_args(args: argparse.Namespace) -> PruneConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "quiet")}
    option_names = set(_method_option_fields())
    options = {k: values.pop(k) for k in list(values) if k in option_names}
    recipe = load_recipe(args.recipe) if args.recipe else {}
    return make_config(recipe, {**values, "method_options": options})


def _summary(report: dict, output: str | None) -> str:
    lines = [
        f"method {report['method']}, pattern {report['pattern']}, "
        f"overall sparsity {report['overall_sparsity']:.4f}",
        f"time {report['total_seconds']:.1f}s (pruning {report['seconds']:.1f}s), "
        f"peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    for source, dense in report["evaluation"]["dense"].items():
        pruned = report["evaluation"]["pruned"][source]
        lines.append(
            f"perplexity {source} (seqlen {dense['seqlen']}, {dense['windows']} windows): "
            f"dense {dense['perplexity']:.3f}{_cached(dense)} -> "
            f"pruned {pruned['perplexity']:.3f}{_cached(pruned)}"
        )
    peaks = report.get("stage_peak_memory_bytes", {})
    if peaks:
        stages = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items())
        lines.append(f"peak memory per stage (GiB): {stages}")
    if output:
        lines.append(f"checkpoint written to {output}")
    return "\n".join(lines)


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
    from safe_llm import distributed
    from safe_llm.checkpoint import save_checkpoint
    from safe_llm.pipeline import run_prune

    config = dataclasses.replace(_config_from_args(args), command_line=_command_line(argv))
    with _graceful_stop() as should_stop:
        result = run_prune(config, progress=not args.quiet, should_stop=should_stop)
        if not distributed.is_writer():  # data-parallel: rank 0 writes and reports
            distributed.shutdown()
            return 0
        if config.output:
            save_checkpoint(result)
    distributed.shutdown()
    print(_summary(result.report, config.output))
    if config.push_to_hub:
        from safe_llm.hub import push_checkpoint

        url = push_checkpoint(
            config.output,
            config.hub_repo_id,
            private=config.hub_private,
            revision=config.hub_revision,
        )
        print(f"pushed to {url}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from safe_llm.hub import push_checkpoint

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
    from safe_llm.export import export_bitmask

    sizes = export_bitmask(args.checkpoint, args.output, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: {sizes.exported_bytes / 2**20:.2f} MiB, "
        f"{sizes.ratio:.3f} of the dense weights ({sizes.dense_bytes / 2**20:.2f} MiB)"
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


def _check_eval_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The perplexity sources and tasks to run; raise before loading anything if unusable."""
    from safe_llm.evaluate import EvalError, parse_list

    tasks = parse_list(args.tasks)
    sources = parse_list(args.datasets) if args.datasets is not None else []
    if args.datasets is None and not tasks:
        sources = ["wikitext2"]
    if not sources and not tasks:
        raise EvalError("nothing to evaluate: give --datasets and/or --tasks")
    for name, minimum in (("seqlen", 2), ("batch_size", 1), ("max_windows", 1), ("limit", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise EvalError(f"{_flag(name)} must be at least {minimum}, got {value}")
    if args.num_fewshot < 0:
        raise EvalError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    if tasks:
        from safe_llm.zeroshot import _lm_eval

        _lm_eval()  # a missing extra fails before the model is loaded
    return sources, tasks


def _run_eval(args: argparse.Namespace) -> int:
    from safe_llm.evaluate import (
        evaluate_perplexity,
        format_perplexity,
        results_document,
        write_json,
    )
    from safe_llm.memory import serve_large_buffers_from_mmap
    from safe_llm.models import load_model, resolve_device, resolve_dtype

    sources, tasks = _check_eval_args(args)
    serve_large_buffers_from_mmap()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer, _ = load_model(args.model, dtype, args.trust_remote_code)
    model.to(device)
    perplexities = evaluate_perplexity(
        model,
        tokenizer,
        sources,
        args.seqlen,
        batch_size=args.batch_size,
        device=device,
        max_windows=args.max_windows,
        text_column=args.text_column,
        progress=not args.quiet,
        cache=args.cache,
    )
    for source, result in perplexities.items():
        print(format_perplexity(source, result))
    zeroshot = None
    if tasks:
        from safe_llm.zeroshot import evaluate_tasks, format_tasks

        zeroshot = evaluate_tasks(
            model,
            tokenizer,
            tasks,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            include_path=args.include_path,
            metric=args.metric,
        )
        print("\n".join(format_tasks(zeroshot)))
    if args.json_path:
        document = results_document(args.model, device, dtype, perplexities, zeroshot)
        print(f"results written to {write_json(args.json_path, document)}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from safe_llm.report import write_report

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
    args = build_parser().parse_args(argv)
    _install_log_handler(getattr(args, "quiet", False))
    _quiet_libraries()
    from safe_llm.resume import Interrupted

    commands = {
        "prune": lambda: _run_prune(args, argv),
        "eval": lambda: _run_eval(args),
        "report": lambda: _run_report(args),
        "push": lambda: _run_push(args),
        "export": lambda: _run_export(args),
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

"""``safe-llm`` command line: ``prune`` and ``eval``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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
        help="token perplexity of a model (SparseGPT/Wanda protocol)",
        description="Perplexity = exp(mean over non-overlapping windows of the mean token "
        "NLL). wikitext2: test split joined with blank lines; c4: first 1100 validation "
        "documents, 256 windows.",
    )
    parser.add_argument("--model", required=True, help="directory, hub id, .gguf or built-in")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["wikitext2"],
        help="sources: wikitext2, c4, builtin-wiki, builtin-c4 or a local file",
    )
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=None, help="at most this many windows")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--text-column", default="text", help="text column of a file/dataset")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the Hub"
    )
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")


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
            f"dense {dense['perplexity']:.3f} -> pruned {pruned['perplexity']:.3f}"
        )
    if output:
        lines.append(f"checkpoint written to {output}")
    return "\n".join(lines)


def _run_prune(args: argparse.Namespace) -> int:
    from safe_llm.checkpoint import save_checkpoint
    from safe_llm.pipeline import run_prune

    config = _config_from_args(args)
    result = run_prune(config, progress=not args.quiet)
    if config.output:
        save_checkpoint(result)
    print(_summary(result.report, config.output))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from safe_llm import data
    from safe_llm.models import load_model, resolve_device, resolve_dtype
    from safe_llm.perplexity import perplexity

    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(
        args.model, resolve_dtype(args.dtype, device), args.trust_remote_code
    )
    model.to(device)
    results = {}
    for source in args.datasets:
        windows = data.evaluation_windows(
            tokenizer, source, args.seqlen, args.max_windows, text_column=args.text_column
        )
        ppl = perplexity(model, windows, args.batch_size, device, progress=True)
        results[source] = {"perplexity": ppl, "seqlen": args.seqlen, "windows": len(windows)}
        print(
            f"{source}: perplexity {ppl:.4f} (token-level, seqlen {args.seqlen}, "
            f"{len(windows)} windows)"
        )
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"model": args.model, "results": results}, fh, indent=2)
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
    try:
        return _run_prune(args) if args.command == "prune" else _run_eval(args)
    except SafeLLMError as exc:
        print(f"safe-llm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safe-llm: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

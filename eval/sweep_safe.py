"""Quick SAFE/SAFE+ hyperparameter study on SmolLM2: prune the first K blocks, measure perplexity.

Usage: python eval/sweep_safe.py --blocks 6 --configs '{"method": "safe+", "lr": 1e-3}' ...
Each config is a JSON object: "method" plus method options, and the engine's
"dense_targets", "joint_blocks", "joint_epochs", "joint_lr". Prints one line per config.
``--eval-start 64`` scores raw ``wiki.utf8`` windows from the 65th on: text outside the
reference protocol's 64 windows, for choosing values without tuning on the reported figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from rescale import rescale_norms

from safe_llm.config import make_method
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.io.data import builtin_data_dir, calibration_windows, evaluation_windows
from safe_llm.io.models import load_model
from safe_llm.stages.prune.engine import EngineOptions, prune_model
from safe_llm.stages.prune.joint import PruneOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=6, help="prune only the first K blocks")
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument(
        "--eval-start",
        type=int,
        default=None,
        help="score raw wiki.utf8 windows [start, start + eval-windows) (default: builtin-wiki)",
    )
    parser.add_argument("--rescale", type=float, default=None, help="rescale_norms(model, c)")
    parser.add_argument("--configs", nargs="+", required=True, help="JSON objects")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tokenizer, _ = load_model(args.model)
    calib = calibration_windows(tokenizer, "builtin-c4", args.nsamples, args.seqlen, 0)
    if args.eval_start is None:
        evalw = evaluation_windows(tokenizer, "builtin-wiki", args.seqlen, args.eval_windows)
    else:
        text = (builtin_data_dir() / "wiki.utf8").read_text(encoding="utf-8")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        start, stop = args.eval_start * args.seqlen, (args.eval_start + args.eval_windows)
        evalw = ids[start : stop * args.seqlen].reshape(args.eval_windows, args.seqlen)
    if args.rescale is not None:
        rescale_norms(dense, args.rescale)
    sparsity = args.sparsity if args.structure == "unstructured" else None
    pattern = SparsityPattern.parse(args.structure, sparsity)
    print(f"dense ppl {perplexity(dense, evalw, 8):.3f}", flush=True)
    for text in args.configs:
        options = json.loads(text)
        method = options.pop("method")
        dense_targets = options.pop("dense_targets", False)
        joint = PruneOptions(
            blocks=options.pop("joint_blocks", 1),
            epochs=options.pop("joint_epochs", 1.0),
            lr=options.pop("joint_lr", 2.5e-3),
        )
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = prune_model(
            model,
            calib,
            make_method(method, options),
            pattern,
            EngineOptions(
                device=torch.device("cpu"),
                max_blocks=args.blocks,
                progress=False,
                dense_targets=dense_targets,
                joint=joint,
            ),
        )
        seconds = time.perf_counter() - start
        ppl = perplexity(model, evalw, 8)
        errors = [round(b.reconstruction_error, 4) for b in report.blocks]
        fell_back = sum(int(b.extra.get("kept_warm_start", 0)) for b in report.blocks)
        joint = [
            (round(b.extra["joint_error_before"], 4), round(b.extra["joint_error_after"], 4))
            for b in report.blocks
            if "joint_error_before" in b.extra
        ]
        print(
            f"{text}: ppl {ppl:.3f}  {seconds / args.blocks:.1f}s/block  errors {errors}  "
            f"warm start kept in {fell_back} blocks"
            + (f"  joint held-out errors {joint}" if joint else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()

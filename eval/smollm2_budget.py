"""Study: how SAFE/SAFE+ on SmolLM2-135M improves with a larger solver budget (GPU-sized).

The CPU recipes spend 2 epochs per block on 32 calibration windows. This script prunes the
built-in SmolLM2-135M (fp32 weights, SAFE's bf16 autocast) at 50% with SparseGPT and with
SAFE/SAFE+ at growing budgets, and scores each on the reference protocol of
``eval/benchmark.py`` (raw ``wiki.utf8``, first 64 windows of 512 tokens). Rows are printed and
appended to ``--jsonl`` as they finish, so an interrupted run keeps what it measured.

Usage (minutes on a GPU; hours on 2 CPU cores)::

    python eval/smollm2_budget.py --device cuda --jsonl eval/results/smollm2_budget.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from safe_llm import prune
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.io.models import load_tokenizer, resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import reference_windows  # noqa: E402

ABSOLUTE = dict(step_scale="absolute", holdout=0.0)  # the steps of the published figures
RECIPE = dict(
    init="sparsegpt",
    lr=5e-4,
    lam=1e-3,
    rho=2e-4,
    epochs=2,
    interval=2,
    warmup_epochs=0,
    sam_ascent="previous",
    **ABSOLUTE,
)
PAPER = dict(
    lr=2e-4,
    lam=1e-3,
    rho=2e-4,
    epochs=30,
    interval=32,
    warmup_epochs=2,
    init="dense",
    sam_ascent="exact",
    **ABSOLUTE,
)

# (label, method, calibration windows, method options)
RUNS = [
    ("sparsegpt", "sparsegpt", 32, {}),
    ("safe+ CPU recipe", "safe+", 32, RECIPE),
    ("sparsegpt", "sparsegpt", 128, {}),
    ("safe+ CPU recipe", "safe+", 128, RECIPE),
    (
        "safe+ sparsegpt init, 8 epochs, exact ascent, interval 4",
        "safe+",
        128,
        dict(RECIPE, epochs=8, interval=4, sam_ascent="exact"),
    ),
    ("safe+ paper setting (from dense, 30 epochs)", "safe+", 32, PAPER),
    ("safe paper setting (from dense, 30 epochs)", "safe", 32, PAPER),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", type=int, nargs="*", help="indices into RUNS (default all)")
    parser.add_argument("--max-blocks", type=int, help="prune only the first N blocks (smoke test)")
    parser.add_argument("--jsonl", help="append one JSON row per run here")
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m")[0], "smollm2-135m")
    windows = reference_windows(tokenizer)
    chosen = [RUNS[i] for i in args.runs] if args.runs else RUNS
    for label, method, nsamples, options in chosen:
        start = time.perf_counter()
        model, report = prune(
            "smollm2-135m",
            method=method,
            sparsity=args.sparsity,
            dataset="builtin-c4",
            nsamples=nsamples,
            seqlen=512,
            seed=0,
            device=args.device,
            dtype="float32",
            method_options=options,
            max_blocks=args.max_blocks,
        )
        seconds = time.perf_counter() - start
        device = torch.device(report.get("device", "cpu"))
        ppl = perplexity(model.to(device), windows, batch_size=8)
        blocks = report["blocks"]
        row = {
            "run": label,
            "method": method,
            "calibration_windows": nsamples,
            "options": options,
            "ref_ppl": round(ppl, 3),
            "seconds": round(seconds, 1),
            "seconds_per_block": round(sum(b["seconds"] for b in blocks) / len(blocks), 2),
            "device": str(device),
        }
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model


if __name__ == "__main__":
    main()

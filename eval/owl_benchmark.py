"""Benchmark: OWL (outlier-weighted layer-wise) vs uniform sparsity on the built-in SmolLM2-135M.

Every (method, sparsity, profile) prunes the model in-process with the Python API
(:func:`safe_llm.prune`), calibrated on 32 windows of 512 tokens of ``builtin-c4``, and
reports the ``builtin-wiki`` token perplexity over the first 32 windows of 512 tokens. The
dense perplexity is printed once; each row also gives the spread of OWL's block sparsities.

Usage (CPU; Wanda takes about a minute a run, SAFE+ with the CPU recipe about six)::

    python eval/owl_benchmark.py --methods wanda --sparsities 0.6 0.7
    python eval/owl_benchmark.py --methods wanda safe+ --json eval/results/owl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safe_llm import prune

EVAL = {"eval": ["builtin-wiki"], "eval_seqlen": 512, "eval_max_windows": 32}


def parse_options(items: list[str]) -> dict:
    """``["epochs=1", "init=sparsegpt"]`` -> ``{"epochs": 1.0, "init": "sparsegpt"}``."""
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            options[key] = value
    return options


def run(method: str, sparsity: float, profile: str, args) -> dict:
    method_options = parse_options(args.safe_options) if method.startswith("safe") else {}
    start = time.perf_counter()
    _, report = prune(
        args.model,
        method=method,
        sparsity=sparsity,
        sparsity_profile=profile,
        dataset="builtin-c4",
        nsamples=args.nsamples,
        seqlen=512,
        device=args.device,
        batch_size=8,
        method_options=method_options,
        **EVAL,
    )
    evaluation = report["evaluation"]
    blocks = report["block_sparsity"]
    return {
        "method": method,
        "sparsity": sparsity,
        "profile": profile,
        "dense_ppl": evaluation["dense"]["builtin-wiki"]["perplexity"],
        "ppl": evaluation["pruned"]["builtin-wiki"]["perplexity"],
        "overall_sparsity": report["overall_sparsity"],
        "block_sparsity_min": min(blocks),
        "block_sparsity_max": max(blocks),
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | sparsity | profile | wiki ppl | overall sparsity | block range | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['sparsity']:.0%} | {r['profile']} | {r['ppl']:.2f} | "
            f"{r['overall_sparsity']:.4f} | {r['block_sparsity_min']:.3f}-"
            f"{r['block_sparsity_max']:.3f} | {r['seconds']:.0f}s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="*", default=["wanda"])
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.6, 0.7])
    parser.add_argument("--profiles", nargs="*", default=["uniform", "owl"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--safe-options",
        nargs="*",
        default=[
            "init=sparsegpt",
            "epochs=2",
            "interval=2",
            "lr=5e-4",
            "warmup_epochs=0",
            "sam_ascent=previous",
        ],
        help="SAFE/SAFE+ options as key=value (default: the SmolLM2 CPU recipe)",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        for sparsity in args.sparsities:
            for profile in args.profiles:
                rows.append(run(method, sparsity, profile, args))
                print(json.dumps(rows[-1]), flush=True)
    print(f"dense wiki ppl {rows[0]['dense_ppl']:.2f}")
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

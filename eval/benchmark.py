"""Benchmark: prune the built-in SmolLM2-135M with every method and print one table.

Each (method, structure) runs ``safe-llm prune`` in its own process (so peak memory is that
run's own), writes a checkpoint to a temporary directory, and the checkpoint is then scored on
two perplexity protocols:

* ``wiki``: the toolkit's ``builtin-wiki`` source (documents joined with blank lines,
  non-overlapping windows), the first ``--eval-windows`` windows;
* ``ref``: the protocol of the reference measurements in issue 4: the raw ``wiki.utf8`` file
  tokenized as it is, the first 64 windows of 512 tokens.

Usage (CPU, about an hour for the default set)::

    python eval/benchmark.py --methods magnitude wanda sparsegpt safe safe+ \
        --structures unstructured 2:4 --recipe-dir recipes --json eval/results/smollm2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safe_llm.evaluation.perplexity import perplexity
from safe_llm.io.data import builtin_data_dir, evaluation_windows
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def reference_windows(tokenizer, seqlen: int = 512, count: int = 64) -> torch.Tensor:
    """The reference protocol's windows: raw ``wiki.utf8`` tokenized whole, first ``count``."""
    text = (builtin_data_dir() / "wiki.utf8").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : count * seqlen]
    return ids.reshape(count, seqlen)


def score(model_dir: str, args, tokenizer) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = {}
    if "wiki" in args.protocols:
        wiki = evaluation_windows(tokenizer, "builtin-wiki", args.seqlen, args.eval_windows)
        scores["wiki"] = perplexity(model, wiki, batch_size=8)
    if "ref" in args.protocols:
        scores["ref"] = perplexity(model, reference_windows(tokenizer), batch_size=8)
    return scores


def checkpoint_digest(model_dir: Path) -> str:
    """SHA-256 over every tensor of the checkpoint (name, dtype, shape, bytes), names sorted."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recipe_for(method: str, structure: str, recipe_dir: str | None) -> list[str]:
    if not recipe_dir or method not in ("safe", "safe+"):
        return []
    tag = "2-4" if structure == "2:4" else "50"
    path = Path(recipe_dir) / f"smollm2-135m-{method}-{tag}.yaml"
    return ["--recipe", str(path)] if path.is_file() else []


def prune_run(method: str, structure: str, args, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "safe_llm.cli",
        "prune",
        "--quiet",
        *recipe_for(method, structure, args.recipe_dir),
        "--model",
        args.model,
        "--method",
        method,
        "--structure",
        structure,
        "--dataset",
        "builtin-c4",
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--seed",
        "0",
        "--device",
        args.device,
        "--output",
        str(out),
        "--overwrite",
        "--eval",  # no in-run evaluation: the checkpoint is scored below
    ]
    if structure == "unstructured":
        command += ["--sparsity", str(args.sparsity)]
    if args.max_blocks is not None:
        command += ["--max-blocks", str(args.max_blocks)]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "safe", "safe+"]
    )
    parser.add_argument("--structures", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--max-blocks", type=int, help="prune only the first N blocks (quick comparisons)"
    )
    parser.add_argument(
        "--digests",
        action="store_true",
        help="add a SHA-256 over each checkpoint's tensors to its row (bit-for-bit comparisons)",
    )
    parser.add_argument(
        "--protocols",
        nargs="*",
        default=["wiki", "ref"],
        choices=["wiki", "ref"],
        help="perplexity protocols to score (see above; none: checkpoints only, with --digests)",
    )
    parser.add_argument(
        "--recipe-dir",
        default=str(ROOT / "recipes"),
        help="SAFE/SAFE+ options from smollm2-135m-<method>-<50|2-4>.yaml",
    )
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()

    model_dir, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"method": "dense", "structure": "-", **score(model_dir, args, tokenizer)}]
    print(f"dense: {rows[0]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for structure in args.structures:
            for method in args.methods:
                out = Path(tmp) / "run"
                report = prune_run(method, structure, args, out)
                blocks = report["blocks"]
                row = {
                    "method": method,
                    "structure": structure,
                    **score(str(out), args, tokenizer),
                    "seconds": report["seconds"],
                    "seconds_per_block": sum(b["seconds"] for b in blocks) / len(blocks),
                    "peak_memory_gib": report["peak_memory_bytes"] / 2**30,
                }
                if args.digests:
                    row["checkpoint_sha256"] = checkpoint_digest(out)
                rows.append(row)
                print(row, flush=True)
    sparsegpt = {r["structure"]: r["seconds_per_block"] for r in rows if r["method"] == "sparsegpt"}
    print(f"\nSmolLM2-135M, {args.nsamples} x {args.seqlen} builtin-c4 calibration, seed 0\n")
    print(
        "| method | pattern | wiki ppl | ref-protocol ppl | time (s) | s/block | x SparseGPT "
        "| peak mem (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_block = r.get("seconds_per_block", 0)
        ratio = per_block / sparsegpt[r["structure"]] if r["structure"] in sparsegpt else 0
        print(
            f"| {r['method']} | {r['structure']} | {r.get('wiki', float('nan')):.2f} | "
            f"{r.get('ref', float('nan')):.2f} | "
            f"{r.get('seconds', 0):.0f} | {per_block:.1f} | {ratio:.1f} | "
            f"{r.get('peak_memory_gib', 0):.2f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

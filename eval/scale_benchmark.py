"""Benchmark: does SAFE+ hold on a model whose weights live on another scale?

SmolLM2-135M and its function-preserving rescaled copies (:func:`rescale.rescale_norms`:
every block norm's gain x c, the linear layers reading it / c; same function, other weights),
pruned with SparseGPT and SAFE+ (options of ``recipes/smollm2-135m-safe+-<50|2-4>.yaml``) on
the reference protocol: 32 x 512 builtin-c4 calibration windows, seed 0; perplexity on the
first 64 x 512 windows of raw ``wiki.utf8`` (dense 16.41). Per SAFE+ run it also reports the
blocks where the held-out windows kept the warm start (SparseGPT) and the held-out errors of
the result against its warm start.

Each run is appended to ``--json`` as soon as it finishes (a partial run keeps its rows).

Usage (CPU; each SAFE+ run takes minutes, ~20 min on 2 busy cores)::

    OMP_NUM_THREADS=1 nice python eval/scale_benchmark.py --scales 1 0.1 10 \\
        --structures unstructured 2:4 --json eval/results/scale_smollm2.jsonl --masks-dir masks
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rescale import rescale_norms

from safe_llm.config import load_recipe, make_method
from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.io.data import calibration_windows
from safe_llm.io.models import load_model
from safe_llm.stages.prune.engine import EngineOptions, prune_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402


def recipe_options(method: str, structure: str) -> dict:
    if method != "safe+":
        return {}
    tag = "2-4" if structure == "2:4" else "50"
    return load_recipe(ROOT / "recipes" / f"smollm2-135m-safe+-{tag}.yaml")["method_options"]


def block_summary(report) -> dict:
    """Held-out errors of SAFE+ against its warm start, per block and in short."""
    extras = [b.extra for b in report.blocks]
    rows = {
        "reconstruction_error": [b.reconstruction_error for b in report.blocks],
        "holdout_error": [e.get("holdout_error") for e in extras],
        "holdout_error_warm_start": [e.get("holdout_error_warm_start") for e in extras],
        "kept_warm_start": [int(e.get("kept_warm_start", 0)) for e in extras],
    }
    pairs = [
        (e["holdout_error"], e["holdout_error_warm_start"]) for e in extras if "holdout_error" in e
    ]
    if pairs:
        rows["blocks_kept_warm_start"] = sum(rows["kept_warm_start"])
        rows["median_holdout_ratio"] = statistics.median(a / w for a, w in pairs)
    return rows


def keep_masks(model, blocks: int | None = None) -> torch.Tensor:
    """The keep-mask of every prunable weight (of the first ``blocks`` blocks), flattened in
    block order."""
    return torch.cat(
        [
            (weight_matrix(layer) != 0).flatten()
            for block in find_blocks(model)[1][:blocks]
            for layer in prunable_layers(block).values()
        ]
    )


def run(args, scale: float, structure: str, method: str, tokenizer, base, calib, scored) -> dict:
    import copy

    model = copy.deepcopy(base)
    if scale != 1:
        rescale_norms(model, scale)
    sparsity = args.sparsity if structure == "unstructured" else None
    pattern = SparsityPattern.parse(structure, sparsity)
    options = recipe_options(method, structure)
    start = time.perf_counter()
    report = prune_model(
        model,
        calib,
        make_method(method, options),
        pattern,
        EngineOptions(device=torch.device("cpu"), progress=False, max_blocks=args.max_blocks),
    )
    seconds = time.perf_counter() - start
    masks = keep_masks(model)
    if args.masks_dir:
        Path(args.masks_dir).mkdir(parents=True, exist_ok=True)
        name = f"{method}-{structure.replace(':', '-')}-c{scale:g}.pt"
        torch.save(masks, Path(args.masks_dir) / name)
    reference = Path(args.masks_dir or "") / f"{method}-{structure.replace(':', '-')}-c1.pt"
    agreement = None
    if args.masks_dir and scale != 1 and reference.is_file():
        agreement = float((torch.load(reference) == masks).float().mean())
    return {
        "scale": scale,
        "structure": structure,
        "method": method,
        "options": options,
        "ppl_ref": perplexity(model, scored, batch_size=8),
        "seconds": seconds,
        "same_mask_as_c1": agreement,
        **block_summary(report),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.1, 10.0])
    parser.add_argument("--structures", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "safe+"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max-blocks", type=int, default=None, help="prune the first K only")
    parser.add_argument("--json", help="append one JSON line per run here")
    parser.add_argument(
        "--masks-dir",
        help="save each run's masks here; a rescaled run reports its agreement with c = 1's",
    )
    args = parser.parse_args()

    base, tokenizer, _ = load_model("smollm2-135m")
    calib = calibration_windows(tokenizer, "builtin-c4", 32, 512, 0)
    scored = reference_windows(tokenizer)
    for structure in args.structures:
        for scale in args.scales:
            for method in args.methods:
                row = run(args, scale, structure, method, tokenizer, base, calib, scored)
                short = {k: v for k, v in row.items() if not isinstance(v, list | dict)}
                print(json.dumps(short), flush=True)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as out:
                        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

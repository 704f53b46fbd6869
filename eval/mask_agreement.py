"""How much of the mask survives a function-preserving rescaling, for SparseGPT and SAFE+.

Prunes the first ``--blocks`` blocks of SmolLM2 and of its rescaled copy
(:func:`rescale.rescale_norms`, norm gains x c, the linear layers reading them / c)
on the same calibration windows and prints the share of identical mask entries. SparseGPT's
solution is scale-invariant in exact arithmetic, so its agreement measures what floating-point
rounding alone flips; a scale-free solver should agree as well as it does.

Usage::

    OMP_NUM_THREADS=1 python eval/mask_agreement.py --methods sparsegpt safe+ --scales 0.1 10
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from rescale import rescale_norms

from safe_llm.config import make_method
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.io import data
from safe_llm.io.models import load_model
from safe_llm.stages.prune.engine import EngineOptions, prune_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_benchmark import keep_masks  # noqa: E402


def agreement(method: str, options: dict, scale: float, args) -> float:
    model, tokenizer, _ = load_model(args.model)
    windows = data.calibration_windows(tokenizer, "builtin-c4", args.nsamples, args.seqlen, 0)
    rescaled = rescale_norms(copy.deepcopy(model), scale)
    pattern = SparsityPattern.parse(args.structure, args.sparsity)
    for candidate in (model, rescaled):
        prune_model(
            candidate,
            windows,
            make_method(method, options),
            pattern,
            EngineOptions(device=torch.device("cpu"), progress=False, max_blocks=args.blocks),
        )
    same = keep_masks(model, args.blocks) == keep_masks(rescaled, args.blocks)
    return float(same.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "safe+"])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.1, 10.0])
    parser.add_argument("--autocast", default="off", help="SAFE's --autocast (off: fp32)")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    for scale in args.scales:
        for method in args.methods:
            options = {"autocast": args.autocast} if method.startswith("safe") else {}
            same = agreement(method, options, scale, args)
            row = {"method": method, **options, "scale": scale, "blocks": args.blocks}
            print(json.dumps({**row, "same_mask": same}), flush=True)


if __name__ == "__main__":
    main()

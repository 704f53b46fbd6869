"""Bitmask export size on the built-in SmolLM2-135M: 50% unstructured and 2:4, fp32 and bf16.

Prunes with magnitude (the size depends only on the pattern and the dtype, not the method),
writes the dense checkpoint, exports it with ``safe-llm export --format bitmask``, checks that
``safe_llm.load`` gives back every tensor bit for bit, and prints the sizes::

    python eval/export_size.py [--output runs/export_size] [--json runs/export_size.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import safe_llm
from safe_llm.io.export import BITMASK_FILE, export_bitmask

SETTINGS = [
    ("unstructured", 0.5, "float32"),
    ("2:4", None, "float32"),
    ("unstructured", 0.5, "bfloat16"),
    ("2:4", None, "bfloat16"),
]


def measure(root: Path, structure: str, sparsity: float | None, dtype: str) -> dict:
    name = f"{structure.replace(':', '-')}-{dtype}"
    checkpoint, exported = root / name, root / f"{name}-bitmask"
    options = dict(method="magnitude", structure=structure, dtype=dtype, dataset="builtin-c4")
    if sparsity is not None:
        options["sparsity"] = sparsity
    safe_llm.prune(
        "smollm2-135m", nsamples=1, seqlen=64, output=str(checkpoint), overwrite=True, **options
    )
    sizes = export_bitmask(checkpoint, exported, overwrite=True)
    dense = load_file(checkpoint / "model.safetensors")
    restored = safe_llm.load(exported).state_dict()
    exact = all(
        torch.equal(dense[k].view(torch.uint8), restored[k].contiguous().view(torch.uint8))
        for k in dense
    )
    return {
        "structure": structure,
        "dtype": dtype,
        "dense_file_bytes": (checkpoint / "model.safetensors").stat().st_size,
        "bitmask_file_bytes": (exported / BITMASK_FILE).stat().st_size,
        "file_ratio": sizes.ratio,
        "pruned_matrices_ratio": sizes.packed_ratio,
        "pruned_share_of_dense": sizes.packed_dense_bytes / sizes.dense_bytes,
        "bitwise_exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/export_size", help="working directory")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    root = Path(args.output)
    rows = [measure(root, *setting) for setting in SETTINGS]
    print("| pattern | dtype | dense MiB | bitmask MiB | file ratio | pruned matrices | exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['structure']} | {r['dtype']} | {r['dense_file_bytes'] / 2**20:.1f} | "
            f"{r['bitmask_file_bytes'] / 2**20:.1f} | {r['file_ratio']:.3f} | "
            f"{r['pruned_matrices_ratio']:.4f} | {r['bitwise_exact']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: one mixture-of-experts block of realistic width, pruned per method on CPU.

A Qwen3-MoE block built from transformers' own config (hidden 1024, 32 experts, top-4,
expert width 512; one decoder layer) with random weights; the calibration windows are real
text (``c4.utf8`` of the built-in calibration data, as UTF-8 bytes, vocabulary 256) through
the model's (random) embedding, so the router sees the uneven token mix of real text rather
than uniform noise. Each run restores the block's initial weights and prunes it through
:func:`safe_llm.stages.prune.engine.prune_model`; the seconds and the relative reconstruction error
``||block(X) - Y||^2 / ||Y||^2`` are the engine's own per-block figures, plus how many experts
received no calibration token and the fewest tokens one did.

Usage (CPU, a few minutes with one thread)::

    OMP_NUM_THREADS=1 python eval/moe_benchmark.py --json eval/results/moe_block_cpu.json

With ``--gpu`` (CUDA) the block is Qwen3-30B-A3B-shaped: hidden 2048, 128 experts, top-8,
expert width 768, bf16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from safe_llm.config import make_method
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.io.data import builtin_data_dir
from safe_llm.stages.prune.engine import EngineOptions, prune_model

BLOCK_SHAPE = ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
RUNS = [  # (label, method, structure, method options, statistics from every token)
    ("magnitude", "magnitude", "unstructured", None, False),
    ("wanda", "wanda", "unstructured", None, False),
    ("wanda, every token", "wanda", "unstructured", None, True),
    ("sparsegpt", "sparsegpt", "unstructured", None, False),
    ("sparsegpt, every token", "sparsegpt", "unstructured", None, True),
    ("safe+ (defaults: sparsegpt start, 2 epochs)", "safe+", "unstructured", {}, False),
    ("sparsegpt 2:4", "sparsegpt", "2:4", None, False),
    ("safe+ 2:4 (defaults)", "safe+", "2:4", {}, False),
]


def build(gpu: bool) -> Qwen3MoeForCausalLM:
    shape = (
        dict(
            hidden_size=2048,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
        )
        if gpu
        else dict(
            hidden_size=1024,
            num_experts=32,
            num_experts_per_tok=4,
            moe_intermediate_size=512,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
        )
    )
    config = Qwen3MoeConfig(
        vocab_size=256,
        num_hidden_layers=1,
        intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=4096,
        norm_topk_prob=True,
        **shape,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


def text_windows(count: int, seqlen: int) -> torch.Tensor:
    """``[count, seqlen]`` byte ids of consecutive stretches of real text."""
    data = (builtin_data_dir() / "c4.utf8").read_bytes()[: count * seqlen]
    return torch.tensor(list(data), dtype=torch.long).reshape(count, seqlen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    model = build(args.gpu)
    if args.gpu:
        model.to(torch.bfloat16)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    windows = text_windows(args.nsamples, args.seqlen)
    results = []
    for label, method, structure, options, every in RUNS:
        if args.only and label not in args.only:
            continue
        model.load_state_dict(initial)
        pattern = SparsityPattern.parse(structure, 0.5 if structure == "unstructured" else None)
        start = time.perf_counter()
        engine = EngineOptions(device=device, batch_size=8, progress=False, moe_every_token=every)
        report = prune_model(model, windows, make_method(method, options), pattern, engine)
        block = report.blocks[0]
        row = {
            "run": label,
            "seconds": round(block.seconds, 2),
            "wall_seconds": round(time.perf_counter() - start, 2),
            "reconstruction_error": block.reconstruction_error,
            "overall_sparsity": report.overall_sparsity,
            "all_block_weights_sparsity": report.all_block_weights_sparsity,
            "experts_without_tokens": block.extra.get("experts_without_tokens"),
            "expert_tokens_min": block.extra.get("expert_tokens_min"),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        document = {
            "block": {k: getattr(model.config, k) for k in BLOCK_SHAPE},
            "windows": [args.nsamples, args.seqlen],
            "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "runs": results,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark: seconds to prune one LLaMA-2-7B-shaped block on a GPU, per method.

The paper's cost table (SAFE.md section 4: first block of LLaMA-2-7B at 50%, 128 windows of
2048 tokens) timed on this toolkit's engine. The model is built from a config (hidden 4096,
intermediate 11008, 32 heads, one block) with random weights in bf16, and the calibration
windows are random token ids: the time does not depend on the values. Each run restores the
block's initial weights and prunes it through :func:`safe_llm.stages.prune.engine.prune_model` (capture,
statistics pass, the method, the pruned forward pass), so the seconds are the engine's per-block
seconds. The paper-setting SAFE (30 epochs, two passes a step) runs for ``--paper-epochs`` and
its full 30-epoch time is also projected from the measured seconds per step.

Usage (needs CUDA; a few minutes on one H100/H200)::

    python eval/gpu_block_benchmark.py --json eval/results/gpu_block.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safe_llm.config import make_method
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.stages.prune.engine import EngineOptions, prune_model

ABSOLUTE = dict(step_scale="absolute", holdout=0.0)  # the steps the READMEs' figures used
PAPER = dict(
    lr=2e-4,
    epochs=30,
    train_batch_size=8,
    lam=1e-3,
    rho=2e-4,
    interval=32,
    warmup_epochs=2,
    init="dense",
    sam_ascent="exact",
    **ABSOLUTE,
)
FAST = dict(
    init="sparsegpt",
    lr=5e-4,
    epochs=2,
    train_batch_size=8,
    lam=1e-3,
    rho=2e-4,
    interval=2,
    warmup_epochs=0,
    sam_ascent="previous",
    **ABSOLUTE,
)


def runs(paper_epochs: float) -> list[tuple[str, str, str, dict | None]]:
    """``(label, method, structure, options)`` in the order they run."""
    return [
        ("magnitude", "magnitude", "unstructured", None),
        ("wanda", "wanda", "unstructured", None),
        ("sparsegpt", "sparsegpt", "unstructured", None),
        ("safe+ (CPU recipe: sparsegpt init, 2 epochs)", "safe+", "unstructured", FAST),
        ("safe+ (sparsegpt init, 4 epochs)", "safe+", "unstructured", dict(FAST, epochs=4)),
        ("safe+ (defaults)", "safe+", "unstructured", None),
        ("sparsegpt 2:4", "sparsegpt", "2:4", None),
        ("safe+ 2:4 (CPU recipe)", "safe+", "2:4", FAST),
        ("safe+ 2:4 (defaults)", "safe+", "2:4", None),
        (
            f"safe (paper setting, {paper_epochs:g} epochs)",
            "safe",
            "unstructured",
            dict(PAPER, epochs=paper_epochs),
        ),
    ]


def build(args, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        return LlamaForCausalLM(config).to(dtype).eval()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument(
        "--only", nargs="+", help="run only these runs (label prefixes, e.g. sparsegpt safe+)"
    )
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--paper-epochs", type=float, default=30, help="epochs of the paper-setting SAFE run"
    )
    parser.add_argument("--device", default="cuda", help="cuda (bf16); cpu (fp32) for a smoke test")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def run_one(model, windows, run: tuple, args, device: torch.device) -> dict:
    """Prune the one block of ``model`` with ``run`` = ``(label, method, structure, options)``
    and return its row: time, peak memory, error (and SAFE's projected 30-epoch time)."""
    label, method, structure, options = run
    pattern = SparsityPattern.parse(structure, args.sparsity)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine = EngineOptions(device=device, batch_size=8, layer_errors=False, progress=False)
    report = prune_model(model, windows, make_method(method, options), pattern, engine)
    total = time.perf_counter() - start
    block = report.blocks[0]
    row = {
        "run": label,
        "method": method,
        "structure": structure,
        "block_seconds": round(block.seconds, 2),
        "total_seconds": round(total, 2),
        "peak_gpu_gib": round(report.peak_memory_bytes / 2**30, 2),
        "reconstruction_error": block.reconstruction_error,
        "steps": block.extra.get("steps"),
    }
    if method == "safe" and block.extra.get("steps"):
        per_step = block.seconds / block.extra["steps"]
        steps_30 = 30 * -(-args.windows // 8)
        row["projected_30_epoch_seconds"] = round(per_step * steps_30, 1)
    return row


def print_table(results: list[dict], name: str, dtype: torch.dtype, args) -> None:
    """The rows, with each run's time relative to SparseGPT's."""
    base = next((r["block_seconds"] for r in results if r["run"] == "sparsegpt"), float("nan"))
    print(
        f"\n{name} | torch {torch.__version__} | "
        f"{args.windows}x{args.seqlen} windows, hidden {args.hidden}, {dtype}"
    )
    print(f"{'run':48s} {'s/block':>8s} {'x SGPT':>7s} {'peak GiB':>8s} {'error':>10s}")
    for r in results:
        print(
            f"{r['run']:48s} {r['block_seconds']:8.2f} {r['block_seconds'] / base:7.2f} "
            f"{r['peak_gpu_gib']:8.2f} {r['reconstruction_error']:10.4g}"
        )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu with small shapes for a smoke test")

    model = build(args, device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(
        32000, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    results = []
    warm = [("warm-up", "magnitude", "unstructured", None)]
    chosen = [
        r for r in runs(args.paper_epochs) if not args.only or r[0].startswith(tuple(args.only))
    ]
    for run in warm + chosen:
        model.load_state_dict(initial)
        row = run_one(model, windows, run, args, device)
        if run[0] != "warm-up":
            results.append(row)
        print(json.dumps(row), flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print_table(results, name, next(model.parameters()).dtype, args)
    if args.json:
        meta = {"device": name, "torch": torch.__version__, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()

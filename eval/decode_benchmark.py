"""Decode benchmark against the memory-bandwidth limit: batch-1 tokens/s and memory of
``transformers``' dense model and of ``load_sparse``, each in a fresh process.

Batch-1 decoding reads every weight once per token, so a model's speed limit is its bytes
per token over the memory bandwidth. For each model, pattern (50%, 70%, 2:4) and thread
count (1, 2), the dense model (``AutoModelForCausalLM.from_pretrained``, the dtype
``load_sparse`` picks: bf16 where the CPU computes it natively, else fp32) and the sparse one
(``load_sparse`` with ``policy=auto``) decode greedily in fresh processes, alternating over
``--rounds`` (medians). Reported per case: tokens/s of each and their ratio; the RSS of each
process after generating and its peak (the load included); the weight bytes each reads per
token; the read bandwidth measured by the same run (one large ``sum`` per thread count, in a
fresh process); the **limit ratio** (dense bytes per token / sparse bytes per token, the
speedup at equal bandwidth) and how much of it was reached; whether both produced the same
tokens; the CPU's name and ``torch.backends.cpu.get_cpu_capability()``.

``--matrices`` adds per-matrix GB/s (compressed bytes over time) of every kernel path and of
dense ``F.linear`` for the shapes of the 1.5B model, from the same measurement ``auto`` uses.

Models: the built-in SmolLM2-135M pruned by ``safe_llm.prune`` (magnitude), and random-weight
LLaMA-shaped models (no tokenizer to calibrate with: each linear layer of the blocks is pruned
by magnitude, per matrix or per N:M group, as the magnitude method does): ``llama1.5b``
(hidden 1536, intermediate 8960, 28 layers, 12 heads with 2 KV heads) and ``llama4096x4``
(hidden 4096, intermediate 11008, 4 layers). ``--isa avx2`` runs both processes as an AVX2
CPU would (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``: fp32, and the ``avx2``
kernel path). Usage::

    python eval/decode_benchmark.py --json eval/results/decode_benchmark.json
    python eval/decode_benchmark.py --models smollm2 --patterns 0.5 --threads 1 --rounds 1
    python eval/decode_benchmark.py --isa avx2 --models llama1.5b --json ...avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMAS = {
    "llama1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    "llama4096x4": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}
LLAMA_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# ---------------------------------------------------------------- checkpoints


def prune_smollm2(path: Path, pattern: str) -> None:
    import safe_llm

    options = {"structure": pattern} if ":" in pattern else {"sparsity": float(pattern)}
    safe_llm.prune(
        "smollm2-135m",
        method="magnitude",
        dataset="builtin-c4",
        nsamples=1,
        seqlen=64,
        output=str(path),
        overwrite=True,
        **options,
    )


def _magnitude(weight: torch.Tensor, pattern: str) -> None:
    """Zero the smallest-magnitude entries of one matrix in place (per matrix, or per group)."""
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        groups = weight.view(weight.shape[0], -1, m)
        groups.scatter_(2, groups.abs().topk(m - n, dim=-1, largest=False).indices, 0)
        return
    k = int(weight.numel() * float(pattern))
    threshold = weight.abs().float().view(-1).kthvalue(k).values
    weight[weight.abs() <= threshold] = 0


def prune_llama(path: Path, pattern: str, shape: dict) -> None:
    """A random LLaMA-shaped model (seeded, bf16 on disk), every block matrix magnitude-pruned."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, **LLAMA_COMMON, dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    _magnitude(module.weight, pattern)
    model.save_pretrained(path)


def checkpoint(root: Path, model: str, pattern: str) -> Path:
    """The pruned checkpoint of ``model`` at ``pattern``, made once under ``root``."""
    path = root / f"{model}-{pattern.replace(':', '-')}"
    if not (path / "config.json").is_file():
        if model == "smollm2":
            prune_smollm2(path, pattern)
        else:
            prune_llama(path, pattern, LLAMAS[model])
    return path


# ---------------------------------------------------------------- one process, one variant


def _weights_read_per_token(model) -> int:
    """Weight bytes one decode step reads: every weight, less an untied input embedding (of
    which one row is read)."""
    from safe_llm.inference.load import weight_bytes

    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and getattr(output, "weight", None) is embedding
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def _decode(model, prompt: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Greedy batch-1 decoding after a prefill of ``prompt``: (seconds of the ``steps``
    decode steps, the tokens), through the KV cache as ``generate`` runs it."""
    from transformers import DynamicCache

    tokens = []
    with torch.inference_mode():
        cache = DynamicCache()
        logits = model(prompt, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        return time.perf_counter() - start, tokens


def run_variant(
    variant: str, path: str, threads: int, kernel: str, steps: int, dtype: str = "auto"
) -> dict:
    """Load ``variant`` (``dense``: transformers; ``sparse``: load_sparse) in this fresh
    process, decode, and measure."""
    import logging

    from safe_llm.core.memory import process_peak_bytes, resident_bytes
    from safe_llm.inference.load import decode_dtype, load_sparse

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("safe_llm.inference").setLevel(logging.INFO)
    start = time.perf_counter()
    if variant == "dense":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=decode_dtype(dtype)).eval()
    else:  # "sparse": the default; "all dense": load_sparse keeping every matrix dense
        policy = "dense" if variant == "all dense" else "auto"
        model = load_sparse(path, dtype=dtype, kernel_path=kernel, policy=policy, progress=False)
    load_s = time.perf_counter() - start
    prompt = torch.arange(100, 116).unsqueeze(0)
    _decode(model, prompt, 2)  # warm-up
    seconds, tokens = _decode(model, prompt, steps)
    summary = getattr(model, "sparse_summary", None)
    return {
        "tokens_per_s": steps / seconds,
        "tokens": tokens,
        "load_s": load_s,
        "rss_after_mib": resident_bytes() / 2**20,
        "peak_mib": process_peak_bytes() / 2**20,
        "bytes_per_token": _weights_read_per_token(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "summary": None if summary is None else summary.describe(),
        "paths": None if summary is None else dict(summary.paths),
    }


def read_bandwidth(threads: int, megabytes: int = 1024) -> float:
    """GB/s of a large ``sum`` (read bytes), the best of 5, with ``threads`` threads."""
    torch.set_num_threads(threads)
    data = torch.ones(megabytes << 18)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def in_child(env: dict, *args: str) -> dict:
    """Run this script with ``args`` in a fresh process; its last stdout line is JSON."""
    command = [sys.executable, __file__, *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the cases


def run_case(path: Path, threads: int, args, env: dict, bandwidth: float) -> dict:
    runs = {"dense": [], "sparse": []}
    if args.all_dense:
        runs["all dense"] = []
    for _ in range(args.rounds):
        for variant in runs:
            child = (str(path), str(threads), args.kernel, str(args.steps), args.dtype)
            child = ("--child", variant, *child)
            runs[variant].append(in_child(env, *child))
    dense, sparse = runs["dense"][-1], runs["sparse"][-1]
    rate = {v: statistics.median(r["tokens_per_s"] for r in runs[v]) for v in runs}
    limit = dense["bytes_per_token"] / sparse["bytes_per_token"]
    return {
        "threads": threads,
        "dense_tokens_per_s": rate["dense"],
        "sparse_tokens_per_s": rate["sparse"],
        "speedup": rate["sparse"] / rate["dense"],
        "limit_ratio": limit,
        "share_of_limit": rate["sparse"] / rate["dense"] / limit,
        "dense_gbs": dense["bytes_per_token"] * rate["dense"] / 1e9,
        "sparse_gbs": sparse["bytes_per_token"] * rate["sparse"] / 1e9,
        "bandwidth_gbs": bandwidth,
        "rss_ratio": sparse["rss_after_mib"] / dense["rss_after_mib"],
        "peak_ratio": sparse["peak_mib"] / dense["peak_mib"],
        "same_tokens": dense["tokens"] == sparse["tokens"],
        "dense": dense,
        "sparse": sparse,
        "rates": {v: [r["tokens_per_s"] for r in runs[v]] for v in runs},
        "all_dense_x_dense": rate["all dense"] / rate["dense"] if "all dense" in rate else None,
    }


def matrix_table(threads_list: list[int], env: dict, dtype: str) -> list[dict]:
    rows = []
    for threads in threads_list:
        child_env = {**env, "DECODE_BENCHMARK_DTYPE": dtype}
        rows += in_child(child_env, "--child-matrices", str(threads))["rows"]
    return rows


def run_matrices(threads: int) -> dict:
    """GB/s of every compiled path and of dense for the 1.5B model's matrix shapes."""
    from safe_llm.inference import autotune, kernel

    torch.set_num_threads(threads)
    shape = LLAMAS["llama1.5b"]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    rows = []
    dtypes = [torch.bfloat16] if _bf16_native() else [torch.float32]
    if os.environ.get("DECODE_BENCHMARK_DTYPE", "auto") != "auto":
        dtypes = [getattr(torch, os.environ["DECODE_BENCHMARK_DTYPE"])]
    for dtype in dtypes:
        for out, width in ((hidden, hidden), (kv, hidden), (inter, hidden), (hidden, inter)):
            for pattern in ("0.5", "0.7", "2:4"):
                torch.manual_seed(0)
                weight = torch.randn(out, width)
                _magnitude(weight, pattern)
                matrix = kernel.compress(weight, dtype)
                paths = autotune.candidate_paths("auto")
                seconds = autotune.measure(matrix, paths)
                dense_bytes = out * width * matrix.values.element_size()
                gbs = {p: matrix.nbytes / s / 1e9 for p, s in seconds.items() if p != "dense"}
                rows.append(
                    {
                        "threads": threads,
                        "shape": f"{out}x{width}",
                        "pattern": pattern,
                        "dtype": str(dtype).removeprefix("torch."),
                        "dense_gbs": dense_bytes / seconds["dense"] / 1e9,
                        "path_gbs": gbs,
                        "x_dense": {p: seconds["dense"] / s for p, s in seconds.items()},
                    }
                )
    return {"rows": rows}


def _bf16_native() -> bool:
    from safe_llm.core.precision import cpu_bf16_is_native

    return cpu_bf16_is_native()


def machine(env: dict) -> dict:
    return in_child(env, "--child-machine")


def describe_machine() -> dict:
    from safe_llm.core.precision import cpu_capability
    from safe_llm.inference import autotune, kernel

    return {
        "cpu": autotune.cpu_name(),
        "torch_cpu_capability": cpu_capability(),
        "bf16_native": _bf16_native(),
        "kernel_paths": kernel.cpu_paths(),
        "dpbf16": kernel.native_bf16_kernel(),
        "torch": torch.__version__,
    }


def print_cases(cases: list[dict]) -> None:
    print(
        "\n| model | pattern | threads | dense tok/s | sparse tok/s | x dense | limit | "
        "of limit | dense GB/s | sparse GB/s | read GB/s | RSS x dense | peak x dense | "
        "same tokens | all-dense load x dense |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for c in cases:
        print(
            f"| {c['model']} | {c['pattern']} | {c['threads']} | "
            f"{c['dense_tokens_per_s']:.2f} | {c['sparse_tokens_per_s']:.2f} | "
            f"{c['speedup']:.2f} | {c['limit_ratio']:.2f} | {c['share_of_limit']:.0%} | "
            f"{c['dense_gbs']:.1f} | {c['sparse_gbs']:.1f} | {c['bandwidth_gbs']:.1f} | "
            f"{c['rss_ratio']:.2f} | {c['peak_ratio']:.2f} | {c['same_tokens']} | "
            + (f"{c['all_dense_x_dense']:.2f} |" if c["all_dense_x_dense"] else "- |")
        )


def print_matrices(rows: list[dict]) -> None:
    paths = sorted({p for r in rows for p in r["path_gbs"]})
    print(f"\n| shape | pattern | dtype | threads | dense GB/s | {' | '.join(paths)} |")
    print("|---|---|---|---:|---:|" + "---:|" * len(paths))
    for r in rows:
        cells = " | ".join(
            f"{r['path_gbs'][p]:.1f} ({r['x_dense'][p]:.2f}x)" if p in r["path_gbs"] else "-"
            for p in paths
        )
        print(
            f"| {r['shape']} | {r['pattern']} | {r['dtype']} | {r['threads']} | "
            f"{r['dense_gbs']:.1f} | {cells} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama1.5b,llama4096x4")
    parser.add_argument("--patterns", default="0.5,0.7,2:4", help="sparsities and/or N:M")
    parser.add_argument("--threads", default="1,2", help="thread counts")
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--kernel", default="auto", help="load_sparse's kernel_path")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--matrices", action="store_true", help="per-matrix GB/s table too")
    parser.add_argument(
        "--all-dense",
        action="store_true",
        help="also load_sparse(policy='dense'): every matrix dense, against transformers' speed",
    )
    parser.add_argument("--workdir", help="where checkpoints are made and kept")
    parser.add_argument("--json", help="write the results here (after every case)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="both processes' dtype (auto: bf16 where native, else fp32; float32 on an "
        "AVX-512 CPU stands for one without AVX-512-BF16)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--child-bandwidth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-matrices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-machine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, path, threads, kernel, steps, dtype = args.child
        result = run_variant(variant, path, int(threads), kernel, int(steps), dtype)
        return print(json.dumps(result))
    if args.child_bandwidth:
        return print(json.dumps({"gbs": read_bandwidth(args.child_bandwidth)}))
    if args.child_matrices:
        return print(json.dumps(run_matrices(args.child_matrices)))
    if args.child_machine:
        return print(json.dumps(describe_machine()))

    env = dict(AVX2_ENV) if args.isa == "avx2" else {}
    if args.isa == "avx2" and args.kernel == "auto":
        args.kernel = "avx2"
    threads_list = [int(t) for t in args.threads.split(",")]
    document = {"machine": machine(env), "isa": args.isa, "kernel": args.kernel, "cases": []}
    document["dtype"] = args.dtype
    print(json.dumps(document["machine"]), flush=True)
    bandwidth = {t: in_child(env, "--child-bandwidth", str(t))["gbs"] for t in threads_list}
    document["read_bandwidth_gbs"] = bandwidth
    root = Path(args.workdir or tempfile.mkdtemp(prefix="decode-benchmark-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.matrices:
        document["matrices"] = matrix_table(threads_list, env, args.dtype)
        print_matrices(document["matrices"])
    for model in args.models.split(","):
        for pattern in args.patterns.split(","):
            path = checkpoint(root, model, pattern)
            for threads in threads_list:
                case = run_case(path, threads, args, env, bandwidth[threads])
                document["cases"].append({"model": model, "pattern": pattern, **case})
                print_cases(document["cases"][-1:])
                sys.stdout.flush()
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(document, indent=1))
    print_cases(document["cases"])
    if args.matrices:
        print_matrices(document["matrices"])


if __name__ == "__main__":
    main()

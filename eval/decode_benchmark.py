"""Decode benchmark: batch-1 tokens/s and weight memory, dense vs sparse, from one checkpoint.

For each model and pattern a pruned checkpoint is written, then loaded three ways in this one
process: dense (``load_dense``), sparse as ``load_sparse`` decides by default (``policy=auto``:
a matrix is sparse only where the kernel was measured faster than dense) and sparse for every
pruned matrix (``policy=sparse``: the kernel's own speed and the memory floor). The variants
decode greedily in interleaved rounds (dense, auto, all, dense, ...) so that their ratios
survive a loaded machine; the medians are reported with the CPU capability, the load average,
the weights' bytes (:func:`~safe_llm.inference.load.weight_bytes`), the RSS of a fresh process
that loaded the variant alone (and that less the RSS of one that loaded nothing),
the bytes read per token against the measured memory bandwidth (a large copy and a large
sum), and whether every variant produced the same tokens.

Models: the built-in SmolLM2-135M pruned with ``magnitude`` through ``safe_llm.prune``, and a
random LLaMA-shaped model of about 1.2B parameters (Llama-3.2-1B's shapes) pruned by
magnitude per matrix. Patterns: 50% and 70% unstructured, 2:4. Usage::

    python eval/decode_benchmark.py --json eval/results/decode_benchmark.json
    python eval/decode_benchmark.py --models smollm2 --patterns 0.5 --steps 16   # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import safe_llm
from safe_llm.core.memory import process_peak_bytes, resident_bytes, return_freed_memory
from safe_llm.core.precision import cpu_capability
from safe_llm.inference import kernel
from safe_llm.inference.linear import SparseLinear
from safe_llm.inference.load import load_dense, load_sparse, weight_bytes

LLAMA_1B = dict(  # Llama-3.2-1B's shapes: 1.24 B parameters with the tied embedding
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def cpu_flags() -> list[str]:
    wanted = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vbmi2", "avx512_bf16", "amx_bf16"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(wanted & set(line.split(":")[1].split()))
    except OSError:
        pass
    return []


def bandwidth_gbs(megabytes: int = 512) -> dict:
    """Memory bandwidth from a large copy (read + write bytes) and a large sum (read bytes),
    the best of 5 each, with torch's threads."""
    src = torch.ones(megabytes << 18)  # float32: megabytes MiB
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - start)
    size = src.numel() * 4
    return {"copy": 2 * size / min(copy) / 1e9, "read": size / min(read) / 1e9}


def prune_smollm2(root: Path, pattern: str) -> Path:
    output = root / f"smollm2-{pattern.replace(':', '-')}"
    options = {"structure": pattern} if ":" in pattern else {"sparsity": float(pattern)}
    safe_llm.prune(
        "smollm2-135m",
        method="magnitude",
        dataset="builtin-c4",
        nsamples=1,
        seqlen=64,
        output=str(output),
        overwrite=True,
        **options,
    )
    return output


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


def prune_llama_1b(root: Path, pattern: str) -> Path:
    """A random Llama-3.2-1B-shaped model (seeded, bf16 on disk), magnitude-pruned."""
    output = root / f"llama1b-{pattern.replace(':', '-')}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, dtype="bfloat16")).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    _magnitude(module.weight, pattern)
    model.save_pretrained(output)
    del model
    gc.collect()
    return output


def decode_rate(model, prompt: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Greedy batch-1 decoding after a prefill of ``prompt``: (tokens/s of the ``steps``
    decode steps, the tokens)."""
    tokens = []
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        return steps / (time.perf_counter() - start), tokens


def read_bytes(model) -> int:
    """Weight bytes one decode step reads: every weight, less an untied input embedding (of
    which one row is read)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and getattr(output, "weight", None) is embedding
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


LOADERS = {
    "sparse (all)": lambda path: load_sparse(path, policy="sparse", progress=False),
    "dense": load_dense,
    "sparse (auto)": lambda path: load_sparse(path, progress=False),
    "nothing": lambda path: None,  # the process's own RSS: torch, transformers, safe_llm
}


def rss_in_child(variant: str, checkpoint: Path) -> dict:
    """RSS (MiB) of a fresh process after loading ``variant`` alone and running one prefill,
    and its peak."""
    command = [sys.executable, __file__, "--rss-of", variant, str(checkpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _report_rss(variant: str, checkpoint: str) -> None:
    torch.set_num_threads(1)
    model = LOADERS[variant](Path(checkpoint))
    if model is not None:  # one prefill touches every weight (a dense load maps the file)
        with torch.inference_mode():
            model(torch.arange(100, 116).unsqueeze(0))
    gc.collect()
    return_freed_memory()
    weights = 0 if model is None else weight_bytes(model)
    rss, peak = resident_bytes() / 2**20, process_peak_bytes() / 2**20
    print(json.dumps({"rss_mib": rss, "peak_mib": peak, "weights_mib": weights / 2**20}))


def load_variants(checkpoint: Path) -> tuple[dict, dict]:
    """``({name: model}, {name: child-process RSS})``; ``auto`` is kept only when its
    measured rule makes some matrix sparse (else it is the same model as ``dense``)."""
    models, rss = {}, {"nothing": rss_in_child("nothing", checkpoint)}
    for name in ("sparse (all)", "dense", "sparse (auto)"):
        models[name] = LOADERS[name](checkpoint)
        if name == "sparse (auto)" and not models[name].sparse_summary.sparse:
            del models[name]  # every matrix dense: the same model as "dense"
            continue
        rss[name] = rss_in_child(name, checkpoint)
    return models, rss


def run_case(model_name: str, pattern: str, checkpoint: Path, args) -> dict:
    models, rss = load_variants(checkpoint)
    prompt = torch.arange(100, 100 + args.prompt_tokens).unsqueeze(0)
    rates = {name: [] for name in models}
    tokens = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            rate, tokens[name] = decode_rate(model, prompt, args.steps)
            rates[name].append(rate)
    auto = models.get("sparse (auto)")
    rows = []
    for name, model in models.items():
        rate = statistics.median(rates[name])
        rows.append(
            {
                "model": model_name,
                "pattern": pattern,
                "variant": name,
                "tokens_per_s": rate,
                "speedup": rate / statistics.median(rates["dense"]),
                "weights_mib": weight_bytes(model) / 2**20,
                "rss_mib": rss[name]["rss_mib"],
                "rss_added_mib": rss[name]["rss_mib"] - rss["nothing"]["rss_mib"],
                "peak_mib": rss[name]["peak_mib"],
                "bytes_per_token_mib": read_bytes(model) / 2**20,
                "implied_gbs": read_bytes(model) * rate / 1e9,
                "sparse_layers": sum(isinstance(m, SparseLinear) for m in model.modules()),
                "same_tokens_as_dense": tokens[name] == tokens["dense"],
            }
        )
    decisions = (auto or models["sparse (all)"]).sparse_summary.decisions
    return {
        "rows": rows,
        "auto_is_dense": auto is None,
        "rss_without_model_mib": rss["nothing"]["rss_mib"],
        "decisions": [{**d, "key": [str(k) for k in d["key"]]} for d in decisions],
    }


def print_table(rows: list[dict], bandwidth: dict) -> None:
    print(
        f"\n| model | pattern | variant | tokens/s | x dense | weights MiB | RSS MiB (model) | "
        f"MiB/token | GB/s (of {bandwidth['read']:.1f} read) | same tokens |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['pattern']} | {r['variant']} | {r['tokens_per_s']:.2f} | "
            f"{r['speedup']:.2f} | {r['weights_mib']:.0f} | "
            f"{r['rss_mib']:.0f} ({r['rss_added_mib']:.0f}) | "
            f"{r['bytes_per_token_mib']:.0f} | {r['implied_gbs']:.1f} | "
            f"{r['same_tokens_as_dense']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama1b", help="smollm2 and/or llama1b")
    parser.add_argument("--patterns", default="0.5,0.7,2:4", help="sparsities and/or N:M")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prefill length")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary dir)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rss-of", nargs=2, metavar=("VARIANT", "CHECKPOINT"), help="internal")
    args = parser.parse_args()
    if args.rss_of:
        return _report_rss(*args.rss_of)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("safe_llm.inference").setLevel(logging.INFO)  # the kernel's decisions
    machine = {
        "torch_cpu_capability": cpu_capability(),
        "kernel_path": kernel.best_path(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "bandwidth_gbs": bandwidth_gbs(),
        "load_average_start": os.getloadavg(),
    }
    print(json.dumps(machine))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="decode-benchmark-"))
    makers = {"smollm2": prune_smollm2, "llama1b": prune_llama_1b}
    cases, rows = [], []
    for model_name in args.models.split(","):
        for pattern in args.patterns.split(","):
            checkpoint = makers[model_name](root, pattern)
            case = run_case(model_name, pattern, checkpoint, args)
            cases.append(case)
            rows += case["rows"]
            print_table(case["rows"], machine["bandwidth_gbs"])
            if case["auto_is_dense"]:
                print("sparse (auto): every matrix dense (the kernel measured slower): = dense")
            shutil.rmtree(checkpoint)
            machine["load_average_end"] = os.getloadavg()
            if args.json:  # after every case: a long run stopped early keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                document = {"machine": machine, "cases": cases}
                Path(args.json).write_text(json.dumps(document, indent=1))
    print_table(rows, machine["bandwidth_gbs"])


if __name__ == "__main__":
    main()

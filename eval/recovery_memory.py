"""Benchmark: peak host memory of ``safe-llm recover``, as bytes per model parameter.

For each checkpoint and each optimiser state (``--states lean adam``: the lean default and
``--no-recover-lean``), runs ``safe-llm recover CHECKPOINT`` (``--steps`` steps of
``--batch-size`` windows of ``--seqlen`` tokens, no evaluation) under ``/usr/bin/time -v``
and reports its peak RSS minus the peak RSS of a bare ``python -c "import torch,
transformers"`` process, divided by the model's parameter count; beside it the planner's
estimate (``report.json``: ``recovery.memory_plan``) and the recovery stage's peak.

``--random-llama`` first builds a randomly initialised LLaMA-shaped model (``LlamaConfig``:
hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632 = TinyLlama-1.1B's shape,
with the vocabulary of ``--tokenizer-from``'s tokenizer so its windows index it), saves it
to ``--work`` and prunes it to 50% by magnitude; that checkpoint is added to the list.

Usage (one thread)::

    OMP_NUM_THREADS=1 python eval/recovery_memory.py --checkpoints runs/sparsegpt-50 \
        --random-llama --work /tmp/r22/mem --json eval/results/recovery_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_benchmark import timed  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 2048, 22, 32, 4, 5632


def peak_rss(command: list[str], log: Path) -> tuple[int, float]:
    """``(peak RSS in bytes, wall seconds)`` of ``command`` under ``/usr/bin/time -v``."""
    run = timed(command, log)
    return round(run["peak_rss_gib"] * 2**30), run["wall_s"]


def random_llama(work: Path, tokenizer_from: str) -> Path:
    """A randomly initialised LLaMA-shaped ~1B model pruned to 50% by magnitude (cached)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from safe_llm.io.models import resolve_model_path

    dense, pruned = work / "llama-1b-dense", work / "llama-1b-magnitude-50"
    if not (dense / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from)[0])
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(dense)
        tokenizer.save_pretrained(dense)
    if not (pruned / "report.json").is_file():
        command = [sys.executable, "-m", "safe_llm.cli", "prune", "--quiet", "--overwrite"]
        command += ["--model", str(dense), "--method", "magnitude", "--sparsity", "0.5"]
        command += ["--dataset", "builtin-c4", "--nsamples", "8", "--seqlen", "256"]
        command += ["--device", "cpu", "--output", str(pruned)]
        subprocess.run(command, check=True)
    return pruned


def recover_row(checkpoint: Path, state: str, baseline: int, args) -> dict:
    out = Path(args.work) / f"{checkpoint.name}-recovered-{state}"
    command = [sys.executable, "-m", "safe_llm.cli", "recover", "--quiet", str(checkpoint)]
    command += ["--output", str(out), "--overwrite", "--eval", "--device", "cpu"]
    command += ["--recover-steps", str(args.steps), "--recover-batch-size", str(args.batch_size)]
    command += ["--recover-seqlen", str(args.seqlen), "--recover-nsamples", str(args.nsamples)]
    command += ["--recover-lean" if state == "lean" else "--no-recover-lean"]
    command += ["--no-recover-memory-check"]
    rss, seconds = peak_rss(command, Path(args.work) / f"{out.name}.log")
    report = json.loads((out / "report.json").read_text())
    plan = report["recovery"]["memory_plan"]
    parameters = round(plan["peak_bytes"] / plan["bytes_per_parameter"])
    return {
        "checkpoint": str(checkpoint),
        "state": state,
        "parameters": parameters,
        "peak_rss_bytes": rss,
        "baseline_rss_bytes": baseline,
        "bytes_per_parameter": (rss - baseline) / parameters,
        "recovery_stage_peak_bytes": report["stage_peak_memory_bytes"].get("recover"),
        "planned_peak_bytes": plan["peak_bytes"],
        "planned_bytes_per_parameter": plan["bytes_per_parameter"],
        "plan_parts": plan["parts"],
        "wall_s": seconds,
        "seconds_per_step": report["recovery"]["seconds"] / args.steps,
    }


def print_table(rows: list[dict], baseline: int) -> None:
    """The rows as a markdown table, under the CPU, the threads and the bare-import RSS."""
    print(
        f"\ncpu capability {torch.backends.cpu.get_cpu_capability()}, threads "
        f"{torch.get_num_threads()}, bare import torch, transformers: {baseline / 2**30:.2f} GiB"
    )
    print(
        "| checkpoint | state | parameters | peak RSS (GiB) | bytes / parameter | planned "
        "| s / step |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {Path(r['checkpoint']).name} | {r['state']} | {r['parameters'] / 1e6:.0f}M | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['bytes_per_parameter']:.1f} | "
            f"{r['planned_bytes_per_parameter']:.1f} | {r['seconds_per_step']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", nargs="*", default=[], help="pruned checkpoints")
    parser.add_argument("--random-llama", action="store_true", help="add a random ~1B LLaMA")
    parser.add_argument("--random-states", nargs="+", default=["lean"], choices=["lean", "adam"])
    parser.add_argument("--tokenizer-from", default="smollm2-135m")
    parser.add_argument("--states", nargs="+", default=["adam", "lean"], choices=["lean", "adam"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--nsamples", type=int, default=8, help="recovery windows (cached)")
    parser.add_argument("--work", default="/tmp/recovery_memory")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    bare = [sys.executable, "-c", "import torch, transformers"]
    baseline, _ = peak_rss(bare, Path(args.work) / "baseline.log")
    runs = [(Path(c), s) for c in args.checkpoints for s in args.states]
    if args.random_llama:
        runs += [
            (random_llama(Path(args.work), args.tokenizer_from), s) for s in args.random_states
        ]
    rows = []
    for checkpoint, state in runs:
        rows.append(recover_row(checkpoint, state, baseline, args))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, baseline)
    if args.json:
        document = {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "args": vars(args),
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: host memory of ``--stream-from-disk`` does not grow with depth.

Writes two randomly initialised Llama-style models as safetensors (one shard per block), with
``N`` and ``4N`` blocks, prunes each with ``safe-llm prune --stream-from-disk`` in its own
process and reports each run's peak RSS (the child's ``ru_maxrss``, checkpoint writing
included). The ``N``-block model is also pruned fully loaded and the two checkpoints are
compared tensor by tensor. Everything is written under ``--workdir`` and deleted at the end.

Defaults: hidden 2048, intermediate 8192, N = 8, so the 4N model holds 32 blocks of 268 MB
(about 9.0 GB of fp32 weights with the tied 49152 x 2048 embedding). Usage::

    df -h /tmp   # about 40 GB free are needed with the defaults
    python eval/stream_benchmark.py --blocks 8 --json eval/results/stream.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from safe_llm.io.models import resolve_model_path

CHILD = (
    "import resource, sys\n"
    "from safe_llm.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def write_model(path: Path, blocks: int, args) -> int:
    """A random Llama-style checkpoint, one shard per block; returns its size in bytes."""
    from accelerate import init_empty_weights

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    path.mkdir(parents=True)
    config.save_pretrained(path)
    tokenizer_dir = Path(resolve_model_path("smollm2-135m")[0])
    for file in tokenizer_dir.glob("*token*"):
        shutil.copy(file, path / file.name)
    with init_empty_weights():
        state = LlamaForCausalLM(config).state_dict()
    groups = [[k for k in state if not k.startswith("model.layers.")]]
    groups += [[k for k in state if k.startswith(f"model.layers.{i}.")] for i in range(blocks)]
    groups[0] = [k for k in groups[0] if k != "lm_head.weight"]  # tied
    weight_map, total = {}, 0
    for shard, keys in enumerate(groups):
        generator = torch.Generator().manual_seed(shard)
        tensors = {
            k: torch.ones(state[k].shape)
            if state[k].dim() == 1
            else torch.randn(state[k].shape, generator=generator) * 0.02
            for k in keys
        }
        name = f"model-{shard + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def prune_run(model: Path, output: Path, stream: bool, args) -> dict:
    command = [sys.executable, "-c", CHILD, "prune", "--quiet", "--model", str(model)]
    command += ["--method", args.method, "--dataset", "builtin-c4"]
    command += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    command += ["--device", "cpu", "--no-layer-errors", "--max-shard-size", "500MB"]
    command += ["--output", str(output), *(["--stream-from-disk"] if stream else [])]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"prune failed:\n{run.stderr[-3000:]}")
    rss = int(run.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
    return {"peak_rss_bytes": rss, "seconds": time.perf_counter() - start}


def same_checkpoints(a: Path, b: Path) -> bool:
    """Whether two checkpoint directories hold the same tensors (read one at a time)."""

    def index(path: Path) -> dict[str, Path]:
        out = {}
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    left, right = index(a), index(b)
    if set(left) != set(right):
        return False
    for key, file in left.items():
        with safe_open(str(file), "pt") as f, safe_open(str(right[key]), "pt") as g:
            if not torch.equal(f.get_tensor(key), g.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="N (the deep model has 4N)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--workdir", default="/tmp/safe_llm_stream_benchmark")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    results = {}
    try:
        for label, blocks in (("N", args.blocks), ("4N", 4 * args.blocks)):
            size = write_model(work / f"model-{label}", blocks, args)
            run = prune_run(work / f"model-{label}", work / f"out-{label}", True, args)
            results[label] = {"blocks": blocks, "weights_bytes": size, **run}
            print(json.dumps({label: results[label]}), flush=True)
            if label == "N":
                loaded = prune_run(work / "model-N", work / "out-N-loaded", False, args)
                results["N_loaded"] = {"blocks": blocks, **loaded}
                results["N_equal_to_loaded"] = same_checkpoints(
                    work / "out-N", work / "out-N-loaded"
                )
                print(json.dumps({k: results[k] for k in ("N_loaded", "N_equal_to_loaded")}))
                shutil.rmtree(work / "out-N-loaded")
            shutil.rmtree(work / f"out-{label}")
            shutil.rmtree(work / f"model-{label}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = results["4N"]["peak_rss_bytes"] / results["N"]["peak_rss_bytes"]
    results["rss_ratio_4N_over_N"] = ratio
    for label in ("N", "4N", "N_loaded"):
        r = results[label]
        print(f"{label:>8}: {r['blocks']} blocks, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"4N / N peak RSS: {ratio:.3f} (target <= 1.25)")
    print(f"N streamed == N fully loaded: {results['N_equal_to_loaded']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

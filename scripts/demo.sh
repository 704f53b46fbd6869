#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then prune the built-in SmolLM2-135M with SAFE+ at 50%
# (the CPU recipe's solver settings) on demo-sized data, print dense vs pruned perplexity on the
# built-in wiki text and write the checkpoint to runs/smollm2-135m-safe+-50. A few minutes on
# 2 CPU cores from the second run on (the first converts the model and computes the dense
# perplexity, which is then cached). Extra arguments go to `safe-llm prune` (they override the
# sizes below); `python eval/benchmark.py` runs the full reference protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DEMO_SIZES=(--nsamples 32 --seqlen 256 --eval-seqlen 512 --eval-max-windows 32)
echo "demo sizes: calibration 32 windows x 256 tokens of builtin-c4; perplexity on the first" \
    "32 windows x 512 tokens of builtin-wiki (the reference protocol is eval/benchmark.py)"
safe-llm prune --recipe recipes/smollm2-135m-safe+-50.yaml "${DEMO_SIZES[@]}" \
    --output runs/smollm2-135m-safe+-50 --overwrite "$@"

#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then prune the built-in SmolLM2-135M with SAFE+ at 50%
# (CPU recipe), print dense vs pruned perplexity on the built-in wiki text and write the
# checkpoint to runs/smollm2-135m-safe+-50. Extra arguments go to `safe-llm prune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
safe-llm prune --recipe recipes/smollm2-135m-safe+-50.yaml \
    --output runs/smollm2-135m-safe+-50 --overwrite "$@"

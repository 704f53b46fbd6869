"""The perplexity cache: a hit is exactly the number a fresh computation gives."""

from __future__ import annotations

import torch

from safe_llm.evaluation import cache as result_cache
from safe_llm.evaluation.evaluate import source_perplexity
from safe_llm.evaluation.perplexity import perplexity

SEQLEN = 16


def _counting(monkeypatch):
    calls = []
    from safe_llm.evaluation import evaluate

    def counted(*args, **kwargs):
        calls.append(1)
        return perplexity(*args, **kwargs)

    monkeypatch.setattr(evaluate, "perplexity", counted)
    return calls


def test_a_second_evaluation_of_the_same_weights_is_read_from_the_cache(
    make_tiny_llama, tiny_tokenizer, calibration_file, monkeypatch
):
    calls = _counting(monkeypatch)
    model = make_tiny_llama(seed=1, vocab_size=len(tiny_tokenizer))
    first = source_perplexity(model, tiny_tokenizer, str(calibration_file), SEQLEN, max_windows=4)
    second = source_perplexity(model, tiny_tokenizer, str(calibration_file), SEQLEN, max_windows=4)
    assert len(calls) == 1
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["perplexity"] == first["perplexity"]  # exact, not approximate


def test_changed_weights_windows_or_batch_size_miss_the_cache(
    make_tiny_llama, tiny_tokenizer, calibration_file, monkeypatch
):
    calls = _counting(monkeypatch)
    model = make_tiny_llama(seed=2, vocab_size=len(tiny_tokenizer))
    source = str(calibration_file)
    source_perplexity(model, tiny_tokenizer, source, SEQLEN, max_windows=4)
    source_perplexity(model, tiny_tokenizer, source, SEQLEN, max_windows=3)  # other windows
    source_perplexity(model, tiny_tokenizer, source, SEQLEN, max_windows=4, batch_size=2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # one weight changed
    result = source_perplexity(model, tiny_tokenizer, source, SEQLEN, max_windows=4)
    assert len(calls) == 4 and not result["cached"]


def test_no_cache_always_computes(make_tiny_llama, tiny_tokenizer, calibration_file, monkeypatch):
    calls = _counting(monkeypatch)
    model = make_tiny_llama(seed=3, vocab_size=len(tiny_tokenizer))
    for _ in range(2):
        result = source_perplexity(
            model, tiny_tokenizer, str(calibration_file), SEQLEN, max_windows=2, cache=False
        )
        assert not result["cached"]
    assert len(calls) == 2


def test_weights_of_a_model_not_in_memory_have_no_fingerprint(make_tiny_llama):
    model = make_tiny_llama(seed=4)
    assert result_cache.weights_fingerprint(model) is not None
    model.model.layers[0].to("meta")
    assert result_cache.weights_fingerprint(model) is None

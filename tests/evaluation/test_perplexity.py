"""Tests for safe_llm.evaluation.perplexity against an independent direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from safe_llm.evaluation.perplexity import perplexity

NWINDOWS, SEQLEN, VOCAB = 7, 24, 128


def _windows(seed: int = 0, nwindows: int = NWINDOWS, seqlen: int = SEQLEN) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (nwindows, seqlen), generator=generator)


def _direct_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean over windows of the window's mean next-token NLL), one window at a time."""
    model.eval()
    nlls = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0].float()
            nlls.append(F.cross_entropy(logits[:-1], window[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_matches_a_direct_per_window_computation(make_tiny_llama):
    model = make_tiny_llama(seed=1)
    windows = _windows()
    expected = _direct_perplexity(model, windows)
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-4)


def test_perplexity_of_a_random_model_is_near_the_vocabulary_size(make_tiny_llama):
    # Sanity check on the scale: an untrained model predicts roughly uniformly.
    ppl = perplexity(make_tiny_llama(seed=2), _windows(seed=2))
    assert VOCAB * 0.7 < ppl < VOCAB * 1.3


@pytest.mark.parametrize("batch_size", [1, 3, NWINDOWS, NWINDOWS + 5])
def test_perplexity_does_not_depend_on_batch_size(make_tiny_llama, batch_size):
    model = make_tiny_llama(seed=3)
    windows = _windows(seed=3)
    expected = _direct_perplexity(model, windows)
    assert perplexity(model, windows, batch_size=batch_size) == pytest.approx(expected, rel=1e-4)


def test_perplexity_averages_window_nlls_not_window_perplexities(make_tiny_llama):
    model = make_tiny_llama(seed=4)
    windows = _windows(seed=4)
    per_window = [perplexity(model, w[None]) for w in windows]
    combined = perplexity(model, windows, batch_size=NWINDOWS)
    geometric_mean = math.exp(sum(math.log(p) for p in per_window) / len(per_window))
    assert combined == pytest.approx(geometric_mean, rel=1e-4)
    assert combined != pytest.approx(sum(per_window) / len(per_window), rel=1e-6)


def test_perplexity_computes_the_loss_in_float32_for_low_precision_models(make_tiny_llama):
    model = make_tiny_llama(seed=5).to(torch.bfloat16)
    windows = _windows(seed=5)
    expected = _direct_perplexity(model, windows)  # bf16 logits, float32 loss
    assert perplexity(model, windows) == pytest.approx(expected, rel=1e-4)


def test_perplexity_puts_the_model_in_eval_mode(make_tiny_llama):
    model = make_tiny_llama(seed=6, attention_dropout=0.5)
    windows = _windows(seed=6)
    expected = _direct_perplexity(model, windows)
    model.train()
    assert perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert not model.training


def test_perplexity_calls_the_model_without_cache_and_on_the_requested_device(make_tiny_llama):
    model = make_tiny_llama(seed=7)
    calls = []

    def record(module, args, kwargs):
        calls.append(
            (kwargs.get("use_cache"), kwargs["input_ids"].device, len(kwargs["input_ids"]))
        )

    model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    perplexity(model, _windows(seed=7), batch_size=3, device="cpu")
    # the first two calls check the body/head split on one 8-token probe
    assert calls[2:] == [(False, torch.device("cpu"), n) for n in (3, 3, 1)]


def test_perplexity_rejects_windows_longer_than_the_model_max_length(make_tiny_llama):
    model = make_tiny_llama(max_position_embeddings=16)
    with pytest.raises(ValueError, match="seqlen 17 exceeds the model's maximum length 16"):
        perplexity(model, _windows(seqlen=17))
    assert perplexity(model, _windows(seqlen=16)) > 0


def test_perplexity_reads_n_positions_from_gpt2_style_configs():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="maximum length 8"):
        perplexity(model, _windows(seqlen=9))


@pytest.mark.parametrize("shape", [(SEQLEN,), (0, SEQLEN), (3, 1)])
def test_perplexity_rejects_malformed_windows(make_tiny_llama, shape):
    windows = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(make_tiny_llama(), windows)


def test_perplexity_shows_a_progress_bar_when_asked(make_tiny_llama, capsys):
    perplexity(make_tiny_llama(), _windows(), batch_size=4, progress=True)
    assert "perplexity" in capsys.readouterr().err
    perplexity(make_tiny_llama(), _windows(), batch_size=4, progress=False)
    assert "perplexity" not in capsys.readouterr().err


def _full_logit_perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    """The path before chunking: whole-batch logits, one cross-entropy over them."""
    from safe_llm.evaluation.perplexity import window_nlls

    with torch.no_grad():
        nlls = [window_nlls(model, w, split=None) for w in windows.split(batch_size)]
    return math.exp(torch.cat(nlls).double().mean().item())


@pytest.mark.parametrize("chunk_elements", [1, 3 * VOCAB, 2**24])
def test_chunked_cross_entropy_gives_the_full_logit_perplexity_to_1e6(
    make_tiny_llama, monkeypatch, chunk_elements
):
    from safe_llm.evaluation import perplexity as module

    model = make_tiny_llama(seed=5)
    windows = _windows(seed=5)
    monkeypatch.setattr(module, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
    assert module.head_split(model) is not None
    chunked = perplexity(model, windows, batch_size=4)
    assert chunked == pytest.approx(_full_logit_perplexity(model, windows, 4), rel=1e-6)


def test_chunked_cross_entropy_never_builds_the_whole_batch_logits(make_tiny_llama, monkeypatch):
    from safe_llm.evaluation import perplexity as module

    model = make_tiny_llama(seed=6)
    windows = _windows(seed=6)
    monkeypatch.setattr(module, "LOGIT_CHUNK_ELEMENTS", 5 * VOCAB)
    rows = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[:-1].numel()))
    perplexity(model, windows, batch_size=NWINDOWS)
    assert max(rows[2:]) <= 5  # rows[:2] are the one-off 8-token check of the split


def test_a_model_that_rescales_its_logits_is_scored_from_its_full_logits(make_tiny_llama):
    from safe_llm.evaluation.perplexity import head_split

    model = make_tiny_llama(seed=7)
    original = type(model).forward

    class ScaledLogits(type(model)):
        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out.logits = 2.0 * out.logits  # a logit scale after the head
            return out

    model.__class__ = ScaledLogits
    windows = _windows(seed=7)
    assert head_split(model) is None
    assert perplexity(model, windows) == pytest.approx(_direct_perplexity(model, windows), rel=1e-4)

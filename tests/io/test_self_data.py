"""Teacher-generated windows (``--dataset self``): seeded, resumable, cached, sampled as set."""

from __future__ import annotations

import json

import pytest
import torch

from safe_llm import cli
from safe_llm.io import self_data
from safe_llm.io.self_data import Sampling, SelfWindows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private ``SAFE_LLM_CACHE`` (never the user's)."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("SAFE_LLM_CACHE", str(directory))
    return directory


def _windows(model, tokenizer, root, seed=0, per_shard=3, seqlen=12):
    return SelfWindows(model, tokenizer, seqlen, Sampling(), seed, per_shard, "cpu", root=root)


def test_a_stopped_generation_continues_to_the_windows_of_an_uninterrupted_one(
    make_tiny_llama, tiny_tokenizer, tmp_path, monkeypatch
):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    whole = _windows(model, tiny_tokenizer, tmp_path / "a").ensure(8, progress=False)
    expected = whole.read(0, 8)
    assert expected.shape == (8, 12) and expected.dtype == torch.int64

    stopped = _windows(model, tiny_tokenizer, tmp_path / "b")
    real, made = SelfWindows._shard, []

    def dies_on_the_third_shard(self, index):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(index)
        return real(self, index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SelfWindows, "_shard", dies_on_the_third_shard)
        with pytest.raises(KeyboardInterrupt):
            stopped.ensure(8, progress=False)
    assert sorted(p.name for p in stopped.directory.glob("windows_*")) == [
        "windows_00000.safetensors",
        "windows_00001.safetensors",
    ]  # nothing half-written: two whole shards, no temporary file
    assert not list(stopped.directory.glob(".*tmp*"))
    resumed = _windows(model, tiny_tokenizer, tmp_path / "b")
    calls = []
    monkeypatch.setattr(SelfWindows, "_shard", lambda self, i: calls.append(i) or real(self, i))
    assert torch.equal(resumed.ensure(8, progress=False).read(0, 8), expected)
    assert calls == [2]  # only the missing shard was generated
    other_seed = _windows(model, tiny_tokenizer, tmp_path / "c", seed=1).ensure(8, progress=False)
    assert not torch.equal(other_seed.read(0, 8), expected)


def test_windows_start_with_bos_or_a_random_token_and_stream_in_batches(
    make_tiny_llama, tiny_tokenizer, tmp_path
):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    assert tiny_tokenizer.bos_token_id is None  # the random one-token prefix
    plain = _windows(model, tiny_tokenizer, tmp_path).ensure(7, progress=False)
    assert plain.settings["first"] == "random 1"
    assert len(set(plain.read(0, 7)[:, 0].tolist())) > 1
    streamed = torch.cat(list(plain.batches(2, 2)))  # windows 2..6, across shard borders
    assert torch.equal(streamed, plain.read(2, 5))
    tiny_tokenizer_bos = tiny_tokenizer.__class__.from_pretrained(
        _saved(tiny_tokenizer, tmp_path), bos_token="<|endoftext|>"
    )
    bos = _windows(model, tiny_tokenizer_bos, tmp_path).ensure(4, progress=False)
    assert (bos.read(0, 4)[:, 0] == tiny_tokenizer_bos.bos_token_id).all()
    assert bos.directory != plain.directory  # the first token is part of the key


def _saved(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_greedy_sampling_through_the_kv_cache_equals_transformers_generate(make_tiny_llama):
    model = make_tiny_llama()
    start = torch.tensor([[5], [9], [17]])
    greedy = Sampling(temperature=1.0, top_p=1.0, top_k=1)
    ours = self_data.generate(model, start, 20, greedy, torch.Generator().manual_seed(0))
    theirs = model.generate(start, max_new_tokens=19, min_new_tokens=19, do_sample=False)
    assert torch.equal(ours, theirs)


def test_top_k_and_top_p_sample_only_the_tokens_they_keep():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top_p = self_data.sample_tokens(logits, Sampling(1.0, 0.7, 0), generator)
    assert set(top_p.tolist()) == {0, 1}  # 0.5 < 0.7: the second token completes the mass
    top_k = self_data.sample_tokens(logits, Sampling(1.0, 1.0, 3), generator)
    assert set(top_k.tolist()) == {0, 1, 2}
    cold = self_data.sample_tokens(logits, Sampling(0.05, 1.0, 0), generator)
    assert (cold == 0).float().mean() > 0.99
    assert set(self_data.sample_tokens(logits, Sampling(1.0, 1.0, 0), generator).tolist()) == {
        0,
        1,
        2,
        3,
    }


def test_a_second_run_reuses_the_cached_windows(save_tiny_model, fast_prune_argv, tmp_path, cache):
    model_dir = save_tiny_model()
    args = ["--dataset", "self", "--self-batch-size", "2"]
    assert cli.main(fast_prune_argv(model_dir, tmp_path / "first", *args)) == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())["calibration"]
    directory = first["self_data"]["directory"]
    assert directory.startswith(str(cache)) and len(list(cache.rglob("windows_*"))) == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SelfWindows, "_shard", lambda *a: pytest.fail("generated again"))
        assert cli.main(fast_prune_argv(model_dir, tmp_path / "second", *args)) == 0
    second = json.loads((tmp_path / "second" / "report.json").read_text())["calibration"]
    assert second["self_data"]["directory"] == directory
    first_weights, second_weights = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    for name, tensor in first_weights.items():
        assert torch.equal(second_weights[name], tensor), name
    hotter = fast_prune_argv(model_dir, tmp_path / "hotter", *args, "--self-temperature", "2")
    assert cli.main(hotter) == 0  # another sampling setting: other windows, another entry
    third = json.loads((tmp_path / "hotter" / "report.json").read_text())["calibration"]
    assert third["self_data"]["directory"] != directory


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow  # the real SmolLM2 (its GGUF converted once per session)
def test_smollm2_samples_from_its_bos_token_and_greedy_equals_generate(smollm2_cache, tmp_path):
    from safe_llm.io.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    made = SelfWindows(model, tokenizer, 24, Sampling(), 0, 2, "cpu", root=tmp_path)
    windows = made.ensure(2, progress=False).read(0, 2)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert len(set(windows[0].tolist())) > 5 and not torch.equal(windows[0], windows[1])
    greedy = Sampling(1.0, 1.0, 1)
    ours = self_data.generate(model, windows[:, :4], 20, greedy, torch.Generator())
    theirs = model.generate(
        windows[:, :4], max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True
    )
    assert torch.equal(ours, theirs)


def _nucleus_by_full_sort(logits: torch.Tensor, top_p: float) -> list[set[int]]:
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    kept = (probs.cumsum(-1) - probs) < top_p
    return [set(order[row][kept[row]].tolist()) for row in range(len(logits))]


def test_top_p_draws_from_the_whole_vocabulary_nucleus_whether_or_not_candidates_hold_it(
    monkeypatch,
):
    monkeypatch.setattr(self_data, "NUCLEUS_CANDIDATES", 8)
    generator = torch.Generator().manual_seed(0)
    peaked = torch.full((64,), -10.0)
    peaked[[3, 40, 7]] = torch.tensor([4.0, 3.5, 3.0])  # nucleus of 3 inside 8 candidates
    flat = torch.randn(64, generator=generator) * 0.1  # nucleus of ~60: sorted whole
    logits = torch.stack([peaked, flat]).repeat_interleave(3000, dim=0)
    drawn = self_data.sample_tokens(logits, Sampling(1.0, 0.9, 0), generator)
    nuclei = _nucleus_by_full_sort(logits[[0, -1]], 0.9)
    assert set(drawn[:3000].tolist()) == nuclei[0]
    assert set(drawn[3000:].tolist()) == nuclei[1]
    assert len(nuclei[1]) > 8

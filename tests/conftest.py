"""Shared offline fixtures: a tiny byte-level BPE tokenizer and tiny random Llama models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes weights from a trained language model without retraining it.",
    "Calibration data is a few random windows of text; evaluation uses wikitext and c4.",
    "= Robert Boulter = Robert Boulter is an English film , television and theatre actor .",
    "Sparse models with flat minima keep their perplexity close to the dense model.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (any UTF-8 text encodes) trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture
def make_tiny_llama():
    """Factory for a tiny seeded random ``LlamaForCausalLM`` (``**overrides`` go to the config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, **overrides) -> LlamaForCausalLM:
        settings = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        settings.update(overrides)
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**settings)).eval()

    return make


@pytest.fixture
def save_tiny_model(tmp_path, tiny_tokenizer, make_tiny_llama):
    """Factory: save a tiny random Llama (vocabulary = the tiny tokenizer's) plus the tokenizer
    with ``save_pretrained`` into ``tmp_path / name``; ``poison`` = (parameter name, value)
    writes that value (e.g. NaN) into one weight first. Returns the directory."""

    def save(name: str = "model", seed: int = 0, poison=None, **overrides):
        model = make_tiny_llama(seed=seed, vocab_size=len(tiny_tokenizer), **overrides)
        if poison is not None:
            param_name, value = poison
            with torch.no_grad():
                model.get_parameter(param_name).view(-1)[3] = value
        path = tmp_path / name
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        return path

    return save


@pytest.fixture
def calibration_file(tmp_path):
    """A small local text file (blank-line separated documents, ~5000 tiny-tokenizer tokens)."""
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(_TOKENIZER_CORPUS * 40), encoding="utf-8")
    return path


@pytest.fixture
def fast_prune_argv(calibration_file):
    """``argv(model_dir, output, *extra)`` of a fast ``safe-llm prune``: magnitude on the CPU,
    4 windows x 16 tokens of the local calibration file in batches of 2, into ``output``;
    ``extra`` comes last (a flag given twice takes its last value)."""

    def argv(model_dir, output, *extra) -> list[str]:
        return [
            "prune",
            "--quiet",
            "--model",
            str(model_dir),
            "--dataset",
            str(calibration_file),
            "--nsamples",
            "4",
            "--seqlen",
            "16",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--method",
            "magnitude",
            "--output",
            str(output),
            *extra,
        ]

    return argv


@pytest.fixture
def torchrun_two():
    """``run(*args)``: ``torchrun --standalone --nproc-per-node 2 *args`` with one thread per
    process, its output captured as text (3 minutes at most); skips the test where torchrun
    is not installed."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed")

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [torchrun, "--standalone", "--nproc-per-node", "2", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)

    return run


@pytest.fixture(autouse=True)
def _private_perplexity_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty perplexity cache of its own (never the user's)."""
    from safe_llm.evaluation import cache as result_cache

    directory = tmp_path_factory.mktemp("ppl_cache")
    monkeypatch.setattr(result_cache, "cache_dir", lambda: directory)


@pytest.fixture(scope="session")
def _session_kernel_timings(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel_timings") / "timings.json"


@pytest.fixture(autouse=True)
def _private_kernel_timings(_session_kernel_timings, monkeypatch):
    """load_sparse's measured kernel choices go to one file of the test session's (never the
    user's cache): measured once per matrix kind, then reused, as on a user's machine."""
    from safe_llm.inference import autotune

    monkeypatch.setattr(autotune, "timings_file", lambda: _session_kernel_timings)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """``SAFE_LLM_CACHE`` pointed at a session directory (never the user's cache), shared by the
    slow tests so the built-in model's GGUF is converted once per session."""
    cache = tmp_path_factory.mktemp("safe_llm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFE_LLM_CACHE", str(cache))
        yield cache


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    """The Hugging Face Hub unreachable (``datasets`` and ``huggingface_hub`` offline, an empty
    ``datasets`` cache) and no task data root from the environment."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("SAFE_LLM_TASK_DATA", raising=False)

"""Text generation from a pruned model, sparse or dense: what ``safe-llm generate`` runs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from safe_llm.errors import SafeLLMError
from safe_llm.io.export import BITMASK_FILE


class GenerateError(SafeLLMError):
    """Bad input to ``safe-llm generate``."""


@dataclass
class Generation:
    text: str  # the new text only
    tokens: list[int]  # the new token ids
    seconds: float  # the whole generate call (prefill included)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / max(self.seconds, 1e-9)


def check_request(
    source: str | os.PathLike,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    tokenizer: str | None = None,
) -> Path:
    """Raise :class:`GenerateError` for bad input before anything is loaded; returns the
    directory the tokenizer is read from."""
    path = Path(source).expanduser()
    is_model = (path / "config.json").is_file() or (path / BITMASK_FILE).is_file()
    if not (is_model or (path.is_file() and path.suffix == ".safetensors")):
        raise GenerateError(
            f"{source} is not a checkpoint directory or a safe-llm export; pass the output "
            "of safe-llm prune or safe-llm export"
        )
    if not prompt:
        raise GenerateError("the prompt is empty; pass --prompt TEXT")
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise GenerateError(f"--temperature must be >= 0 (0 = greedy), not {temperature}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], not {top_p}")
    directory = Path(tokenizer).expanduser() if tokenizer else path
    if not directory.is_dir():
        raise GenerateError(
            f"no tokenizer directory for {source} (a single exported file has none): "
            "pass --tokenizer DIR"
        )
    return directory


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Generation:
    """Continue ``prompt``: greedy when ``temperature`` is 0, else sampled with
    ``temperature`` and nucleus ``top_p`` from ``seed``; stops at the end-of-text token."""
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    sampled = temperature > 0
    options = dict(do_sample=sampled, temperature=temperature, top_p=top_p) if sampled else {}
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sampled,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            eos_token_id=eos,
            **{k: v for k, v in options.items() if k != "do_sample"},
        )
    seconds = time.perf_counter() - start
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, seconds)

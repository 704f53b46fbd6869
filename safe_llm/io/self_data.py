"""Teacher-generated data (``--dataset self``, ``--recover-dataset self``): windows the dense
model samples itself, kept on disk as they are made.

Each window of ``seqlen`` tokens starts from the tokenizer's BOS token (or, when it has none,
from :data:`PREFIX_TOKENS` token drawn uniformly from the vocabulary) and continues with
tokens sampled from the model at ``temperature`` after top-k and top-p (nucleus) filtering,
through the model's KV cache, a batch of windows at a time on the run's device. Generation
does not stop at an end-of-text token: the model goes on past it, as in packed documents.

Windows are made ``per_shard`` at a time (one batch), and batch ``j`` is seeded with
``seed * 1_000_003 + j`` alone, so window ``i`` does not depend on how many windows are asked
for. Each batch is written as one shard file ``windows_<j>.safetensors`` (``ids``:
``[per_shard, seqlen]`` int64) atomically as soon as it is made, into a directory of the
safe-llm cache (``$SAFE_LLM_CACHE/self_windows/<key>``) keyed by everything that decides the
tokens: the model's weights (a hash of every tensor), its dtype, the device type, ``seqlen``,
the sampling settings, the seed, ``per_shard``, the first token and the torch and
transformers versions. A stopped run therefore continues with the first missing shard and ends
with the windows of an uninterrupted one, and a later run with the same key reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from safe_llm.core import distributed
from safe_llm.core.atomic import atomic_write
from safe_llm.evaluation.cache import weights_fingerprint
from safe_llm.io.data import DataError
from safe_llm.io.models import cache_dir

log = logging.getLogger(__name__)

SELF = "self"  # the source name of teacher-generated windows
FORMAT = 2  # 2: draws among the nucleus' candidates (tokens differ from format 1)
PREFIX_TOKENS = 1  # random first tokens of a window when the tokenizer has no BOS
NUCLEUS_CANDIDATES = 1024  # most likely tokens tried first for the top-p nucleus


@dataclass(frozen=True)
class Sampling:
    """How each next token is drawn: logits / ``temperature``, then only the ``top_k`` most
    likely tokens (0: all), then the smallest set of most likely tokens whose probability
    reaches ``top_p`` (1: all)."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0

    @classmethod
    def of(cls, config) -> Sampling:
        """The sampling of a run config (``--self-temperature``, ``--self-top-p``,
        ``--self-top-k``)."""
        return cls(config.self_temperature, config.self_top_p, config.self_top_k)


def check_can_generate(model: nn.Module, flag: str = "--dataset self") -> None:
    """Refuse, in one line, a model that cannot sample its own windows: one without an LM
    head or that transformers does not know as a generating causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    can = getattr(model, "can_generate", None)
    if head is None or not callable(can) or not can():
        raise DataError(
            f"{flag}: {type(model).__name__} cannot generate (no LM head, or not a causal LM "
            "transformers can generate with); use a text source instead"
        )


def sample_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> torch.LongTensor:
    """One token per row of ``logits`` ``[batch, vocab]`` drawn with ``sampling``: ``[batch]``.

    With top-p alone, a row is drawn among its :data:`NUCLEUS_CANDIDATES` most likely tokens
    when they hold at least ``top_p`` of its probability (its nucleus then lies inside them:
    the distribution of sorting the whole vocabulary, 10x faster on a CPU at batch 64); the
    other rows are sorted whole and drawn again.
    """
    logits = logits.float() / sampling.temperature
    vocab = logits.shape[-1]
    keep = sampling.top_k if 0 < sampling.top_k < vocab else vocab
    if keep == vocab and sampling.top_p >= 1:
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if keep < vocab or vocab <= NUCLEUS_CANDIDATES or sampling.top_p >= 1:
        return _draw(*torch.topk(logits, keep, dim=-1), sampling.top_p, generator)
    top, index = torch.topk(logits, NUCLEUS_CANDIDATES, dim=-1)
    tokens = _draw(top, index, sampling.top_p, generator)
    held = (top - torch.logsumexp(logits, dim=-1, keepdim=True)).exp().sum(-1)
    wide = held < sampling.top_p  # rows whose nucleus reaches past the candidates
    if bool(wide.any()):
        ordered = torch.sort(logits[wide], dim=-1, descending=True)
        tokens[wide] = _draw(*ordered, sampling.top_p, generator)
    return tokens


def _draw(
    top: torch.Tensor, index: torch.LongTensor, top_p: float, generator: torch.Generator
) -> torch.LongTensor:
    """One of ``index`` ``[batch, k]`` per row, drawn by the logits ``top`` ``[batch, k]``
    (descending) within the smallest prefix of each row holding ``top_p`` of its mass."""
    probs = torch.softmax(top, dim=-1)
    if top_p < 1:
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens: the first is kept
        probs = probs.masked_fill(before >= top_p, 0)
    drawn = torch.multinomial(probs, 1, generator=generator)
    return index.gather(-1, drawn).squeeze(1)


def _cache_names(model: nn.Module) -> tuple[str, dict]:
    """``(the forward's KV-cache keyword, {"logits_to_keep": 1} where it takes that)``:
    transformers 5 names the cache ``cache``, earlier versions ``past_key_values``."""
    taken = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in taken else "past_key_values"
    return name, {"logits_to_keep": 1} if "logits_to_keep" in taken else {}


@torch.no_grad()
def generate(
    model: nn.Module, start: torch.Tensor, seqlen: int, sampling: Sampling, generator
) -> torch.LongTensor:
    """Continue ``start`` ``[batch, p]`` (on the model's device) to ``[batch, seqlen]`` token
    ids, one token per step for the whole batch, through the KV cache."""
    batch, prefix = start.shape
    ids = torch.empty(batch, seqlen, dtype=torch.long, device=start.device)
    ids[:, :prefix] = start
    name, keep = _cache_names(model)
    out = model(input_ids=start, use_cache=True, **keep)
    for position in range(prefix, seqlen):
        ids[:, position] = sample_tokens(out.logits[:, -1], sampling, generator)
        if position + 1 < seqlen:
            cache = {name: getattr(out, name)}
            step = ids[:, position : position + 1]
            out = model(input_ids=step, use_cache=True, **cache, **keep)
    return ids


class SelfWindows:
    """The windows ``model`` samples for one key, in shard files under ``directory``.

    ``ensure(count)`` generates the missing shards of the first ``count`` windows (a progress
    bar in tokens/s); ``read(start, count)`` and ``batches(start, size)`` read them back
    (``[count, seqlen]`` / ``[size, seqlen]`` int64 on the host), one shard in memory at a
    time."""

    def __init__(self, model, tokenizer, seqlen, sampling, seed, per_shard, device, root=None):
        self.model, self.seqlen, self.sampling = model, seqlen, sampling
        self.seed, self.per_shard, self.device = seed, per_shard, torch.device(device)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.vocab = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
        self.settings = self._settings(model)
        key = hashlib.blake2b(json.dumps(self.settings, sort_keys=True).encode(), digest_size=16)
        root = Path(root) if root is not None else cache_dir() / "self_windows"
        self.directory = root / key.hexdigest()
        self.count = 0  # windows ensured so far (the source of a streamed recovery)
        self._held: tuple[int, torch.Tensor | None] = (-1, None)

    def _settings(self, model) -> dict:
        """Everything that decides the tokens (the cache key)."""
        import transformers

        return {
            "format": FORMAT,
            "weights": weights_fingerprint(model),
            "dtype": str(next(model.parameters()).dtype),
            "device": self.device.type,
            "seqlen": self.seqlen,
            **asdict(self.sampling),
            "seed": self.seed,
            "per_shard": self.per_shard,
            "first": f"bos {self.bos}" if self.bos is not None else f"random {PREFIX_TOKENS}",
            "vocab": self.vocab,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    def describe(self) -> dict:
        """What a report records: the directory, the sampling and how windows start."""
        return {
            "directory": str(self.directory),
            "sampling": asdict(self.sampling),
            "first_token": self.settings["first"],
            "per_shard": self.per_shard,
            "windows": self.count,
        }

    def shard_file(self, index: int) -> Path:
        return self.directory / f"windows_{index:05d}.safetensors"

    def ensure(self, count: int, progress: bool = True) -> SelfWindows:
        """Generate (and write) every missing shard of the first ``count`` windows."""
        shards = math.ceil(count / self.per_shard)
        missing = [j for j in range(shards) if not self.shard_file(j).is_file()]
        if missing:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.directory / "key.json",
                lambda tmp: tmp.write_text(json.dumps(self.settings, indent=1)),
            )
            self._generate(missing, progress)
        log.info(
            "self data: %d windows x %d tokens (%d shard(s) generated, %d reused) in %s",
            count,
            self.seqlen,
            len(missing),
            shards - len(missing),
            self.directory,
        )
        self.count = max(self.count, count)
        return self

    def _generate(self, shards: list[int], progress: bool) -> None:
        tokens = len(shards) * self.per_shard * self.seqlen
        bar = tqdm(
            total=tokens, desc="self data", unit="tok", unit_scale=True, disable=not progress
        )
        with _evaluating(self.model), bar:
            for index in shards:
                ids = self._shard(index).cpu()
                atomic_write(self.shard_file(index), lambda tmp, ids=ids: _save(ids, tmp))
                bar.update(ids.numel())

    def _shard(self, index: int) -> torch.LongTensor:
        """Shard ``index``'s windows ``[per_shard, seqlen]``, from its own seed."""
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + index)
        shape = (self.per_shard, PREFIX_TOKENS)
        if self.bos is not None:
            start = torch.full((self.per_shard, 1), self.bos, dtype=torch.long, device=self.device)
        else:
            start = torch.randint(0, self.vocab, shape, generator=generator, device=self.device)
        return generate(self.model, start, self.seqlen, self.sampling, generator)

    def _load(self, index: int) -> torch.LongTensor:
        """Shard ``index`` ``[per_shard, seqlen]``; the last one read is kept (one in memory)."""
        if self._held[0] == index:
            return self._held[1]
        try:
            ids = load_file(str(self.shard_file(index)))["ids"]
        except (OSError, KeyError, RuntimeError) as exc:
            raise DataError(
                f"self data shard {self.shard_file(index)} cannot be read ({exc}); delete it "
                "and run again"
            ) from exc
        self._held = (index, ids)
        return ids

    def read(self, start: int, count: int) -> torch.LongTensor:
        """Windows ``start .. start + count - 1`` (generated before): ``[count, seqlen]``."""
        first, last = start // self.per_shard, (start + count - 1) // self.per_shard
        ids = torch.cat([self._load(j) for j in range(first, last + 1)])
        offset = start - first * self.per_shard
        return ids[offset : offset + count]

    def batches(self, start: int, size: int) -> Iterator[torch.LongTensor]:
        """``[size, seqlen]`` batches of the ensured windows from window ``start`` on (the
        last one possibly smaller)."""
        for first in range(start, self.count, size):
            yield self.read(first, min(size, self.count - first))


def _save(ids: torch.Tensor, path: Path) -> None:
    save_file({"ids": ids.contiguous()}, str(path))


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    """``model`` in eval mode within the context (dropout off), its mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def self_windows(model, tokenizer, config, seqlen, seed, count, progress=True) -> SelfWindows:
    """The first ``count`` windows of ``seqlen`` tokens ``model`` samples with ``config``'s
    sampling (``--self-*``) and ``seed``, generated where missing on the device ``model`` is
    on (by one process of a ``torchrun`` group, the others waiting) and kept on disk."""
    device = next(model.parameters()).device
    windows = SelfWindows(
        model, tokenizer, seqlen, Sampling.of(config), seed, config.self_batch_size, device
    )
    if distributed.is_writer():
        windows.ensure(count, progress)
    distributed.barrier()
    windows.count = max(windows.count, count)
    return windows

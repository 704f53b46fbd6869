"""Text sources and token windows for calibration and perplexity evaluation.

Sources are plain strings:

* ``"c4"`` -- the ``allenai/c4`` shards used by SparseGPT/Wanda (train shard 0 for calibration,
  validation shard 0 for evaluation).
* ``"wikitext2"`` -- ``wikitext`` / ``wikitext-2-raw-v1`` (train for calibration, test for evaluation).
* ``"builtin-c4"``, ``"builtin-wiki"`` -- offline texts shipped with the ``exllamav3`` package.
* a local file: ``.txt`` / ``.utf8`` / ``.md`` (documents separated by blank lines), ``.jsonl`` /
  ``.json`` (one object per line) or ``.parquet`` (a text column).
* anything else: a ``datasets`` hub id or local dataset directory, optionally ``"name:config"``.

The ``c4`` and ``wikitext2`` loaders can be pointed at a local copy of the hub repositories with
``dataset_path=`` or the ``SAFE_LLM_DATASET_ROOT`` environment variable (``$ROOT/allenai/c4``,
``$ROOT/wikitext``). A local ``wikitext`` copy needs the hub's ``README.md`` (its ``configs:`` YAML
maps the config name ``wikitext-2-raw-v1`` to its parquet files); without it ``datasets`` only
knows a ``default`` config.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path

import torch

from safe_llm.errors import SafeLLMError
from safe_llm.options import ConfigError

BUILTIN_SOURCES: dict[str, str] = {"builtin-c4": "c4.utf8", "builtin-wiki": "wiki.utf8"}
DATASET_ROOT_ENV = "SAFE_LLM_DATASET_ROOT"

C4_PATH = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
WIKITEXT_PATH = "wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"

TEXT_SUFFIXES = (".txt", ".utf8", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_SOURCES_HELP = (
    "use c4, wikitext2, builtin-c4, builtin-wiki, a .txt/.utf8/.md/.jsonl/.json/.parquet file, "
    "or a datasets id / local dataset directory (optionally name:config)"
)


class DataError(SafeLLMError):
    """A calibration / evaluation source could not provide the requested text or windows."""


# --------------------------------------------------------------------------------------------
# loading text
# --------------------------------------------------------------------------------------------


def load_text(
    source: str,
    split: str = "train",
    text_column: str = "text",
    *,
    dataset_path: str | None = None,
) -> str | list[str]:
    """Load the text of ``source``.

    Returns a single string for ``wikitext2`` (its rows are lines: the split joined with
    ``"\\n\\n"``, as the reference code does) and a list of documents for every other source.
    ``split`` selects the split for dataset sources (``"train"`` / ``"validation"`` for c4) and is
    ignored for builtin texts and local files. ``dataset_path`` overrides where the ``c4`` /
    ``wikitext2`` loaders look (a hub id or a local directory with the hub's layout).
    """
    if source == "c4":
        return _load_c4(split, dataset_path)
    if source == "wikitext2":
        return _load_wikitext2(split, dataset_path)
    if source in BUILTIN_SOURCES:
        return _load_builtin(source)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, text_column)
    if path.is_dir():
        return _load_dataset_column(str(path), None, split, text_column)
    if _looks_like_path(source):
        raise DataError(f"source file {source!r} does not exist; {_SOURCES_HELP}")
    if not _HUB_ID.match(source):
        raise DataError(f"unknown source {source!r}; {_SOURCES_HELP}")
    name, _, config = source.partition(":")
    return _load_dataset_column(name, config or None, split, text_column)


def _looks_like_path(source: str) -> bool:
    suffixes = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or source.lower().endswith(suffixes)
    )


def _dataset_location(default: str, dataset_path: str | None) -> str:
    if dataset_path is not None:
        return dataset_path
    root = os.environ.get(DATASET_ROOT_ENV)
    return os.path.join(root, default) if root else default


def _load_dataset(*args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types (ValueError, ConnectionError, ...)
        where = args[0] if args else kwargs.get("path")
        raise DataError(
            f"could not load dataset {where!r} ({type(exc).__name__}: {exc}); check the name, "
            f"config and split, or point {DATASET_ROOT_ENV} / dataset_path at a local copy"
        ) from exc


def _load_c4(split: str, dataset_path: str | None) -> list[str]:
    files = {"train": C4_TRAIN_FILE, "validation": C4_VALIDATION_FILE}
    if split not in files:
        raise DataError(f"c4 has splits 'train' and 'validation', not {split!r}")
    location = _dataset_location(C4_PATH, dataset_path)
    ds = _load_dataset(location, data_files={split: files[split]}, split=split)
    return _column(ds, "text", location)


def _load_wikitext2(split: str, dataset_path: str | None) -> str:
    location = _dataset_location(WIKITEXT_PATH, dataset_path)
    ds = _load_dataset(location, WIKITEXT_CONFIG, split=split)
    return "\n\n".join(_column(ds, "text", location))


def _load_dataset_column(name: str, config: str | None, split: str, column: str) -> list[str]:
    return _column(_load_dataset(name, config, split=split), column, name)


def _column(ds, column: str, where: str) -> list[str]:
    if column not in ds.column_names:
        raise DataError(
            f"{where!r} has no text column {column!r}; available columns: "
            f"{', '.join(ds.column_names)} (pass the right one as text_column)"
        )
    return [t for t in ds[column] if t is not None]


def builtin_data_dir() -> Path:
    """Directory holding exllamav3's standard calibration texts (exllamav3 is not imported)."""
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin sources need the exllamav3 package: pip install --no-deps exllamav3==1.6.5"
        )
    return Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data"


def _load_builtin(source: str) -> list[str]:
    path = builtin_data_dir() / BUILTIN_SOURCES[source]
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall: pip install --no-deps exllamav3==1.6.5")
    text = path.read_text(encoding="utf-8")
    if source == "builtin-wiki":
        docs = re.findall(r"<doc[^>]*>(.*?)</doc>", text, flags=re.DOTALL)
    else:
        docs = text.splitlines()
    return [d.strip() for d in docs if d.strip()]


def _load_file(path: Path, text_column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8")
        return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if suffix in JSON_SUFFIXES + PARQUET_SUFFIXES:
        builder = "parquet" if suffix in PARQUET_SUFFIXES else "json"
        ds = _load_dataset(builder, data_files=str(path), split="train")
        return _column(ds, text_column, str(path))
    raise DataError(f"unsupported file type {suffix!r} for {path}; {_SOURCES_HELP}")


# --------------------------------------------------------------------------------------------
# tokens and windows
# --------------------------------------------------------------------------------------------


def _quiet(tokenizer) -> None:
    """Silence the one-off 'sequence length is longer than the model maximum' warning."""
    warnings = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warnings, dict):
        warnings["sequence-length-is-longer-than-the-specified-maximum"] = True


def _encode(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of ``text`` as the reference code computes them: shape ``[1, ntokens]``."""
    return tokenizer(text, return_tensors="pt").input_ids


def _check_sizes(nsamples: int | None, seqlen: int) -> None:
    if nsamples is not None and nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 (one input and one target token), got {seqlen}")


def _require_text(source: str, docs: list[str]) -> None:
    if not any(d.strip() for d in docs):
        raise DataError(f"source {source!r} contains no text")


def _too_little(source: str, found: int, needed: int) -> DataError:
    return DataError(
        f"source {source!r} has too little text: found {found} tokens, need at least {needed}; "
        f"use fewer --nsamples or a smaller --seqlen, or a larger source"
    )


def _random_windows(
    ids: torch.LongTensor, nsamples: int, seqlen: int, rng: random.Random, source: str
) -> torch.LongTensor:
    """``nsamples`` random windows ``[nsamples, seqlen]`` from one token stream ``[1, n]``."""
    if ids.shape[1] <= seqlen:
        raise _too_little(source, ids.shape[1], seqlen + 1)
    starts = [rng.randint(0, ids.shape[1] - seqlen - 1) for _ in range(nsamples)]
    return torch.cat([ids[:, i : i + seqlen] for i in starts])


def _document_windows(
    docs: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, encoded=None
) -> torch.LongTensor | None:
    """The SparseGPT/Wanda c4 protocol: ``[nsamples, seqlen]``, or None if no document fits.

    For each sample, draw random documents until one has more than ``seqlen`` tokens, then take a
    random window of it. Documents are tokenized lazily (``encoded`` may pre-fill the cache).
    """
    cache: dict[int, torch.LongTensor] = dict(encoded or {})
    short: set[int] = set()
    samples = []
    for _ in range(nsamples):
        while True:
            if len(short) == len(docs):
                return None
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = _encode(tokenizer, docs[i])
            if cache[i].shape[1] > seqlen:
                break
            short.add(i)
        j = rng.randint(0, cache[i].shape[1] - seqlen - 1)
        samples.append(cache[i][:, j : j + seqlen])
    return torch.cat(samples)


def _prefer_documents(docs: list[str], tokenizer, nsamples: int, seqlen: int):
    """Pre-tokenize a small corpus; return its encodings if at least ``nsamples`` docs fit."""
    ids = tokenizer(docs)["input_ids"]
    long = sum(len(x) > seqlen for x in ids)
    if long < nsamples:
        return None
    return {i: torch.tensor([x], dtype=torch.long) for i, x in enumerate(ids)}


def calibration_windows(
    tokenizer,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    text_column: str = "text",
    *,
    dataset_path: str | None = None,
    split: str = "train",
) -> torch.LongTensor:
    """Random calibration windows, shape ``[nsamples, seqlen]`` (dtype long).

    Follows SparseGPT/Wanda: ``c4`` and other document sources draw random documents longer than
    ``seqlen`` tokens and take a random window from each; ``wikitext2`` takes random windows of
    the joined split. Builtin texts and local files fall back to random windows of the text joined
    with ``"\\n\\n"`` when fewer than ``nsamples`` documents are long enough. The same ``seed``
    gives the same windows (a private ``random.Random(seed)``, the sequence of ``random.seed``).
    """
    _check_sizes(nsamples, seqlen)
    _quiet(tokenizer)
    rng = random.Random(seed)
    text = load_text(source, split, text_column, dataset_path=dataset_path)
    docs = [text] if isinstance(text, str) else text
    _require_text(source, docs)
    if isinstance(text, list):
        encoded = None
        small = source in BUILTIN_SOURCES or Path(source).expanduser().is_file()
        if small:
            encoded = _prefer_documents(docs, tokenizer, nsamples, seqlen)
        if not small or encoded is not None:
            windows = _document_windows(docs, tokenizer, nsamples, seqlen, rng, encoded)
            if windows is not None:
                return windows
        text = "\n\n".join(docs)
    return _random_windows(_encode(tokenizer, text), nsamples, seqlen, rng, source)


def evaluation_windows(
    tokenizer,
    source: str,
    seqlen: int,
    max_windows: int | None = None,
    text_column: str = "text",
    *,
    dataset_path: str | None = None,
    split: str | None = None,
    c4_documents: int = C4_EVAL_DOCUMENTS,
    c4_windows: int = C4_EVAL_WINDOWS,
) -> torch.LongTensor:
    """Consecutive non-overlapping evaluation windows, shape ``[nwindows, seqlen]``.

    ``wikitext2``: the test split joined with ``"\\n\\n"``, ``numel // seqlen`` windows.
    ``c4``: the first ``c4_documents`` (1100) validation documents joined with ``" "``, cut to
    ``c4_windows * seqlen`` (256 windows) tokens. Other sources: documents joined with
    ``"\\n\\n"`` (split ``"test"`` for dataset ids). The tail shorter than ``seqlen`` is dropped;
    ``max_windows`` keeps only the first windows.
    """
    _check_sizes(None, seqlen)
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1, got {max_windows}")
    _quiet(tokenizer)
    default_split = {"c4": "validation"}.get(source, "test")
    text = load_text(source, split or default_split, text_column, dataset_path=dataset_path)
    docs = [text] if isinstance(text, str) else text
    _require_text(source, docs)
    if source == "c4":
        ids = _encode(tokenizer, " ".join(docs[:c4_documents]))[:, : c4_windows * seqlen]
    else:
        ids = _encode(tokenizer, text if isinstance(text, str) else "\n\n".join(docs))
    nwindows = ids.shape[1] // seqlen
    if nwindows == 0:
        raise _too_little(source, ids.shape[1], seqlen)
    if max_windows is not None:
        nwindows = min(nwindows, max_windows)
    return ids[0, : nwindows * seqlen].reshape(nwindows, seqlen)


class TextWindows:
    """Random windows of ``source`` made one at a time, for a recovery that streams its
    windows (``--recover-tokens``) instead of holding them: ``batches(start, size)`` yields
    ``[size, seqlen]`` int64 batches from window ``start`` on, without end.

    Large sources (``c4``, datasets ids and directories) follow the document protocol of
    :func:`calibration_windows`: a random document longer than ``seqlen`` tokens, then a random
    window of it, each document tokenized when drawn (never the whole corpus at once). Small
    sources (the builtin texts, local files, ``wikitext2``'s joined split) are tokenized once,
    joined with ``"\\n\\n"``, and cut at random starts. Window ``i`` depends only on the
    source, ``seqlen`` and ``seed`` (a private ``random.Random(seed)`` drawn in order), so a
    resumed run that skips the first windows sees the same ones after them.
    """

    def __init__(self, tokenizer, source: str, seqlen: int, seed: int = 0, text_column="text"):
        _check_sizes(None, seqlen)
        _quiet(tokenizer)
        self.tokenizer, self.source, self.seqlen = tokenizer, source, seqlen
        self.seed, self.text_column = seed, text_column

    def batches(self, start: int, size: int):
        windows = self._windows()
        for _ in range(start):  # the draws of the skipped windows, in order
            next(windows)
        while True:
            yield torch.stack([next(windows) for _ in range(size)])

    def _windows(self):
        rng = random.Random(self.seed)
        text = load_text(self.source, "train", self.text_column)
        docs = [text] if isinstance(text, str) else text
        _require_text(self.source, docs)
        small = self.source in BUILTIN_SOURCES or Path(self.source).expanduser().is_file()
        if isinstance(text, list) and not small:
            yield from self._document_windows(docs, rng)
        ids = _encode(self.tokenizer, "\n\n".join(docs))[0]
        if ids.numel() <= self.seqlen:
            raise _too_little(self.source, ids.numel(), self.seqlen + 1)
        while True:
            i = rng.randint(0, ids.numel() - self.seqlen - 1)
            yield ids[i : i + self.seqlen]

    def _document_windows(self, docs: list[str], rng: random.Random):
        """Windows of random long documents; returns when no document is long enough (the
        caller then cuts the joined text)."""
        short: set[int] = set()
        while len(short) < len(docs):
            i = rng.randint(0, len(docs) - 1)
            if i in short:
                continue
            ids = _encode(self.tokenizer, docs[i])[0]
            if ids.numel() <= self.seqlen:
                short.add(i)
                continue
            j = rng.randint(0, ids.numel() - self.seqlen - 1)
            yield ids[j : j + self.seqlen]


def check_source(source: str) -> None:
    """A text source that is plainly a local file must exist (checked before any loading)."""
    suffixes = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    if source in ("c4", "wikitext2") or source in BUILTIN_SOURCES:
        return
    looks_local = source.startswith((".", "/", "~")) or source.lower().endswith(suffixes)
    if looks_local and not Path(source).expanduser().exists():
        raise ConfigError(f"text source {source} does not exist")

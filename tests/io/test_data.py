"""Tests for safe_llm.io.data: sources, calibration windows and evaluation windows (all offline)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from safe_llm.io import data
from safe_llm.io.data import DataError, calibration_windows, evaluation_windows, load_text

HAS_EXLLAMAV3 = importlib.util.find_spec("exllamav3") is not None
needs_exllamav3 = pytest.mark.skipif(not HAS_EXLLAMAV3, reason="exllamav3 is not installed")

WIKITEXT_README = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
  - split: test
    path: wikitext-2-raw-v1/test-*
---
# wikitext (local test copy)
"""


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    """Keep datasets' cache in tmp and make any accidental hub access fail fast."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(data.DATASET_ROOT_ENV, raising=False)


def _sentence(i: int) -> str:
    return f"Sentence {i} about pruning the quick brown fox and sparse models number {i * 7}."


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def _contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    n = needle.numel()
    return any(torch.equal(haystack[i : i + n], needle) for i in range(haystack.numel() - n + 1))


def _wikitext_rows(split: str, n: int) -> list[str]:
    rows = []
    for i in range(n):
        rows += [f" = {split.title()} section {i} = \n", "", f" {_sentence(i)} {split} text . \n"]
    return rows


@pytest.fixture
def dataset_root(tmp_path):
    """A local directory with the hub layout of ``wikitext`` and ``allenai/c4``."""
    root = tmp_path / "hub"
    wiki = root / "wikitext" / "wikitext-2-raw-v1"
    wiki.mkdir(parents=True)
    (root / "wikitext" / "README.md").write_text(WIKITEXT_README)
    for split, n in (("train", 40), ("validation", 5), ("test", 30)):
        table = pa.table({"text": _wikitext_rows(split, n)})
        pq.write_table(table, wiki / f"{split}-00000-of-00001.parquet")
    c4 = root / "allenai" / "c4" / "en"
    c4.mkdir(parents=True)
    train_docs = [" ".join(_sentence(i + k) for k in range(1 + i % 6)) for i in range(30)]
    valid_docs = [f"Validation document {i}: {_sentence(i)}" for i in range(40)]
    for name, docs in (
        ("c4-train.00000-of-01024.json.gz", train_docs),
        ("c4-validation.00000-of-00008.json.gz", valid_docs),
    ):
        with gzip.open(c4 / name, "wt", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc, "timestamp": "2019", "url": "u"}) + "\n")
    return root, train_docs, valid_docs


# ------------------------------------------------------------------------------------- wikitext2


def test_wikitext2_evaluation_is_the_joined_test_split_cut_into_numel_div_seqlen(
    tiny_tokenizer, dataset_root
):
    root, _, _ = dataset_root
    seqlen = 16
    windows = evaluation_windows(
        tiny_tokenizer, "wikitext2", seqlen, dataset_path=str(root / "wikitext")
    )
    expected = _ids(tiny_tokenizer, "\n\n".join(_wikitext_rows("test", 30)))
    n = expected.numel() // seqlen
    assert windows.dtype == torch.long
    assert windows.shape == (n, seqlen)
    assert torch.equal(windows.flatten(), expected[: n * seqlen])


def test_wikitext2_resolves_under_the_dataset_root_environment_variable(
    tiny_tokenizer, dataset_root, monkeypatch
):
    root, _, _ = dataset_root
    monkeypatch.setenv(data.DATASET_ROOT_ENV, str(root))
    text = load_text("wikitext2", split="test")
    assert text == "\n\n".join(_wikitext_rows("test", 30))
    assert evaluation_windows(tiny_tokenizer, "wikitext2", 8, max_windows=3).shape == (3, 8)


def test_wikitext2_calibration_windows_are_slices_of_the_joined_train_split(
    tiny_tokenizer, dataset_root
):
    root, _, _ = dataset_root
    windows = calibration_windows(
        tiny_tokenizer, "wikitext2", nsamples=4, seqlen=12, dataset_path=str(root / "wikitext")
    )
    train = _ids(tiny_tokenizer, "\n\n".join(_wikitext_rows("train", 40)))
    assert windows.shape == (4, 12)
    assert all(_contains(train, w) for w in windows)


# -------------------------------------------------------------------------------------------- c4


def test_c4_evaluation_joins_the_first_documents_with_a_space_and_keeps_windows_times_seqlen(
    tiny_tokenizer, dataset_root
):
    root, _, valid_docs = dataset_root
    windows = evaluation_windows(
        tiny_tokenizer,
        "c4",
        seqlen=8,
        dataset_path=str(root / "allenai" / "c4"),
        c4_documents=10,
        c4_windows=5,
    )
    expected = _ids(tiny_tokenizer, " ".join(valid_docs[:10]))[: 5 * 8]
    assert windows.shape == (5, 8)
    assert torch.equal(windows.flatten(), expected)


def test_c4_evaluation_defaults_to_1100_documents_and_256_windows(tiny_tokenizer, tmp_path):
    c4 = tmp_path / "allenai" / "c4"
    (c4 / "en").mkdir(parents=True)
    docs = [f"doc {i} text" for i in range(1100)] + ["EXTRA document never used " * 50] * 20
    with gzip.open(c4 / "en" / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    windows = evaluation_windows(tiny_tokenizer, "c4", seqlen=4, dataset_path=str(c4))
    expected = _ids(tiny_tokenizer, " ".join(docs[:1100]))[: 256 * 4]
    assert windows.shape == (256, 4)
    assert torch.equal(windows.flatten(), expected)


def test_c4_calibration_follows_the_sparsegpt_wanda_sampling_protocol(tiny_tokenizer, dataset_root):
    root, train_docs, _ = dataset_root
    nsamples, seqlen, seed = 6, 20, 3
    windows = calibration_windows(
        tiny_tokenizer, "c4", nsamples, seqlen, seed=seed, dataset_path=str(root / "allenai/c4")
    )
    # Reference (SparseGPT/Wanda get_c4), written independently with the global random module.
    random.seed(seed)
    expected = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(train_docs) - 1)
            enc = tiny_tokenizer(train_docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        expected.append(enc.input_ids[:, i : i + seqlen])
    assert torch.equal(windows, torch.cat(expected))


def test_calibration_windows_are_reproducible_for_a_seed(tiny_tokenizer, dataset_root):
    root = str(dataset_root[0] / "allenai" / "c4")
    first = calibration_windows(tiny_tokenizer, "c4", 5, 16, seed=7, dataset_path=root)
    again = calibration_windows(tiny_tokenizer, "c4", 5, 16, seed=7, dataset_path=root)
    assert torch.equal(first, again)


def test_calibration_windows_differ_between_seeds(tiny_tokenizer, dataset_root):
    root = str(dataset_root[0] / "allenai" / "c4")
    first = calibration_windows(tiny_tokenizer, "c4", 5, 16, seed=0, dataset_path=root)
    other = calibration_windows(tiny_tokenizer, "c4", 5, 16, seed=1, dataset_path=root)
    assert not torch.equal(first, other)


# ----------------------------------------------------------------------------------- local files


def test_text_file_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird doc\n")
    assert load_text(str(path)) == ["first doc\nstill first", "second doc", "third doc"]


def test_text_file_evaluation_joins_documents_with_blank_lines(tiny_tokenizer, tmp_path):
    docs = [_sentence(i) for i in range(20)]
    path = tmp_path / "corpus.md"
    path.write_text("\n\n".join(docs))
    windows = evaluation_windows(tiny_tokenizer, str(path), seqlen=10)
    expected = _ids(tiny_tokenizer, "\n\n".join(docs))
    n = expected.numel() // 10
    assert windows.shape == (n, 10)
    assert torch.equal(windows.flatten(), expected[: n * 10])


def test_jsonl_file_reads_the_requested_text_column(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [" ".join(_sentence(i + k) for k in range(4)) for i in range(8)]
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    assert load_text(str(path), text_column="body") == docs
    windows = calibration_windows(tiny_tokenizer, str(path), 3, 16, text_column="body")
    encoded = [_ids(tiny_tokenizer, d) for d in docs]
    assert windows.shape == (3, 16)
    assert all(any(_contains(e, w) for e in encoded) for w in windows)


def test_parquet_file_loads_through_datasets(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.parquet"
    docs = [" ".join(_sentence(i + k) for k in range(3)) for i in range(6)]
    pq.write_table(pa.table({"text": docs}), path)
    assert load_text(str(path)) == docs
    assert calibration_windows(tiny_tokenizer, str(path), 4, 8).shape == (4, 8)


def test_short_documents_fall_back_to_windows_of_the_joined_text(tiny_tokenizer, tmp_path):
    docs = [f"tiny doc {i}" for i in range(50)]  # each far shorter than seqlen
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(docs))
    windows = calibration_windows(tiny_tokenizer, str(path), 4, 24, seed=1)
    joined = _ids(tiny_tokenizer, "\n\n".join(docs))
    assert windows.shape == (4, 24)
    assert all(_contains(joined, w) for w in windows)


def test_too_few_long_documents_fall_back_to_the_joined_text(tiny_tokenizer, tmp_path):
    long_doc = " ".join(_sentence(k) for k in range(3))
    docs = [long_doc] + [f"tiny doc {i}" for i in range(200)]
    path = tmp_path / "mixed.txt"
    path.write_text("\n\n".join(docs))
    assert _ids(tiny_tokenizer, long_doc).numel() > 24
    one = calibration_windows(tiny_tokenizer, str(path), 1, 24, seed=0)
    assert _contains(_ids(tiny_tokenizer, long_doc), one[0])  # enough long docs: protocol
    many = calibration_windows(tiny_tokenizer, str(path), 8, 24, seed=0)
    assert not all(_contains(_ids(tiny_tokenizer, long_doc), w) for w in many)
    assert all(_contains(_ids(tiny_tokenizer, "\n\n".join(docs)), w) for w in many)


def test_local_dataset_directory_with_config_loads_like_a_hub_id(dataset_root):
    root, _, _ = dataset_root
    docs = load_text(f"{root / 'wikitext'}", split="validation")
    assert docs == [r for r in _wikitext_rows("validation", 5)]


# ---------------------------------------------------------------------------------- builtin data


@needs_exllamav3
def test_builtin_c4_has_one_document_per_non_empty_line():
    docs = load_text("builtin-c4")
    path = data.builtin_data_dir() / "c4.utf8"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert len(docs) == len(lines) > 100


@needs_exllamav3
def test_builtin_wiki_splits_doc_blocks_without_markup():
    docs = load_text("builtin-wiki")
    raw = (data.builtin_data_dir() / "wiki.utf8").read_text(encoding="utf-8")
    assert len(docs) == raw.count("</doc>") > 100
    assert not any("<doc" in d or "</doc>" in d for d in docs)


@needs_exllamav3
@pytest.mark.parametrize("source", ["builtin-c4", "builtin-wiki"])
def test_builtin_sources_give_calibration_and_evaluation_windows(tiny_tokenizer, source):
    cal = calibration_windows(tiny_tokenizer, source, nsamples=4, seqlen=64, seed=0)
    ev = evaluation_windows(tiny_tokenizer, source, seqlen=64, max_windows=5)
    assert cal.shape == (4, 64) and ev.shape == (5, 64)
    assert cal.dtype == ev.dtype == torch.long
    assert not torch.equal(cal, calibration_windows(tiny_tokenizer, source, 4, 64, seed=1))


def test_builtin_source_without_exllamav3_asks_to_install_it(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps exllamav3==1\.6\.5"):
        load_text("builtin-wiki")


# ---------------------------------------------------------------------------------------- errors


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_unknown_source_names_the_accepted_sources():
    with pytest.raises(DataError, match="unknown source 'not a source!'.*wikitext2"):
        load_text("not a source!")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_unreachable_dataset_id_raises_data_error():
    with pytest.raises(DataError, match="could not load dataset 'no-such-owner/no-such-data'"):
        load_text("no-such-owner/no-such-data:cfg")


def test_unsupported_file_type_is_reported(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_text(str(path))


def test_empty_text_is_reported(tiny_tokenizer, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(DataError, match="contains no text"):
        calibration_windows(tiny_tokenizer, str(path), 1, 8)


def test_missing_text_column_lists_available_columns(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    with pytest.raises(DataError, match="no text column 'text'.*body, id"):
        load_text(str(path))


def test_too_little_text_for_calibration_reports_tokens_found_and_needed(tiny_tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("just a few words")
    found = _ids(tiny_tokenizer, "just a few words").numel()
    with pytest.raises(DataError, match=rf"found {found} tokens, need at least 101.*--nsamples"):
        calibration_windows(tiny_tokenizer, str(path), nsamples=2, seqlen=100)


def test_too_little_text_for_evaluation_suggests_a_smaller_seqlen(tiny_tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("just a few words")
    with pytest.raises(DataError, match=r"need at least 100.*smaller --seqlen"):
        evaluation_windows(tiny_tokenizer, str(path), seqlen=100)


@pytest.mark.parametrize(
    ("nsamples", "seqlen", "message"),
    [(0, 8, "nsamples must be at least 1"), (2, 1, "seqlen must be at least 2")],
)
def test_invalid_window_sizes_are_rejected(tiny_tokenizer, tmp_path, nsamples, seqlen, message):
    path = tmp_path / "corpus.txt"
    path.write_text(_sentence(1) * 10)
    with pytest.raises(DataError, match=message):
        calibration_windows(tiny_tokenizer, str(path), nsamples, seqlen)


def test_evaluation_rejects_seqlen_below_two(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_sentence(1) * 10)
    with pytest.raises(DataError, match="seqlen must be at least 2"):
        evaluation_windows(tiny_tokenizer, str(path), seqlen=1)

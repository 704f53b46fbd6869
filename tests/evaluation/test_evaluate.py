"""The evaluation harness (safe_llm.evaluation.evaluate) and ``safe-llm eval`` / ``prune --eval``, offline."""

from __future__ import annotations

import gzip
import json
import math
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from safe_llm import cli
from safe_llm.evaluation.evaluate import evaluate_perplexity, source_perplexity
from safe_llm.evaluation.perplexity import SeqlenError
from safe_llm.io import data
from safe_llm.options import parse_list

SEQLEN = 16
WIKITEXT_README = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
---
"""


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    """datasets' cache in tmp; any hub access fails fast."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(data.DATASET_ROOT_ENV, raising=False)


@pytest.fixture
def hub_root(tmp_path):
    """Local copies with the hub layout of ``wikitext`` (test split) and ``allenai/c4``
    (validation shard 0). Returns (root, wikitext rows, c4 documents)."""
    root = tmp_path / "hub"
    wiki = root / "wikitext" / "wikitext-2-raw-v1"
    wiki.mkdir(parents=True)
    (root / "wikitext" / "README.md").write_text(WIKITEXT_README)
    rows = []
    for i in range(25):
        rows += [f" = Section {i} = \n", "", f" The quick brown fox number {i} jumps . \n"]
    pq.write_table(pa.table({"text": rows}), wiki / "test-00000-of-00001.parquet")
    c4 = root / "allenai" / "c4" / "en"
    c4.mkdir(parents=True)
    docs = [f"Validation document {i}: sparse models keep their perplexity." for i in range(40)]
    with gzip.open(c4 / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs)
    return root, rows, docs


@pytest.fixture
def model_dir(save_tiny_model):
    return save_tiny_model(max_position_embeddings=64)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(f"Document {i}: pruning the quick brown fox." for i in range(30)))
    return path


def _direct_perplexity(model, tokenizer, text: str, seqlen: int, max_windows=None) -> float:
    """Written independently of safe_llm: tokenize ``text`` once, cut consecutive windows, sum
    every target token's log-probability in float64, exp(-mean). (All windows have the same
    length, so the token mean equals the mean of window means.)"""
    ids = tokenizer(text)["input_ids"]
    count = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for w in range(count):
            window = torch.tensor(ids[w * seqlen : (w + 1) * seqlen])
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total += logp[torch.arange(seqlen - 1), window[1:]].sum().item()
            tokens += seqlen - 1
    return math.exp(-total / tokens)


def _load(model_dir):
    from safe_llm.io.models import load_model

    model, tokenizer, _ = load_model(str(model_dir))
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# lists and labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [["wikitext2,c4", "x.txt"], ["wikitext2", "c4", "x.txt"], "wikitext2, c4 x.txt"],
    ids=["mixed", "space", "one string"],
)
def test_source_lists_accept_commas_and_spaces(values):
    assert parse_list(values) == ["wikitext2", "c4", "x.txt"]


def test_source_lists_drop_empty_items_and_duplicates():
    assert parse_list(["c4,,c4", ",wikitext2,"]) == ["c4", "wikitext2"]
    assert parse_list(None) == []


# --------------------------------------------------------------------------------------------
# the numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 50])
def test_file_perplexity_matches_an_independent_computation_for_any_batch_size(
    model_dir, text_file, batch_size
):
    model, tokenizer = _load(model_dir)
    text = "\n\n".join(data.load_text(str(text_file)))
    expected = _direct_perplexity(model, tokenizer, text, SEQLEN)
    result = source_perplexity(model, tokenizer, str(text_file), SEQLEN, batch_size=batch_size)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-4)
    assert result["windows"] == result["total_windows"] == len(tokenizer(text)["input_ids"]) // 16
    assert result["tokens"] == result["windows"] * SEQLEN


def test_max_windows_keeps_the_first_windows_and_says_so_in_the_protocol(model_dir, text_file):
    model, tokenizer = _load(model_dir)
    text = "\n\n".join(data.load_text(str(text_file)))
    result = source_perplexity(model, tokenizer, str(text_file), SEQLEN, max_windows=3)
    assert result["perplexity"] == pytest.approx(
        _direct_perplexity(model, tokenizer, text, SEQLEN, max_windows=3), rel=1e-4
    )
    assert result["windows"] == 3 and result["total_windows"] > 3
    assert f"first 3 of {result['total_windows']}" in result["protocol"]


def test_wikitext2_and_c4_go_through_load_dataset_with_the_standard_names(
    model_dir, hub_root, monkeypatch
):
    root, rows, docs = hub_root
    real = datasets.load_dataset
    calls = []

    def spy(path, *args, **kwargs):
        # the standard hub names, then served from the local copy (no network)
        calls.append((path, args, kwargs))
        local = {"wikitext": root / "wikitext", "allenai/c4": root / "allenai" / "c4"}[path]
        return real(str(local), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    model, tokenizer = _load(model_dir)
    results = evaluate_perplexity(model, tokenizer, "wikitext2,c4", SEQLEN, batch_size=4)
    assert calls == [
        ("wikitext", ("wikitext-2-raw-v1",), {"split": "test"}),
        (
            "allenai/c4",
            (),
            {
                "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                "split": "validation",
            },
        ),
    ]
    expected = {
        "wikitext2": _direct_perplexity(model, tokenizer, "\n\n".join(rows), SEQLEN),
        "c4": _direct_perplexity(model, tokenizer, " ".join(docs), SEQLEN),
    }
    assert {k: r["perplexity"] for k, r in results.items()} == pytest.approx(expected, rel=1e-4)
    assert "wikitext-2-raw-v1 test split" in results["wikitext2"]["protocol"]
    assert "allenai/c4 en validation shard 0, first 1100 documents" in results["c4"]["protocol"]


def test_seqlen_above_the_model_maximum_fails_before_any_text_is_loaded(model_dir, monkeypatch):
    model, tokenizer = _load(model_dir)
    monkeypatch.setattr(data, "load_text", lambda *a, **k: pytest.fail("text was loaded"))
    with pytest.raises(SeqlenError, match="seqlen 65 exceeds the model's maximum length 64"):
        evaluate_perplexity(model, tokenizer, ["wikitext2"], 65)


# --------------------------------------------------------------------------------------------
# safe-llm eval
# --------------------------------------------------------------------------------------------


def _eval(model_dir, *extra) -> list[str]:
    return ["eval", "--model", str(model_dir), "--seqlen", str(SEQLEN), *extra]


def test_eval_cli_writes_json_with_a_protocol_label_for_every_number(
    model_dir, text_file, hub_root, tmp_path, monkeypatch, capsys
):
    root, rows, _ = hub_root
    monkeypatch.setenv(data.DATASET_ROOT_ENV, str(root))
    out = tmp_path / "results" / "eval.json"
    args = _eval(model_dir, "--datasets", f"wikitext2,{text_file}", "c4", "--json", str(out))
    assert cli.main([*args, "--batch-size", "3"]) == 0
    captured = capsys.readouterr()
    document = json.loads(out.read_text())
    model, tokenizer = _load(model_dir)
    assert list(document["perplexity"]) == ["wikitext2", str(text_file), "c4"]
    wiki = document["perplexity"]["wikitext2"]
    assert wiki["perplexity"] == pytest.approx(
        _direct_perplexity(model, tokenizer, "\n\n".join(rows), SEQLEN), rel=1e-4
    )
    for source, result in document["perplexity"].items():
        assert result["protocol"].startswith("token perplexity, SparseGPT/Wanda")
        assert f"seqlen {SEQLEN}, {result['windows']} non-overlapping windows" in result["protocol"]
        assert f"{source}: perplexity {result['perplexity']:.4f} (" in captured.out
    assert document["model"] == str(model_dir) and document["dtype"] == "float32"
    assert "perplexity" in captured.err  # the progress bar
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_python_evaluate_gives_the_document_safe_llm_eval_writes(model_dir, text_file, tmp_path):
    import safe_llm

    document = safe_llm.evaluate(str(model_dir), str(text_file), seqlen=SEQLEN, batch_size=2)
    out = tmp_path / "eval.json"
    assert cli.main(_eval(model_dir, "--datasets", str(text_file), "--json", str(out))) == 0
    written = json.loads(out.read_text())
    assert list(document) == list(written)
    result, expected = document["perplexity"][str(text_file)], written["perplexity"][str(text_file)]
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert result["protocol"] == expected["protocol"]


def test_eval_cli_quiet_shows_no_progress_bar(model_dir, text_file, capsys):
    assert cli.main(_eval(model_dir, "--datasets", str(text_file), "--quiet")) == 0
    assert "perplexity" not in capsys.readouterr().err


def test_eval_cli_batch_size_does_not_change_the_numbers(model_dir, text_file, tmp_path):
    ppl = []
    for batch_size in ("1", "7"):
        out = tmp_path / f"b{batch_size}.json"
        args = _eval(model_dir, "--datasets", str(text_file), "--batch-size", batch_size)
        assert cli.main([*args, "--json", str(out), "--quiet"]) == 0
        ppl.append(json.loads(out.read_text())["perplexity"][str(text_file)]["perplexity"])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)


def test_eval_cli_seqlen_above_the_model_maximum_is_one_error_line_exit_2(
    model_dir, text_file, tmp_path, capsys
):
    out = tmp_path / "eval.json"
    args = _eval(model_dir, "--datasets", str(text_file), "--json", str(out))
    assert cli.main([*args, "--seqlen", "65"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "safe-llm: error: --seqlen 65 exceeds the model's maximum length 64 "
        "(max_position_embeddings in its config); use --seqlen 64 or less"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--datasets"], "nothing to evaluate"),
        (["--seqlen", "1"], "--seqlen must be at least 2"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-windows", "0"], "--max-windows must be at least 1"),
        (["--datasets", "./missing.txt"], "missing.txt"),
    ],
)
def test_eval_cli_bad_options_are_one_error_line_exit_2(model_dir, extra, needle, capsys):
    assert cli.main([*_eval(model_dir), *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: ") and needle in lines[0]


def test_eval_cli_tasks_without_lm_eval_ask_for_the_extra(model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.setattr(
        "safe_llm.io.models.load_model", lambda *a, **k: pytest.fail("model loaded first")
    )
    assert cli.main([*_eval(model_dir), "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'safe-llm[eval]'" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# safe-llm prune --eval
# --------------------------------------------------------------------------------------------


def test_prune_eval_accepts_a_comma_list_and_reports_dense_and_pruned_with_protocols(
    model_dir, calibration_file, text_file, hub_root, tmp_path, monkeypatch
):
    root, rows, _ = hub_root
    monkeypatch.setenv(data.DATASET_ROOT_ENV, str(root))
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--dataset", str(calibration_file)]
    args += ["--nsamples", "4", "--seqlen", str(SEQLEN), "--batch-size", "2", "--quiet"]
    args += ["--eval", f"wikitext2,{text_file}", "--output", str(out)]
    assert cli.main(args) == 0
    evaluation = json.loads((out / "report.json").read_text())["evaluation"]
    assert set(evaluation) == {"dense", "pruned"}
    dense_model, tokenizer = _load(model_dir)
    pruned_model, _ = _load(out)
    text = "\n\n".join(data.load_text(str(text_file)))
    for stage, model in (("dense", dense_model), ("pruned", pruned_model)):
        assert list(evaluation[stage]) == ["wikitext2", str(text_file)]
        expected = _direct_perplexity(model, tokenizer, text, SEQLEN)
        assert evaluation[stage][str(text_file)]["perplexity"] == pytest.approx(expected, rel=1e-4)
        assert "SparseGPT/Wanda" in evaluation[stage]["wikitext2"]["protocol"]
    assert (
        evaluation["dense"]["wikitext2"]["perplexity"]
        != evaluation["pruned"]["wikitext2"]["perplexity"]
    )

"""``safe-llm report``: Markdown table and PNG plots from real (tiny) run directories."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from safe_llm import cli
from safe_llm.evaluation.compare import PLOTS, load_runs, markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """Two pruned checkpoints of one tiny Llama (wanda 50% with --eval, magnitude 2:4 with
    mlp.down_proj kept dense), written by ``safe-llm prune --output``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox prunes." for i in range(60)))
    common = ["prune", "--model", str(root / "model"), "--dataset", str(text), "--quiet"]
    common += ["--nsamples", "4", "--seqlen", "16", "--eval", str(text)]
    wanda, magnitude = root / "wanda", root / "magnitude"
    assert cli.main([*common, "--method", "wanda", "--output", str(wanda)]) == 0
    args = ["--method", "magnitude", "--structure", "2:4", "--ignore", "mlp.down_proj"]
    assert cli.main([*common, *args, "--output", str(magnitude)]) == 0
    return wanda, magnitude, str(text)


def test_report_table_has_one_row_per_run_with_the_run_figures(runs, tmp_path, capsys):
    wanda, magnitude, text = runs
    out = tmp_path / "report"
    assert cli.main(["report", str(wanda), str(magnitude), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | model | method | structure | sparsity |")
    assert f"{text} ppl (dense → pruned)" in rows[0]
    assert len(rows) == 3
    for row, path in zip(rows[1:], (wanda, magnitude), strict=True):
        report = json.loads((path / "report.json").read_text())
        dense = report["evaluation"]["dense"][text]["perplexity"]
        pruned = report["evaluation"]["pruned"][text]["perplexity"]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:5] == [
            report["method"],
            report["pattern"],
            f"{report['overall_sparsity']:.4f}",
        ]
        assert cells[5] == f"{dense:.3f} → {pruned:.3f}"
        assert cells[6:] == [
            f"{report['seconds']:.1f}",
            f"{report['total_seconds']:.1f}",
            f"{report['peak_memory_bytes'] / 2**30:.2f}",
        ]
        assert report["evaluation"]["pruned"][text]["protocol"] in md
    assert "wanda 50%" in rows[1] and "magnitude 2:4" in rows[2]
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out


def test_report_writes_the_three_plots_as_png_images(runs, tmp_path):
    import matplotlib.image

    wanda, magnitude, _ = runs
    out = tmp_path / "report"
    assert cli.main(["report", str(wanda), str(magnitude), "--output", str(out)]) == 0
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert height > 200 and width > 400
        assert f"]({name})" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS, "report.md"])


def test_runs_without_evaluation_get_no_perplexity_plot_and_say_so(runs, tmp_path):
    wanda, _, _ = runs
    bare = tmp_path / "bare"
    bare.mkdir()
    report = json.loads((wanda / "report.json").read_text())
    report["evaluation"] = {"dense": {}, "pruned": {}}
    (bare / "report.json").write_text(json.dumps(report))
    out = tmp_path / "report"
    assert cli.main(["report", str(bare), "--output", str(out)]) == 0
    assert not (out / "perplexity.png").exists()
    assert "No run was evaluated" in (out / "report.md").read_text()


def test_identical_run_labels_are_told_apart_by_directory(runs, tmp_path):
    wanda, _, _ = runs
    copy = tmp_path / "again"
    copy.mkdir()
    for name in ("report.json", "recipe.yaml"):
        (copy / name).write_bytes((wanda / name).read_bytes())
    labels = [r.label for r in load_runs([wanda, copy])]
    assert labels == ["wanda 50% (wanda)", "wanda 50% (again)"]


def test_per_matrix_sparsity_in_the_plot_data_shows_dense_matrices(runs):
    from safe_llm.evaluation.compare import _sparsity_matrix

    _, magnitude, _ = runs
    names, blocks, values = _sparsity_matrix(load_runs([magnitude])[0])
    assert blocks == [0, 1, 2] and "mlp.down_proj" not in names  # ignored: never recorded
    assert all(v == 0.5 for row in values for v in row)
    assert "magnitude 2:4" in markdown(load_runs([magnitude]))


def test_no_plots_writes_only_the_markdown(runs, tmp_path):
    wanda, _, _ = runs
    out = tmp_path / "report"
    assert cli.main(["report", str(wanda), "--output", str(out), "--no-plots"]) == 0
    assert [p.name for p in out.iterdir()] == ["report.md"]


def test_missing_matplotlib_is_one_error_line_and_writes_nothing(
    runs, tmp_path, monkeypatch, capsys
):
    wanda, _, _ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report"
    assert cli.main(["report", str(wanda), "--output", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and "pip install 'safe-llm[eval]'" in lines[0] and "--no-plots" in lines[0]
    )
    assert not out.exists()


def test_directory_without_report_json_is_one_error_line(runs, tmp_path, capsys):
    wanda, _, _ = runs
    out = tmp_path / "report"
    assert cli.main(["report", str(wanda), str(tmp_path), "--output", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"safe-llm: error: {tmp_path} is not a safe-llm run directory: it has no report.json"
    ]
    assert not out.exists()

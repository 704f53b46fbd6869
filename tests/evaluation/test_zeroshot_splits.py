"""eval/zeroshot_splits.py: rows are named as the field table names them, a row's cached tasks
are never scored again, and the share of SparseGPT's gap a row closes is taken per pattern."""

import argparse
import json

import pytest
import torch
import zeroshot_splits


def _result(value: float, stderr: float = 0.01) -> dict:
    return {"value": value, "stderr": stderr}


def _row(method: str, pattern: str, *values: float) -> dict:
    tasks = {name: _result(v) for name, v in zip("ab", values, strict=False)}
    return {"method": method, "pattern": pattern, "tasks": tasks}


def test_a_row_is_dense_or_method_and_pattern_with_colons_kept():
    assert zeroshot_splits.parse_row("dense") == ("dense", "-")
    assert zeroshot_splits.parse_row("safe+rec:2:4") == ("safe+rec", "2:4")
    assert zeroshot_splits.parse_row("sparsegpt:50%") == ("sparsegpt", "50%")
    with pytest.raises(argparse.ArgumentTypeError):
        zeroshot_splits.parse_row("sparsegpt")


def test_limits_parse_and_a_malformed_one_is_refused():
    assert zeroshot_splits.parse_limits(["hellaswag=500", "piqa=0"]) == {
        "hellaswag": 500,
        "piqa": 0,
    }
    with pytest.raises(SystemExit):
        zeroshot_splits.parse_limits(["hellaswag:500"])


def test_the_share_of_the_gap_closed_is_taken_against_sparsegpt_at_the_same_pattern():
    rows = [
        _row("dense", "-", 0.60, 0.40),  # mean 0.50
        _row("sparsegpt", "50%", 0.50, 0.30),  # mean 0.40: gap 0.10
        _row("safe+rec", "50%", 0.55, 0.35),  # mean 0.45: half of it
        _row("sparsegpt", "2:4", 0.40, 0.20),  # mean 0.30: gap 0.20
        _row("safe+rec", "2:4", 0.40, 0.25),  # mean 0.325: an eighth
        _row("safe+rec", "60%", 0.50, 0.50),  # no SparseGPT row at 60%: left out
    ]
    closed = zeroshot_splits.gap_closed(rows, ["a", "b"])

    assert [(c["pattern"], round(c["closed"], 6)) for c in closed] == [
        ("50%", 0.5),
        ("2:4", 0.125),
    ]
    # sqrt(2) x the mean's stderr (0.01 / sqrt(2)) over the gap
    assert closed[0]["closed_stderr"] == pytest.approx(0.01 / 0.10)


def test_a_row_missing_a_task_has_no_mean():
    assert zeroshot_splits.task_mean(_row("dense", "-", 0.5), ["a", "b"]) is None


def test_a_cached_row_is_returned_without_loading_or_scoring_anything(tmp_path, monkeypatch):
    cached = {"method": "sparsegpt", "pattern": "50%", "ref": 34.7, "tasks": {"a": _result(0.4)}}
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "sparsegpt-50.json").write_text(json.dumps(cached))

    def fail(*args, **kwargs):
        raise AssertionError("a cached row was scored again")

    monkeypatch.setattr(zeroshot_splits, "make_checkpoint", fail)
    monkeypatch.setattr(zeroshot_splits, "evaluate_tasks", fail)
    args = argparse.Namespace(runs_dir=str(tmp_path), tasks=["a"], limits={}, cached_only=False)

    assert zeroshot_splits.score_row("sparsegpt", "50%", None, args) == cached


def test_rows_read_from_the_cache_are_ordered_as_the_field_table_orders_them():
    rows = [_row("safe+rec", "2:4"), _row("sparsegpt", "50%"), _row("dense", "-")]
    rows += [_row("safe+rec", "50%")]
    ordered = sorted(rows, key=zeroshot_splits.table_order)

    assert [(r["method"], r["pattern"]) for r in ordered] == [
        ("dense", "-"),
        ("sparsegpt", "50%"),
        ("safe+rec", "50%"),
        ("safe+rec", "2:4"),
    ]


def _answers(generator, count: int, accuracy: float) -> list[int]:
    return (torch.rand(count, generator=generator) < accuracy).int().tolist()


def test_the_paired_share_stderr_agrees_with_a_bootstrap_over_the_examples():
    generator = torch.Generator().manual_seed(0)
    tasks, rows = ["a", "b"], {}
    for task, count in zip(tasks, (600, 400), strict=True):
        base = _answers(generator, count, 0.45)
        dense = _answers(generator, count, 0.60)
        # the recovered model answers as dense on about half the examples, as the baseline on
        # the rest: its gain and the gap move together, which only the pairing sees
        takes = _answers(generator, count, 0.5)
        rows.setdefault("mine", {})[task] = [
            d if t else b for b, d, t in zip(base, dense, takes, strict=True)
        ]
        rows.setdefault("base", {})[task] = base
        rows.setdefault("dense", {})[task] = dense
    as_row = {
        key: {
            "tasks": {
                t: {"value": sum(a) / len(a), "stderr": 0.0, "correct": a}
                for t, a in answers.items()
            }
        }
        for key, answers in rows.items()
    }
    analytic = zeroshot_splits.paired_share_stderr(
        as_row["mine"], as_row["base"], as_row["dense"], tasks
    )

    draws = []
    for _ in range(2000):  # resample each task's examples, all three models together
        means = {key: 0.0 for key in rows}
        for task in tasks:
            count = len(rows["base"][task])
            pick = torch.randint(count, (count,), generator=generator)
            for key in rows:
                means[key] += torch.tensor(rows[key][task], dtype=torch.float64)[pick].mean()
        draws.append((means["mine"] - means["base"]) / (means["dense"] - means["base"]))
    bootstrap = float(torch.stack(draws).std())
    assert analytic == pytest.approx(bootstrap, rel=0.15)


def test_without_per_example_results_the_share_falls_back_to_independent_errors():
    rows = [
        _row("dense", "-", 0.60, 0.40),
        _row("sparsegpt", "50%", 0.50, 0.30),
        _row("safe+rec", "50%", 0.55, 0.35),
    ]
    (closed,) = zeroshot_splits.gap_closed(rows, ["a", "b"])
    assert closed["stderr_kind"] == "independent"
    rows[0]["tasks"]["a"]["correct"] = [1, 0]  # one row and one task only: still independent
    (closed,) = zeroshot_splits.gap_closed(rows, ["a", "b"])
    assert closed["stderr_kind"] == "independent"

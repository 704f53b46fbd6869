"""eval/field_table.py's row cache: rows another process has claimed are skipped, a claim is
released when its row ends (finished or failed), and finished rows are read from the cache."""

import argparse
import json
import subprocess

import field_table


def _args(tmp_path, **overrides) -> argparse.Namespace:
    values = {
        "runs_dir": str(tmp_path),
        "methods": ["magnitude", "wanda"],
        "patterns": ["50%"],
        "cached_only": False,
    }
    return argparse.Namespace(**{**values, **overrides})


def test_a_row_claimed_by_another_process_is_skipped_and_the_rest_run(tmp_path, monkeypatch):
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    (rows_dir / "dense--.json").write_text(json.dumps({"method": "dense", "pattern": "-"}))
    (rows_dir / "magnitude-50.running").touch()  # another process holds it
    ran = []

    def fake_row(method, pattern, tokenizer, windows, args):
        ran.append((method, pattern))
        return {"method": method, "pattern": pattern}

    monkeypatch.setattr(field_table, "run_row", fake_row)
    monkeypatch.setattr(field_table, "summary", lambda row: "")
    rows = field_table.cached_rows(_args(tmp_path), None, {}, lambda rows: None)

    assert ran == [("wanda", "50%")]
    assert [r["method"] for r in rows] == ["dense", "wanda"]
    assert (rows_dir / "magnitude-50.running").exists()  # not ours to release
    assert not (rows_dir / "wanda-50.running").exists()
    assert json.loads((rows_dir / "wanda-50.json").read_text())["method"] == "wanda"


def test_a_failed_row_releases_its_claim_and_stays_uncached(tmp_path, monkeypatch):
    def failing_row(method, pattern, tokenizer, windows, args):
        raise subprocess.CalledProcessError(1, ["safe-llm"])

    monkeypatch.setattr(field_table, "run_row", failing_row)
    rows = field_table.cached_rows(
        _args(tmp_path, methods=["magnitude"]), None, {}, lambda rows: None
    )

    assert rows == []
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == []

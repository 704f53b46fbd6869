"""eval/recovery_tasks.py: recovery rows are named by their window count, shares are taken
against SparseGPT at the same pattern, finished checkpoints are reused and a failed job says
why."""

import argparse
import os
import sys

import pytest
import recovery_tasks
from field_table import SEPARATING


def _row(method: str, pattern: str, ref: float, accuracy: float) -> dict:
    tasks = {t: {"value": accuracy, "stderr": 0.01} for t in SEPARATING}
    return {"method": method, "pattern": pattern, "ref": ref, "tasks": tasks}


def _args(tmp_path, jobs: int = 1) -> argparse.Namespace:
    return recovery_tasks.parse_args(["--runs-dir", str(tmp_path), "--jobs", str(jobs)])


def test_recovery_rows_are_named_and_labelled_by_their_window_count():
    assert recovery_tasks.recovered(128) == "safe+rec128"
    assert recovery_tasks.label("safe+rec128") == "SAFE+ + recovery, 128 windows"
    assert recovery_tasks.label("sparsegpt") == "SparseGPT"


def test_damage_and_gap_shares_are_taken_against_sparsegpt_at_the_same_pattern():
    rows = [
        _row("dense", "-", 10.0, 0.50),
        _row("sparsegpt", "50%", 30.0, 0.40),
        _row("safe+rec32", "50%", 20.0, 0.45),
        _row("sparsegpt", "2:4", 50.0, 0.30),
        _row("safe+rec32", "2:4", 40.0, 0.35),
    ]
    summary = recovery_tasks.summarise(rows)
    removed = {(r["method"], r["pattern"]): r["damage_removed"] for r in summary["rows"]}
    assert removed[("safe+rec32", "50%")] == pytest.approx(0.5)  # (30 - 20) / (30 - 10)
    assert removed[("safe+rec32", "2:4")] == pytest.approx(0.25)  # (50 - 40) / (50 - 10)
    closed = {(c["method"], c["pattern"]): c["closed"] for c in summary["gap_closed"]}
    assert closed[("safe+rec32", "50%")] == pytest.approx(0.5)  # 0.05 of a 0.10 gap
    assert closed[("safe+rec32", "2:4")] == pytest.approx(0.25)  # 0.05 of a 0.20 gap
    table = recovery_tasks.markdown(summary)
    assert "| SAFE+ + recovery, 32 windows | 2:4 | 40.00 | 25% |" in table
    assert len(table.strip().splitlines()) == 2 + len(rows)


def test_a_finished_checkpoint_is_reused_without_running_anything(tmp_path, monkeypatch):
    (tmp_path / "sparsegpt-50").mkdir()
    (tmp_path / "sparsegpt-50" / "report.json").write_text("{}")
    runner = recovery_tasks.Runner(_args(tmp_path))
    monkeypatch.setattr(runner, "run", lambda *a: pytest.fail("ran a finished checkpoint"))
    assert runner.prune("sparsegpt", "50%") == (tmp_path / "sparsegpt-50", None)


def test_a_failed_job_raises_with_the_end_of_its_log(tmp_path):
    runner = recovery_tasks.Runner(_args(tmp_path, jobs=2))
    failing = [sys.executable, "-c", "import sys; print('no GGUF here'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)broken failed \(exit 3\).*no GGUF here"):
        runner.run("broken", failing)
    assert runner.env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))

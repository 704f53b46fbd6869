"""eval/recovery_curve.py: rows are named by source and budget, damage and paired gap shares
are taken against SparseGPT at the same pattern, the tuning and reporting halves split each
task's examples in two, and a rerun runs nothing already done (the jobs faked on a tiny model
directory: no pruning, recovery or scoring runs here)."""

import json
import threading
import time
from pathlib import Path

import pytest
import recovery_curve
from zeroshot_splits import paired_share_stderr

from safe_llm import cli

TASKS = ["a", "b"]


def test_recovery_and_calibration_rows_are_named_by_source_budget_and_windows():
    assert recovery_curve.recovered("builtin-c4", 8000) == "safe+rec-c4-8k"
    assert recovery_curve.recovered("self", 2_000_000) == "safe+rec-self-2M"
    assert recovery_curve.budget_label(65536) == "65536"
    assert recovery_curve.calibrated("safe+", "self", 128) == "safe+-cal-self-128"
    args = recovery_curve.parse_args(
        ["--patterns", "50%", "2:4", "--budgets", "32k", "8k", "--calibration"]
    )
    names = [recovery_curve.name_of(row) for row in recovery_curve.plan(args)]
    assert names[:3] == ["dense", "sparsegpt-50", "safe+-50"]
    assert names[3:7] == [  # per source, budgets ascending
        "safe+rec-c4-8k-50",
        "safe+rec-c4-32k-50",
        "safe+rec-self-8k-50",
        "safe+rec-self-32k-50",
    ]
    assert "sparsegpt-cal-self-32-2-4" in names and "safe+-cal-c4-128-2-4" in names
    assert "sparsegpt-cal-c4-32-50" not in names  # builtin-c4 at --nsamples: the base row
    assert len(names) == len(set(names)) == 1 + 2 * (2 + 4 + 6)
    for bad in ("0", "-8k", "lots"):
        with pytest.raises(SystemExit):
            recovery_curve.parse_args(["--budgets", bad])


def _scores(name: str) -> dict:
    """Synthetic scores of a row: means and answers chosen so the shares are round."""
    answers = {  # per task, 8 examples
        "dense": [1] * 8,
        "sparsegpt-50": [1, 1, 1, 1, 0, 0, 0, 0],  # gap 0.5
        "sparsegpt-2-4": [1, 1, 0, 0, 0, 0, 0, 0],  # gap 0.75
    }.get(name, [1, 1, 1, 1, 1, 1, 0, 0] if name.endswith("-50") else [1, 1, 1, 1, 0, 0, 0, 0])
    ref = {"dense": 10.0, "sparsegpt-50": 30.0, "sparsegpt-2-4": 50.0}
    ref = ref.get(name, 20.0 if name.endswith("-50") else 40.0)
    tasks = {t: {"value": sum(answers) / 8, "stderr": 0.1, "correct": answers} for t in TASKS}
    return {"ref": ref, "tasks": tasks}


def _rows(*argv: str) -> list[dict]:
    args = recovery_curve.parse_args(["--patterns", "50%", "2:4", "--budgets", "8k", *argv])
    return [{**row, **_scores(recovery_curve.name_of(row))} for row in recovery_curve.plan(args)]


def test_damage_and_the_paired_gap_share_are_taken_against_sparsegpt_at_the_same_pattern():
    rows = _rows("--sources", "self")
    summary = recovery_curve.summarise(rows, "whole", TASKS)
    by_name = {recovery_curve.name_of(r): r for r in summary["rows"]}
    recovered50, recovered24 = by_name["safe+rec-self-8k-50"], by_name["safe+rec-self-8k-2-4"]

    assert recovered50["damage_removed"] == pytest.approx(0.5)  # (30 - 20) / (30 - 10)
    assert recovered24["damage_removed"] == pytest.approx(0.25)  # (50 - 40) / (50 - 10)
    assert recovered50["closed"] == pytest.approx(0.5)  # 0.25 of a 0.5 gap
    assert recovered24["closed"] == pytest.approx(1 / 3)  # 0.25 of a 0.75 gap
    assert recovered24["stderr_kind"] == "paired"
    raw = {recovery_curve.name_of(r): r for r in rows}
    expected = paired_share_stderr(
        raw["safe+rec-self-8k-2-4"], raw["sparsegpt-2-4"], raw["dense"], TASKS
    )
    assert recovered24["closed_stderr"] == pytest.approx(expected)
    assert "closed" not in by_name["sparsegpt-50"]  # the baseline closes nothing of its own

    (curve50, curve24) = summary["curves"]
    assert (curve50["source"], curve50["pattern"], curve24["pattern"]) == ("self", "50%", "2:4")
    assert curve24["points"][0]["closed"] == pytest.approx(1 / 3)
    table = recovery_curve.markdown(summary, _meta())
    assert "| SAFE+ + recovery, 8k tokens of self | 2:4 | - | 40.00 | 25% |" in table
    assert "33% ± " in table


def _meta() -> dict:
    return {"tasks": TASKS, "limits": {}, "machine": "test", "command": "test", "model": "tiny"}


def test_the_choose_and_report_halves_are_disjoint_and_cover_each_task():
    for count in (7, 8):
        choose = set(recovery_curve.half(count, "choose"))
        report = set(recovery_curve.half(count, "report"))
        assert not choose & report
        assert choose | report == set(recovery_curve.half(count, "whole")) == set(range(count))

    answers = [1, 0, 0, 1, 1, 1, 0]
    row = {"method": "dense", "pattern": "-", "tasks": {"a": {"value": 4 / 7, "correct": answers}}}
    choose = recovery_curve.split_view(row, "choose")["tasks"]["a"]
    report = recovery_curve.split_view(row, "report")["tasks"]["a"]
    assert choose["correct"] == [1, 0, 1, 0] and report["correct"] == [0, 1, 1]
    assert (choose["value"], report["value"]) == (0.5, pytest.approx(2 / 3))
    assert choose["examples"] * choose["value"] + report["examples"] * report["value"] == 4
    assert row["tasks"]["a"]["correct"] == answers  # a view, the row untouched

    rows = _rows("--sources", "self")
    views = {split: recovery_curve.summarise(rows, split, TASKS) for split in ("choose", "report")}
    samples = {s: v["rows"][0]["tasks"]["a"]["examples"] for s, v in views.items()}
    assert samples == {"choose": 4, "report": 4}


class FakeJobs:
    """Stands in for ``Runner.run``: writes what each job would (a checkpoint's
    ``report.json``, a score cache) and records it; every safe-llm command must parse."""

    def __init__(self):
        self.names, self.commands, self.lock = [], [], threading.Lock()

    def __call__(self, name: str, command: list[str]) -> float:
        with self.lock:
            self.names.append(name)
            self.commands.append(command)
        if "--score-out" in command:
            out = Path(command[command.index("--score-out") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(_scores(out.stem)))
        elif "safe_llm.cli" in command:
            words = command[command.index("safe_llm.cli") + 1 :]
            cli.parse_args(words)  # a valid safe-llm command line
            out = Path(words[words.index("--output") + 1])
            out.mkdir(parents=True)
            report = {"seconds": 5.0}
            if words[0] == "recover":
                tokens = int(words[words.index("--recover-tokens") + 1])
                recovery = {"tokens": tokens, "seconds": tokens / 40, "tokens_per_second": 40.0}
                report["recovery"] = recovery
            (out / "report.json").write_text(json.dumps(report))
        return 1.0


def test_a_rerun_runs_nothing_done_and_a_missing_score_alone_is_redone(
    tmp_path, monkeypatch, save_tiny_model
):
    model = save_tiny_model("dense")
    jobs = FakeJobs()
    monkeypatch.setattr(recovery_curve.CurveRunner, "run", lambda self, *a: jobs(*a))
    argv = ["--model", str(model), "--runs-dir", str(tmp_path / "runs"), "--jobs", "2"]
    argv += ["--patterns", "50%", "--budgets", "1k", "4k", "--tasks", *TASKS, "--limit"]
    argv += ["--json", str(tmp_path / "curve.json")]

    # a part first: SAFE+ is made for its recovery, not scored
    first = recovery_curve.main([*argv, "--rows", "dense", "sparsegpt-50", "safe+rec-self-1k-50"])
    assert sorted(jobs.names) == sorted(
        ["self-windows", "sparsegpt-50", "safe+-50", "safe+rec-self-1k-50"]
        + ["dense.score", "sparsegpt-50.score", "safe+rec-self-1k-50.score"]
    )
    assert len(first["rows"]) == 3
    (recover,) = [c for c in jobs.commands if "recover" in c]
    assert str(tmp_path / "runs" / "safe+-50") in recover  # from the SAFE+ checkpoint
    flags = {
        flag: recover[recover.index(flag) + 1] for flag in ("--recover-tokens", "--recover-dataset")
    }
    assert flags == {"--recover-tokens": "1000", "--recover-dataset": "self"}

    jobs.names.clear()
    document = recovery_curve.main(argv)  # the rest: 4 self windows were made, 16 are needed
    assert sorted(jobs.names) == sorted(
        ["self-windows", "safe+rec-c4-1k-50", "safe+rec-c4-4k-50", "safe+rec-self-4k-50"]
        + ["safe+-50.score", "safe+rec-c4-1k-50.score", "safe+rec-c4-4k-50.score"]
        + ["safe+rec-self-4k-50.score"]
    )
    point = document["views"]["report"]["curves"][0]["points"][1]
    assert (point["tokens"], point["seconds"], point["tokens_per_second"]) == (4000, 100.0, 40.0)
    assert (tmp_path / "curve.md").is_file() and (tmp_path / "curve.png").is_file()

    jobs.names.clear()
    assert recovery_curve.main(argv)["views"] == document["views"]
    assert jobs.names == []  # every row finished: nothing runs again

    (tmp_path / "runs" / "scores" / "safe+rec-self-4k-50.json").unlink()
    recovery_curve.main(argv)
    assert jobs.names == ["safe+rec-self-4k-50.score"]


def test_jobs_get_their_slot_by_priority_then_first_come():
    gate, order, lock = recovery_curve.PriorityGate(1), [], threading.Lock()
    gate.__enter__()  # the slot is taken: the others queue

    def wait(priority, name):
        gate.priority.value = priority
        with gate, lock:
            order.append(name)

    threads = []
    for priority, name in ((3, "score"), (1, "prune"), (0, "safe+"), (1, "self")):
        threads.append(threading.Thread(target=wait, args=(priority, name)))
        threads[-1].start()
        while len(gate.waiting) < len(threads):
            time.sleep(0.001)
    gate.__exit__(None, None, None)
    for thread in threads:
        thread.join()
    assert order == ["safe+", "prune", "self", "score"]

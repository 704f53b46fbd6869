r"""Study: the recovery curve (issue 37). How much of SparseGPT's damage does SAFE+ followed by
recovery remove, on perplexity and on the zero-shot tasks, as recovery's token budget grows, and
does it matter whether the tokens are C4 text or text the dense model writes itself?

Per pattern (default 50% and 2:4), SparseGPT and SAFE+ are pruned once, as ``field_table.py``
and ``recovery_tasks.py`` prune them (32 x 256 builtin-c4 windows, seed 0, fp32 weights). Then
``safe-llm recover`` runs on the SAFE+ checkpoint once per data source (``--sources``, default
``builtin-c4`` and ``self``) and token budget (``--budgets``, default 8k 32k 128k):
``--recover-tokens B --recover-dataset D``, recover's other defaults. ``--calibration`` adds the
calibration rows: SparseGPT and SAFE+ pruned on ``self`` windows against builtin-c4 at 32 and
128 windows (``--calibration-windows``; builtin-c4 at ``--nsamples`` is the base row itself).

Every row is scored on the reference protocol (raw ``wiki.utf8``, first 64 x 512 windows, as
``benchmark.py``) and on the four tasks that separate methods at SmolLM2's size (hellaswag,
piqa, arc_easy, winogrande; whole validation splits except ``--limit``, default the first 500
of hellaswag, as ``zeroshot_splits.py``), keeping each example's answer. From them, per
pattern: the share of SparseGPT's perplexity damage (over dense) a row removes, and the share
of SparseGPT's gap to dense in the four tasks' mean accuracy it closes, with a standard error
paired over the examples (``zeroshot_splits.paired_share_stderr``).

Tuning and reporting halves (``--split``): ``choose`` reads the even-indexed examples of each
task (0, 2, 4, ...), ``report`` the odd-indexed ones, ``whole`` all of them. Every row is
scored once on the whole split; the halves are two views of the same answers, so a default
chosen on one half is reported on the other without scoring anything again. The JSON holds all
three views; the Markdown table and the plot show ``--split``'s.

Self data: the teacher's windows are generated once, before any recovery, for the largest
budget (``$SAFE_LLM_CACHE/self_windows``, keyed as recover keys them), so recoveries side by
side read the same shards instead of sampling them twice; smaller budgets read a prefix of them.
Its seconds are in the JSON (``self_generation``), apart from each recovery's.

Everything is cached in ``--runs-dir``: checkpoints (a prune or recovery killed midway continues
from its work area), scores (``scores/<row>.json``, written after every task), so a rerun
resumes and a finished row is never run or scored again. ``--jobs N`` runs N processes side by
side, each with ``OMP_NUM_THREADS`` = the CPUs this process may use / N; checkpoints go before
scores, the SAFE+ checkpoints and recoveries first (the path every recovery waits on).
``--rows NAME ...`` scores only those rows (and makes the checkpoints they need), so a study can
be done in parts; ``--cached-only`` reports what is there and runs nothing (safe beside a
running study).

Outputs: ``--json`` and, beside it, the same stem as ``.md`` (the table) and ``.png`` (damage
removed and gap closed against recovery tokens, log axis, one line per source and pattern,
SAFE+ before recovery as a dashed level). Each recovery row carries its time: recover's
seconds, the step loop's tokens/s and its share of the machine's dense matmul rate; per source
and pattern a log-linear fit of each share against tokens says what a budget would take (an
extrapolation, labelled so).

Usage (CPU; both cores, two processes at a time)::

    python eval/recovery_curve.py --patterns 50% --budgets 8k 32k --sources builtin-c4 self \
        --jobs 2 --runs-dir runs/curve --json eval/results/recovery_curve_smollm2.json
    python eval/recovery_curve.py --runs-dir runs/curve --cached-only --split choose \
        --json runs/curve/choose.json
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from safe_llm.io.models import resolve_model_path
from safe_llm.options import ConfigError, parse_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from field_table import SEPARATING, damage_cut, row_name  # noqa: E402
from recovery_tasks import RESTART, Runner, machine  # noqa: E402
from zeroshot_splits import (  # noqa: E402
    gap_closed,
    missing_tasks,
    parse_limits,
    score_into,
    task_mean,
)

SPLITS = ("choose", "report", "whole")
SHORT = {"builtin-c4": "c4", "self": "self"}
NAMES = {"sparsegpt": "SparseGPT", "safe+": "SAFE+"}
SOURCE_LABELS = {"builtin-c4": "C4 text (builtin-c4)", "self": "teacher-generated text"}


# ------------------------------------------------------------------------------------ naming


def short(source: str) -> str:
    """A data source as a file-name word: builtin-c4 -> c4, self -> self, others sanitised."""
    return SHORT.get(source) or re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")


def budget_label(tokens: int) -> str:
    """8000 -> 8k, 2000000 -> 2M, 65536 -> 65536 (the suffixes of ``--recover-tokens``)."""
    for scale, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if tokens % scale == 0:
            return f"{tokens // scale}{suffix}"
    return str(tokens)


def parse_budget(text: str) -> int:
    try:
        tokens = parse_count(text, "--budgets")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if tokens <= 0:
        raise argparse.ArgumentTypeError(f"a budget is a positive count of tokens, got {text!r}")
    return tokens


def recovered(source: str, tokens: int) -> str:
    """The method name of SAFE+ followed by recovery on ``tokens`` tokens of ``source``."""
    return f"safe+rec-{short(source)}-{budget_label(tokens)}"


def calibrated(method: str, source: str, windows: int) -> str:
    """The method name of ``method`` pruned on ``windows`` calibration windows of ``source``."""
    return f"{method}-cal-{short(source)}-{windows}"


def plan(args) -> list[dict]:
    """Every row: dense, then per pattern the two base rows, the recoveries (source by source,
    budgets ascending) and, with ``--calibration``, the calibration rows."""
    rows = [{"method": "dense", "pattern": "-", "kind": "dense", "label": "dense"}]
    for pattern in args.patterns:
        for method in ("sparsegpt", "safe+"):
            rows.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "kind": "prune",
                    "dataset": "builtin-c4",
                    "windows": args.nsamples,
                    "label": NAMES[method],
                }
            )
        for source in args.sources:
            for tokens in sorted(args.budgets):
                rows.append(
                    {
                        "method": recovered(source, tokens),
                        "pattern": pattern,
                        "kind": "recover",
                        "source": source,
                        "budget": tokens,
                        "label": f"SAFE+ + recovery, {budget_label(tokens)} tokens of {source}",
                    }
                )
        if not args.calibration:
            continue
        for method in ("sparsegpt", "safe+"):
            for source in ("self", "builtin-c4"):
                for windows in args.calibration_windows:
                    if (source, windows) == ("builtin-c4", args.nsamples):
                        continue  # the base row
                    rows.append(
                        {
                            "method": calibrated(method, source, windows),
                            "pattern": pattern,
                            "kind": "prune",
                            "dataset": source,
                            "windows": windows,
                            "label": f"{NAMES[method]}, calibrated on {windows} {source} windows",
                        }
                    )
    return rows


def name_of(row: dict) -> str:
    return "dense" if row["method"] == "dense" else row_name(row["method"], row["pattern"])


def base_method(row: dict) -> str:
    """The pruning method of a prune row (its calibration variants included)."""
    return row["method"].split("-cal-")[0]


# ------------------------------------------------------------------------------------ running


def self_windows_needed(rows: list[dict], seqlen: int) -> int:
    """Self windows the rows read: the largest self budget's (recover streams whole steps of
    its batch size), the largest self calibration's."""
    from safe_llm.stages.recover.loop import total_steps
    from safe_llm.stages.recover.options import RecoverOptions

    counts = [0]
    for row in rows:
        if row.get("source") == "self":
            options = RecoverOptions(tokens=row["budget"])
            counts.append(total_steps(options, None, seqlen) * options.batch_size)
        elif row.get("dataset") == "self":
            counts.append(row["windows"])
    return max(counts)


def selected(args) -> tuple[list[dict], list[dict]]:
    """``(the rows to score, the rows whose checkpoints that needs)``: every planned row, or
    those ``--rows`` names (a recovery needs its pattern's SAFE+ checkpoint, made but not
    scored unless named too)."""
    rows = plan(args)
    if not args.rows:
        return rows, rows
    names = {name_of(row) for row in rows}
    unknown = [name for name in args.rows if name not in names]
    if unknown:
        raise SystemExit(f"--rows: no such row {', '.join(unknown)}; planned: {' '.join(names)}")
    scored = [row for row in rows if name_of(row) in args.rows]
    sources = {row["pattern"] for row in scored if row["kind"] == "recover"}
    made = [row for row in rows if row in scored or (row["method"], row["pattern"]) in
            {("safe+", pattern) for pattern in sources}]  # fmt: skip
    return scored, made


class PriorityGate:
    """At most ``slots`` holders at a time, granted lowest priority first (then first come):
    :meth:`Runner.run` enters it as it enters a semaphore, with the priority its thread set
    in ``priority.value``."""

    def __init__(self, slots: int):
        self.free, self.waiting = slots, []
        self.turns = itertools.count()
        self.condition = threading.Condition()
        self.priority = threading.local()

    def __enter__(self):
        with self.condition:
            ticket = (getattr(self.priority, "value", 0), next(self.turns))
            heapq.heappush(self.waiting, ticket)
            self.condition.wait_for(lambda: self.free > 0 and self.waiting[0] == ticket)
            heapq.heappop(self.waiting)
            self.free -= 1
            self.condition.notify_all()
        return self

    def __exit__(self, *exc):
        with self.condition:
            self.free += 1
            self.condition.notify_all()


class CurveRunner(Runner):
    """``recovery_tasks.Runner`` (jobs, logs, prune) plus the curve's recoveries, the self
    windows made once, and scores cached per task."""

    # checkpoints before scores, and first the path every recovery waits on: the SAFE+
    # checkpoints and the recoveries themselves, then the self windows and the other prunes;
    # among the scores, the recoveries' first
    PRIORITY = {"safe+": 0, "recover": 0, "self": 1, "prune": 1, "score recover": 2, "score": 3}

    def __init__(self, args):
        super().__init__(args)
        self.slots = PriorityGate(args.jobs)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        threads = max(1, (cpus or os.cpu_count() or 1) // args.jobs)
        self.env["OMP_NUM_THREADS"] = str(threads)

    def generate_self(self, count: int) -> float | None:
        """Seconds to sample the first ``count`` self windows (None: made before)."""
        marker = self.runs / "self-windows.json"
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        if count <= done.get("windows", 0):
            return None
        self.slots.priority.value = self.PRIORITY["self"]
        command = [sys.executable, __file__, "--generate-self", str(count)]
        command += ["--model", self.args.model, "--seqlen", str(self.args.seqlen)]
        command += ["--device", self.args.device]
        seconds = self.run("self-windows", command)
        marker.write_text(json.dumps({"windows": count, "seconds": seconds}))
        return seconds

    def make(self, row: dict, sources: dict[str, Future], self_data: Future | None):
        """The row's checkpoint: ``(directory, seconds or None when reused)``."""
        if row["kind"] == "dense":
            return Path(resolve_model_path(self.args.model)[0]), None
        if row["dataset" if row["kind"] == "prune" else "source"] == "self" and self_data:
            self_data.result()
        kind = "safe+" if row["method"] == "safe+" else row["kind"]
        self.slots.priority.value = self.PRIORITY[kind]
        if row["kind"] == "prune":
            method = base_method(row)
            return self.prune(method, row["pattern"], row["dataset"], row["windows"], name_of(row))
        out = self.runs / name_of(row)
        checkpoint, _ = sources[row["pattern"]].result()
        if (out / "report.json").is_file():
            return out, None
        command = self.cli("recover", str(checkpoint), "--recover-tokens", str(row["budget"]))
        command += ["--recover-dataset", row["source"], *self.args.recover_options.split()]
        command += ["--output", str(out), *RESTART]
        return out, self.run(out.name, command)

    def score(self, row: dict, made: Future) -> dict:
        """The row with its scores (from ``scores/<row>.json``, scored there first if
        incomplete) and its checkpoint's times."""
        directory, _ = made.result()
        cache = self.runs / "scores" / f"{name_of(row)}.json"
        if not complete(cache, self.args):
            kind = "score recover" if row["kind"] == "recover" else "score"
            self.slots.priority.value = self.PRIORITY[kind]
            command = [sys.executable, __file__, "--score", str(directory)]
            command += ["--score-out", str(cache), "--device", self.args.device]
            command += ["--batch-size", str(self.args.batch_size), "--tasks", *self.args.tasks]
            command += ["--limit", *self.args.limit]
            self.run(f"{name_of(row)}.score", command)
        return assemble(row, cache, directory)


def complete(cache: Path, args) -> bool:
    if not cache.is_file():
        return False
    scored = json.loads(cache.read_text())
    return "ref" in scored and not missing_tasks(scored, args.tasks, parse_limits(args.limit))


def assemble(row: dict, cache: Path, directory: Path | None) -> dict:
    """``row`` with the cached scores and, from the checkpoint's ``report.json``, its times."""
    out = {**row, **json.loads(cache.read_text()), "method": row["method"]}
    out["pattern"] = row["pattern"]
    report_file = directory / "report.json" if directory else None
    if report_file is None or not report_file.is_file() or row["kind"] == "dense":
        return out
    report = json.loads(report_file.read_text())
    recovery = report.get("recovery") or {}
    if row["kind"] == "recover" and recovery:
        out["tokens"] = recovery.get("tokens")
        out["recovery_seconds"] = recovery.get("seconds")
        out["train_seconds"] = recovery.get("train_seconds")
        out["tokens_per_second"] = recovery.get("tokens_per_second")
        out["flop_fraction"] = recovery.get("flop_fraction")
        out["recovery_steps"] = recovery.get("steps")
        out["autocast_bf16"] = recovery.get("autocast_bf16")
    else:
        out["prune_seconds"] = report.get("seconds")
        out["precision"] = report.get("precision")
    return out


def run_all(args) -> list[dict]:
    """Every planned row made and scored, ``--jobs`` processes at a time."""
    runner = CurveRunner(args)
    runner.runs.mkdir(parents=True, exist_ok=True)
    rows, needed = selected(args)
    with ThreadPoolExecutor(max_workers=2 * len(needed) + 4) as pool:
        count = self_windows_needed(needed, args.seqlen)
        self_data = pool.submit(runner.generate_self, count) if count else None
        made: dict[str, Future] = {}
        safe_plus: dict[str, Future] = {}
        for row in needed:  # base rows first: recoveries wait on their SAFE+ checkpoint
            if row["kind"] != "recover":
                made[name_of(row)] = pool.submit(runner.make, row, safe_plus, self_data)
                if row["method"] == "safe+":
                    safe_plus[row["pattern"]] = made[name_of(row)]
        for row in needed:
            if row["kind"] == "recover":
                made[name_of(row)] = pool.submit(runner.make, row, safe_plus, self_data)
        scored = [pool.submit(runner.score, row, made[name_of(row)]) for row in rows]
        return [future.result() for future in scored]


def cached_rows(args) -> list[dict]:
    """The planned rows whose scores are complete in ``--runs-dir`` (nothing is run)."""
    runs = Path(args.runs_dir)
    rows = []
    for row in selected(args)[0]:
        cache = runs / "scores" / f"{name_of(row)}.json"
        if complete(cache, args):
            directory = None if row["kind"] == "dense" else runs / name_of(row)
            rows.append(assemble(row, cache, directory))
    return rows


# --------------------------------------------------------------------------------- child jobs


def score_checkpoint(args) -> None:
    """Reference perplexity and every task of one checkpoint into ``--score-out`` (resumes at
    the first task not cached there)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(args.score)[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    score_into(
        Path(args.score_out),
        {},
        lambda: path,
        tokenizer,
        args.tasks,
        parse_limits(args.limit),
        batch_size=args.batch_size,
        device=args.device,
    )


def generate_self_windows(args) -> None:
    """The first ``--generate-self`` windows the dense model samples with recover's defaults
    (fp32, as the recovery's teacher is loaded; seed 0, as the study prunes): the windows
    ``safe-llm recover --recover-dataset self`` then reads from the cache."""
    from safe_llm.config import RunConfig
    from safe_llm.io.models import load_model
    from safe_llm.io.self_data import self_windows

    defaults = {
        f.name: f.default for f in dataclasses.fields(RunConfig) if f.name.startswith("self_")
    }
    model, tokenizer, _ = load_model(args.model, torch.float32)
    model.to(args.device)
    config = argparse.Namespace(**defaults)
    self_windows(model, tokenizer, config, args.seqlen, 0, args.generate_self, progress=False)


# ---------------------------------------------------------------------------------- summaries


def half(count: int, split: str) -> range:
    """The indices of ``split`` among ``count`` examples: ``choose`` the even ones, ``report``
    the odd ones, ``whole`` all."""
    return range(count) if split == "whole" else range(SPLITS.index(split), count, 2)


def split_view(row: dict, split: str) -> dict:
    """``row`` with each task's answers cut to ``split``: ``choose`` the even-indexed examples,
    ``report`` the odd-indexed ones, ``whole`` all; accuracy and its standard error (as
    lm-eval's: the sample standard deviation over sqrt(n)) recomputed on the half. A task
    without per-example answers has no half and is left out of a half view."""
    if split == "whole":
        return {**row, "tasks": dict(row.get("tasks", {}))}
    tasks = {}
    for task, result in row.get("tasks", {}).items():
        correct = result.get("correct")
        if not correct:
            continue
        kept = [correct[i] for i in half(len(correct), split)]
        p = sum(kept) / len(kept)
        stderr = math.sqrt(p * (1 - p) / (len(kept) - 1)) if len(kept) > 1 else 0.0
        tasks[task] = {**result, "value": p, "stderr": stderr, "correct": kept}
        tasks[task]["examples"] = len(kept)
    return {**row, "tasks": tasks}


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares ``y = a + b log2(tokens)`` over ``(tokens, y)``: ``(a, b)``; None with
    fewer than two distinct budgets."""
    xs = [math.log2(t) for t, _ in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, (_, y) in zip(xs, points, strict=True)) / sxx
    return my - b * mx, b


def extrapolate(points: list[dict], target: float = 0.5) -> dict:
    """Per source and pattern: the fitted gain of each share per doubling of tokens and, where
    the gap-closed line rises, the tokens at which it reaches ``target`` and the hours that
    would take at the points' median tokens/s. An extrapolation of a fit, not a measurement."""
    out = {"points": len(points), "target": target}
    for key in ("damage_removed", "closed"):
        line = fit([(p["tokens"], p[key]) for p in points if p.get(key) is not None])
        out[f"{key}_per_doubling"] = line[1] if line else None
        if key == "closed" and line and line[1] > 0:
            tokens = 2 ** ((target - line[0]) / line[1])
            out["tokens_to_target"] = tokens
            rates = sorted(p["tokens_per_second"] for p in points if p.get("tokens_per_second"))
            if rates:
                out["hours_at_measured_rate"] = tokens / rates[len(rates) // 2] / 3600
    return out


def summarise(rows: list[dict], split: str, tasks: list[str]) -> dict:
    """One view (``split``) of the rows: each row's mean over ``tasks``, its share of
    SparseGPT's perplexity damage removed and of SparseGPT's gap closed (paired) at its
    pattern; the curve's points per source and pattern and their extrapolation."""
    views = [split_view(r, split) for r in rows]
    closed = {(c["method"], c["pattern"]): c for c in gap_closed(views, tasks)}
    out_rows = []
    for view in views:
        mean = task_mean(view, tasks)
        entry = {k: v for k, v in view.items() if k != "tasks"}
        entry["tasks"] = {
            t: {k: v for k, v in view["tasks"][t].items() if k != "correct"}
            for t in tasks
            if t in view.get("tasks", {})
        }
        entry["damage_removed"] = damage_cut(view, views)
        entry["mean"], entry["mean_stderr"] = mean if mean else (None, None)
        share = closed.get((view["method"], view["pattern"]))
        if share:
            entry.update({k: share[k] for k in ("gap", "closed", "closed_stderr", "stderr_kind")})
        out_rows.append(entry)
    curves = {}
    for entry in out_rows:
        if entry["kind"] == "recover":
            key = f"{entry['source']} {entry['pattern']}"
            point = {k: entry.get(k) for k in ("damage_removed", "closed", "closed_stderr")}
            point["tokens"] = entry.get("tokens") or entry["budget"]
            point["budget"] = entry["budget"]
            point["seconds"] = entry.get("recovery_seconds")
            point["tokens_per_second"] = entry.get("tokens_per_second")
            curves.setdefault(key, {"source": entry["source"], "pattern": entry["pattern"]})
            curves[key].setdefault("points", []).append(point)
    for curve in curves.values():
        curve["points"].sort(key=lambda p: p["tokens"])
        curve["extrapolation"] = extrapolate(curve["points"])
    return {"split": split, "rows": out_rows, "curves": list(curves.values())}


def _share(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{value:.0%} ± {stderr:.0%}" if stderr is not None else f"{value:.0%}"


def _number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def split_label(split: str, limits: dict[str, int]) -> str:
    what = {
        "choose": "the even-indexed examples (the tuning half)",
        "report": "the odd-indexed examples (the reporting half)",
        "whole": "every example",
    }[split]
    cut = ", ".join(f"first {n} of {t}" for t, n in limits.items() if n)
    return f"{what} of each task's validation split" + (f" ({cut})" if cut else "")


def markdown(summary: dict, meta: dict) -> str:
    tasks = meta["tasks"]
    head = ["row", "pattern", "tokens", "ref ppl", "damage removed", *tasks, "mean"]
    head += ["gap closed", "recovery s", "tokens/s"]
    lines = [
        f"Zero-shot on {split_label(summary['split'], meta['limits'])}; gap closed: the share "
        "of SparseGPT's gap to dense in the mean at the same pattern, ± its standard error "
        "paired over the examples. Damage removed: the share of SparseGPT's reference-"
        "perplexity damage over dense.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in summary["rows"]:
        cells = [row["label"], row["pattern"], _number(row.get("tokens"), ",")]
        cells += [_number(row.get("ref"), ".2f"), _share(row.get("damage_removed"))]
        for task in tasks:
            result = row["tasks"].get(task)
            cells.append(f"{result['value']:.3f}" if result else "-")
        mean = row.get("mean")
        cells.append(f"{mean:.3f} ± {row['mean_stderr']:.3f}" if mean is not None else "-")
        cells.append(_share(row.get("closed"), row.get("closed_stderr")))
        cells += [_number(row.get("recovery_seconds"), ".0f")]
        cells += [_number(row.get("tokens_per_second"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for curve in summary["curves"]:
        ex = curve["extrapolation"]
        text = f"- {curve['source']} at {curve['pattern']}: {ex['points']} point(s)"
        if ex.get("closed_per_doubling") is not None:
            text += (
                f"; a log-linear fit gains {ex['damage_removed_per_doubling']:+.1%} of the "
                f"damage and {ex['closed_per_doubling']:+.1%} of the gap per doubling of tokens"
            )
        if ex.get("tokens_to_target") is not None:
            text += f"; it would reach half the gap at about {ex['tokens_to_target']:,.0f} tokens"
            if ex.get("hours_at_measured_rate") is not None:
                text += f", {ex['hours_at_measured_rate']:.1f} h at the measured tokens/s"
            text += " (an extrapolation)"
        lines.append(text + ".")
    if meta.get("self_generation_seconds"):
        lines.append(
            f"- Self windows: {meta['self_windows']} sampled in "
            f"{meta['self_generation_seconds']:.0f} s (apart from the recoveries' seconds)."
        )
    lines += ["", f"{meta['machine']}. Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(summary: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    panels = (
        ("damage_removed", "perplexity damage removed", "share of SparseGPT's damage over dense"),
        ("closed", "zero-shot gap closed", "share of SparseGPT's gap to dense (mean of 4)"),
    )
    patterns = list(dict.fromkeys(c["pattern"] for c in summary["curves"]))
    sources = list(dict.fromkeys(c["source"] for c in summary["curves"]))
    styles = ["-", "--", ":", "-."]
    for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
        for curve in summary["curves"]:
            points = [p for p in curve["points"] if p.get(key) is not None]
            if not points:
                continue
            color = f"C{sources.index(curve['source'])}"
            style = styles[patterns.index(curve["pattern"]) % len(styles)]
            xs = [p["tokens"] for p in points]
            ys = [p[key] for p in points]
            errors = [p.get("closed_stderr") or 0 for p in points] if key == "closed" else None
            label = f"{SOURCE_LABELS.get(curve['source'], curve['source'])}, {curve['pattern']}"
            ax.errorbar(xs, ys, yerr=errors, marker="o", color=color, linestyle=style,
                        capsize=3, label=label)  # fmt: skip
        for row in summary["rows"]:
            if row["method"] == "safe+" and row.get(key) is not None:
                style = styles[patterns.index(row["pattern"]) % len(styles)]
                if row["pattern"] in patterns:
                    ax.axhline(row[key], color="grey", linestyle=style, linewidth=1,
                               label=f"SAFE+ before recovery, {row['pattern']}")  # fmt: skip
        if key == "closed":
            ax.axhline(0.5, color="k", linewidth=0.8, alpha=0.5, label="half the gap")
        ax.set_xscale("log")
        ax.set_xlabel("recovery tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    half = {"choose": "the tuning half", "report": "the reporting half", "whole": "whole splits"}
    fig.suptitle(f"{meta['model']}: SAFE+ + recovery against SparseGPT (zero-shot: "
                 f"{half[summary['split']]})")  # fmt: skip
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model to prune (dense row)")
    parser.add_argument("--patterns", nargs="+", default=["50%", "2:4"], help="e.g. 50%% 2:4")
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=parse_budget,
        default=[8000, 32000, 128000],
        help="recovery token budgets (--recover-tokens: 8k 32k 128k 512k 2M)",
    )
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["builtin-c4", "self"],
        help="recovery data (--recover-dataset): builtin-c4, self, any text source",
    )
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="also SparseGPT and SAFE+ pruned on self windows against builtin-c4",
    )
    parser.add_argument(
        "--calibration-windows", nargs="+", type=int, default=[32, 128], help="with --calibration"
    )
    parser.add_argument("--split", choices=SPLITS, default="report", help="examples reported")
    parser.add_argument("--tasks", nargs="+", default=list(SEPARATING))
    parser.add_argument(
        "--limit",
        nargs="*",
        default=["hellaswag=500"],
        help="TASK=N: score the first N examples of TASK (the others whole)",
    )
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every job")
    parser.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size")
    parser.add_argument("--jobs", type=int, default=1, help="processes at a time")
    parser.add_argument(
        "--recover-options",
        default="",
        help="more recover options for every recovery row, one string (e.g. "
        '"--no-recover-lean --no-recover-gradient-checkpointing": the same steps, faster '
        "where memory allows); kept in the JSON's meta",
    )
    parser.add_argument("--runs-dir", default="runs/curve", help="checkpoints, logs, scores")
    parser.add_argument("--json", help="rows and views (a .md and a .png are written beside)")
    parser.add_argument(
        "--rows",
        nargs="+",
        help="score only these rows (names as in --runs-dir, e.g. dense sparsegpt-50 "
        "safe+rec-self-8k-50); the checkpoints they need are made",
    )
    parser.add_argument("--cached-only", action="store_true", help="run nothing; report")
    parser.add_argument("--score", help=argparse.SUPPRESS)  # one checkpoint, in a child process
    parser.add_argument("--score-out", help=argparse.SUPPRESS)
    parser.add_argument("--generate-self", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parse_limits(args.limit)  # refuse a malformed one now
    return args


def report(rows: list[dict], args, meta: dict) -> dict:
    """The JSON document, and the Markdown and PNG beside ``--json`` (if given)."""
    summaries = {split: summarise(rows, split, args.tasks) for split in SPLITS}
    document = {"meta": meta, "rows": rows, "views": summaries}
    text = markdown(summaries[args.split], meta)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1))
        path.with_suffix(".md").write_text(text)
        plot(summaries[args.split], meta, path.with_suffix(".png"))
    print(text)
    return document


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.score:
        score_checkpoint(args)
        return None
    if args.generate_self:
        generate_self_windows(args)
        return None
    start = time.perf_counter()
    if args.cached_only:
        rows = cached_rows(args)
    else:
        resolve_model_path(args.model)  # convert a built-in model once, before the jobs start
        rows = run_all(args)
    marker = Path(args.runs_dir) / "self-windows.json"
    generation = json.loads(marker.read_text()) if marker.is_file() else {}
    meta = {
        "model": args.model,
        "patterns": args.patterns,
        "budgets": args.budgets,
        "sources": args.sources,
        "calibration": args.calibration_windows if args.calibration else [],
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tasks": args.tasks,
        "limits": parse_limits(args.limit),
        "split": args.split,
        "jobs": args.jobs,
        "recover_options": args.recover_options,
        "threads_per_job": CurveRunner(args).env["OMP_NUM_THREADS"],
        "machine": machine(args.device),
        "environment": {
            key: os.environ[key]
            for key in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "SAFE_LLM_CACHE")
            if key in os.environ
        },
        "self_windows": generation.get("windows"),
        "self_generation_seconds": generation.get("seconds"),
        "wall_seconds": time.perf_counter() - start,
        "command": " ".join(["python", "eval/recovery_curve.py", *(argv or sys.argv[1:])]),
    }
    return report(rows, args, meta)


if __name__ == "__main__":
    main()

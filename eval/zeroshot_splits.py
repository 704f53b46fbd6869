"""Zero-shot accuracy of the field table's headline rows on (nearly) whole task splits.

``field_table.py`` scores every row on the first ``--prefix`` examples of each task, a CPU
preview whose 4-task mean has a standard error of about 0.024 at 100 examples: too coarse to
say whether recovery closes half of SparseGPT's zero-shot gap to dense. This script scores a
few rows -- by default dense, SparseGPT and SAFE+ followed by the default recovery, at 50% and
2:4 -- on the tasks that separate methods at SmolLM2's size (hellaswag, piqa, arc_easy,
winogrande) with a per-task limit (default: every task whole except hellaswag, whose 10,042
examples would take about three hours of one CPU thread per model; its first ``--limit
hellaswag=N`` examples instead). Then, per pattern, the share of SparseGPT's gap to dense that
each row closes on the mean of the tasks.

Checkpoints are made exactly as ``field_table.py`` makes them (same calibration, seed and
defaults), in the same ``--runs-dir``, so its rows and these score the same weights: each row
also records its reference-protocol perplexity to show it. Every (row, task) result is cached
in ``<runs-dir>/splits/<row>.json`` and a rerun resumes; two processes may share the runs
directory when they are given different ``--rows``.

Usage (CPU, one thread; about 30 minutes of scoring per row on an AVX2 CPU)::

    OMP_NUM_THREADS=1 python eval/zeroshot_splits.py --runs-dir runs/field \
        --rows dense sparsegpt:50% sparsegpt:2:4 --json runs/splits-a.json
    OMP_NUM_THREADS=1 python eval/zeroshot_splits.py --runs-dir runs/field \
        --rows safe+rec:50% safe+rec:2:4 --json runs/splits-b.json
    python eval/zeroshot_splits.py --runs-dir runs/field --cached-only \
        --json eval/results/zeroshot_splits_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safe_llm.core.precision import cpu_capability
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.evaluation.zeroshot import evaluate_tasks
from safe_llm.io.models import resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import reference_windows  # noqa: E402
from field_table import (  # noqa: E402
    LABELS,
    METHODS,
    PATTERNS,
    SEPARATING,
    make_checkpoint,
    row_name,
)

DEFAULT_ROWS = ("dense", "sparsegpt:50%", "safe+rec:50%", "sparsegpt:2:4", "safe+rec:2:4")


def parse_row(text: str) -> tuple[str, str]:
    """``"dense"`` or ``"METHOD:PATTERN"`` (``safe+rec:2:4``) -> ``(method, pattern)``."""
    if text == "dense":
        return "dense", "-"
    method, sep, pattern = text.partition(":")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"a row is dense or METHOD:PATTERN, got {text!r}")
    return method, pattern


def parse_limits(items: list[str]) -> dict[str, int]:
    """``["hellaswag=500"]`` -> ``{"hellaswag": 500}`` (0: the whole split)."""
    limits = {}
    for item in items:
        task, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise SystemExit(f"--limit takes TASK=N (N >= 0), got {item!r}")
        limits[task] = int(count)
    return limits


def score_row(method: str, pattern: str, tokenizer, args) -> dict:
    """The row's cached results, with every missing task scored (and cached) first."""
    cache = Path(args.runs_dir) / "splits" / f"{row_name(method, pattern)}.json"

    def directory() -> str:
        if method == "dense":
            return resolve_model_path(args.model)[0]
        return make_checkpoint(method, pattern, args)[0]

    identity = {"method": method, "pattern": pattern}
    return score_into(
        cache, identity, directory, tokenizer, args.tasks, args.limits, args.cached_only
    )


def score_into(
    cache: Path,
    identity: dict,
    directory: Callable[[], str | Path],
    tokenizer,
    tasks: list[str],
    limits: dict[str, int],
    cached_only: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict:
    """The results cached in ``cache`` (a row: ``identity``, the reference perplexity ``ref``
    and each task's result with its per-example answers), with the reference perplexity and
    every missing task of ``tasks`` scored first on the checkpoint ``directory()`` (called
    only then) and the cache rewritten after each (atomically): a stopped scoring resumes at
    the task it was on. ``limits``: the first N examples of a task (absent or 0: whole); each
    result notes its limit, and one cached with another is scored again."""
    row = json.loads(cache.read_text()) if cache.is_file() else {}
    row.update(identity)
    missing = missing_tasks(row, tasks, limits)
    if cached_only or (not missing and "ref" in row):
        return row
    model = AutoModelForCausalLM.from_pretrained(directory(), dtype=torch.float32)
    model = model.to(device).eval()
    cache.parent.mkdir(parents=True, exist_ok=True)
    if "ref" not in row:
        row["ref"] = perplexity(model, reference_windows(tokenizer), batch_size=8)
        _write(cache, row)
    for task in missing:
        limit = limits.get(task) or None
        start = time.perf_counter()
        result = evaluate_tasks(
            model,
            tokenizer,
            [task],
            batch_size=batch_size,
            limit=limit,
            metric="acc_norm",
            per_example=True,
        )["tasks"][task]
        result["seconds"] = time.perf_counter() - start
        result["limit"] = limit
        row.setdefault("tasks", {})[task] = result
        _write(cache, row)
        print(f"{cache.stem} {task}: {result['value']:.4f}", flush=True)
    return row


def missing_tasks(row: dict, tasks: list[str], limits: dict[str, int]) -> list[str]:
    """The tasks of ``tasks`` the cached ``row`` lacks, or holds scored with another limit
    than ``limits`` gives (a result without a noted limit, from before, counts as matching)."""
    cached = row.get("tasks", {})
    wanted = {t: limits.get(t) or None for t in tasks}
    return [t for t in tasks if t not in cached or cached[t].get("limit", wanted[t]) != wanted[t]]


def _write(path: Path, row: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, path)


def task_mean(row: dict, tasks: list[str]) -> tuple[float, float] | None:
    """Mean accuracy over ``tasks`` and its standard error (tasks independent)."""
    results = [row.get("tasks", {}).get(t) for t in tasks]
    if any(r is None for r in results):
        return None
    mean = sum(r["value"] for r in results) / len(results)
    stderr = math.sqrt(sum(r["stderr"] ** 2 for r in results)) / len(results)
    return mean, stderr


def gap_closed(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Per pattern: the share of SparseGPT's mean-accuracy gap to dense each row closes, with
    its standard error: paired over the examples when the three rows hold per-example results
    (``"correct"``), else the three means' errors taken independent (an overstatement: the
    rows answer the same examples)."""
    by_key = {(r["method"], r["pattern"]): r for r in rows}
    means = {key: task_mean(row, tasks) for key, row in by_key.items()}
    dense = means.get(("dense", "-"))
    out = []
    for (method, pattern), mine in means.items():
        baseline = means.get(("sparsegpt", pattern))
        if method in ("dense", "sparsegpt") or not (dense and baseline and mine):
            continue
        gap = dense[0] - baseline[0]
        if gap <= 0:
            continue  # SparseGPT is not below dense here: there is no gap to close
        closed = (mine[0] - baseline[0]) / gap
        three = [by_key[(method, pattern)], by_key[("sparsegpt", pattern)], by_key[("dense", "-")]]
        paired = paired_share_stderr(*three, tasks)
        stderr = paired if paired is not None else math.hypot(mine[1], baseline[1]) / gap
        out.append(
            {
                "method": method,
                "pattern": pattern,
                "gap": gap,
                "closed": closed,
                "closed_stderr": stderr,
                "stderr_kind": "paired" if paired is not None else "independent",
            }
        )
    return out


def paired_share_stderr(row: dict, baseline: dict, dense: dict, tasks: list[str]) -> float | None:
    """Standard error of ``(mean(row) - mean(baseline)) / (mean(dense) - mean(baseline))``
    over the tasks' examples, each example answered by all three models (the delta method on
    the two paired differences); None unless every task holds per-example results."""
    per_task = []
    for task in tasks:
        answers = [r.get("tasks", {}).get(task, {}).get("correct") for r in (row, baseline, dense)]
        if any(a is None for a in answers) or len({len(a) for a in answers}) != 1:
            return None
        mine, base, top = (torch.tensor(a, dtype=torch.float64) for a in answers)
        per_task.append((mine - base, top - base))
    count = len(per_task)
    gained = sum(float(x.mean()) for x, _ in per_task) / count
    gap = sum(float(y.mean()) for _, y in per_task) / count
    if gap <= 0:
        return None

    def covariance(u: torch.Tensor, v: torch.Tensor) -> float:  # of the two means
        return float(((u - u.mean()) * (v - v.mean())).sum() / (len(u) - 1) / len(u))

    var_gained = sum(covariance(x, x) for x, _ in per_task) / count**2
    var_gap = sum(covariance(y, y) for _, y in per_task) / count**2
    cov = sum(covariance(x, y) for x, y in per_task) / count**2
    share = gained / gap
    return math.sqrt(max(var_gained - 2 * share * cov + share**2 * var_gap, 0.0)) / gap


def table_order(row: dict) -> tuple[int, int]:
    """Dense first, then pattern by pattern in the field table's order of methods."""
    if row["method"] == "dense":
        return -1, -1
    return PATTERNS.index(row["pattern"]), METHODS.index(row["method"])


def markdown(rows: list[dict], closed: list[dict], args) -> str:
    def split(task):
        limit = args.limits.get(task)
        return f"{task} (first {limit})" if limit else f"{task} (whole)"

    lines = [
        "| row | pattern | ref ppl | " + " | ".join(split(t) for t in args.tasks) + " | mean |",
        "|---|---|---|" + "---|" * (len(args.tasks) + 1),
    ]
    for row in rows:
        cells = []
        for task in args.tasks:
            result = row.get("tasks", {}).get(task)
            cells.append(f"{result['value']:.3f} ± {result['stderr']:.3f}" if result else "-")
        mean = task_mean(row, args.tasks)
        mean_cell = f"{mean[0]:.3f} ± {mean[1]:.3f}" if mean else "-"
        ref = f"{row['ref']:.2f}" if "ref" in row else "-"
        label = LABELS.get(row["method"], row["method"])
        lines.append(f"| {label} | {row['pattern']} | {ref} | {' | '.join(cells)} | {mean_cell} |")
    lines.append("")
    for item in closed:
        lines.append(
            f"- {LABELS.get(item['method'], item['method'])} at {item['pattern']} closes "
            f"{item['closed']:.0%} ± {item['closed_stderr']:.0%} of SparseGPT's gap to dense "
            f"({item['gap']:.3f} in mean accuracy; standard error {item['stderr_kind']})."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--rows",
        nargs="+",
        type=parse_row,
        default=[parse_row(r) for r in DEFAULT_ROWS],
        help="dense or METHOD:PATTERN (methods and patterns as in field_table.py)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(SEPARATING))
    parser.add_argument(
        "--limit",
        nargs="*",
        default=["hellaswag=500"],
        help="TASK=N: score the first N examples of TASK (the others whole)",
    )
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--runs-dir", required=True, help="checkpoints (shared with field_table)")
    parser.add_argument("--json", required=True, help="where to write the rows and the shares")
    parser.add_argument("--cached-only", action="store_true", help="score nothing; report")
    args = parser.parse_args()
    args.limits = parse_limits(args.limit)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model)[0])
    if args.cached_only:
        cached = sorted((Path(args.runs_dir) / "splits").glob("*.json"))
        rows = sorted((json.loads(p.read_text()) for p in cached), key=table_order)
    else:
        rows = [score_row(method, pattern, tokenizer, args) for method, pattern in args.rows]
    closed = gap_closed(rows, args.tasks)
    meta = {
        "model": args.model,
        "tasks": args.tasks,
        "limits": args.limits,
        "machine": f"CPU capability {cpu_capability()}, torch {torch.__version__}",
    }
    Path(args.json).write_text(
        json.dumps({"meta": meta, "rows": rows, "gap_closed": closed}, indent=1)
    )
    print(markdown(rows, closed, args))


if __name__ == "__main__":
    main()

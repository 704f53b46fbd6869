"""The table the pruning papers publish, for one model, in one command.

Rows: the dense model, then every method -- magnitude, wanda, sparsegpt, safe, safe+ (their
default options) and safe+ followed by the default ``safe-llm recover`` -- at 50%, 60%, 70%,
80%, 2:4 and 4:8. Columns:

* ``ref``: the reference perplexity protocol of ``eval/benchmark.py`` (raw ``wiki.utf8``
  tokenized whole, first 64 windows of 512 tokens);
* ``held-out c4``: ``eval/recovery_benchmark.py``'s builtin-c4 windows (512 tokens) of the
  documents no calibration (or recovery) window was cut from;
* each zero-shot task's accuracy (lm-evaluation-harness prompts and metrics, ``acc_norm`` where
  the task has it, else ``acc``; lm-eval's stderr) and their mean, on the local task data
  (``safe_llm.evaluation.task_data``: validation splits); ``--prefix N`` scores the first N
  examples of each task, labelled as such in every output;
* pruning seconds (``report.json``; safe+ + recovery: pruning + recovery) and their multiple
  of SparseGPT's at the same pattern, CPU seconds and peak RSS of the process
  (``/usr/bin/time -v``).

Every run is its own ``safe-llm`` process; each finished row is cached as
``<runs-dir>/rows/<row>.json`` and a rerun resumes (checkpoints other than SAFE+'s, which
recovery starts from, are deleted once scored). Several processes may share one
``--runs-dir``: each claims a row with ``<runs-dir>/rows/<row>.running`` and skips rows another
one holds (a killed process leaves its claim behind: delete the file). After every row the
outputs are rewritten in ``--out``: ``field_table.json``, ``field_table.md``, ``perplexity_vs_sparsity.png`` (log axis)
and ``zeroshot_vs_sparsity.png``.

Usage (CPU, one thread; the demo's calibration budget; hours for the whole table)::

    OMP_NUM_THREADS=1 python eval/field_table.py --runs-dir runs/field \
        --out eval/results/field_smollm2 --nsamples 32 --seqlen 256 --prefix 100 \
        --heldout-windows 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safe_llm.core.precision import cpu_capability
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.evaluation.zeroshot import TABLE_TASKS, evaluate_tasks
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402
from recovery_benchmark import finished, heldout_c4_windows, timed  # noqa: E402

PATTERNS = ("50%", "60%", "70%", "80%", "2:4", "4:8")
METHODS = ("magnitude", "wanda", "sparsegpt", "safe", "safe+", "safe+rec")
# the tasks that separate methods at SmolLM2's size (boolq and rte sit near their label prior)
SEPARATING = ("hellaswag", "piqa", "arc_easy", "winogrande")
HEADLINE = (("sparsegpt", "50%"), ("safe+", "50%"), ("sparsegpt", "2:4"), ("safe+", "2:4"))
LABELS = {"safe+rec": "SAFE+ + recovery", "safe+": "SAFE+", "safe": "SAFE"}


def row_name(method: str, pattern: str) -> str:
    return f"{method}-{pattern.replace('%', '').replace(':', '-')}"


def plan(args) -> list[tuple[str, str]]:
    """``(method, pattern)`` of every row to run: dense, the headline rows, then the rest
    pattern by pattern (cheap methods first)."""
    wanted = [(m, p) for p in args.patterns for m in args.methods]
    order = [("dense", "-")] + [r for r in HEADLINE if r in wanted]
    return order + [r for r in wanted if r not in order]


def pattern_flags(pattern: str) -> list[str]:
    if pattern.endswith("%"):
        return ["--structure", "unstructured", "--sparsity", str(int(pattern[:-1]) / 100)]
    return ["--structure", pattern]


def make_checkpoint(method: str, pattern: str, args) -> tuple[Path, dict]:
    """Run ``safe-llm prune`` (or ``recover`` on the SAFE+ checkpoint) unless its checkpoint
    is already in ``--runs-dir``: ``(directory, timing)``."""
    runs = Path(args.runs_dir)
    name = row_name(method, pattern)
    timing = finished(name, args)
    if timing is not None:
        return runs / name, timing
    cli = [sys.executable, "-m", "safe_llm.cli"]
    if method == "safe+rec":
        source, _ = make_checkpoint("safe+", pattern, args)
        command = [*cli, "recover", "--quiet", str(source), "--output", str(runs / name)]
    else:
        command = [*cli, "prune", "--quiet", "--model", args.model, "--method", method]
        command += [*pattern_flags(pattern), "--dataset", "builtin-c4", "--seed", "0"]
        command += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        command += ["--device", "cpu", "--output", str(runs / name)]
    return runs / name, timed([*command, "--overwrite"], runs / f"{name}.log")


def measure(directory: str, tokenizer, windows: dict, args) -> dict:
    """Perplexity on each set of ``windows`` and zero-shot accuracy of a checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    scores = {key: perplexity(model, w, batch_size=8) for key, w in windows.items()}
    limit = args.prefix or None
    tasks = evaluate_tasks(
        model, tokenizer, args.tasks, batch_size=8, limit=limit, metric="acc_norm"
    )
    return {**scores, "zeroshot": tasks}


def run_row(method: str, pattern: str, tokenizer, windows: dict, args) -> dict:
    """One row, measured (checkpoints pruned or recovered first where needed)."""
    if method == "dense":
        directory, timing, report = resolve_model_path(args.model)[0], {}, {}
    else:
        directory, timing = make_checkpoint(method, pattern, args)
        report = json.loads((directory / "report.json").read_text())
    row = {"method": method, "pattern": pattern, **timing}
    row.update(measure(str(directory), tokenizer, windows, args))
    if report:
        recovery = report.get("recovery") or {}
        row["prune_seconds"] = report["seconds"]
        row["recovery_seconds"] = recovery.get("seconds")
        row["seconds"] = report["seconds"] + (recovery.get("seconds") or 0.0)
        row["overall_sparsity"] = report["overall_sparsity"]
        row["precision"] = report.get("precision")
    if method not in ("dense", "safe+") and not args.keep_checkpoints:
        shutil.rmtree(directory, ignore_errors=True)  # scored; SAFE+ is kept for recovery
    return row


def claim(path: Path) -> bool:
    """Mark the row of cache file ``path`` as running (``<row>.running``, created atomically);
    False when another process holds it, so several processes can share one ``--runs-dir``."""
    try:
        path.with_suffix(".running").open("x").close()
    except FileExistsError:
        return False
    return True


def cached_rows(args, tokenizer, windows: dict, write) -> list[dict]:
    """Every planned row, from its cache or run now; ``write(rows)`` after each new one."""
    cache = Path(args.runs_dir) / "rows"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, pattern in plan(args):
        path = cache / f"{row_name(method, pattern)}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        if args.cached_only or not claim(path):
            continue  # another field_table process on the same --runs-dir is running it
        start = time.time()
        try:
            row = run_row(method, pattern, tokenizer, windows, args)
        except subprocess.CalledProcessError as exc:  # one failed run does not stop the table
            print(f"{method} {pattern}: FAILED ({exc}); see its log in --runs-dir", flush=True)
            continue  # not cached: a rerun tries it again
        finally:
            path.with_suffix(".running").unlink(missing_ok=True)
        row["row_wall_s"] = time.time() - start
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        os.replace(tmp, path)
        rows.append(row)
        print(f"{method} {pattern}: {summary(row)}", flush=True)
        write(rows)
    return rows


def summary(row: dict) -> str:
    z = row["zeroshot"]
    return f"ref {row['ref']:.2f}, held-out c4 {row['c4']:.2f}, zero-shot mean {z['mean']:.4f}"


# ----------------------------------------------------------------------------------- outputs


def prefix_label(args) -> str:
    what = f"first {args.prefix} examples of each task" if args.prefix else "whole splits"
    return f"zero-shot on the {what} (validation splits, lm-eval prompts; a CPU preview)"


def multiples(rows: list[dict]) -> dict[str, float]:
    """Each pattern's SparseGPT pruning seconds."""
    return {r["pattern"]: r["seconds"] for r in rows if r["method"] == "sparsegpt"}


def _cell(value, spec=".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def separating_mean(z: dict) -> tuple[float, float] | None:
    """Mean accuracy over :data:`SEPARATING` and its stderr (tasks independent), if scored."""
    if not all(t in z["tasks"] for t in SEPARATING):
        return None
    entries = [z["tasks"][t] for t in SEPARATING]
    mean = sum(e["value"] for e in entries) / len(entries)
    return mean, math.sqrt(sum(e["stderr"] ** 2 for e in entries)) / len(entries)


def damage_cut(row: dict, rows: list[dict]) -> float | None:
    """The share of SparseGPT's reference-perplexity damage (over dense) that ``row`` removes
    at the same pattern."""
    dense = next((r["ref"] for r in rows if r["method"] == "dense"), None)
    same_pattern = [r for r in rows if r["pattern"] == row["pattern"]]
    base = next((r["ref"] for r in same_pattern if r["method"] == "sparsegpt"), None)
    if dense is None or base is None or base <= dense or row["method"] == "dense":
        return None
    return (base - row["ref"]) / (base - dense)


def markdown(rows: list[dict], meta: dict, args) -> str:
    tasks = list(args.tasks)
    head = ["method", "pattern", "ref ppl", "ppl cut", "held-out c4 ppl", *tasks, "mean"]
    head += ["mean of 4"]
    head += ["prune s", "x SparseGPT", "CPU s", "peak RSS GiB"]
    lines = [f"# {meta['title']}", "", meta["protocol"], ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = multiples(rows)
    for r in rows:
        z = r["zeroshot"]
        cells = [
            LABELS.get(r["method"], r["method"]),
            r["pattern"],
            _cell(r["ref"]),
            _cell(damage_cut(r, rows), ".0%"),
            _cell(r["c4"]),
        ]
        for t in tasks:
            entry = z["tasks"][t]
            cells.append(f"{entry['value']:.3f} ± {entry['stderr']:.3f}")
        cells.append(f"{z['mean']:.3f} ± {z['mean_stderr']:.3f}")
        four = separating_mean(z)
        cells.append(f"{four[0]:.3f} ± {four[1]:.3f}" if four else "-")
        seconds = r.get("seconds")
        ratio = seconds / base[r["pattern"]] if seconds and r["pattern"] in base else None
        cells += [_cell(seconds, ".0f"), _cell(ratio, ".1f"), _cell(r.get("cpu_s"), ".0f")]
        cells.append(_cell(r.get("peak_rss_gib")))
        lines.append("| " + " | ".join(cells) + " |")
    metrics = ", ".join(f"{t}: {rows[0]['zeroshot']['tasks'][t]['metric']}" for t in tasks)
    lines += ["", f"Metrics: {metrics}. " + meta["machine"]]
    lines += [
        "",
        f"ppl cut: the share of SparseGPT's ref-perplexity damage (over dense) removed at the "
        f"same pattern. mean of 4: {', '.join(SEPARATING)} (the tasks that separate methods "
        "at this size; boolq and rte sit near their label prior).",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["method"] == "dense"), None)
    panels = (
        ("ref", "reference wiki perplexity (log)", True, "perplexity_vs_sparsity.png"),
        ("mean", "zero-shot mean accuracy", False, "zeroshot_vs_sparsity.png"),
    )
    for key, ylabel, log, name in panels:
        fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
        for index, method in enumerate(args.methods):
            label = LABELS.get(method, method)
            for group in (PATTERNS[:4], PATTERNS[4:]):  # unstructured, then N:M
                points = sorted(
                    (PATTERNS.index(r["pattern"]), _value(r, key))
                    for r in rows
                    if r["method"] == method and r["pattern"] in group
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", color=f"C{index}", label=label)
                    label = None
        if dense:
            ax.axhline(_value(dense, key), color="k", linestyle="--", label="dense")
        ax.set_xticks(range(len(PATTERNS)), PATTERNS)
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel("sparsity / pattern")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{args.model}: {ylabel}" + ("" if log else f"\n{prefix_label(args)}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def _value(row: dict, key: str) -> float:
    return row["zeroshot"]["mean"] if key == "mean" else row[key]


def write_outputs(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "title": f"{args.model}: perplexity and zero-shot accuracy by method and sparsity",
        "protocol": (
            f"Calibration: {args.nsamples} x {args.seqlen} builtin-c4 windows, seed 0; every "
            "method with its default options; SAFE+ + recovery: safe-llm recover's defaults on "
            "the SAFE+ checkpoint. ref: raw wiki.utf8, first 64 x 512 windows; held-out c4: "
            f"{args.heldout_windows} x 512 builtin-c4 tokens of documents no calibration window "
            f"came from. {prefix_label(args)}; ± lm-eval's stderr."
        ),
        "machine": (
            f"CPU capability {cpu_capability()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; seconds measured "
            "on a shared machine (multiples of SparseGPT's are the figures to read)."
        ),
        "prefix": args.prefix,
        "tasks": list(args.tasks),
        "command": " ".join(a for a in sys.argv if a != "--cached-only"),
    }
    (out / "field_table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "field_table.md").write_text(markdown(rows, meta, args))
    plot(rows, args, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--tasks", nargs="+", default=list(TABLE_TASKS))
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    parser.add_argument(
        "--prefix", type=int, default=500, help="score the first N examples of each task (0: all)"
    )
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--runs-dir", required=True, help="checkpoints, logs and the row cache")
    parser.add_argument("--out", required=True, help="directory of the JSON, markdown and plots")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="write the outputs from the cached rows only (run nothing)",
    )
    args = parser.parse_args()
    model_dir, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibrations = ((args.nsamples, args.seqlen),)  # recovery's default windows are the same
    windows = {
        "ref": reference_windows(tokenizer),
        "c4": heldout_c4_windows(tokenizer, args, calibrations),
    }
    rows = cached_rows(args, tokenizer, windows, lambda rows: write_outputs(rows, args))
    write_outputs(rows, args)
    print((Path(args.out) / "field_table.md").read_text())


if __name__ == "__main__":
    main()

r"""Study: does more recovery data move the zero-shot tasks, not only perplexity? (issue 27)

Per pattern, SparseGPT and SAFE+ are pruned as ``field_table.py`` prunes them (the demo's
calibration budget: 32 x 256 builtin-c4 windows, seed 0, fp32 weights), then ``safe-llm
recover`` runs on the SAFE+ checkpoint once per ``--windows N``: one pass over N recovery
windows drawn like the calibration windows (N = 32 is recover's default, one pass over the
calibration windows). Every checkpoint is scored on the reference protocol (raw ``wiki.utf8``,
first 64 x 512) and on the tasks that separate methods at SmolLM2's size, whole splits unless
``--limit``. Per pattern: the share of SparseGPT's perplexity damage each row removes and the
share of SparseGPT's zero-shot gap to dense it closes (mean over the tasks).

Jobs run side by side (``--jobs``, default 1): with a 135M model the CPU side of scoring
(lm-eval building and batching requests) dominates, so on a GPU machine with many cores several
jobs pay; their kernels time-slice one GPU, so many jobs do not come free (on an H200 with 16
jobs, recovery on 128 windows took 264-303 s). Checkpoints and scores are kept in
``--runs-dir`` and a rerun reuses them (a killed prune or recovery continues from its work
area).

Usage (the committed results: an H200, about 80 s for the nine scores once the checkpoints
exist)::

    python eval/recovery_tasks.py --device cuda --jobs 9 --batch-size 64 --patterns 50% 2:4 \
        --windows 32 128 --limit 500 --runs-dir runs/recovery_tasks \
        --json eval/results/recovery_tasks_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safe_llm.core.precision import cpu_capability
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.evaluation.zeroshot import evaluate_tasks
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402
from field_table import SEPARATING, damage_cut, pattern_flags, row_name  # noqa: E402
from zeroshot_splits import gap_closed, task_mean  # noqa: E402

# a run stopped before its checkpoint continues from its work area (finished blocks, the
# recovery's last saved state); an output without one is replaced
RESTART = ("--resume", "--overwrite")


def recovered(windows: int) -> str:
    """The method name of SAFE+ followed by recovery on ``windows`` windows."""
    return f"safe+rec{windows}"


def label(method: str) -> str:
    if method.startswith("safe+rec"):
        return f"SAFE+ + recovery, {method.removeprefix('safe+rec')} windows"
    return {"sparsegpt": "SparseGPT", "safe+": "SAFE+"}.get(method, method)


class Runner:
    """Runs commands with at most ``jobs`` at a time, each logged to ``<runs-dir>/<name>.log``."""

    def __init__(self, args):
        self.args = args
        self.runs = Path(args.runs_dir)
        self.slots = threading.Semaphore(args.jobs)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}

    def run(self, name: str, command: list[str]) -> float:
        """Seconds ``command`` took; on failure raise with the end of its log."""
        log = self.runs / f"{name}.log"
        with self.slots, log.open("w") as out:
            start = time.perf_counter()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
            seconds = time.perf_counter() - start
        if done.returncode != 0:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{tail}")
        print(f"{name}: {seconds:.0f} s", flush=True)
        return seconds

    def cli(self, *words: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "safe_llm.cli",
            *words,
            "--quiet",
            "--device",
            self.args.device,
        ]

    def prune(
        self,
        method: str,
        pattern: str,
        dataset: str = "builtin-c4",
        nsamples: int | None = None,
        name: str | None = None,
    ) -> tuple[Path, float | None]:
        """``method`` at ``pattern`` on ``nsamples`` (default ``--nsamples``) windows of
        ``dataset`` into ``<runs-dir>/<name>`` (default: the field table's row name), unless
        its checkpoint is there: ``(directory, seconds or None when reused)``."""
        out = self.runs / (name or row_name(method, pattern))
        if (out / "report.json").is_file():
            return out, None
        command = self.cli("prune", "--model", self.args.model, "--method", method)
        command += [*pattern_flags(pattern), "--dataset", dataset, "--seed", "0"]
        command += ["--nsamples", str(nsamples or self.args.nsamples)]
        command += ["--seqlen", str(self.args.seqlen), "--dtype", "float32"]
        command += ["--output", str(out), *RESTART]
        return out, self.run(out.name, command)

    def recover(self, source: Future, windows: int, pattern: str) -> tuple[Path, float | None]:
        out = self.runs / row_name(recovered(windows), pattern)
        checkpoint, _ = source.result()
        if (out / "report.json").is_file():
            return out, None
        command = self.cli("recover", str(checkpoint), "--recover-nsamples", str(windows))
        command += ["--output", str(out), *RESTART]
        return out, self.run(out.name, command)

    def score(self, method: str, pattern: str, made: Future | None) -> dict:
        name = row_name(method, pattern) if method != "dense" else "dense"
        cache = self.runs / f"{name}.score.json"
        directory, seconds = made.result() if made else (None, None)
        if not cache.is_file():
            command = [sys.executable, __file__, "--score", str(directory or self.args.model)]
            command += ["--score-out", str(cache), "--device", self.args.device]
            command += ["--batch-size", str(self.args.batch_size), "--limit", str(self.args.limit)]
            self.run(f"{name}.score", command)
        row = {"method": method, "pattern": pattern, **json.loads(cache.read_text())}
        if seconds is not None:
            row["seconds"] = seconds
        return row


def run_all(args) -> list[dict]:
    """Every checkpoint made and scored, as many at a time as ``--jobs`` allows."""
    runner = Runner(args)
    runner.runs.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, Future | None]] = [("dense", "-", None)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        for pattern in args.patterns:
            safe_plus = pool.submit(runner.prune, "safe+", pattern)
            rows.append(("sparsegpt", pattern, pool.submit(runner.prune, "sparsegpt", pattern)))
            rows.append(("safe+", pattern, safe_plus))
            for windows in args.windows:
                made = pool.submit(runner.recover, safe_plus, windows, pattern)
                rows.append((recovered(windows), pattern, made))
        scored = [pool.submit(runner.score, method, p, made) for method, p, made in rows]
        return [future.result() for future in scored]


def score_checkpoint(directory: str, args) -> dict:
    """Reference perplexity and zero-shot accuracy of one checkpoint (run in its own process)."""
    path = resolve_model_path(directory)[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    start = time.perf_counter()
    ref = perplexity(model, reference_windows(tokenizer), batch_size=8)
    zeroshot = evaluate_tasks(
        model,
        tokenizer,
        list(SEPARATING),
        batch_size=args.batch_size,
        limit=args.limit or None,
        metric="acc_norm",
        per_example=True,  # the gap shares' standard errors are then paired over the examples
    )
    return {"ref": ref, "tasks": zeroshot["tasks"], "score_seconds": time.perf_counter() - start}


def summarise(rows: list[dict]) -> dict:
    tasks = list(SEPARATING)
    for row in rows:
        row["damage_removed"] = damage_cut(row, rows)
        mean = task_mean(row, tasks)
        row["mean"], row["mean_stderr"] = mean if mean else (None, None)
    return {"rows": rows, "gap_closed": gap_closed(rows, tasks)}


def markdown(summary: dict) -> str:
    closed = {(c["method"], c["pattern"]): c for c in summary["gap_closed"]}
    head = "| row | pattern | ref ppl | damage removed | " + " | ".join(SEPARATING)
    lines = [head + " | mean | gap closed |", "|---|---|---|---|" + "---|" * (len(SEPARATING) + 2)]
    for row in summary["rows"]:
        cut = row.get("damage_removed")
        tasks = [f"{row['tasks'][t]['value']:.3f}" for t in SEPARATING]
        share = closed.get((row["method"], row["pattern"]))
        gap = f"{share['closed']:.0%} ± {share['closed_stderr']:.0%}" if share else "-"
        cells = [
            label(row["method"]),
            row["pattern"],
            f"{row['ref']:.2f}",
            f"{cut:.0%}" if cut is not None else "-",
            *tasks,
            f"{row['mean']:.3f} ± {row['mean_stderr']:.3f}",
            gap,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU capability {cpu_capability()}, torch {torch.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model to prune (dense row)")
    parser.add_argument(
        "--patterns", nargs="+", default=["50%", "2:4", "60%", "70%"], help="e.g. 50%% 2:4"
    )
    parser.add_argument(
        "--windows",
        nargs="+",
        type=int,
        default=[32, 128, 512],
        help="recovery windows of each SAFE+ + recovery row (32: recover's default)",
    )
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    parser.add_argument("--limit", type=int, default=0, help="examples per task (0: whole)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every job")
    parser.add_argument("--batch-size", type=int, default=32, help="zero-shot batch size")
    parser.add_argument("--jobs", type=int, default=1, help="processes at a time")
    parser.add_argument(
        "--runs-dir", default="runs/recovery_tasks", help="checkpoints, logs, cached scores"
    )
    parser.add_argument("--json", help="where to write the rows and shares")
    parser.add_argument("--score", help=argparse.SUPPRESS)  # one checkpoint, in a child process
    parser.add_argument("--score-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.score:
        Path(args.score_out).write_text(json.dumps(score_checkpoint(args.score, args)))
        return
    resolve_model_path(args.model)  # convert a built-in model once, before the jobs start
    start = time.perf_counter()
    summary = summarise(run_all(args))
    meta = {key: getattr(args, key) for key in ("model", "patterns", "windows", "nsamples")}
    meta.update(seqlen=args.seqlen, limit=args.limit, machine=machine(args.device))
    meta["wall_seconds"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, **summary}, indent=1))
    print(markdown(summary))


if __name__ == "__main__":
    main()

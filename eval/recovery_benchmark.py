"""Benchmark: how much of SparseGPT's damage SAFE+ and end-to-end recovery remove on SmolLM2.

Rows, for each structure (50% unstructured, 2:4):

* ``sparsegpt``: SparseGPT on the reference calibration (32 x 512 builtin-c4 windows, seed 0);
* ``safe+``: SAFE+ with the CPU recipe (``recipes/smollm2-135m-safe+-<50|2-4>.yaml``);
* ``safe+ + recovery <S> steps``: ``safe-llm recover`` on the SAFE+ checkpoint, one row per
  budget in ``--budgets`` (optimiser steps of ``--recover-batch-size`` windows drawn from
  ``--recover-nsamples`` builtin-c4 windows, seed 0, in a seeded order);
* ``--levers dense n64 n96 n128 joint2 joint3 n64joint2``: the same recipe with dense-stream
  targets, with 64-128 calibration windows, with windows of 2 or 3 consecutive blocks
  reconstructed jointly after each block's own step (``--joint-blocks``), with both (64
  windows, windows of 2 blocks); ``--recover-on`` adds recovery rows (``--lever-budgets`` steps) on
  top of a lever; ``--only-finished`` makes the table of what already ran.

Each run is its own ``safe-llm`` process under ``/usr/bin/time -v`` (wall and CPU seconds, peak
RSS). A pruned checkpoint is made once per structure and kept in ``--runs-dir`` (finished runs
and scores are reused), and the recovery variants start from it. Columns: perplexity on the
reference protocol (the raw ``wiki.utf8`` tokenized whole, first 64 x 512 windows), the cut
of SparseGPT's damage ``(ppl_sgpt - ppl) / (ppl_sgpt - dense)``, perplexity on the tuning
split (``tune``: raw ``wiki.utf8`` windows 65-80, after the scored ones; settings are chosen
on it, never on the reference windows), perplexity on builtin-c4
windows that no calibration or recovery window came from (``--heldout-windows`` x 512 tokens
of the documents none was drawn from), seconds (SAFE+ rows: pruning + recovery) and their
multiple of SparseGPT's, peak RSS.

Usage (CPU, single thread; a few hours on a quiet machine)::

    OMP_NUM_THREADS=1 python eval/recovery_benchmark.py --runs-dir runs/recovery \
        --json eval/results/recovery_smollm2.json

The defaults are the settings of the table in ``eval/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safe_llm.evaluation.perplexity import perplexity
from safe_llm.io.data import calibration_windows, load_text
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402

TAGS = {"unstructured": "50", "2:4": "2-4"}
LEVER_WINDOWS = (64, 96, 128)
LEVER_JOINT = (2, 3)  # windows of consecutive blocks reconstructed jointly
LEVERS = (
    "dense",
    *(f"n{count}" for count in LEVER_WINDOWS),
    *(f"joint{size}" for size in LEVER_JOINT),
    "n64joint2",
)


def timed(command: list[str], log: Path) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``: ``{wall_s, cpu_s, peak_rss_gib}``."""
    time_file = log.with_suffix(".time")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(time_file), *command],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return read_time(time_file)


def read_time(path: Path) -> dict:
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    user = float(re.search(r"User time \(seconds\): (\S+)", text).group(1))
    system = float(re.search(r"System time \(seconds\): (\S+)", text).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": seconds, "cpu_s": user + system, "peak_rss_gib": rss / 2**20}


def finished(name: str, args) -> dict | None:
    """The timing of a finished run in ``--runs-dir``, else None."""
    out = Path(args.runs_dir) / name
    if (out / "report.json").is_file() and out.with_suffix(".time").is_file():
        return read_time(out.with_suffix(".time"))
    return None


def prune(name: str, method: str, structure: str, nsamples: int, args, *extra: str) -> dict:
    out = Path(args.runs_dir) / name
    command = [sys.executable, "-m", "safe_llm.cli", "prune", "--quiet"]
    if method == "safe+":
        command += [
            "--recipe",
            str(ROOT / "recipes" / f"smollm2-135m-safe+-{TAGS[structure]}.yaml"),
        ]
    command += ["--model", args.model, "--method", method, "--structure", structure]
    command += ["--dataset", "builtin-c4", "--nsamples", str(nsamples), "--seqlen", "512"]
    command += ["--seed", "0", "--device", "cpu", "--output", str(out), "--overwrite", "--eval"]
    if structure == "unstructured":
        command += ["--sparsity", "0.5"]
    return timed([*command, *extra], out.with_suffix(".log"))


def recover(name: str, source: str, steps: int, args) -> dict:
    out = Path(args.runs_dir) / name
    command = [sys.executable, "-m", "safe_llm.cli", "recover", "--quiet"]
    command += [str(Path(args.runs_dir) / source), "--output", str(out), "--overwrite"]
    command += ["--recover-steps", str(steps), "--recover-lr", str(args.recover_lr)]
    command += ["--recover-batch-size", str(args.recover_batch_size)]
    command += ["--recover-warmup-steps", str(args.recover_warmup)]
    command += ["--recover-step-scale", args.recover_step_scale]
    command += ["--recover-nsamples", str(args.recover_nsamples)]
    command += ["--recover-hidden-weight", str(args.recover_hidden_weight)]
    if not args.checkpointing:
        command += ["--no-recover-gradient-checkpointing"]
    if args.recover_state == "adam":
        command += ["--no-recover-lean"]
    return timed(command, out.with_suffix(".log"))


def heldout_c4_windows(
    tokenizer, args, calibrations: tuple = ((32, 512), (128, 512))
) -> torch.Tensor:
    """``[--heldout-windows, 512]`` of builtin-c4 documents that no calibration or recovery
    window (``calibrations``: (windows, tokens) pairs, seed 0; by default this benchmark's 32
    and 128 windows of 512 tokens) was cut from, joined with blank lines."""
    docs = load_text("builtin-c4")
    encoded = [torch.tensor(ids, dtype=torch.int32) for ids in tokenizer(docs)["input_ids"]]
    used = set()
    for nsamples, seqlen in calibrations:
        windows = calibration_windows(tokenizer, "builtin-c4", nsamples, seqlen, 0)
        for window in windows.to(torch.int32):
            key = window.numpy().tobytes()
            used.update(i for i, ids in enumerate(encoded) if key in ids.numpy().tobytes())
    kept = [d for i, d in enumerate(docs) if i not in used]
    ids = tokenizer("\n\n".join(kept), return_tensors="pt").input_ids[0]
    count = min(args.heldout_windows, ids.numel() // 512)
    return ids[: count * 512].reshape(count, 512)


def score(name: str, directory: str, windows: dict, args) -> dict:
    """Perplexity of the checkpoint on each set of ``windows``; cached per run (a set added
    later is computed and added to the cache)."""
    cache = Path(args.runs_dir) / f"{name}.score.json"
    result = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [key for key in windows if key not in result]
    if missing:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        result.update({key: perplexity(model, windows[key], batch_size=8) for key in missing})
        cache.write_text(json.dumps(result))
    return result


def recovery_variant(args) -> tuple[str, str]:
    """``(run-name suffix, label suffix)`` of recovery settings off the table's defaults."""
    name, label = "", ""
    if args.recover_batch_size != 2:
        name += f"b{args.recover_batch_size}"
        label += f", {args.recover_batch_size} windows/step"
    if args.recover_hidden_weight:
        weight = f"{args.recover_hidden_weight:g}"
        name += f"h{weight.replace('.', 'p')}"  # no dot: log and time files add suffixes
        label += f", hidden-state weight {weight}"
    if args.recover_state == "adam":
        name += "adam"
        label += ", torch.optim.Adam state (--no-recover-lean)"
    return name, label


def plan_for(structure: str, args) -> list[tuple]:
    """``(label, run name, run it, the run it recovers or None)`` of every row."""
    tag = TAGS[structure]
    variant, variant_label = recovery_variant(args)

    def pruned(label, name, nsamples, method="safe+", *extra):
        return (label, name, lambda n: prune(n, method, structure, nsamples, args, *extra), None)

    def recovered(label, source, budgets):
        return [
            (
                f"{label} + recovery, {steps} steps{variant_label}",
                f"{source}-rec{steps}{variant}",
                lambda n, s=steps: recover(n, source, s, args),
                source,
            )
            for steps in budgets
        ]

    levers = {
        "dense": pruned(
            "SAFE+, dense-stream targets", f"safe+dense-{tag}", 32, "safe+", "--dense-targets"
        )
    }
    for count in LEVER_WINDOWS:
        levers[f"n{count}"] = pruned(f"SAFE+, {count} windows", f"safe+n{count}-{tag}", count)
    for size in LEVER_JOINT:
        label = f"SAFE+, joint windows of {size} blocks"
        levers[f"joint{size}"] = pruned(
            label, f"safe+joint{size}-{tag}", 32, "safe+", "--joint-blocks", str(size)
        )
    levers["n64joint2"] = pruned(
        "SAFE+, 64 windows, joint windows of 2 blocks",
        f"safe+n64joint2-{tag}",
        64,
        "safe+",
        "--joint-blocks",
        "2",
    )
    plan = [
        pruned("SparseGPT", f"sparsegpt-{tag}", 32, "sparsegpt"),
        pruned("SAFE+ (CPU recipe)", f"safe+-{tag}", 32),
    ]
    plan += recovered("SAFE+", f"safe+-{tag}", args.budgets)
    plan += [levers[name] for name in args.levers]
    for name in args.recover_on:
        label, source, _, _ = levers[name]
        plan += recovered(label, source, args.lever_budgets)
    return plan


def rows_for(structure: str, args, windows: dict, dense: dict) -> list[dict]:
    runs = Path(args.runs_dir)
    rows = []
    for label, name, run, source in plan_for(structure, args):
        timing = finished(name, args)
        if timing is None and args.only_finished:
            continue
        timing = timing or run(name)
        row = {"row": label, "structure": structure, "run": name, **timing}
        row.update(score(name, str(runs / name), windows, args))
        if source is not None:  # pruning + recovery
            pruned = read_time(runs / f"{source}.time")
            row["recovery_wall_s"], row["recovery_cpu_s"] = row["wall_s"], row["cpu_s"]
            row["wall_s"] += pruned["wall_s"]
            row["cpu_s"] += pruned["cpu_s"]
            row["peak_rss_gib"] = max(row["peak_rss_gib"], pruned["peak_rss_gib"])
            report = json.loads((runs / name / "report.json").read_text())
            row["recovery_tokens"] = report["recovery"]["tokens"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        damage = base["ref"] - dense["ref"]
        row["cut"] = (base["ref"] - row["ref"]) / damage
        row["x_sparsegpt_cpu"] = row["cpu_s"] / base["cpu_s"]
        row["x_sparsegpt_wall"] = row["wall_s"] / base["wall_s"]
    return rows


def table(rows: list[dict], dense: dict) -> str:
    lines = [
        "| row | 50%: ref ppl | cut | held-out c4 | 2:4: ref ppl | cut | held-out c4 "
        "| CPU s 50% / 2:4 | x SparseGPT | wall s 50% / 2:4 | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | {dense['ref']:.2f} | | {dense['c4_heldout']:.2f} | {dense['ref']:.2f} | | "
        f"{dense['c4_heldout']:.2f} | | | | |",
    ]
    labels = list(dict.fromkeys(r["row"] for r in rows))
    for label in labels:
        by = {r["structure"]: r for r in rows if r["row"] == label}
        cells = []
        for structure in ("unstructured", "2:4"):
            r = by.get(structure)
            cells += (
                [f"{r['ref']:.2f}", f"{r['cut']:.0%}", f"{r['c4_heldout']:.2f}"]
                if r
                else ["-", "-", "-"]
            )

        def both(key, fmt, by=by):
            return " / ".join(format(by[s][key], fmt) if s in by else "-" for s in TAGS)

        rss = max(r["peak_rss_gib"] for r in by.values())
        lines.append(
            f"| {label} | {' | '.join(cells)} | {both('cpu_s', '.0f')} | "
            f"{both('x_sparsegpt_cpu', '.1f')} | {both('wall_s', '.0f')} | {rss:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--structures", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--budgets", nargs="*", type=int, default=[48, 96], help="recovery steps")
    parser.add_argument("--recover-lr", type=float, default=5e-4)
    parser.add_argument(
        "--recover-step-scale", default="absolute", choices=["absolute", "relative"]
    )
    parser.add_argument("--recover-batch-size", type=int, default=2)
    parser.add_argument(
        "--recover-hidden-weight",
        type=float,
        default=0.0,
        help="weight of the hidden-state term (0: KL only)",
    )
    parser.add_argument("--recover-warmup", type=int, default=4, help="warm-up steps")
    parser.add_argument(
        "--recover-state",
        default="lean",
        choices=["lean", "adam"],
        help="optimiser state: the lean default, or torch.optim.Adam over whole tensors (the "
        "table's rows before issue 22)",
    )
    parser.add_argument(
        "--recover-nsamples", type=int, default=128, help="recovery windows (builtin-c4, seed 0)"
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing in recovery (off here: SmolLM2 fits, and it costs a forward)",
    )
    parser.add_argument(
        "--levers",
        nargs="*",
        default=list(LEVERS),
        choices=LEVERS,
        help="rows after the recovery ones: SAFE+ with dense-stream targets (dense), with 64, 96 or "
        "128 calibration windows (n64, n96, n128), with joint windows of 2 or 3 blocks (joint2, "
        "joint3), with 64 windows and joint windows of 2 blocks (n64joint2)",
    )
    parser.add_argument(
        "--recover-on",
        nargs="*",
        default=["n64", "n96", "joint2"],
        choices=LEVERS,
        help="also recover these levers' checkpoints (--lever-budgets steps); the row's time "
        "is the lever's pruning plus the recovery",
    )
    parser.add_argument(
        "--lever-budgets",
        nargs="+",
        type=int,
        default=[40, 48, 96],
        help="recovery steps of the --recover-on rows",
    )
    parser.add_argument(
        "--only-finished",
        action="store_true",
        help="run nothing: the table of the runs already finished in --runs-dir",
    )
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--runs-dir", default="runs/recovery")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)

    model_dir, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = {
        "ref": reference_windows(tokenizer),
        "tune": reference_windows(tokenizer, count=80)[64:],
        "c4_heldout": heldout_c4_windows(tokenizer, args),
    }
    dense = score("dense", model_dir, windows, args)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, dense {dense}", flush=True)
    rows = [row for s in args.structures for row in rows_for(s, args, windows, dense)]
    print()
    print(table(rows, dense))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        document = {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "args": vars(args),
            "dense": dense,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

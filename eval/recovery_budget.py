"""Study: which recovery budget and step size hold at high sparsity (issue 27, part 4).

Starts from the SAFE+ checkpoints ``eval/field_table.py`` keeps (``<field-runs>/safe+-<pattern>``,
the demo's calibration budget: 32 x 256 builtin-c4 windows) and runs ``safe-llm recover`` once
per variant, each its own process:

* ``default``: recover's defaults (one pass over the calibration windows: 16 steps of 2);
* ``n64`` / ``n128``: one pass over 64 / 128 windows (``--recover-nsamples``; the step size
  and everything else the default);
* ``pass2``: two passes over the calibration windows (``--recover-steps 32``);
* ``lr2x``: the default budget at twice the default peak step;
* ``hidden1``: the default budget with the hidden-state term at weight 1 (SquareHead);
* ``bs1``: the default budget in steps of one window (32 steps).

SparseGPT at the same pattern and calibration is pruned once into ``--runs-dir`` for the cut
``(ppl_sgpt - ppl) / (ppl_sgpt - ppl_dense)``. Settings are chosen on the **tuning** split
(raw ``wiki.utf8`` windows 65-80 of 512 tokens, after the reference protocol's 64), never on the
field table's reference windows or held-out C4.

Usage (CPU, one thread)::

    OMP_NUM_THREADS=1 python eval/recovery_budget.py --field-runs runs/field \
        --runs-dir runs/recovery_budget --patterns 60% --variants default n64 pass2 lr2x
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from safe_llm.core.precision import cpu_capability
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402
from field_table import pattern_flags, row_name  # noqa: E402
from recovery_benchmark import finished, score, timed  # noqa: E402

CALIBRATION = (32, 256)  # the field table's (and the demo's) windows x tokens
VARIANTS = {
    "default": [],
    "n64": ["--recover-nsamples", "64"],
    "n128": ["--recover-nsamples", "128"],
    # two passes over the calibration windows in steps of 2 windows (--recover-tokens now
    # streams fresh windows instead)
    "pass2": ["--recover-steps", str(CALIBRATION[0])],
    "lr2x": ["--recover-lr", "5e-3"],
    "hidden1": ["--recover-hidden-weight", "1.0"],
    "bs1": ["--recover-batch-size", "1"],
}


def cli() -> list[str]:
    return [sys.executable, "-m", "safe_llm.cli"]


def sparsegpt(pattern: str, args) -> Path:
    """SparseGPT at ``pattern`` with the field table's calibration (pruned once)."""
    out = Path(args.runs_dir) / row_name("sparsegpt", pattern)
    if finished(out.name, args) is None:
        command = [*cli(), "prune", "--quiet", "--model", args.model, "--method", "sparsegpt"]
        command += [*pattern_flags(pattern), "--dataset", "builtin-c4", "--seed", "0"]
        command += ["--nsamples", str(CALIBRATION[0]), "--seqlen", str(CALIBRATION[1])]
        command += ["--device", "cpu", "--output", str(out), "--overwrite"]
        timed(command, out.with_suffix(".log"))
    return out


def recovered(pattern: str, variant: str, args) -> tuple[Path, dict]:
    """``safe-llm recover`` of the field table's SAFE+ checkpoint with ``variant``'s flags."""
    source = Path(args.field_runs) / row_name("safe+", pattern)
    if not (source / "report.json").is_file():
        raise SystemExit(f"no SAFE+ checkpoint at {source}: run eval/field_table.py first")
    out = Path(args.runs_dir) / f"{row_name('rec', pattern)}-{variant}"
    timing = finished(out.name, args)
    if timing is None:
        command = [*cli(), "recover", "--quiet", str(source), "--output", str(out)]
        timing = timed([*command, *VARIANTS[variant], "--overwrite"], out.with_suffix(".log"))
    return out, timing


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--field-runs", required=True, help="eval/field_table.py's --runs-dir")
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--patterns", nargs="+", default=["60%"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    model_dir, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = {"tune": reference_windows(tokenizer, count=80)[64:]}
    dense = score("dense", str(model_dir), windows, args)["tune"]
    rows = []
    for pattern in args.patterns:
        base = score(row_name("sparsegpt", pattern), str(sparsegpt(pattern, args)), windows, args)
        safe_plus = Path(args.field_runs) / row_name("safe+", pattern)
        start = score(f"safe+-{pattern}", str(safe_plus), windows, args)["tune"]
        for variant in args.variants:
            directory, timing = recovered(pattern, variant, args)
            tune = score(directory.name, str(directory), windows, args)["tune"]
            report = json.loads((directory / "report.json").read_text())["recovery"]
            row = {"pattern": pattern, "variant": variant, "tune": tune, **timing}
            row["cut"] = (base["tune"] - tune) / (base["tune"] - dense)
            row["safe+_cut"] = (base["tune"] - start) / (base["tune"] - dense)
            row["steps"], row["recovery_s"] = report.get("steps"), report.get("seconds")
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"cpu_capability": cpu_capability(), "dense_tune": dense}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{'pattern':8} {'variant':8} {'tune':>7} {'cut':>6} {'s':>6}")
    for row in rows:
        print(
            f"{row['pattern']:8} {row['variant']:8} {row['tune']:7.2f} {row['cut']:6.0%} "
            f"{row['recovery_s'] or 0:6.0f}"
        )


if __name__ == "__main__":
    main()

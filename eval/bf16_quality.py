"""Does SAFE's bf16 solver cost quality against fp32? (issue 27: the choice of ``auto``)

``--autocast auto`` runs SAFE's steps under bf16 autocast wherever the device computes bf16
natively (CUDA, CPUs with AVX-512-BF16 or AMX) and in fp32 elsewhere. On a CPU without native
bf16 torch emulates bf16 matmuls (60x slower for a large matmul, 6x for a SmolLM2 block on an
AVX2 CPU), so the whole-model comparison runs the same numerics at fp32 speed:
:class:`RoundedBF16` replaces every ``linear`` and ``scaled_dot_product_attention`` call inside
SAFE's autocast scope by its bf16 form -- inputs rounded to bf16, products accumulated in fp32,
the output rounded to bf16 (and so, through autograd, every gradient that flows back through
those casts) -- which is what autocast does on bf16 hardware, up to the order of the fp32 sums.

Two parts:

* ``--check``: block 0 pruned three ways -- fp32, torch's real bf16 autocast (emulated by
  torch here, about 6x slower on this block) and :class:`RoundedBF16` -- and SAFE's held-out
  error of each. The figure to read is ``|emulated - real| / |real - fp32|``: well below 1
  means the emulation reproduces bf16's effect on the solver, not just some perturbation.
* the run: SAFE+ (or ``--method``) on the same calibration as the field table
  (``eval/field_table.py``: 32 x 256 builtin-c4 windows, seed 0), with the emulated bf16
  solver and with fp32 (``--fp32-row``: the field table's cached row of that run instead of
  a second run), scored on the reference wiki protocol and held-out C4.

Usage (CPU, one thread; about half an hour)::

    OMP_NUM_THREADS=1 python eval/bf16_quality.py --runs-dir runs/bf16check --max-blocks 1 --check
    OMP_NUM_THREADS=1 python eval/bf16_quality.py --runs-dir runs/bf16 \
        --fp32-row runs/field/rows/safe+-50.json --json runs/bf16/safe+-50.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, AutoTokenizer

import safe_llm
from safe_llm.core import precision
from safe_llm.core.precision import cpu_capability
from safe_llm.evaluation.perplexity import perplexity
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402
from field_table import row_name  # noqa: E402
from recovery_benchmark import heldout_c4_windows  # noqa: E402


def _rounded_fp32(value):
    """A floating tensor's values rounded to bf16, as fp32 (its backward rounds the gradient
    the same way); anything else (a boolean mask, a flag) as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


class RoundedBF16(TorchFunctionMode):
    """bf16 autocast's numerics for ``linear`` and ``scaled_dot_product_attention`` at fp32
    speed: inputs rounded to bf16, computed in fp32, the output returned in bf16 (as autocast
    returns it, so the elementwise ops after it run in bf16 too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.scaled_dot_product_attention:
            inputs = [_rounded_fp32(a) for a in args]
            return func(*inputs, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def emulated_autocast(device, on: bool, cache: bool = True):
    """Drop-in for :func:`safe_llm.core.precision.bf16_autocast` that emulates bf16."""
    return RoundedBF16() if on else contextlib.nullcontext()


def check(args, runs: Path) -> dict:
    """Block 0 pruned in fp32, in torch's real bf16 autocast (slow here) and in emulated bf16:
    SAFE's held-out error of each, and ``|emulated - real| / |real - fp32|``."""
    variants = {"fp32": ("off", False), "bf16": ("bf16", False), "bf16_emulated": ("bf16", True)}
    errors = {}
    for name, (autocast, emulate) in variants.items():
        report = prune(args, runs / f"check-{name}", autocast, emulate, max_blocks=1)
        errors[name] = holdout_errors(report)[0]
    errors["ratio"] = abs(errors["bf16_emulated"] - errors["bf16"]) / abs(
        errors["bf16"] - errors["fp32"]
    )
    return errors


def prune(args, output: Path, autocast: str, emulate: bool, max_blocks: int | None) -> dict:
    """Prune with SAFE's ``autocast`` (``emulate``: bf16 by :class:`RoundedBF16`), the first
    ``max_blocks`` blocks (all: None); ``report.json`` as a dict."""
    patch = mock.patch.object(precision, "bf16_autocast", emulated_autocast)
    with patch if emulate else contextlib.nullcontext():
        safe_llm.prune(
            args.model,
            method=args.method,
            sparsity=args.sparsity,
            structure=args.structure,
            dataset="builtin-c4",
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=0,
            device="cpu",
            max_blocks=max_blocks,
            output=str(output),
            overwrite=True,
            method_options={"autocast": autocast},
        )
    return json.loads((output / "report.json").read_text())


def holdout_errors(report: dict) -> list[float]:
    """SAFE's held-out reconstruction error of each block (its keep-best measure)."""
    return [block["extra"].get("holdout_error") for block in report["blocks"]]


def scores(directory: Path, windows: dict) -> dict:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return {key: perplexity(model, w, batch_size=8) for key, w in windows.items()}


def compare(args, windows: dict) -> dict:
    """The whole model pruned with the emulated bf16 solver and in fp32 (or the fp32 row):
    perplexity on each set of ``windows``, seconds and SAFE's held-out error per block."""
    result = {}
    runs = Path(args.runs_dir)
    pattern = f"{args.sparsity:.0%}" if args.structure == "unstructured" else args.structure
    stem = row_name(args.method, pattern)
    variants = {"bf16_emulated": ("bf16", True), "fp32": ("off", False)}
    if args.fp32_row:
        del variants["fp32"]
    for name, (autocast, emulate) in variants.items():
        output = runs / f"{stem}-{name}"
        report = prune(args, output, autocast, emulate, args.max_blocks)
        result[name] = {**scores(output, windows), "seconds": report["seconds"]}
        result[name]["holdout_errors"] = holdout_errors(report)
        print(name, {k: result[name][k] for k in (*windows, "seconds")}, flush=True)
    if args.fp32_row:
        row = json.loads(Path(args.fp32_row).read_text())
        result["fp32"] = {"ref": row["ref"], "c4": row["c4"], "source": args.fp32_row}
    for key in windows:
        change = result["bf16_emulated"][key] / result["fp32"][key] - 1
        print(
            f"{key}: fp32 {result['fp32'][key]:.2f}, bf16 {result['bf16_emulated'][key]:.2f} "
            f"({change:+.1%})"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="safe+", choices=("safe", "safe+"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--structure", default="unstructured", help="unstructured or N:M")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument(
        "--check", action="store_true", help="block 0: the emulation against real bf16"
    )
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument(
        "--fp32-row", help="the field table's cached row of the same run in fp32 (else: run it)"
    )
    parser.add_argument("--max-blocks", type=int, help="prune only the first N blocks")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model_dir, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = {"machine": f"CPU capability {cpu_capability()}, torch {torch.__version__}"}
    if args.check:
        result["check"] = check(args, Path(args.runs_dir))
        print("check:", json.dumps(result["check"]), flush=True)

    windows = {
        "ref": reference_windows(tokenizer),
        "c4": heldout_c4_windows(tokenizer, args, ((args.nsamples, args.seqlen),)),
    }
    result.update(compare(args, windows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

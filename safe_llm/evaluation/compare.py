"""``safe-llm report``: compare pruning runs in a Markdown table and PNG plots.

Each run directory is a checkpoint written by :func:`safe_llm.io.checkpoint.save_checkpoint`: its
``report.json`` (method, pattern, per-block reconstruction error and per-matrix sparsity, time,
peak memory, ``evaluation`` = ``{"dense": {source: {...}}, "pruned": {...}}``) and
``recipe.yaml`` (the options of the run). Written into ``--output``:

* ``report.md`` -- one row per run, the perplexity protocols underneath;
* ``reconstruction_error.png`` -- each block's relative output error, per run;
* ``layer_sparsity.png`` -- the sparsity of every matrix of every block, per run;
* ``perplexity.png`` -- dense and pruned perplexity per source and run (runs with ``--eval``);
* ``zeroshot.png`` -- each task's accuracy (with lm-eval's stderr) and the mean per run, the
  dense model's as a tick (runs with ``--eval-tasks``).

The plots need matplotlib (``pip install 'safe-llm[eval]'``); ``plots=False`` writes only the
Markdown. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from safe_llm.core.atomic import umask
from safe_llm.errors import SafeLLMError
from safe_llm.options import read_yaml

INSTALL_HINT = "pip install 'safe-llm[eval]'"
PLOTS = ("reconstruction_error.png", "layer_sparsity.png", "perplexity.png")
ZEROSHOT_PLOT = "zeroshot.png"  # runs with --eval-tasks


class ReportError(SafeLLMError):
    """A run directory that cannot be reported, or plots without matplotlib."""


@dataclass
class Run:
    """One pruning run: its directory, ``report.json`` and ``recipe.yaml`` (may be empty)."""

    path: Path
    report: dict
    recipe: dict
    label: str = ""

    @property
    def evaluation(self) -> dict:
        return self.report.get("evaluation") or {"dense": {}, "pruned": {}}

    def zeroshot(self, stage: str = "pruned") -> dict | None:
        """The ``--eval-tasks`` result of ``stage`` (dense / pruned), or None."""
        return (self.report.get("zeroshot") or {}).get(stage)


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory; raise :class:`ReportError` if it has no readable ``report.json``."""
    path = Path(path).expanduser()
    report_file = path / "report.json"
    if not report_file.is_file():
        raise ReportError(f"{path} is not a safe-llm run directory: it has no report.json")
    try:
        report = json.loads(report_file.read_text())
        recipe_file = path / "recipe.yaml"
        recipe = read_yaml(recipe_file.read_text()) if recipe_file.is_file() else {}
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ReportError(f"{path}: cannot read the run files: {exc}") from exc
    if not isinstance(report, dict) or "method" not in report:
        raise ReportError(f"{report_file} is not a safe-llm run report")
    return Run(path, report, recipe or {})


def _base_label(run: Run) -> str:
    report = run.report
    sparsity = report.get("sparsity")
    pattern = report.get("pattern", "?")
    if pattern == "unstructured" and isinstance(sparsity, (int, float)):
        return f"{report['method']} {sparsity:.0%}"
    return f"{report['method']} {pattern}"


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """Load every run and give each a short unique label (``wanda 50%``, ``safe+ 2:4``...)."""
    if not paths:
        raise ReportError("no run directories given")
    runs = [load_run(p) for p in paths]
    bases = [_base_label(r) for r in runs]
    for run, base in zip(runs, bases, strict=True):
        run.label = base if bases.count(base) == 1 else f"{base} ({run.path.name})"
    return runs


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3f") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return format(value, spec)


def _sources(runs: list[Run]) -> list[str]:
    """Every evaluated source, in first-seen order."""
    seen: dict[str, None] = {}
    for run in runs:
        for stage in ("dense", "pruned"):
            seen.update(dict.fromkeys(run.evaluation.get(stage, {})))
    return list(seen)


def _ppl(run: Run, stage: str, source: str):
    return run.evaluation.get(stage, {}).get(source, {}).get("perplexity")


def _mean(result: dict | None) -> str:
    if not result:
        return "-"
    spread = result.get("mean_stderr")
    return _fmt(result["mean"]) + (f" ± {_fmt(spread)}" if spread is not None else "")


def _row(run: Run, sources: list[str], any_zeroshot: bool = False) -> list[str]:
    report, recipe = run.report, run.recipe
    cells = [
        run.label,
        f"`{report.get('model') or recipe.get('model', '?')}`",
        report["method"],
        str(report.get("pattern", "?")),
        _fmt(report.get("overall_sparsity"), ".4f"),
    ]
    for source in sources:
        dense, pruned = _ppl(run, "dense", source), _ppl(run, "pruned", source)
        cells.append(f"{_fmt(dense)} → {_fmt(pruned)}" if dense or pruned else "-")
    if any_zeroshot:
        dense, pruned = run.zeroshot("dense"), run.zeroshot("pruned")
        cells.append(f"{_mean(dense)} → {_mean(pruned)}" if dense or pruned else "-")
    memory = report.get("peak_memory_bytes")
    cells += [
        _fmt(report.get("seconds"), ".1f"),
        _fmt(report.get("total_seconds"), ".1f"),
        _fmt(memory / 2**30 if isinstance(memory, (int, float)) else None, ".2f"),
    ]
    return cells


def _protocols(runs: list[Run], sources: list[str]) -> list[str]:
    lines = []
    for source in sources:
        labels = {
            r.evaluation[stage][source].get("protocol")
            or f"seqlen {r.evaluation[stage][source]['seqlen']}"
            for r in runs
            for stage in ("dense", "pruned")
            if source in r.evaluation.get(stage, {})
        }
        lines += [f"- **{source}**: {label}" for label in sorted(labels)]
    return lines


def markdown(runs: list[Run], plots: list[str] = ()) -> str:
    """The report: a table with one row per run, the protocols, the plots."""
    sources, zeroshot = _sources(runs), any(r.zeroshot() or r.zeroshot("dense") for r in runs)
    header = ["run", "model", "method", "structure", "sparsity"]
    header += [f"{s} ppl (dense → pruned)" for s in sources]
    header += ["zero-shot mean (dense → pruned)"] if zeroshot else []
    header += ["pruning time (s)", "total time (s)", "peak memory (GiB)"]
    lines = ["# safe-llm runs", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(run, sources, zeroshot)) + " |" for run in runs]
    lines += ["", "Sparsity: the achieved fraction of zeros over all pruned matrices."]
    if zeroshot:
        lines += ["", *zeroshot_table(runs)]
    if sources:
        lines += ["", "## Perplexity protocols", "", *_protocols(runs, sources)]
    else:
        lines += ["", "No run was evaluated (prune with `--eval wikitext2,c4` to compare)."]
    lines += ["", "## Runs", ""]
    lines += [f"- **{r.label}**: `{r.path}`" + _calibration(r) for r in runs]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _tasks(runs: list[Run]) -> list[str]:
    """Every zero-shot task of any run, in first-seen order."""
    seen: dict[str, None] = {}
    for run in runs:
        for stage in ("dense", "pruned"):
            seen.update(dict.fromkeys((run.zeroshot(stage) or {}).get("tasks", {})))
    return list(seen)


def _task_cell(result: dict | None, task: str) -> str:
    entry = (result or {}).get("tasks", {}).get(task)
    if entry is None:
        return "-"
    spread = entry.get("stderr")
    return _fmt(entry["value"]) + (f" ± {_fmt(spread)}" if spread is not None else "")


def zeroshot_table(runs: list[Run]) -> list[str]:
    """Each task's accuracy (lm-eval's stderr), dense first then each run; the protocols and
    the split each task scored underneath."""
    tasks = _tasks(runs)
    lines = ["## Zero-shot accuracy", "", "| model | " + " | ".join([*tasks, "mean"]) + " |"]
    lines.append("|" + "---|" * (len(tasks) + 2))
    dense = next((r.zeroshot("dense") for r in runs if r.zeroshot("dense")), None)
    rows = ([("dense", dense)] if dense else []) + [(r.label, r.zeroshot()) for r in runs]
    for label, result in rows:
        cells = [_task_cell(result, t) for t in tasks] + [_mean(result)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    results = [result for _, result in rows if result]
    splits = {
        f"{t}: {e.get('metric')}, {e.get('split')} split, {e.get('samples')} examples"
        + (" (preview)" if e.get("preview") else "")
        for r in results
        for t, e in r["tasks"].items()
    }
    lines += ["", *sorted({f"- {r['protocol']}" for r in results})]
    return lines + [f"- {line}" for line in sorted(splits)]


def _calibration(run: Run) -> str:
    cal = run.report.get("calibration") or {}
    if not cal:
        return ""
    return (
        f" (calibration: {cal.get('nsamples')} x {cal.get('seqlen')} tokens of "
        f"{cal.get('dataset')}, seed {cal.get('seed')})"
    )


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportError(
            f"the report's plots need matplotlib: {INSTALL_HINT} (or pass --no-plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reconstruction_error(plt, runs: list[Run], path: Path) -> None:
    """Each block's relative output error ``||Y_pruned - Y_dense|| / ||Y_dense||``, per run."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for run in runs:
        blocks = run.report.get("blocks", [])
        ax.plot(
            [b["index"] for b in blocks],
            [b["reconstruction_error"] for b in blocks],
            marker="o",
            markersize=3,
            label=run.label,
        )
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error (log)")
    ax.set_title("Per-block reconstruction error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sparsity_matrix(run: Run) -> tuple[list[str], list[int], list[list[float]]]:
    """``(matrix names, block indices, [names][blocks] sparsity)`` (NaN where absent)."""
    blocks = run.report.get("blocks", [])
    names = list(dict.fromkeys(n for b in blocks for n in b.get("layer_sparsity", {})))
    values = [[b.get("layer_sparsity", {}).get(n, math.nan) for b in blocks] for n in names]
    return names, [b["index"] for b in blocks], values


def _sparsity_range(runs: list[Run]) -> tuple[float, float]:
    """Colour range: the data's range padded to at least 0.1, so small differences show."""
    values = [
        v for r in runs for row in _sparsity_matrix(r)[2] for v in row if math.isfinite(v)
    ] or [0.0, 1.0]
    low, high = min(values), max(values)
    pad = max(0.0, 0.1 - (high - low)) / 2
    return max(0.0, low - pad), min(1.0, high + pad)


def _annotate(ax, values: list[list[float]]) -> None:
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w")


def plot_layer_sparsity(plt, runs: list[Run], path: Path) -> None:
    """A heatmap per run: rows are matrices, columns blocks, colour the fraction of zeros
    (cells carry their value when there are few enough of them to read)."""
    height = sum(0.7 + 0.2 * max(1, len(_sparsity_matrix(r)[0])) for r in runs)
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(9, height + 0.6), squeeze=False, layout="constrained"
    )
    vmin, vmax = _sparsity_range(runs)
    image = None
    for ax, run in zip(axes[:, 0], runs, strict=True):
        names, blocks, values = _sparsity_matrix(run)
        if not names:
            ax.set_axis_off()
            ax.set_title(f"{run.label}: no per-matrix sparsity recorded", fontsize="small")
            continue
        image = ax.imshow(values, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
        if len(names) * len(blocks) <= 320:
            _annotate(ax, values)
        ax.set_yticks(range(len(names)), names, fontsize="x-small")
        step = max(1, len(blocks) // 16)
        ax.set_xticks(range(0, len(blocks), step), blocks[::step], fontsize="x-small")
        ax.set_title(run.label, fontsize="small")
    axes[-1, 0].set_xlabel("block")
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="sparsity (fraction of zeros)")
    fig.suptitle("Per-matrix sparsity")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_perplexity(plt, runs: list[Run], path: Path) -> None:
    """One panel per source, one row per run: dense (hollow) -> pruned (filled) perplexity."""
    sources = _sources(runs)
    fig, axes = plt.subplots(
        1,
        len(sources),
        figsize=(2.0 + 3.6 * len(sources), 1.4 + 0.45 * len(runs)),
        squeeze=False,
        layout="constrained",
    )
    rows = range(len(runs))[::-1]  # first run on top
    for ax, source in zip(axes[0], sources, strict=True):
        dense = [_ppl(r, "dense", source) or math.nan for r in runs]
        pruned = [_ppl(r, "pruned", source) or math.nan for r in runs]
        ax.hlines(rows, dense, pruned, color="0.6", linewidth=1.5, zorder=1)
        ax.scatter(dense, rows, facecolors="white", edgecolors="C0", label="dense", zorder=2)
        ax.scatter(pruned, rows, color="C3", label="pruned", zorder=3)
        for y, value in zip(rows, pruned, strict=True):
            if math.isfinite(value):
                ax.annotate(f" {value:.2f}", (value, y), va="center", fontsize="x-small")
        finite = [v for v in dense + pruned if math.isfinite(v)]
        if finite and max(finite) / min(finite) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.18, y=0.3)
        ax.set_yticks(list(rows), [r.label for r in runs])
        ax.set_title(source)
        ax.set_xlabel("token perplexity (lower is better)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize="x-small", loc="best")
    fig.suptitle("Perplexity by method: dense → pruned")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_zeroshot(plt, runs: list[Run], path: Path) -> None:
    """Each task's accuracy and the mean, one bar per run (lm-eval's stderr as error bars),
    the dense model's accuracy as a black tick."""
    tasks = _tasks(runs)
    names = [*tasks, "mean"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(names), 4.5), layout="constrained")
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values, errors = _accuracies(run.zeroshot(), tasks)
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=run.label)
    dense = next((r.zeroshot("dense") for r in runs if r.zeroshot("dense")), None)
    if dense:
        values, _ = _accuracies(dense, tasks)
        starts = [j - 0.45 for j in range(len(names))]
        ends = [j + 0.45 for j in range(len(names))]
        ax.hlines(values, starts, ends, color="k", label="dense")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (higher is better)")
    ax.set_title("Zero-shot accuracy (lm-evaluation-harness)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracies(result: dict | None, tasks: list[str]) -> tuple[list[float], list[float]]:
    """``(values, stderrs)`` over ``tasks`` then the mean (NaN / 0 where absent)."""
    entries = [(result or {}).get("tasks", {}).get(t) or {} for t in tasks]
    values = [e.get("value", math.nan) for e in entries] + [(result or {}).get("mean", math.nan)]
    errors = [e.get("stderr") or 0.0 for e in entries] + [(result or {}).get("mean_stderr") or 0]
    return values, errors


def _write_plots(runs: list[Run], directory: Path) -> list[str]:
    plt = _pyplot()
    plot_reconstruction_error(plt, runs, directory / PLOTS[0])
    plot_layer_sparsity(plt, runs, directory / PLOTS[1])
    written = [PLOTS[0], PLOTS[1]]
    if _sources(runs):
        plot_perplexity(plt, runs, directory / PLOTS[2])
        written.append(PLOTS[2])
    if _tasks(runs):
        plot_zeroshot(plt, runs, directory / ZEROSHOT_PLOT)
        written.append(ZEROSHOT_PLOT)
    return written


def write_report(
    run_dirs: list[str | os.PathLike], output: str | os.PathLike, plots: bool = True
) -> list[Path]:
    """Write ``report.md`` (and the PNG plots) for ``run_dirs`` into ``output``.

    Everything is rendered into a temporary directory inside ``output`` first and then renamed
    file by file, so an error leaves no partial report. Returns the written paths.
    """
    runs = load_runs(list(run_dirs))
    if plots:
        _pyplot()  # a missing matplotlib fails before anything is written
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise ReportError(f"--output {output} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report.tmp-", dir=output))
    try:
        names = _write_plots(runs, tmp) if plots else []
        (tmp / "report.md").write_text(markdown(runs, names), encoding="utf-8")
        names.append("report.md")
        mask = umask()
        for name in names:
            (tmp / name).chmod(0o666 & ~mask)
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [output / name for name in names]

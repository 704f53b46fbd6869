"""The model card (``README.md`` with Hub metadata) written into every checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from safe_llm.version import __version__

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(model: str) -> str | None:
    """The Hub id ``model`` came from: a built-in's source, a Hub id itself, else None."""
    from safe_llm.io.models import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].hub_id
    if HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def card_metadata(recipe: dict, report: dict) -> dict:
    """The YAML front matter: base_model, library_name, pipeline_tag and tags."""
    pattern = report["pattern"]
    tags = ["safe-llm", "sparse", "pruned", pattern, recipe["method"]]
    if pattern != "unstructured":
        tags.append("n:m-sparsity")
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    base = base_model_id(str(recipe.get("model") or ""))
    if base:
        metadata = {"base_model": base, **metadata}
    return metadata


def _pattern_text(report: dict) -> str:
    if report["pattern"] == "unstructured":
        return f"{report['sparsity']:.0%} unstructured"
    return f"{report['pattern']} semi-structured ({report['sparsity']:.0%})"


def _settings_table(recipe: dict, report: dict) -> list[str]:
    calibration = report.get("calibration", {})
    options = recipe.get("method_options") or {}
    rows = [
        ("Base model", f"`{recipe.get('model')}`"),
        ("Method", recipe["method"] + (f" ({options})" if options else "")),
        ("Pattern", _pattern_text(report)),
        (
            "Overall sparsity",
            f"{report.get('overall_sparsity', float('nan')):.4f} of the pruned layers' weights",
        ),
        (
            "Pruned layers",
            "every linear layer and every expert's matrix of the decoder blocks"
            + (f" except {', '.join(recipe['ignore'])}" if recipe.get("ignore") else "")
            + "; embeddings and lm_head are dense",
        ),
        *_dense_rows(report),
        (
            "Calibration",
            f"{calibration.get('nsamples')} windows x {calibration.get('seqlen')} "
            f"tokens of `{calibration.get('dataset')}`, seed {calibration.get('seed')}",
        ),
        (
            "Targets",
            "dense stream (global propagation)"
            if recipe.get("dense_targets")
            else "pruned stream (sequential)",
        ),
        ("Reconstruction", _reconstruction(recipe)),
        ("Dtype / device", f"{report.get('dtype')} on {report.get('device')}"),
    ]
    recovery = report.get("recovery")
    if recovery:
        rows.append(
            (
                "Recovery",
                f"{recovery['method']}: the whole model trained against the dense model's "
                f"next-token distribution (KL{_hidden_term(recovery)}), mask frozen; "
                f"{recovery['tokens']} tokens "
                f"({recovery['steps']} steps x {recovery['batch_size']} windows x "
                f"{recovery['seqlen']} tokens) of `{recovery['dataset']}`, seed "
                f"{recovery['seed']}, lr {recovery['lr']:g}, trained: "
                f"{', '.join(recovery['train'])}",
            )
        )
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _dense_rows(report: dict) -> list[tuple[str, str]]:
    """The block weights left dense (routers, convolutions, ignored layers) and the sparsity
    over every block weight of 2+ dimensions, when some were."""
    dense = report.get("unpruned_block_weights") or {}
    if not dense:
        return []
    names = ", ".join(f"`{name}`" for name in sorted(dense))
    return [
        ("Left dense in the blocks", f"{names} ({sum(dense.values())} parameters)"),
        (
            "Sparsity of every block weight",
            f"{report.get('all_block_weights_sparsity', float('nan')):.4f} (2+ dimensions, "
            "pruned or not; biases and norms excepted)",
        ),
    ]


def _hidden_term(recovery: dict) -> str:
    weight = recovery.get("hidden_weight") or 0
    return f" + {weight:g} x block-output error" if weight else ""


def _perplexity_table(report: dict) -> list[str]:
    evaluation = report.get("evaluation") or {}
    dense, pruned = evaluation.get("dense") or {}, evaluation.get("pruned") or {}
    sources = [s for s in pruned if s in dense] or list(pruned)
    if not sources:
        return ["Not evaluated (run `safe-llm prune` with `--eval` to add perplexities)."]
    lines = ["| Text | Seqlen | Windows | Dense | Pruned |", "|---|---|---|---|---|"]
    for source in sources:
        p, d = pruned[source], dense.get(source, {})
        dense_ppl = f"{d['perplexity']:.3f}" if "perplexity" in d else "-"
        lines.append(
            f"| {source} | {p['seqlen']} | {p['windows']} | {dense_ppl} | {p['perplexity']:.3f} |"
        )
    lines.append("")
    lines.append("Token-level perplexity, non-overlapping windows (SparseGPT/Wanda protocol).")
    return lines


def _zeroshot_table(report: dict) -> list[str]:
    """``--eval-tasks``: each task's accuracy with lm-eval's stderr, dense and pruned."""
    zeroshot = report.get("zeroshot") or {}
    pruned = zeroshot.get("pruned")
    if not pruned:
        return []
    dense = zeroshot.get("dense") or {}
    lines = ["## Zero-shot accuracy", "", "| Task | Metric | Split | Examples | Dense | Pruned |"]
    lines.append("|---|---|---|---|---|---|")
    for task, entry in pruned["tasks"].items():
        before = (dense.get("tasks") or {}).get(task)
        examples = f"{entry.get('samples', '?')}" + (" (preview)" if entry.get("preview") else "")
        lines.append(
            f"| {task} | {entry['metric']} | {entry.get('split', '?')} | {examples} | "
            f"{_accuracy(before)} | {_accuracy(entry)} |"
        )
    mean = {"value": pruned["mean"], "stderr": pruned.get("mean_stderr")}
    dense_mean = {"value": dense["mean"], "stderr": dense.get("mean_stderr")} if dense else None
    lines.append(f"| mean | | | | {_accuracy(dense_mean)} | {_accuracy(mean)} |")
    return lines + ["", f"{pruned['protocol']}.", ""]


def _accuracy(entry: dict | None) -> str:
    if not entry:
        return "-"
    spread = entry.get("stderr")
    return f"{entry['value']:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")


def render_model_card(recipe: dict, report: dict) -> str:
    """``README.md`` text for a checkpoint made with ``recipe`` (the options) and ``report``
    (``report.json``): Hub metadata, settings, perplexities and the command that made it."""
    front = yaml.safe_dump(card_metadata(recipe, report), sort_keys=False).strip()
    command = report.get("command") or "(not recorded)"
    title = f"{recipe.get('model')} pruned to {_pattern_text(report)} with {recipe['method']}"
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {title}",
        "",
        f"Pruned with safe-llm {__version__}, block by block, "
        + (
            "then recovered end to end by distillation from the dense model (see Recovery). "
            if report.get("recovery")
            else "without retraining. "
        )
        + "The zeros are stored in place: the weights load as a dense model in "
        "`transformers`, vLLM or any other tool.",
        "",
        "## Settings",
        "",
        *_settings_table(recipe, report),
        "",
        "## Perplexity",
        "",
        *_perplexity_table(report),
        "",
        *_zeroshot_table(report),
        "## How it was made",
        "",
        "```bash",
        command,
        "```",
        "",
        "`recipe.yaml` holds every option; `report.json` the per-block times and errors.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this repository>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this repository>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _reconstruction(recipe: dict) -> str:
    """How the blocks were reconstructed: one at a time, or also in joint windows."""
    joint = recipe.get("joint") or {}
    size = joint.get("blocks") or 1
    if size == 1:
        return "block by block"
    return (
        f"block by block, then windows of {size} consecutive blocks trained jointly against "
        f"the dense window's outputs, masks frozen ({joint.get('epochs'):g} epochs, "
        f"lr {joint.get('lr'):g} of each tensor's RMS)"
    )

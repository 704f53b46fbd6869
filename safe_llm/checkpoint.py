"""Writing a pruned checkpoint that plain ``transformers`` loads, atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from safe_llm import __version__

CONFIG_KEY = "safe_llm_sparsity"


def sparsity_metadata(result) -> dict:
    """What a reader of ``config.json`` needs to know about the pruning."""
    return {
        "tool": f"safe-llm {__version__}",
        "method": result.config.method,
        "structure": result.report["pattern"],
        "sparsity": result.report["sparsity"],
        "ignore": list(result.config.ignore),
        "overall_sparsity": result.report["overall_sparsity"],
    }


def save_checkpoint(result) -> Path:
    """Write model, tokenizer, ``recipe.yaml`` and ``report.json`` into ``config.output``.

    Everything goes to a temporary sibling directory first and is renamed into place, so a
    crash never leaves a half-written checkpoint; an existing output (``--overwrite``) is
    replaced only after the new one is complete.
    """
    output = Path(result.config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        setattr(result.model.config, CONFIG_KEY, sparsity_metadata(result))
        result.model.save_pretrained(tmp, max_shard_size=result.config.max_shard_size)
        result.tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(result.config.to_dict(), sort_keys=False))
        (tmp / "report.json").write_text(json.dumps(result.report, indent=2))
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output

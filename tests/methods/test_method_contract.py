"""The contract every registered pruning method meets, checked for each entry of the registry
(a new method file gets these checks without touching this file):

* the exact pattern, unstructured 50% and 2:4 (counted per row for a ``per_row`` method);
* ``--ignore``: ignored layers are not pruned (no zero added; a method that trains the block's
  other weights, as SAFE's ``train_others``, may still change their values);
* a run stopped after a block (the work area as a kill leaves it) and resumed gives the bits
  of a run never stopped;
* the written checkpoint reloads with plain transformers and gives finite logits.

``test_a_throwaway_method_gets_every_check_for_free`` registers a method defined here and runs
the same checks on it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from safe_llm.config import make_config
from safe_llm.core.blocks import find_blocks, prunable_layers, weight_matrix
from safe_llm.io.work_area import Interrupted
from safe_llm.methods import available_methods, get_method_class, register, unregister
from safe_llm.methods.base import BlockContext, PruningMethod
from safe_llm.pipeline import finish_run, run_prune

IGNORED = ("mlp.down_proj", "self_attn.o_proj")
# quick options for methods whose defaults are sized for real models (still the same code path)
QUICK_OPTIONS = {
    "safe": {"epochs": 2, "warmup_epochs": 0},
    "safe+": {"epochs": 2, "warmup_epochs": 0},
}


@pytest.fixture
def run(save_tiny_model, calibration_file, tmp_path):
    """run(method, output=None, **options) -> the result of a tiny prune run (checkpoint written
    when ``output`` is given)."""
    model_dir = save_tiny_model()

    def prune(method: str, output: str | None = None, should_stop=None, **options):
        config = make_config(
            overrides={
                "model": str(model_dir),
                "method": method,
                "dataset": str(calibration_file),
                "nsamples": 4,
                "seqlen": 16,
                "batch_size": 2,
                "output": str(tmp_path / output) if output else None,
                "method_options": QUICK_OPTIONS.get(method, {}),
                **options,
            }
        )
        result = run_prune(config, progress=False, should_stop=should_stop)
        finish_run(result)
        return result

    return prune


def _layers(model):
    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            yield f"block {index} {name}", name, weight_matrix(layer).detach()


def _assert_exact_pattern(weight: torch.Tensor, structure: str, per_row: bool, where: str) -> None:
    kept = weight != 0
    rows, cols = weight.shape
    if structure == "2:4":
        per_group = kept.reshape(rows, cols // 4, 4).sum(dim=2)
        assert (per_group == 2).all(), f"{where}: not exactly 2 of every 4 kept"
    elif per_row:
        assert (kept.sum(dim=1) == round(cols / 2)).all(), f"{where}: not half of every row kept"
    else:
        assert int(kept.sum()) == round(weight.numel() / 2), f"{where}: not half kept"


def check_exact_pattern_and_reload(method: str, run, tmp_path) -> None:
    per_row = get_method_class(method).per_row
    for structure in ("unstructured", "2:4"):
        result = run(method, output=f"{method}-{structure}", structure=structure)
        for where, _, weight in _layers(result.model):
            _assert_exact_pattern(weight, structure, per_row, where)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"{method}-{structure}")
        with torch.no_grad():
            logits = reloaded(torch.tensor([[1, 5, 9, 3, 7]])).logits
        assert torch.isfinite(logits).all(), f"{method} {structure}: non-finite logits"


def check_ignore_leaves_layers_unpruned(method: str, run, make_dense) -> None:
    dense = {where: weight.clone() for where, _, weight in _layers(make_dense())}
    result = run(method, structure="2:4", ignore=list(IGNORED))
    for where, name, weight in _layers(result.model):
        if name in IGNORED:
            added = (weight == 0) & (dense[where] != 0)
            assert not added.any(), f"{method} pruned the ignored {where}"
        else:
            _assert_exact_pattern(weight, "2:4", False, where)


def check_resume_after_a_stop_gives_the_same_bits(method: str, run, tmp_path) -> None:
    run(method, output="whole")
    with pytest.raises(Interrupted):  # saved block 0, then stopped: what a kill leaves behind
        run(method, output="stopped", should_stop=lambda: signal.SIGTERM)
    run(method, output="stopped", resume=True)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), f"{method}: {key} differs after resume"


@pytest.fixture
def make_dense(save_tiny_model):
    def make():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(save_tiny_model("dense-copy"))

    return make


REGISTERED = available_methods()


@pytest.mark.parametrize("method", REGISTERED)
def test_every_method_meets_the_exact_pattern_and_its_checkpoint_reloads_finite(
    method, run, tmp_path
):
    check_exact_pattern_and_reload(method, run, tmp_path)


@pytest.mark.parametrize("method", REGISTERED)
def test_every_method_leaves_ignored_layers_dense(method, run, make_dense):
    check_ignore_leaves_layers_unpruned(method, run, make_dense)


@pytest.mark.parametrize("method", REGISTERED)
def test_every_method_resumed_after_a_stop_gives_the_bits_of_an_uninterrupted_run(
    method, run, tmp_path
):
    check_resume_after_a_stop_gives_the_same_bits(method, run, tmp_path)


@dataclass
class _ColumnOptions:
    salt: int = field(default=0, metadata={"help": "throwaway: shifts the random column order"})


class _RandomColumns(PruningMethod):
    """Throwaway: scores ``|W_ij| * r_j`` with a random ``r`` from the block's seed."""

    name = "throwaway-random-columns"
    Options = _ColumnOptions

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        generator = torch.Generator().manual_seed(ctx.seed + self.options.salt)
        for name in ctx.layers:
            weight = ctx.matrix(name)
            importance = torch.rand(weight.shape[1], generator=generator)
            weight.copy_(ctx.pattern.project(weight, importance))
        return {}


def test_a_throwaway_method_gets_every_check_for_free(run, make_dense, tmp_path, request):
    available_methods()
    register(_RandomColumns)
    request.addfinalizer(lambda: unregister(_RandomColumns.name))
    check_exact_pattern_and_reload(_RandomColumns.name, run, tmp_path)
    check_ignore_leaves_layers_unpruned(_RandomColumns.name, run, make_dense)
    check_resume_after_a_stop_gives_the_same_bits(_RandomColumns.name, run, tmp_path)


def test_a_second_method_or_stage_of_a_taken_name_is_refused():
    from safe_llm.errors import SafeLLMError
    from safe_llm.stages.base import Stage, register_stage, registered_stages

    available_methods()

    class Impostor(PruningMethod):
        name = "wanda"

    with pytest.raises(SafeLLMError, match="two pruning methods are named 'wanda'"):
        register(Impostor)
    assert get_method_class("wanda") is not Impostor
    register(get_method_class("wanda"))  # the same class again is no duplicate

    class Prune(Stage):
        name, order = "prune", 1

    registered_stages()
    with pytest.raises(SafeLLMError, match="two stages are named 'prune'"):
        register_stage(Prune)

"""The contract of a stage: a stage registered with ``@register_stage`` runs in the pipeline in
its order, its options are a recipe section and CLI flags, what it returns is recorded in the
report under its name, and a resumed run does not run it again once it finished (a stage
interrupted mid-way gets its state directory back). The throwaway stage below is defined
here only: nothing in the pipeline, the config or the CLI names it.
"""

from __future__ import annotations

import functools
import json
import signal
from dataclasses import dataclass

import pytest

from safe_llm import cli
from safe_llm.config import make_config
from safe_llm.io.work_area import Interrupted
from safe_llm.options import option
from safe_llm.pipeline import finish_run, run_prune
from safe_llm.stages.base import Stage, register_stage, unregister_stage


@dataclass(frozen=True)
class CountOptions:
    times: int = option(1, "what the throwaway stage records")


CALLS: list[int] = []  # the ``times`` of every run of the stage
INTERRUPT: list[bool] = []  # non-empty: the next run stops half-way, as after a signal


class CountStage(Stage):
    """Counts its runs, changes nothing; between the profile and the block loop."""

    name = "count"
    order = 25
    Options = CountOptions

    def run(self, model, context) -> dict:
        CALLS.append(context.config.count.times)
        state = context.state_dir(self.name)
        resumed = state is not None and (state / "half-done").is_file()
        if INTERRUPT:
            INTERRUPT.clear()
            state.mkdir(parents=True, exist_ok=True)
            (state / "half-done").write_text("1")
            raise Interrupted(signal.SIGTERM, 0, 0, context.work.path)
        windows = int(context.windows.shape[0])  # the run's calibration windows, tokenized once
        return {"times": context.config.count.times, "windows": windows, "resumed": resumed}


@pytest.fixture
def count_stage():
    register_stage(CountStage)
    CALLS.clear()
    INTERRUPT.clear()
    yield CountStage
    unregister_stage(CountStage.name)


@pytest.fixture
def prune_argv(save_tiny_model, fast_prune_argv):
    return functools.partial(fast_prune_argv, save_tiny_model())


def _report(output) -> dict:
    return json.loads((output / "report.json").read_text())


def test_a_registered_stage_runs_with_its_flag_and_is_recorded_in_the_report(
    count_stage, prune_argv, tmp_path, capsys
):
    assert cli.main([*prune_argv(tmp_path / "out"), "--count-times", "3"]) == 0
    assert CALLS == [3]
    assert _report(tmp_path / "out")["stages"]["count"] == {
        "times": 3,
        "windows": 4,
        "resumed": False,
    }
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    assert "--count-times" in capsys.readouterr().out


def test_a_registered_stage_takes_its_options_from_its_recipe_section(
    count_stage, prune_argv, tmp_path
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("count:\n  times: 2\n")
    assert cli.main([*prune_argv(tmp_path / "out"), "--recipe", str(recipe)]) == 0
    assert CALLS == [2]
    written = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "count:\n  times: 2\n" in written  # the checkpoint's recipe reruns it


def _config(save_tiny_model, calibration_file, output, **options):
    return make_config(
        overrides={
            "model": str(save_tiny_model()),
            "method": "magnitude",
            "dataset": str(calibration_file),
            "nsamples": 4,
            "seqlen": 16,
            "batch_size": 2,
            "device": "cpu",
            "output": str(output),
            "count_times": 5,
            **options,
        }
    )


def test_a_finished_stage_is_not_run_again_on_resume_and_stays_in_the_report(
    count_stage, save_tiny_model, calibration_file, tmp_path
):
    out = tmp_path / "out"
    stop_after_block_0 = lambda: signal.SIGTERM  # noqa: E731 (polled after each block's save)
    with pytest.raises(Interrupted):
        run_prune(_config(save_tiny_model, calibration_file, out), False, stop_after_block_0)
    assert CALLS == [5]
    config = _config(save_tiny_model, calibration_file, out, resume=True)
    result = run_prune(config, progress=False)
    finish_run(result)
    assert CALLS == [5]  # finished before the interruption: not run again
    assert result.report.resumed_from_block == 1
    assert _report(out)["stages"]["count"] == {"times": 5, "windows": 4, "resumed": False}


def test_an_interrupted_stage_gets_its_state_directory_back_on_resume(
    count_stage, save_tiny_model, calibration_file, tmp_path
):
    out = tmp_path / "out"
    INTERRUPT.append(True)
    with pytest.raises(Interrupted):
        run_prune(_config(save_tiny_model, calibration_file, out), progress=False)
    result = run_prune(_config(save_tiny_model, calibration_file, out, resume=True), False)
    finish_run(result)
    assert CALLS == [5, 5]
    assert _report(out)["stages"]["count"]["resumed"] is True


def test_a_resume_with_other_options_of_a_stage_is_refused(
    count_stage, save_tiny_model, calibration_file, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run_prune(_config(save_tiny_model, calibration_file, out), False, lambda: signal.SIGTERM)
    with pytest.raises(Exception, match="count"):
        run_prune(_config(save_tiny_model, calibration_file, out, resume=True, count_times=6))

"""Every options class checks its own values when it is built (``__post_init__``), once,
whichever way the values came: a recipe, a flag or Python. Each option of every method, every
stage and the run gets a bad value here and must fail with one clear error naming it."""

from __future__ import annotations

import dataclasses

import pytest

from safe_llm import cli
from safe_llm.config import RunConfig, make_config
from safe_llm.methods import available_methods, get_method_class
from safe_llm.options import ConfigError, annotation_of, flag, flag_dest
from safe_llm.stages.base import registered_stages

TREE = ("method_options", "stage_options")


def _bad_values(f: dataclasses.Field) -> list:
    """Values field ``f`` must refuse: one of the wrong type, and one outside its declared
    choices or bounds where it declares any."""
    annotation = str(annotation_of(f))
    wrong_type = {"x": 1} if "dict" not in annotation else [1]
    bad = [wrong_type]
    declared = f.metadata
    if "choices" in declared:
        bad.append("no-such-choice")
    for key, step in (("at_least", -1), ("above", 0), ("below", 0), ("at_most", 1)):
        if key in declared:
            bound = declared[key]
            value = bound + step if key in ("at_least", "at_most") else bound
            bad.append([value] if "list" in annotation else value)
    if "float" in annotation:
        bad.append(float("nan"))
    return bad


def _cases():
    for method in available_methods():
        options = get_method_class(method).Options
        for f in dataclasses.fields(options):
            for value in _bad_values(f):
                yield pytest.param("method", method, f, value, id=f"{method}.{f.name}={value!r}")
    for stage in registered_stages():
        for f in dataclasses.fields(stage.Options):
            for value in _bad_values(f):
                yield pytest.param("stage", stage, f, value, id=f"{stage.name}.{f.name}={value!r}")
    for f in dataclasses.fields(RunConfig):
        if f.name not in TREE:
            for value in _bad_values(f):
                yield pytest.param("run", None, f, value, id=f"run.{f.name}={value!r}")


CASES = list(_cases())


def _flag_of(kind, owner, f) -> str:
    prefix = owner.prefix() if kind == "stage" else ""
    return flag(flag_dest(f, prefix))


@pytest.mark.parametrize("kind,owner,f,value", CASES)
def test_every_option_refuses_a_bad_value_from_a_recipe_with_an_error_naming_it(
    kind, owner, f, value
):
    recipe = {"model": "some-model", "dataset": "builtin-c4"}
    if kind == "method":
        recipe |= {"method": owner, "method_options": {f.name: value}}
    elif kind == "stage":
        recipe |= {owner.recipe_key(): {f.name: value}}
    else:
        recipe |= {f.name: value}
    with pytest.raises(ConfigError) as error:
        make_config(recipe)
    message = str(error.value)
    assert _flag_of(kind, owner, f) in message, message
    assert "\n" not in message


@pytest.mark.parametrize("kind,owner,f,value", [c for c in CASES if c.values[0] != "run"])
def test_every_option_refuses_a_bad_value_from_python(kind, owner, f, value):
    options = get_method_class(owner).Options if kind == "method" else owner.Options
    with pytest.raises(ConfigError, match=_flag_of(kind, owner, f)):
        options(**{f.name: value})


def test_the_walk_covers_every_option_of_every_method_and_stage():
    named = {(c.values[0], c.values[2].name) for c in CASES}
    for method in available_methods():
        for f in dataclasses.fields(get_method_class(method).Options):
            assert ("method", f.name) in named
    for stage in registered_stages():
        for f in dataclasses.fields(stage.Options):
            assert ("stage", f.name) in named
    assert len(CASES) > 100


def test_sparsegpt_blocksize_0_in_a_recipe_is_a_config_error_naming_the_option():
    recipe = {"model": "m", "method": "sparsegpt", "method_options": {"blocksize": 0}}
    with pytest.raises(ConfigError, match="--blocksize must be at least 1, got 0"):
        make_config(recipe)


def test_a_bad_safe_init_fails_when_the_config_is_made():
    with pytest.raises(ConfigError, match="--init takes dense, wanda, sparsegpt"):
        make_config({"model": "m", "method": "safe", "method_options": {"init": "magnitude"}})


def test_a_bad_flag_value_is_refused_by_the_options_with_exit_2(tmp_path, capsys):
    argv = ["prune", "--model", "m", "--dataset", "builtin-c4", "--method", "safe+"]
    assert cli.main([*argv, "--joint-holdout", "1.5"]) == 2
    assert "--joint-holdout must be below 1, got 1.5" in capsys.readouterr().err
    assert cli.main([*argv, "--recover-kl-chunk", "0"]) == 2
    assert "--recover-kl-chunk must be at least 1, got 0" in capsys.readouterr().err


def test_ints_become_floats_and_good_values_pass_once_checked():
    config = make_config({"model": "m", "method": "safe", "method_options": {"lr": 1}})
    assert config.method_options.lr == 1.0 and isinstance(config.method_options.lr, float)
    assert config.joint.holdout == 0.125


def test_the_kl_chunk_help_says_what_the_memory_planner_counts():
    from safe_llm.stages.recover import plan
    from safe_llm.stages.recover.options import RecoverOptions

    (kl_chunk,) = [f for f in dataclasses.fields(RecoverOptions) if f.name == "kl_chunk"]
    assert f"{plan.KL_TENSORS} x chunk x vocab x 4 bytes" in kl_chunk.metadata["help"]


@pytest.mark.parametrize(
    "given, tokens", [("2M", 2_000_000), ("500k", 500_000), ("65536", 65536), ("1.5G", 1.5e9)]
)
def test_recover_tokens_reads_k_m_g_suffixes_from_a_flag_or_a_recipe(given, tokens):
    config = make_config({"model": "m", "recover": {"tokens": given}})
    assert config.recover.tokens == tokens and isinstance(config.recover.tokens, int)
    args = cli.parse_args(["recover", "ckpt", "--output", "o", "--recover-tokens", given])
    assert make_config({"model": "m"}, {"recover_tokens": args.recover_tokens}).recover.tokens == (
        tokens
    )

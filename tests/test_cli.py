"""The ``safe-llm`` command line and the ``safe_llm.prune`` Python API, on a tiny local model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import safe_llm
from safe_llm import cli, pipeline
from safe_llm.config import RunConfig, load_recipe, make_config
from safe_llm.stages.prune import loop

LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@pytest.fixture
def model_dir(save_tiny_model):
    return save_tiny_model()


@pytest.fixture
def base_args(model_dir, calibration_file):
    """A fast prune run: 4 windows x 16 tokens of the local calibration file."""
    return [
        "prune",
        "--model",
        str(model_dir),
        "--dataset",
        str(calibration_file),
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--batch-size",
        "2",
    ]


def _prune_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["prune"]


def _tree(path):
    """Every path under ``path`` with its bytes (None for directories)."""
    return {
        p.relative_to(path): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# --version, --help
# --------------------------------------------------------------------------------------------


def test_version_flag_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"safe-llm {safe_llm.__version__}"


def test_python_dash_m_safe_llm_is_the_safe_llm_command():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "safe_llm", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == f"safe-llm {safe_llm.__version__}"


def test_modules_read_the_version_from_its_own_module_not_from_the_package():
    package = Path(safe_llm.__file__).parent
    readers = [
        p.name for p in package.rglob("*.py") if "from safe_llm import __version__" in p.read_text()
    ]
    assert readers == []
    assert safe_llm.__version__ == __import__("safe_llm.version").version.__version__


def test_prune_help_lists_every_config_and_method_option_with_help_text(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    parser = _prune_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    flags = {a.dest: a for a in options}
    expected = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("cli", True)}
    expected |= {cli.OPTION_DEST + name for name in cli._method_option_fields()} - {
        cli.OPTION_DEST + name for name in expected
    }
    expected |= {"recipe", "quiet", "method_option_pairs"}
    assert expected <= set(flags), f"options without a flag: {expected - set(flags)}"
    for action in options:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in help_text, f"{flag} missing from prune --help"


# --------------------------------------------------------------------------------------------
# a full run
# --------------------------------------------------------------------------------------------


def test_prune_run_writes_checkpoint_with_tokenizer_recipe_report_and_sparsity_config(
    base_args, tmp_path, capsys
):
    out = tmp_path / "out"
    assert cli.main([*base_args, "--output", str(out)]) == 0
    assert f"checkpoint written to {out}" in capsys.readouterr().out

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "report.json"} <= names
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert not [n for n in names if n.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left"

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "safe+" and report["sparsity"] == 0.5
    assert [b["index"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:
        assert set(block["layer_sparsity"]) == set(LAYERS)
        assert all(s == 0.5 for s in block["layer_sparsity"].values())
        assert set(block["layer_error"]) == set(LAYERS)
        assert math.isfinite(block["reconstruction_error"]) and block["reconstruction_error"] > 0
        assert block["seconds"] > 0
    assert 0 < report["seconds"] <= report["total_seconds"]
    assert report["peak_memory_bytes"] > 0
    assert report["overall_sparsity"] == 0.5

    config = json.loads((out / "config.json").read_text())
    meta = config["safe_llm_sparsity"]
    assert meta["method"] == "safe+"  # the default method
    assert meta["structure"] == "unstructured"
    assert meta["sparsity"] == 0.5
    assert meta["overall_sparsity"] == 0.5

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"] == base_args[2] and recipe["nsamples"] == 4 and recipe["seqlen"] == 16
    assert recipe["sparsity"] == 0.5  # the resolved value, not the unset default


def test_recipe_supplies_options_and_flags_override_it(base_args, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: sparsegpt\n"
        "sparsity: 0.25\n"
        "nsamples: 3\n"
        "seed: 7\n"
        "ignore: [mlp.down_proj]\n"
        "method_options:\n"
        "  blocksize: 16\n"
        "  damping: 1e-2\n"
    )
    out = tmp_path / "out"
    # --nsamples 4 and --seqlen 16 of base_args override the recipe's nsamples too
    argv = [*base_args, "--recipe", str(recipe), "--sparsity", "0.75", "--blocksize", "8"]
    assert cli.main([*argv, "--output", str(out), "--quiet"]) == 0

    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["method"] == "sparsegpt"  # from the recipe
    assert written["seed"] == 7 and written["ignore"] == ["mlp.down_proj"]  # from the recipe
    assert written["sparsity"] == 0.75  # flag beats recipe
    assert written["nsamples"] == 4  # flag beats recipe
    assert written["method_options"] == {"blocksize": 8, "damping": 0.01}  # merged per key

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sparsegpt" and report["calibration"]["nsamples"] == 4
    assert report["calibration"]["seed"] == 7
    for block in report["blocks"]:
        assert "mlp.down_proj" not in block["layer_sparsity"]
        assert all(s == 0.75 for s in block["layer_sparsity"].values())


def test_written_recipe_is_the_one_used_rerunning_it_reproduces_the_weights(base_args, tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    argv = [*base_args, "--method", "sparsegpt", "--structure", "2:4", "--seed", "3", "--quiet"]
    assert cli.main([*argv, "--output", str(first)]) == 0
    # only the output changes: everything else comes from the written recipe
    rerun = ["prune", "--recipe", str(first / "recipe.yaml"), "--output", str(second), "--quiet"]
    assert cli.main(rerun) == 0
    a, b = (load_file(d / "model.safetensors") for d in (first, second))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    recipe_a = load_recipe(first / "recipe.yaml")
    recipe_b = load_recipe(second / "recipe.yaml")
    assert {**recipe_a, "output": None} == {**recipe_b, "output": None}
    assert make_config({**recipe_a, "output": None}).pattern().structure == "2:4"


def test_recipe_reads_unquoted_nm_structure_as_text_not_a_base60_number(base_args, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("structure: 2:4\n")  # YAML 1.1 would read this as the integer 124
    out = tmp_path / "out"
    assert cli.main([*base_args, "--recipe", str(recipe), "--output", str(out), "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["pattern"] == "2:4"


def test_python_api_prune_returns_pruned_model_and_report(model_dir, calibration_file, tmp_path):
    model, report = safe_llm.prune(
        str(model_dir),
        method="magnitude",
        sparsity=0.5,
        dataset=str(calibration_file),
        nsamples=2,
        seqlen=16,
        progress=False,
    )
    assert isinstance(model, torch.nn.Module)
    assert report["method"] == "magnitude" and report["overall_sparsity"] == 0.5
    for name, param in model.named_parameters():
        if name.startswith("model.layers.") and param.ndim == 2:
            assert float((param == 0).float().mean()) == 0.5, name
    assert not list(tmp_path.glob("out*")), "the API wrote without output="


def test_python_api_writes_a_checkpoint_when_output_is_given(model_dir, calibration_file, tmp_path):
    out = tmp_path / "api-out"
    _, report = safe_llm.prune(
        str(model_dir), dataset=str(calibration_file), nsamples=2, seqlen=16, output=str(out)
    )
    assert json.loads((out / "report.json").read_text())["blocks"] == report["blocks"]


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written, and no expensive work first
# --------------------------------------------------------------------------------------------


@pytest.fixture
def forbid(monkeypatch):
    """forbid(stage): make the work after ``stage`` blow up if the run gets that far.

    "config": loading the model is forbidden; "model": calibration data is forbidden;
    "data": pruning is forbidden.
    """

    def boom(*args, **kwargs):
        raise AssertionError("bad input was detected too late: expensive work already started")

    def apply(stage: str):
        targets = ["load_model", "calibration_windows", "prune_model"]
        for target in targets[["config", "model", "data"].index(stage) :]:
            if target == "calibration_windows":
                monkeypatch.setattr(pipeline.data, target, boom)
            elif target == "prune_model":
                monkeypatch.setattr(loop, target, boom)
            else:
                monkeypatch.setattr(pipeline, target, boom)

    return apply


SHORT_TEXT = Path(__file__).parent / "data" / "short.txt"  # fewer tokens than one window
BAD_INPUTS = {
    "sparsity 0": (["--sparsity", "0"], "config", "sparsity"),
    "sparsity 1": (["--sparsity", "1"], "config", "sparsity"),
    "sparsity -0.1": (["--sparsity=-0.1"], "config", "sparsity"),
    "sparsity 1.5": (["--sparsity", "1.5"], "config", "sparsity"),
    "sparsity nan": (["--sparsity", "nan"], "config", "sparsity"),
    "N:M with N == M": (["--structure", "4:4"], "config", "4:4"),
    "N:M with N > M": (["--structure", "6:4"], "config", "6:4"),
    "N:M contradicting sparsity": (["--structure", "2:4", "--sparsity", "0.6"], "config", "2:4"),
    "in-features not divisible by M": (["--structure", "2:3"], "model", "not divisible by M=3"),
    "option of another method": (["--blocksize", "8"], "config", "blocksize"),
    "nsamples 0": (["--nsamples", "0"], "config", "nsamples"),
    "joint window of 0 blocks": (["--joint-blocks", "0"], "config", "--joint-blocks"),
    "joint epochs 0": (["--joint-blocks", "2", "--joint-epochs", "0"], "config", "--joint-epochs"),
    "joint lr nan": (["--joint-blocks", "2", "--joint-lr", "nan"], "config", "--joint-lr"),
    "too little calibration text": (
        ["--dataset", str(SHORT_TEXT), "--seqlen", "200"],
        "data",
        "too little text",
    ),
    "seqlen beyond the context": (["--seqlen", "100000"], "config", "maximum length 256"),
    "missing calibration file": (["--dataset", "/nonexistent/cal.txt"], "config", "cal.txt"),
    "missing eval file": (["--eval", "./nonexistent.jsonl"], "config", "nonexistent.jsonl"),
    "missing recipe": (["--recipe", "/nonexistent/recipe.yaml"], "config", "recipe"),
}


@pytest.mark.parametrize("quiet", [False, True], ids=["verbose", "quiet"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_option_fails_with_one_error_line_exit_2_and_writes_nothing(
    case, quiet, base_args, tmp_path, capsys, forbid
):
    extra, stage, needle = BAD_INPUTS[case]
    forbid(stage)
    out = tmp_path / "out"
    before = _tree(tmp_path)
    rc = cli.main([*base_args, *extra, "--output", str(out), *(["--quiet"] if quiet else [])])
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert rc == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("safe-llm: error: ") and needle in lines[0], lines[0]
    assert not out.exists()
    assert _tree(tmp_path) == before


def test_unknown_method_is_an_argparse_error_with_exit_2(base_args, tmp_path, capsys, forbid):
    forbid("config")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main([*base_args, "--method", "pruneall", "--output", str(out)])
    assert exc.value.code == 2
    assert "invalid choice: 'pruneall'" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_method_in_recipe_fails_with_one_error_line(base_args, tmp_path, capsys, forbid):
    forbid("config")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: pruneall\n")
    out = tmp_path / "out"
    assert cli.main([*base_args, "--recipe", str(recipe), "--output", str(out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: ")
    assert "pruneall" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "recipe_text, needle",
    [
        ("sparsity: half\n", "sparsity"),
        ("seed: 2.5\n", "seed"),
        ("spars1ty: 0.5\n", "spars1ty"),
        ("- a\n- list\n", "mapping"),
        ("sparsity: [0.5\n", "YAML"),
        ("method: sparsegpt\nmethod_options: {damping: lots}\n", "damping"),
    ],
    ids=["string sparsity", "float seed", "unknown key", "not a mapping", "bad yaml", "bad opt"],
)
def test_bad_recipe_fails_with_one_error_line_naming_the_problem(
    recipe_text, needle, base_args, tmp_path, capsys, forbid
):
    forbid("config")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    assert cli.main([*base_args, "--recipe", str(recipe), "--output", str(out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: ") and needle in lines[0]
    assert not out.exists()


def test_missing_model_path_fails_before_loading_anything(
    calibration_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    argv = ["prune", "--model", str(missing), "--dataset", str(calibration_file)]
    assert cli.main([*argv, "--output", str(out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: ")
    assert str(missing) in lines[0]
    assert not out.exists() and not missing.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_model_with_non_finite_weight_fails_before_calibration(
    value, save_tiny_model, calibration_file, tmp_path, capsys, forbid
):
    forbid("model")
    bad = save_tiny_model("bad-model", poison=("model.layers.1.mlp.up_proj.weight", value))
    out = tmp_path / "out"
    argv = ["prune", "--model", str(bad), "--dataset", str(calibration_file), "--seqlen", "16"]
    assert cli.main([*argv, "--output", str(out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: ")
    assert "model.layers.1.mlp.up_proj.weight" in lines[0] and "NaN or Inf" in lines[0]
    assert not out.exists()


def test_non_empty_output_dir_is_refused_and_left_untouched(base_args, tmp_path, capsys, forbid):
    forbid("config")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("precious")
    before = _tree(tmp_path)
    assert cli.main([*base_args, "--output", str(out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--overwrite" in lines[0]
    assert _tree(tmp_path) == before


def test_overwrite_flag_replaces_non_empty_output_dir(base_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("stale")
    assert cli.main([*base_args, "--output", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "results.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_empty_output_dir_is_accepted_without_overwrite(base_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main([*base_args, "--output", str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "with --overwrite"])
@pytest.mark.parametrize("where", ["same", "same with slash", "parent"])
def test_output_dir_that_is_or_contains_the_input_model_is_refused(
    where, overwrite, base_args, model_dir, tmp_path, capsys, forbid
):
    forbid("config")
    out = {"same": str(model_dir), "same with slash": f"{model_dir}/", "parent": str(tmp_path)}
    before = _tree(tmp_path)
    argv = [*base_args, "--output", out[where], *(["--overwrite"] if overwrite else [])]
    assert cli.main(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: --output")
    assert _tree(tmp_path) == before


def test_output_that_is_a_file_is_refused(base_args, tmp_path, capsys, forbid):
    forbid("config")
    out = tmp_path / "out"
    out.write_text("not a directory")
    assert cli.main([*base_args, "--output", str(out), "--overwrite"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert out.read_text() == "not a directory"


def test_multi_line_library_error_is_printed_on_one_line(base_args, monkeypatch, capsys):
    from safe_llm.io.models import ModelError

    def fail(*args, **kwargs):
        raise ModelError("cannot load:\nfirst reason\n\n  second reason")

    monkeypatch.setattr(pipeline, "load_model", fail)
    assert cli.main(base_args) == 2
    err = capsys.readouterr().err
    assert err == "safe-llm: error: cannot load: first reason second reason\n"


@pytest.mark.parametrize(
    "recipe",
    sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
    ids=lambda path: path.name,
)
def test_every_shipped_recipe_is_a_valid_configuration_that_keeps_its_values(recipe):
    values = load_recipe(recipe)
    written = make_config(values).to_dict()  # builds (and checks) every sub-config
    for key, value in values.items():  # no value dropped or changed on the way
        for name, given in value.items() if isinstance(value, dict) else [(None, value)]:
            kept = written[key][name] if name is not None else written[key]
            assert kept == given, f"{recipe.name}: {key} {name or ''}"


# --------------------------------------------------------------------------------------------
# method options named like a run option or like another method's option
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clashing_method(monkeypatch):
    """A method whose options are named like a run option (``seed``) and like SAFE's ``lr``
    (but an int with another default)."""
    from safe_llm.methods import METHODS, available_methods
    from safe_llm.methods.base import PruningMethod

    available_methods()

    @dataclasses.dataclass
    class Options:
        seed: int = dataclasses.field(default=7, metadata={"help": "the method's own seed"})
        lr: int = dataclasses.field(default=3, metadata={"help": "an integer step"})

    class Clash(PruningMethod):
        name = "clash"

    Clash.Options = Options
    monkeypatch.setitem(METHODS, "clash", Clash)
    return Clash


def test_method_options_named_like_run_options_or_other_methods_options_all_reach_the_method(
    clashing_method, base_args
):
    parser = cli.build_parser()  # used to raise: --seed registered twice
    args = parser.parse_args([*base_args, "--method", "clash", "--seed", "5", "--lr", "2"])
    config = cli._config_from_args(args)
    assert config.seed == 5 and (config.method_options.lr, config.method_options.seed) == (2, 7)
    assert isinstance(config.method_options.lr, int)
    args = parser.parse_args([*base_args, "--method", "clash", "--method-option", "seed=11"])
    assert cli._config_from_args(args).method_options.seed == 11
    args = parser.parse_args([*base_args, "--method", "safe", "--lr", "2"])
    lr = cli._config_from_args(args).method_options.lr
    assert lr == 2.0 and isinstance(lr, float)


# --------------------------------------------------------------------------------------------
# start-up without torch; --output checked before the model loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--version"], 0),
        (["--help"], 0),
        (["eval", "--help"], 0),
        (["recover", "--help"], 0),
        (["prune", "--sparsity", "abc"], 2),
        (["prune", "--joint-blocks", "x"], 2),
        (["prune", "--sparsity-profile", "bogus"], 2),
        (["nocommand"], 2),
    ],
    ids=[
        "version",
        "help",
        "eval help",
        "recover help",
        "bad sparsity",
        "bad stage flag",
        "bad choice",
        "bad command",
    ],
)
def test_help_version_and_argument_errors_are_answered_without_importing_torch(argv, code):
    script = (
        "import sys\nfrom safe_llm import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.stdout.split()[-3:] == [str(code), "False", "False"], run.stderr[-2000:]


@pytest.mark.parametrize("parent", ["file", "read-only"])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(
    parent, base_args, tmp_path, capsys, forbid
):
    forbid("config")
    if parent == "file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    assert cli.main([*base_args, "--output", str(out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(out) in lines[0] and "choose another --output" in lines[0]


def test_every_flag_of_every_subcommand_has_a_help_text():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        (name, action.option_strings)
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.help
    ]
    assert missing == []


def test_every_recipe_reader_reads_yaml_1_2_numbers(tmp_path):
    """A checkpoint's recipe.yaml is read like a --recipe (``1e-3`` a float, ``2:4`` text) by
    ``safe-llm recover`` and ``safe-llm report`` alike."""
    from safe_llm.evaluation.compare import load_run
    from safe_llm.pipeline import read_checkpoint_record

    (tmp_path / "recipe.yaml").write_text("model: m\nstructure: 2:4\nrecover:\n  lr: 1e-3\n")
    (tmp_path / "report.json").write_text('{"method": "magnitude"}')
    recipe, _ = read_checkpoint_record(tmp_path)
    assert recipe["structure"] == "2:4" and recipe["recover"]["lr"] == 1e-3
    assert load_run(tmp_path).recipe == recipe


@pytest.mark.parametrize(
    "method, flags, expected",
    [("wanda", [], False), ("sparsegpt", [], True), ("wanda", ["--layer-errors"], True)],
)
def test_layer_errors_are_on_where_the_method_gathers_x_t_x_and_the_report_says_which(
    base_args, tmp_path, method, flags, expected
):
    out = tmp_path / "out"
    argv = [*base_args, "--method", method, *flags, "--output", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layer_errors"] is expected
    assert [bool(b["layer_error"]) for b in report["blocks"]] == [expected, expected]

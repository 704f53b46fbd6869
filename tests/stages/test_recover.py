"""End-to-end sparse recovery (``--recover distill``, ``safe-llm recover``) on tiny models."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from safe_llm import cli
from safe_llm.stages.recover import loop
from safe_llm.stages.recover.loss import chunked_kl_backward
from safe_llm.stages.recover.options import RecoverOptions, RecoveryError
from safe_llm.stages.recover.parameters import sparsity_masks
from safe_llm.train import masked_adam as lean_adam


def _pruned_pair(make_tiny_llama, structure: str = "unstructured", sparsity: float = 0.5):
    """(student, teacher): a tiny Llama pruned by magnitude per matrix (``sparsity`` or 2:4),
    and a dense copy with sharpened logits so the KL is far from zero."""
    from safe_llm.core.sparsity import SparsityPattern

    teacher = make_tiny_llama(seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    student = copy.deepcopy(teacher)
    pattern = SparsityPattern.parse(structure, sparsity if structure == "unstructured" else None)
    with torch.no_grad():
        for module in student.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(pattern.keep_mask(module.weight.abs()))
    return student, teacher


def _windows(n: int = 8, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_recovery_keeps_every_pruned_weight_exactly_zero(make_tiny_llama, structure):
    student, teacher = _pruned_pair(make_tiny_llama, structure)
    before = sparsity_masks(student)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    options = RecoverOptions(steps=6, lr=3e-3, batch_size=8)  # one batch: the loss falls
    report = loop.recover(student, teacher, _windows(), options, progress=False)
    after = sparsity_masks(student)
    assert set(after) == set(before) and len(before) == 14
    for name in before:
        assert torch.equal(after[name], before[name]), name
        zeros = student.get_parameter(name)[before[name]]
        assert torch.equal(zeros.view(torch.int32), torch.zeros_like(zeros).view(torch.int32))
    moved = [n for n in before if not torch.equal(student.get_parameter(n), weights[n])]
    assert len(moved) == len(before)  # every kept weight trained
    assert report.losses[-1] < report.losses[0]


def test_recovery_with_lr_zero_returns_the_input_weights_exactly(make_tiny_llama):
    student, teacher = _pruned_pair(make_tiny_llama)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    loop.recover(student, teacher, _windows(), RecoverOptions(steps=3, lr=0.0), progress=False)
    for name, param in student.named_parameters():
        assert torch.equal(param, weights[name]), name


def _independent_kl(student, teacher, windows) -> float:
    """Mean over tokens of sum_v p_teacher * (log p_teacher - log p_student), full logits."""
    with torch.no_grad():
        t = teacher(input_ids=windows).logits.double()
        s = student(input_ids=windows).logits.double()
    p = torch.softmax(t, -1)
    return float((p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean())


@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_chunked_kl_equals_an_independently_written_kl(make_tiny_llama, chunk):
    student, teacher = _pruned_pair(make_tiny_llama)
    windows = _windows()
    expected = _independent_kl(student, teacher, windows)
    options = RecoverOptions(
        steps=1, lr=0.0, batch_size=len(windows), kl_chunk=chunk, autocast="off"
    )
    report = loop.recover(student, teacher, windows, options, progress=False)
    assert expected > 1e-3
    assert report.losses[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seq, chunk", [(7, 3), (40, 37)])  # chunks shorter and longer than KL_ROWS
def test_chunked_kl_gradient_equals_the_full_logits_gradient(make_tiny_llama, seq, chunk):
    student, teacher = _pruned_pair(make_tiny_llama)
    hidden = torch.randn(2, seq, 32)
    target = torch.randn(2, seq, 32)
    loss, grad = chunked_kl_backward(
        hidden, target, student.lm_head, teacher.lm_head, chunk=chunk, scale=1 / (2 * seq)
    )
    leaf = hidden.clone().requires_grad_()
    log_q = F.log_softmax(student.lm_head(leaf), -1)
    log_p = F.log_softmax(teacher.lm_head(target), -1).detach()
    full = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    full.backward()
    assert loss == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(grad, leaf.grad, atol=1e-6)


def _independent_hidden_error(student, teacher, windows) -> float:
    """Mean over tokens of sum over blocks of ||s - t||^2 / ||t||^2: the block outputs are
    transformers' hidden states 1..L-1 and the final norm's input."""

    def block_outputs(model):
        last = []
        handle = model.model.norm.register_forward_pre_hook(lambda m, a: last.append(a[0]))
        with torch.no_grad():
            states = model(input_ids=windows, output_hidden_states=True).hidden_states
        handle.remove()
        return [h.double() for h in (*states[1:-1], last[0])]

    total = 0.0
    for s, t in zip(block_outputs(student), block_outputs(teacher), strict=True):
        total += float(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean())
    return total


def test_hidden_state_term_equals_an_independently_written_one(make_tiny_llama):
    student, teacher = _pruned_pair(make_tiny_llama)
    windows = _windows()
    kl = _independent_kl(student, teacher, windows)
    hidden = _independent_hidden_error(student, teacher, windows)
    options = RecoverOptions(
        steps=1, lr=0.0, batch_size=len(windows), hidden_weight=0.5, autocast="off"
    )
    report = loop.recover(student, teacher, windows, options, progress=False)
    assert hidden > 1e-3
    assert report.losses[0] == pytest.approx(kl + 0.5 * hidden, rel=1e-5)


def test_hidden_state_term_steps_the_same_with_and_without_gradient_checkpointing(
    make_tiny_llama,
):
    """A checkpointed block is recomputed in the backward: its output must count once."""
    results = []
    for checkpointing in (False, True):
        student, teacher = _pruned_pair(make_tiny_llama)
        options = RecoverOptions(
            steps=3,
            lr=1e-2,
            hidden_weight=1.0,
            gradient_checkpointing=checkpointing,
            autocast="off",
        )
        report = loop.recover(student, teacher, _windows(), options, progress=False)
        results.append((report.losses, dict(student.named_parameters())))
    (losses_off, weights_off), (losses_on, weights_on) = results
    assert losses_on == pytest.approx(losses_off, rel=1e-6)
    for name, param in weights_off.items():
        assert torch.allclose(weights_on[name], param, atol=1e-6), name


def test_a_non_finite_loss_stops_recovery_before_any_step(make_tiny_llama):
    student, teacher = _pruned_pair(make_tiny_llama)
    with torch.no_grad():
        teacher.model.norm.weight[0] = float("nan")
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    with pytest.raises(RecoveryError, match="not finite"):
        loop.recover(student, teacher, _windows(), RecoverOptions(steps=2), progress=False)
    for name, param in student.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_embeddings_and_lm_head_are_frozen_and_shared_with_the_teacher(make_tiny_llama):
    student, teacher = _pruned_pair(make_tiny_llama)
    head = student.lm_head.weight.detach().clone()
    report = loop.recover(
        student, teacher, _windows(), RecoverOptions(steps=2, lr=1e-2), progress=False
    )
    assert report.shared_with_teacher == ["input embeddings", "lm_head"]
    assert teacher.lm_head.weight is student.lm_head.weight
    assert torch.equal(student.lm_head.weight, head)
    assert not any(p.requires_grad for p in student.parameters())


def test_only_the_norms_train_when_asked(make_tiny_llama):
    student, teacher = _pruned_pair(make_tiny_llama)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    options = RecoverOptions(steps=2, lr=1e-2, train=["norms"])
    loop.recover(student, teacher, _windows(), options, progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all("norm" in n for n in changed)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "adam"])
def test_a_killed_recovery_resumes_to_the_same_weights_bit_for_bit(make_tiny_llama, tmp_path, lean):
    options = RecoverOptions(steps=6, lr=1e-2, batch_size=3, save_every=2, lean=lean)
    whole, teacher = _pruned_pair(make_tiny_llama)
    loop.recover(whole, teacher, _windows(), options, progress=False)

    killed, teacher = _pruned_pair(make_tiny_llama)
    calls = {"n": 0}
    real_step = loop.finish_step

    def dies_at_step_five(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "finish_step", dies_at_step_five)
        with pytest.raises(KeyboardInterrupt):
            loop.recover(killed, teacher, _windows(), options, state_dir=tmp_path, progress=False)
    resumed, teacher = _pruned_pair(make_tiny_llama)
    auto = replace(options, lean=None)  # auto resumes with the state that was saved
    report = loop.recover(resumed, teacher, _windows(), auto, state_dir=tmp_path, progress=False)
    assert report.resumed_from_step == 4 and report.optimizer == ("lean" if lean else "adam")
    for name, param in whole.named_parameters():
        assert torch.equal(resumed.get_parameter(name), param), name
    other, teacher = _pruned_pair(make_tiny_llama)
    with pytest.raises(RecoveryError, match="lean"):  # a state is resumed the way it was saved
        loop.recover(
            other,
            teacher,
            _windows(),
            replace(options, lean=not lean),
            state_dir=tmp_path,
            progress=False,
        )


@pytest.mark.parametrize("native", [False, True])
def test_auto_autocast_is_bf16_exactly_where_the_device_computes_it_natively(
    make_tiny_llama, monkeypatch, native
):
    monkeypatch.setattr(loop.precision, "native_bf16", lambda device: native)
    student, teacher = _pruned_pair(make_tiny_llama)
    before = sparsity_masks(student)
    report = loop.recover(
        student, teacher, _windows(), RecoverOptions(steps=6, lr=3e-3, batch_size=8), progress=False
    )
    assert report.autocast_bf16 is native
    assert report.losses[-1] < report.losses[0]
    for name, pruned in before.items():
        assert torch.equal(sparsity_masks(student)[name], pruned), name
        assert student.get_parameter(name).dtype == torch.float32


def _recovered_pair(make_tiny_llama, scale: float, step_scale: str):
    """(recovered student, recovered copy of it rescaled by ``scale`` before recovery)."""
    from rescale import rescale_norms

    options = RecoverOptions(
        steps=4, lr=3e-2, batch_size=8, step_scale=step_scale, grad_clip=0.0, autocast="off"
    )
    student, teacher = _pruned_pair(make_tiny_llama)
    rescaled = rescale_norms(copy.deepcopy(student), scale)
    loop.recover(student, teacher, _windows(), options, progress=False)
    loop.recover(rescaled, teacher, _windows(), options, progress=False)
    return student, rescaled


@pytest.mark.parametrize("step_scale, invariant", [("relative", True), ("absolute", False)])
def test_relative_recovery_steps_do_not_depend_on_the_weights_scale(
    make_tiny_llama, step_scale, invariant
):
    """A function-preserving rescaling (norm gains x 10, the layers reading them / 10) gives
    the same recovered weights (/ 10) with relative steps; absolute steps move the small
    weights 10x further in their own units."""
    student, rescaled = _recovered_pair(make_tiny_llama, 10.0, step_scale)
    q = student.model.layers[0].self_attn.q_proj.weight
    q_scaled = rescaled.model.layers[0].self_attn.q_proj.weight * 10.0
    close = torch.allclose(q_scaled, q, rtol=0, atol=2e-4)  # weights: RMS 0.02, max 0.06
    assert close is invariant
    ids = _windows(2)
    same = torch.allclose(rescaled(ids).logits, student(ids).logits, rtol=1e-3, atol=1e-3)
    assert same is invariant


def test_bf16_recovery_steps_from_the_updated_weights_not_a_stale_copy(make_tiny_llama):
    """autocast caches bf16 copies of the weights; one context around the whole loop would
    give step 2 the loss (and gradient) of the weights before step 1."""
    options = RecoverOptions(steps=2, lr=3e-2, batch_size=8, autocast="bf16", step_scale="absolute")
    windows = _windows()
    two, teacher = _pruned_pair(make_tiny_llama)
    report = loop.recover(two, teacher, windows, options, progress=False)
    one, teacher = _pruned_pair(make_tiny_llama)
    loop.recover(one, teacher, windows, replace(options, steps=1), progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after_one_step = _independent_kl(one, teacher, windows)
    assert abs(report.losses[1] - report.losses[0]) > 0.2 * report.losses[0]
    assert report.losses[1] == pytest.approx(after_one_step, rel=0.05)


# -- the command line -----------------------------------------------------------------------


def test_prune_with_recovery_writes_a_checkpoint_plain_transformers_loads(
    save_tiny_model, calibration_file, tmp_path, fast_prune_argv
):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model()
    plain, recovered = tmp_path / "plain", tmp_path / "recovered"
    assert cli.main(fast_prune_argv(model_dir, plain)) == 0
    extra = ["--recover", "--recover-steps", "3", "--recover-lr", "1e-2"]
    extra += ["--recover-batch-size", "4"]
    assert cli.main(fast_prune_argv(model_dir, recovered, *extra)) == 0
    report = json.loads((recovered / "report.json").read_text())
    assert report["recovery"]["method"] == "distill"
    assert report["recovery"]["tokens"] == 3 * 4 * 16
    assert report["recovery"]["dataset"] == str(calibration_file)
    card = (recovered / "README.md").read_text()
    assert "recovered end to end" in card and "192 tokens" in card
    model = AutoModelForCausalLM.from_pretrained(recovered)
    before, after = _weights(plain), model.state_dict()
    for name, tensor in before.items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert torch.equal(after[name] == 0, tensor == 0), name
            assert not torch.equal(after[name], tensor), name
    assert not (recovered / ".safe_llm_work").exists()


def test_recover_command_recovers_an_existing_checkpoint(
    save_tiny_model, fast_prune_argv, tmp_path
):
    model_dir = save_tiny_model()
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert cli.main(fast_prune_argv(model_dir, pruned)) == 0
    args = ["recover", "--quiet", str(pruned), "--output", str(recovered)]
    args += ["--recover-steps", "2", "--recover-lr", "1e-2", "--recover-train", "weights"]
    args += ["--recover-hidden-weight", "0.25"]
    assert cli.main(args) == 0
    report = json.loads((recovered / "report.json").read_text())
    assert report["recovery"]["steps"] == 2 and report["recovery"]["train"] == ["weights"]
    assert report["recovery"]["hidden_weight"] == 0.25
    assert "KL + 0.25 x block-output error" in (recovered / "README.md").read_text()
    assert report["method"] == "magnitude"
    before, after = _weights(pruned), _weights(recovered)
    for name in before:
        if name.endswith("proj.weight"):
            assert torch.equal(after[name] == 0, before[name] == 0), name
    assert cli.main(args) == 2  # the output exists: --overwrite needed


def test_recover_on_a_checkpoint_with_an_old_flat_recipe_names_the_keys_and_the_fix(
    save_tiny_model, fast_prune_argv, tmp_path, capsys
):
    import yaml

    pruned = tmp_path / "pruned"
    assert cli.main(fast_prune_argv(save_tiny_model(), pruned)) == 0
    recipe = yaml.safe_load((pruned / "recipe.yaml").read_text())
    recipe.pop("joint")
    recipe.update(joint_blocks=1, recover_options={})  # the flat keys of older versions
    (pruned / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = ["recover", "--quiet", str(pruned), "--output", str(tmp_path / "recovered")]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert (
        "recipe.yaml has options this safe-llm does not know (joint_blocks, recover_options)"
        in error
    )
    assert "older version" in error and "joint:" in error and "prune again" in error
    assert not (tmp_path / "recovered").exists()


@pytest.mark.slow  # torchrun subprocesses
def test_the_recover_command_under_torchrun_with_fsdp_equals_one_process(
    save_tiny_model, fast_prune_argv, torchrun_two, tmp_path
):
    model_dir = save_tiny_model()
    pruned = tmp_path / "pruned"
    assert cli.main(fast_prune_argv(model_dir, pruned)) == 0

    def recover_args(output):
        return [
            "recover",
            "--quiet",
            str(pruned),
            "--output",
            str(output),
            "--recover-steps",
            "3",
            "--recover-lr",
            "1e-2",
            "--recover-autocast",
            "off",
        ]

    assert cli.main(recover_args(tmp_path / "single")) == 0
    run = torchrun_two("-m", "safe_llm.cli", *recover_args(tmp_path / "fsdp"), "--recover-fsdp")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("checkpoint written to") == 1  # rank 0 alone reports and writes
    assert json.loads((tmp_path / "fsdp" / "report.json").read_text())["recovery"]["fsdp"]
    expected, got = _weights(tmp_path / "single"), _weights(tmp_path / "fsdp")
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-4), key
        assert torch.equal(got[key] == 0, expected[key] == 0), key


def test_recovery_options_are_validated(save_tiny_model, fast_prune_argv, tmp_path, capsys):
    model_dir = save_tiny_model()
    args = fast_prune_argv(model_dir, tmp_path / "o", "--recover")
    assert cli.main([*args, "--recover-lr", "-1"]) == 2
    assert "--recover-lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a choice argparse knows: its usage error
        cli.main([*args, "--recover-train", "embeddings"])
    assert exit_.value.code == 2 and "--recover-train" in capsys.readouterr().err
    assert cli.main([*args, "--recover-hidden-weight", "nan"]) == 2
    assert "--recover-hidden-weight" in capsys.readouterr().err
    assert cli.main([*args, "--recover-fsdp"]) == 2  # one process: nothing to shard over
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


@pytest.mark.slow  # torchrun subprocesses
@pytest.mark.parametrize("sharding", [[], ["--recover-fsdp"]], ids=["ddp", "fsdp"])
def test_two_process_recovery_equals_the_single_process_run(
    sharding, save_tiny_model, fast_prune_argv, torchrun_two, tmp_path
):
    model_dir = save_tiny_model()
    extra = ["--recover", "--recover-steps", "3", "--recover-lr", "1e-2"]
    extra += ["--recover-autocast", "off"]  # fp32: bf16 rounding depends on the batch split
    extra += ["--recover-hidden-weight", "0.25"]  # block hooks on the sharded blocks too
    single = tmp_path / "single"
    assert cli.main(fast_prune_argv(model_dir, single, *extra)) == 0
    parallel = tmp_path / "parallel"
    run = torchrun_two(
        "-m", "safe_llm.cli", *fast_prune_argv(model_dir, parallel, *extra, *sharding)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((parallel / "report.json").read_text())
    assert report["recovery"]["fsdp"] == bool(sharding)
    expected, got = _weights(single), _weights(parallel)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-4), key
        assert torch.equal(got[key] == 0, expected[key] == 0), key


@pytest.mark.slow  # torchrun subprocesses
def test_a_killed_fsdp_recovery_resumes_from_its_shards_to_the_same_weights_bit_for_bit(
    torchrun_two, tmp_path
):
    worker = Path(__file__).with_name("_fsdp_resume_worker.py")
    run = torchrun_two(str(worker), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok rank 0" in run.stdout and "ok rank 1" in run.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "recovery_weights.rank0-of-2.safetensors" in names, names
    assert "recovery_weights.rank1-of-2.safetensors" in names, names


# -- the lean optimiser state ----------------------------------------------------------------


@pytest.mark.parametrize(
    "structure, sparsity", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.3)]
)
@pytest.mark.parametrize("clip", [1e-3, 0.0], ids=["clipped", "unclipped"])
def test_the_lean_state_takes_the_same_steps_as_torch_adam(
    make_tiny_llama, structure, sparsity, clip
):
    """Packed moments and gradients taken by hooks change memory, not math: after 8 steps the
    weights equal torch.optim.Adam's over whole masked tensors to float tolerance (clipping
    on, at a limit the gradients exceed, and off; at 50% and 2:4 the gradients wait in the
    pruned entries, at 30% in buffers of their own)."""
    options = RecoverOptions(
        steps=8,
        lr=3e-3,
        batch_size=3,
        grad_clip=clip,
        autocast="off",
        step_scale="absolute",
        lean=True,
    )
    old, teacher = _pruned_pair(make_tiny_llama, structure, sparsity)
    report_old = loop.recover(
        old, teacher, _windows(), replace(options, lean=False), progress=False
    )
    lean, teacher = _pruned_pair(make_tiny_llama, structure, sparsity)
    stashed = []
    real_put = lean_adam._Slot.put

    def put(slot, grad):
        stashed.append(slot.stash)
        return real_put(slot, grad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lean_adam._Slot, "put", put)
        report = loop.recover(lean, teacher, _windows(), options, progress=False)
    assert (report_old.optimizer, report.optimizer) == ("adam", "lean")
    assert stashed.count(True) == (0 if sparsity == 0.3 else 8 * 14)  # 14 pruned layers
    assert report.losses == pytest.approx(report_old.losses, rel=1e-5)
    start, _ = _pruned_pair(make_tiny_llama, structure, sparsity)
    for name, param in old.named_parameters():
        got = lean.get_parameter(name)
        assert torch.allclose(got, param, rtol=1e-5, atol=1e-7), name
        assert torch.equal(got == 0, param == 0), name
    moved = lean.model.layers[0].mlp.up_proj.weight - start.model.layers[0].mlp.up_proj.weight
    assert moved.abs().max() > 5e-3  # the steps were not negligible (weights' RMS: 0.02)


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1,), (7, 3, 11)])
def test_a_bit_mask_unpacks_to_the_mask_it_packed(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    bits = lean_adam.BitMask(mask)
    assert torch.equal(bits.unpack(), mask)
    assert bits.count() == int(mask.sum())
    assert bits.bits.numel() == -(-mask.numel() // 8)  # one byte per 8 entries


def test_the_lean_state_holds_no_whole_gradient_and_frees_the_teacher(make_tiny_llama):
    """Between the backward and the step no trainable tensor has a ``.grad`` (each was packed
    by its hook and freed); with ``release_teacher`` every teacher tensor not shared with the
    student is freed once its hidden states are cached, and the shared ones are intact."""
    student, teacher = _pruned_pair(make_tiny_llama)
    embedding = student.model.embed_tokens.weight.detach().clone()
    seen = []
    real_step = loop.finish_step

    def finish(optimizer, params, *args):
        seen.append([name for name, p in params.items() if p.grad is not None])
        return real_step(optimizer, params, *args)

    options = RecoverOptions(steps=2, lr=1e-2, lean=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "finish_step", finish)
        report = loop.recover(
            student, teacher, _windows(), options, progress=False, release_teacher=True
        )
    assert seen == [[], []] and report.optimizer == "lean"
    assert teacher.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert teacher.model.norm.weight.device.type == "meta"
    assert teacher.lm_head.weight is student.lm_head.weight
    assert torch.equal(student.model.embed_tokens.weight, embedding)

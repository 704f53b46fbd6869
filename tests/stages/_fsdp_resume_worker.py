"""Run under ``torchrun --nproc-per-node 2``: an FSDP recovery killed at step 5 and resumed
from its per-rank state ends with the weights of an uninterrupted FSDP run, bit for bit.
Usage: torchrun ... tests/stages/_fsdp_resume_worker.py STATE_DIR (exit 0 and "ok" on success)."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from safe_llm.core import distributed
from safe_llm.core.sparsity import SparsityPattern
from safe_llm.stages.recover import loop
from safe_llm.stages.recover.options import RecoverOptions


def pruned_pair():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    teacher = LlamaForCausalLM(config).eval()
    student = copy.deepcopy(teacher)
    pattern = SparsityPattern.parse("unstructured", 0.5)
    with torch.no_grad():
        for module in student.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(pattern.keep_mask(module.weight.abs()))
    return student, teacher


def main(state_dir: str) -> None:
    distributed.init_from_env()
    windows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    options = RecoverOptions(
        steps=6, lr=1e-2, batch_size=4, save_every=2, fsdp=True, autocast="off"
    )
    whole, teacher = pruned_pair()
    loop.recover(whole, teacher, windows, options, progress=False)

    killed, teacher = pruned_pair()
    real_step, calls = loop.finish_step, {"n": 0}

    def dies_at_step_five(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args)

    loop.finish_step = dies_at_step_five
    try:
        loop.recover(killed, teacher, windows, options, state_dir=state_dir, progress=False)
        raise AssertionError("the recovery was not interrupted")
    except KeyboardInterrupt:
        pass
    loop.finish_step = real_step
    dist.barrier()
    resumed, teacher = pruned_pair()
    report = loop.recover(resumed, teacher, windows, options, state_dir=state_dir, progress=False)
    assert report.resumed_from_step == 4, report.resumed_from_step
    for name, param in whole.named_parameters():
        assert torch.equal(resumed.get_parameter(name), param), name
    print(f"ok rank {distributed.rank()}", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

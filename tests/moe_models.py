"""Tiny random mixture-of-experts models built with transformers' own classes (3 blocks, 8
experts, top-2), shared by the MoE tests of every package folder."""

from __future__ import annotations

import torch
import transformers

EXPERTS = 8
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# (config class, model class, config fields, the block weights left dense by design)
ARCHS = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8, head_dim=16),
        {"mlp.gate.weight"},
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=32, num_local_experts=8),
        {"mlp.gate.weight"},
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=8,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=16,
        ),
        {"mlp.router.weight"},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        {"mlp.gate.weight"},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            head_dim=16,
            shared_expert_intermediate_size=32,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        {"mlp.gate.weight", "mlp.shared_expert_gate.weight", "linear_attn.conv1d.weight"},
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=8,
            layer_types=["mamba", "attention", "mamba"],
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_expand=2,
            shared_intermediate_size=64,
        ),
        {"block_sparse_moe.router.weight", "mamba.conv1d.weight"},
    ),
    "llama4": (  # undeclared experts, transposed: the layout read from the shapes
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=32,
            intermediate_size_mlp=128,
            num_local_experts=8,
            head_dim=16,
            interleave_moe_layer_step=1,
        ),
        {"feed_forward.router.weight"},
    ),
}


def make_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    config_class, model_class, fields, _ = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        **COMMON, num_experts_per_tok=2, **fields, tie_word_embeddings=False
    )
    return getattr(transformers, model_class)(config).eval()


def make_windows(n: int = 8, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, COMMON["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(seed)
    )

"""transformers' KimiLinearForCausalLM as an oracle, and a writer of original-name checkpoints.

`make_reference(tmp, **shape)` builds a random transformers model (non-trivial norms, gates,
correction bias), writes it as a Kimi Linear checkpoint in the *original* tensor naming (the
names our loader reads; transformers renames them at load time) and returns both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import KimiLinearConfig, KimiLinearForCausalLM


def tf_config(num_layers=4, mla=(4,), first_dense=1, experts=8, topk=2, heads=2, head_dim=16,
              hidden=64, vocab=512, n_shared=1, n_group=1, topk_group=1) -> KimiLinearConfig:
    """A small transformers config; `mla` lists 1-indexed full-attention layers (like config.json)."""
    kda = [i for i in range(1, num_layers + 1) if i not in mla]
    return KimiLinearConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        num_local_experts=experts, num_experts_per_tok=topk, n_shared_experts=n_shared,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.446, norm_topk_prob=True,
        linear_attn_config={"full_attn_layers": list(mla), "kda_layers": kda, "head_dim": head_dim,
                            "num_heads": heads, "short_conv_kernel_size": 4},
        first_k_dense_replace=first_dense, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with healthy activations; every norm, gate and bias away from its init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1, 16, generator=g)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 2.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g))


def to_original_names(model: KimiLinearForCausalLM) -> dict[str, np.ndarray]:
    """transformers' state dict -> the Kimi Linear checkpoint's own tensor names."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        a = t.detach().cpu().numpy()
        if ".self_attn.conv1d.weight" in name:
            base = name.replace("conv1d.weight", "")
            for part, x in zip("qkv", np.split(a, 3, axis=0)):
                out[f"{base}{part}_conv1d.weight"] = x
        elif ".forget_gate." in name:
            out[name.replace("forget_gate.", "")] = a
        elif ".mlp.experts.gate_up_proj" in name:
            base = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
            inter = cfg.moe_intermediate_size
            for e in range(a.shape[0]):
                out[f"{base}{e}.w1.weight"] = a[e, :inter]
                out[f"{base}{e}.w3.weight"] = a[e, inter:]
        elif ".mlp.experts.down_proj" in name:
            base = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for e in range(a.shape[0]):
                out[f"{base}{e}.w2.weight"] = a[e]
        elif ".mlp.gate." in name or ".mlp.shared_experts." in name:
            out[name.replace(".mlp.", ".block_sparse_moe.")] = a
        else:
            out[name] = a
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_checkpoint(model: KimiLinearForCausalLM, directory: Path, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    d = model.config.to_dict()
    d["architectures"] = ["KimiLinearForCausalLM"]
    (directory / "config.json").write_text(json.dumps(d, default=str))
    tensors = to_original_names(model)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def make_reference(directory: Path, seed: int = 0, shards: int = 1, **shape):
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tf_config(**shape)).eval()
    randomize(model, seed)
    write_checkpoint(model, directory, shards=shards)
    return model


def tf_logits(model: KimiLinearForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def tf_greedy(model: KimiLinearForCausalLM, prompt, n: int) -> list[int]:
    """transformers' greedy continuation of one prompt (full forward per token: slow, exact)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(tf_logits(model, np.array([seq]))[0, -1].argmax()))
    return seq[len(prompt):]

"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek-V3-style sigmoid MoE.

MoE routing ("noaux_tc"): scores = sigmoid(x @ W_gate) in fp32; the correction bias is added
only to *choose* experts (grouped top-k); the weights are the unbiased scores of the chosen
experts, renormalised and scaled by routed_scaling_factor. `moe_biased_weights` reproduces the
original remote code, whose in-place add leaks the bias into the weights. Experts run as a
grouped matmul (`lax.ragged_dot`) over tokens sorted by expert, so the cost follows top-k,
not the expert count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.norms import dense_init


class MLP(nnx.Module):
    def __init__(self, hidden: int, inter: int, dtype, rngs: nnx.Rngs):
        self.gate_proj = dense_init(rngs, (hidden, inter), dtype)
        self.up_proj = dense_init(rngs, (hidden, inter), dtype)
        self.down_proj = dense_init(rngs, (inter, hidden), dtype)

    def __call__(self, x):
        return (jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])) @ self.down_proj[...]


def route(logits: jax.Array, bias: jax.Array, config: ModelConfig):
    """(expert ids [N, k], weights [N, k] fp32) from router logits [N, E] (fp32)."""
    c = config
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias
    if c.num_expert_group > 1:
        n, e = choice.shape
        grouped = choice.reshape(n, c.num_expert_group, e // c.num_expert_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                 # [N, G]
        _, top_groups = jax.lax.top_k(group_score, c.topk_group)
        keep = jnp.zeros_like(group_score, bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // c.num_expert_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, c.num_experts_per_token)
    w = jnp.take_along_axis(choice if c.moe_biased_weights else scores, idx, axis=-1)
    if c.moe_renormalize:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * c.routed_scaling_factor


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        dt = jnp.dtype(c.dtype)
        self.config = c
        e, d, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router = dense_init(rngs, (d, e), dt)
        self.correction_bias = nnx.Param(jnp.zeros((e,), jnp.float32))
        self.w1 = dense_init(rngs, (e, d, i), dt)   # gate
        self.w3 = dense_init(rngs, (e, d, i), dt)   # up
        self.w2 = dense_init(rngs, (e, i, d), dt)   # down
        self.shared = (MLP(d, i * c.num_shared_experts, dt, rngs) if c.num_shared_experts else None)

    def __call__(self, x):
        c = self.config
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n, k = xf.shape[0], c.num_experts_per_token
        logits = xf.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        idx, w = route(logits, self.correction_bias[...], c)
        # sort (token, slot) pairs by expert and run one grouped matmul per projection
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        tokens = order // k
        xs = xf[tokens]
        sizes = jnp.bincount(flat, length=c.num_experts).astype(jnp.int32)
        h = jax.nn.silu(jax.lax.ragged_dot(xs, self.w1[...], sizes)) * jax.lax.ragged_dot(xs, self.w3[...], sizes)
        ys = jax.lax.ragged_dot(h, self.w2[...], sizes)
        ys = ys.astype(jnp.float32) * w.reshape(-1)[order][:, None]
        y = jnp.zeros((n, shape[-1]), jnp.float32).at[tokens].add(ys).astype(x.dtype)
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.reshape(shape)

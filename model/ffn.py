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


BUFFERED_MAX_ROWS = 4096  # above this (prefill) only the grouped path is compiled (see below)


def expert_capacity(rows: int, experts: int) -> int | None:
    """Slots per expert for the buffered path: 4x the balanced load (at least 8, at most all rows),
    rounded to a power of two so a few shapes cover every batch. None for large row counts:
    there, compiling the grouped fallback inside a `lax.cond` made XLA plan for the dense
    all-experts product at once (a 36 GiB allocation at a 4K-token chunk of the 48B shape)."""
    if rows > BUFFERED_MAX_ROWS:
        return None
    want = max(8, -(-4 * rows // experts))
    return min(rows, 1 << (want - 1).bit_length())


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

    def experts(self, xs, expert, capacity: int | None):
        """SwiGLU expert outputs for rows `xs` [M, D] sorted by `expert` [M].

        With a capacity C, rows go into an [E, C, D] buffer and every expert runs one dense
        matmul over its C slots: the weights are read once and the FLOPs follow E*C, not E*M
        (on jax 0.10/0.11 `lax.ragged_dot` lowers to a dense product over all experts). When
        some expert receives more than C rows, the exact `ragged_dot` path runs instead, so
        the result never depends on the capacity."""
        e = self.config.num_experts
        sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
        w1, w3, w2 = self.w1[...], self.w3[...], self.w2[...]

        def grouped(_):
            h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
            return jax.lax.ragged_dot(h, w2, sizes)

        if capacity is None:
            return grouped(None)

        def buffered(_):
            rank = jnp.arange(xs.shape[0]) - (jnp.cumsum(sizes) - sizes)[expert]   # slot within expert
            buf = jnp.zeros((e, capacity, xs.shape[1]), xs.dtype).at[expert, rank].set(xs, mode="drop")
            h = jax.nn.silu(jnp.einsum("ecd,edi->eci", buf, w1)) * jnp.einsum("ecd,edi->eci", buf, w3)
            return jnp.einsum("eci,eid->ecd", h, w2)[expert, rank]

        return jax.lax.cond(jnp.max(sizes) <= capacity, buffered, grouped, None)

    def __call__(self, x):
        c = self.config
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n, k = xf.shape[0], c.num_experts_per_token
        logits = xf.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        idx, w = route(logits, self.correction_bias[...], c)
        # sort (token, slot) pairs by expert, then run the experts on them
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        tokens = order // k
        ys = self.experts(xf[tokens], flat[order], capacity=expert_capacity(n * k, c.num_experts))
        ys = ys.astype(jnp.float32) * w.reshape(-1)[order][:, None]
        y = jnp.zeros((n, shape[-1]), jnp.float32).at[tokens].add(ys).astype(x.dtype)
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.reshape(shape)

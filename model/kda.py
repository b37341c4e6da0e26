"""Kimi Delta Attention (KDA) layer: projections, short convs, gates, kernel call, gated norm.

    q, k = L2Norm(SiLU(ShortConv(W_q/k x)));  v = SiLU(ShortConv(W_v x))
    g    = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)        (per key channel, fp32)
    beta = sigmoid(b_proj(x))                                     (per head, fp32)
    o    = o_proj( RMSNorm_head(KDA(q, k, v, g, beta)) * w * sigmoid(g_b(g_a(x))) )

The recurrence itself lives in `jaxprfaas.pallas_kernels` (chunked for prefill, recurrent for
decode). Padded positions of a ragged batch get g = 0 and beta = 0, which leaves the recurrent
state untouched, so each row's final state is the one it would get alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.norms import dense_init, rms_normalize
from jaxprfaas.pallas_kernels import chunk_kda, fused_recurrent_kda


class KDA(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, h, k, w = config.hidden_size, config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
        dt = jnp.dtype(config.dtype)
        self.config = config
        self.q_proj = dense_init(rngs, (d, h * k), dt)
        self.k_proj = dense_init(rngs, (d, h * k), dt)
        self.v_proj = dense_init(rngs, (d, h * k), dt)
        # depthwise causal conv weights for the q|k|v channels, [3*H*K, W]; fp32 like vLLM.
        self.conv_weight = nnx.Param(
            jax.random.normal(rngs.params(), (3 * h * k, w), jnp.float32) / math.sqrt(w))
        self.f_a_proj = dense_init(rngs, (d, k), dt)
        self.f_b_proj = dense_init(rngs, (k, h * k), dt)
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), jnp.float32, 1.0, 16.0)))
        dt_init = jnp.exp(jax.random.uniform(rngs.params(), (h * k,), jnp.float32,
                                             math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nnx.Param(dt_init + jnp.log(-jnp.expm1(-dt_init)))  # inverse softplus
        self.b_proj = dense_init(rngs, (d, h), dt)
        self.g_a_proj = dense_init(rngs, (d, k), dt)
        self.g_b_proj = dense_init(rngs, (k, h * k), dt)
        self.o_norm = nnx.Param(jnp.ones((k,), dt))
        self.o_proj = dense_init(rngs, (h * k, d), dt)

    # ---- pieces shared by prefill and decode --------------------------------------------------
    def _gates(self, x: jax.Array):
        """Log-space forget gate g [..., H, K] and beta [..., H], both fp32."""
        c = self.config
        f = (x @ self.f_a_proj[...]) @ self.f_b_proj[...]
        f = f.astype(jnp.float32) + self.dt_bias[...]
        f = f.reshape(*f.shape[:-1], c.kda_num_heads, c.kda_head_dim)
        g = -jnp.exp(self.A_log[...])[:, None] * jax.nn.softplus(f)
        beta = jax.nn.sigmoid((x @ self.b_proj[...]).astype(jnp.float32))
        return g, beta

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        """Per-head RMSNorm of the KDA output, gated by sigmoid(g_b(g_a(x))), then o_proj."""
        c = self.config
        gate = ((x @ self.g_a_proj[...]) @ self.g_b_proj[...]).astype(jnp.float32)
        gate = gate.reshape(*gate.shape[:-1], c.kda_num_heads, c.kda_head_dim)
        y = rms_normalize(o, c.rms_norm_eps) * self.o_norm[...].astype(jnp.float32) * jax.nn.sigmoid(gate)
        y = y.astype(x.dtype).reshape(*x.shape[:-1], c.kda_dim)
        return y @ self.o_proj[...]

    def _qkv(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([x @ self.q_proj[...], x @ self.k_proj[...], x @ self.v_proj[...]], axis=-1)

    def _split_heads(self, y: jax.Array):
        c = self.config
        q, k, v = jnp.split(y, 3, axis=-1)
        shape = (*y.shape[:-1], c.kda_num_heads, c.kda_head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    # ---- prefill: x [B, T, D], valid [B, T] (right-padded), n_new [B] -------------------------
    def prefill(self, x, conv_tail, rec_state, valid, n_new, impl: str = "auto"):
        w = self.config.conv_kernel_size
        x = jnp.where(valid[..., None], x, 0).astype(x.dtype)
        mixed = self._qkv(x)                                          # [B, T, 3HK]
        xpad = jnp.concatenate([conv_tail.astype(mixed.dtype), mixed], axis=1)  # [B, W-1+T, C]
        t = x.shape[1]
        cw = self.conv_weight[...]
        y = sum(xpad[:, j:j + t].astype(jnp.float32) * cw[:, j] for j in range(w))
        y = jax.nn.silu(y).astype(x.dtype)
        # the new tail: the last W-1 inputs up to each row's last valid token
        new_tail = jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, w - 1, axis=0))(xpad, n_new)
        q, k, v = self._split_heads(y)
        g, beta = self._gates(x)
        g = jnp.where(valid[..., None, None], g, 0.0)
        beta = jnp.where(valid[..., None], beta, 0.0)
        o, new_state = chunk_kda(q, k, v, g, beta, initial_state=rec_state, output_final_state=True,
                                 use_qk_l2norm=True, impl=impl)
        return self._output(x, o), new_tail.astype(conv_tail.dtype), new_state

    # ---- decode: x [B, D] one token per row -----------------------------------------------------
    def decode(self, x, conv_tail, rec_state, impl: str = "auto"):
        mixed = self._qkv(x)                                          # [B, C]
        window = jnp.concatenate([conv_tail.astype(mixed.dtype), mixed[:, None]], axis=1)  # [B, W, C]
        y = jnp.einsum("bwc,cw->bc", window.astype(jnp.float32), self.conv_weight[...])
        y = jax.nn.silu(y).astype(x.dtype)
        q, k, v = self._split_heads(y[:, None])                      # [B, 1, H, K]
        g, beta = self._gates(x[:, None])
        o, new_state = fused_recurrent_kda(q, k, v, g, beta, initial_state=rec_state,
                                           output_final_state=True, use_qk_l2norm=True, impl=impl)
        return self._output(x, o[:, 0]), window[:, 1:].astype(conv_tail.dtype), new_state

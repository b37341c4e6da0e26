"""Multi-head Latent Attention with NoPE (DeepSeek-V2/V3 MLA without q-LoRA or rotation).

The cache per token is the 576-wide latent [c_kv (kv_lora_rank) | k_pe (rope dim)], never the
expanded K/V. Prefill expands the latent with kv_b_proj (expanded form); decode folds W_UK into
the query and W_UV after attention (absorbed form) so it reads only the latent cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.norms import RMSNorm, dense_init

_NEG = -1e30


class MLA(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        dt = jnp.dtype(c.dtype)
        self.config = c
        nh = c.num_attention_heads
        self.q_proj = dense_init(rngs, (c.hidden_size, nh * c.qk_head_dim), dt)
        self.kv_a_proj = dense_init(rngs, (c.hidden_size, c.latent_dim), dt)
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, c.kv_a_layernorm_eps, dt)
        self.kv_b_proj = dense_init(rngs, (c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim)), dt)
        self.o_proj = dense_init(rngs, (nh * c.v_head_dim, c.hidden_size), dt)

    @property
    def scale(self) -> float:
        return self.config.qk_head_dim ** -0.5

    def _q(self, x):
        c = self.config
        q = (x @ self.q_proj[...]).reshape(*x.shape[:-1], c.num_attention_heads, c.qk_head_dim)
        return q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]

    def latent(self, x):
        """The cache entry of each token: [kv_a_norm(c_kv) | k_pe]."""
        c = self.config
        ckv = x @ self.kv_a_proj[...]
        return jnp.concatenate([self.kv_a_norm(ckv[..., :c.kv_lora_rank]), ckv[..., c.kv_lora_rank:]], -1)

    def _kv_b(self):
        c = self.config
        w = self.kv_b_proj[...].reshape(c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim)
        return w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]   # W_UK, W_UV [R, H, d]

    # ---- prefill (expanded form): x [B, T, D]; cache [B, C, L] with old_len [B] valid rows ----
    def prefill(self, x, cache, old_len):
        c = self.config
        b, t, _ = x.shape
        new = self.latent(x).astype(cache.dtype)                         # [B, T, L]
        buf = jnp.concatenate([cache, jnp.zeros((b, t, c.latent_dim), cache.dtype)], axis=1)
        buf = jax.vmap(lambda a, n, s: jax.lax.dynamic_update_slice_in_dim(a, n, s, axis=0))(buf, new, old_len)
        q_nope, q_pe = self._q(x)
        w_uk, w_uv = self._kv_b()
        c_kv, k_pe = buf[..., :c.kv_lora_rank], buf[..., c.kv_lora_rank:]
        k_nope = jnp.einsum("bsr,rhd->bshd", c_kv, w_uk)
        v = jnp.einsum("bsr,rhd->bshd", c_kv, w_uv)
        s = (jnp.einsum("bthd,bshd->bhts", q_nope, k_nope)
             + jnp.einsum("bthd,bsd->bhts", q_pe, k_pe)).astype(jnp.float32) * self.scale
        pos_q = old_len[:, None] + jnp.arange(t)[None]                    # [B, T]
        mask = jnp.arange(buf.shape[1])[None, None, :] <= pos_q[:, :, None]  # [B, T, S]
        s = jnp.where(mask[:, None], s, _NEG)
        p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        o = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, -1)
        return o @ self.o_proj[...], buf

    # ---- decode (absorbed form): x [B, D]; cache [B, C, L]; the new token goes to row lengths[b]
    def decode(self, x, cache, lengths):
        c = self.config
        new = self.latent(x).astype(cache.dtype)                          # [B, L]
        cache = jax.vmap(lambda a, n, s: jax.lax.dynamic_update_slice_in_dim(a, n[None], s, axis=0))(
            cache, new, lengths)
        q_nope, q_pe = self._q(x)                                          # [B, H, dn], [B, H, dr]
        w_uk, w_uv = self._kv_b()
        q_lat = jnp.einsum("bhd,rhd->bhr", q_nope, w_uk)                   # absorb W_UK
        c_kv, k_pe = cache[..., :c.kv_lora_rank], cache[..., c.kv_lora_rank:]
        s = (jnp.einsum("bhr,bsr->bhs", q_lat, c_kv)
             + jnp.einsum("bhd,bsd->bhs", q_pe, k_pe)).astype(jnp.float32) * self.scale
        mask = jnp.arange(cache.shape[1])[None, :] <= lengths[:, None]     # [B, S]
        s = jnp.where(mask[:, None], s, _NEG)
        p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        ctx = jnp.einsum("bhs,bsr->bhr", p, c_kv)                          # latent context
        o = jnp.einsum("bhr,rhd->bhd", ctx, w_uv).reshape(x.shape[0], -1)  # absorb W_UV
        return o @ self.o_proj[...], cache

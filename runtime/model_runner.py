"""The model's compute, reshaped for serving: a paged decode step and a layer-wise prefill.

Both reuse the model's own layer modules (`HybridLM.layers[i]`), so the numbers are the model's:
  * `DecodeStep`: one token for each row of a padded batch, reading and writing the cache pool
    in place. KDA rows go through `fused_recurrent_kda` on pool slots (`state_indices`); MLA
    rows gather their pages into a [B, S, L] view (XLA gather) and run the model's absorbed
    decode; the new latent row is scattered back into its page. Sampling (model/generate.py's
    `sample_tokens`/`step_keys`) runs in the same program, so only token ids leave the device.
  * `LayerwisePrefill`: the model's `_prefill` loop body as one jitted function per block
    kind, so a hook can run between layers while the next layer computes (JAX dispatch is
    asynchronous: the hook gets arrays that are still being computed, and blocks only if it
    reads them).
Each jitted body bumps `trace_counts[name]` when traced: a new entry means a new XLA program,
which is how the tests pin "no recompilation after warm-up".
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprfaas.model.generate import sample_tokens, step_keys
from jaxprfaas.model.state import HybridState
from jaxprfaas.pallas_kernels import fused_recurrent_kda
from jaxprfaas.runtime.cache_pool import PoolArrays

trace_counts: collections.Counter = collections.Counter()


def use_triton_ragged_dot(enable: bool = True) -> bool:
    """Route `lax.ragged_dot` (the MoE's grouped matmul) through jax's Pallas-Triton lowering on GPU.

    The default GPU lowering of this jax computes every row against every expert (a dense dot
    over a masked [E, N, D] operand: 256x the FLOPs for top-8 of 256 experts), which was the
    bulk of both decode and prefill time on the H100 (benchmarks/RESULTS.md "## Engines").
    Off by default: on jax 0.11.2 (the H100 machine) the flag exists but the lowering it selects
    fails at trace time (ModuleNotFoundError: jax._src.lax.pallas_lowerings), so it cannot be
    used there. Returns whether the switch exists in this jax. The model's MoE has its own
    buffered path for decode-sized batches instead (model/ffn.py)."""
    name = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    if name not in jax.config.values:
        return False
    jax.config.update(name, bool(enable))
    return True


def select_ragged_dot(choice: str) -> str:
    """The benchmarks' `--ragged-dot xla|triton`: applies the choice and returns the one in effect
    ("triton" falls back to "xla", saying so, where this jax lacks the switch)."""
    if choice == "triton" and not use_triton_ragged_dot():
        print("this jax has no Pallas-Triton ragged_dot lowering; staying on xla", flush=True)
        return "xla"
    return choice


# ---- decode -------------------------------------------------------------------------------------

def _kda_decode_paged(attn, x, conv_pool, rec_pool, slots, impl):
    """The model's KDA.decode, but the conv tail and the recurrent state live in pool slots."""
    mixed = attn._qkv(x)                                              # [B, 3HK]
    safe = jnp.maximum(slots, 0)
    tail = conv_pool[safe]                                            # [B, W-1, 3HK]
    window = jnp.concatenate([tail.astype(mixed.dtype), mixed[:, None]], axis=1)
    y = jnp.einsum("bwc,cw->bc", window.astype(jnp.float32), attn.conv_weight[...])
    y = jax.nn.silu(y).astype(x.dtype)
    q, k, v = attn._split_heads(y[:, None])
    g, beta = attn._gates(x[:, None])
    o, rec_pool = fused_recurrent_kda(q, k, v, g, beta, initial_state=rec_pool, state_indices=slots,
                                      output_final_state=True, use_qk_l2norm=True, impl=impl)
    drop = jnp.where(slots >= 0, slots, conv_pool.shape[0])           # padding rows write nothing
    conv_pool = conv_pool.at[drop].set(window[:, 1:].astype(conv_pool.dtype), mode="drop")
    return attn._output(x, o[:, 0]), conv_pool, rec_pool


def _mla_decode_paged(attn, x, lat_pool, page_table, lengths, valid):
    """The new latent row is written into its page first, then the model's absorbed MLA.decode
    runs over the gathered pages. Write-then-read matters: a gather of the pool followed by a
    scatter into it makes XLA copy the whole (donated) pool every step."""
    b, n_pages = page_table.shape
    ps = lat_pool.shape[1]
    new = attn.latent(x).astype(lat_pool.dtype)                       # [B, L]: this token's row
    page = jnp.take_along_axis(page_table, (lengths // ps)[:, None], axis=1)[:, 0]
    page = jnp.where(valid, page, lat_pool.shape[0])
    lat_pool = lat_pool.at[page, lengths % ps].set(new, mode="drop")
    cache = lat_pool[page_table].reshape(b, n_pages * ps, lat_pool.shape[-1])   # [B, S, L] gather
    out, _ = attn.decode(x, cache, lengths)
    return out, lat_pool


def decode_body(model, arrays: PoolArrays, tokens, slots, page_table, lengths, impl: str):
    """Logits [B, V] fp32 and the updated pool for one token per row. slots < 0 marks padding."""
    valid = slots >= 0
    x = model.embed[...][tokens]
    rec, conv, lat = list(arrays.recurrent), list(arrays.conv), list(arrays.latent)
    ki = mi = 0
    for blk in model.layers:
        h = blk.input_norm(x)
        if blk.is_mla:
            a, lat[mi] = _mla_decode_paged(blk.attn, h, lat[mi], page_table, lengths, valid)
            mi += 1
        else:
            a, conv[ki], rec[ki] = _kda_decode_paged(blk.attn, h, conv[ki], rec[ki], slots, impl)
            ki += 1
        x = x + a
        x = x + blk.ffn(blk.post_norm(x))
    return model._logits(x), PoolArrays(tuple(rec), tuple(conv), tuple(lat))


@functools.partial(jax.jit, static_argnums=(0, 12), donate_argnums=(2,))
def _decode_sample(graphdef, params, arrays, tokens, slots, page_table, lengths,
                   temperature, top_k, top_p, seeds, steps, impl):
    trace_counts["decode"] += 1
    model = nnx.merge(graphdef, params)
    logits, arrays = decode_body(model, arrays, tokens, slots, page_table, lengths, impl)
    nxt = sample_tokens(logits, temperature, top_k, top_p, step_keys(seeds, steps))
    return nxt, arrays


class DecodeStep:
    """`step(arrays, batch...) -> (next tokens [B] int32, new arrays)`; the arrays are donated."""

    def __init__(self, model, impl: str = "auto"):
        self.graphdef, self.params = nnx.split(model)
        self.impl = impl

    def __call__(self, arrays, tokens, slots, page_table, lengths, temperature, top_k, top_p, seeds, steps):
        return _decode_sample(self.graphdef, self.params, arrays, tokens, slots, page_table, lengths,
                              temperature, top_k, top_p, seeds, steps, self.impl)


# ---- prefill ------------------------------------------------------------------------------------

def mla_prefill_blockwise(attn, x, cache, old_len, block: int):
    """MLA.prefill (expanded form) with an online softmax over key blocks of `block` rows.

    Same function as the model's, but the [B, H, T, S] score matrix is never built: each key
    block is expanded through kv_b_proj, scored, and folded into running (max, sum, output),
    so memory is O(T * block) and a 128K-token context fits beside the weights. Only the
    blocks that some query can see are visited (causal)."""
    c = attn.config
    b, t, _ = x.shape
    r, h, dv = c.kv_lora_rank, c.num_attention_heads, c.v_head_dim
    new = attn.latent(x).astype(cache.dtype)
    buf = jnp.concatenate([cache, jnp.zeros((b, t, c.latent_dim), cache.dtype)], axis=1)
    buf = jax.vmap(lambda a, n, s: jax.lax.dynamic_update_slice_in_dim(a, n, s, axis=0))(buf, new, old_len)
    kv = jnp.pad(buf, ((0, 0), (0, (-buf.shape[1]) % block), (0, 0)))
    q_nope, q_pe = attn._q(x)                                          # [B, T, H, dn], [B, T, H, dr]
    w_uk, w_uv = attn._kv_b()
    pos_q = old_len[:, None] + jnp.arange(t)[None]                     # [B, T]
    f32 = jnp.float32

    def body(i, carry):
        m, l, acc = carry                                              # [B,H,T], [B,H,T], [B,H,T,dv]
        blk = jax.lax.dynamic_slice_in_dim(kv, i * block, block, axis=1)
        c_kv, k_pe = blk[..., :r], blk[..., r:]
        k_nope = jnp.einsum("bsr,rhd->bshd", c_kv, w_uk)
        v = jnp.einsum("bsr,rhd->bshd", c_kv, w_uv)
        sc = (jnp.einsum("bthd,bshd->bhts", q_nope, k_nope)
              + jnp.einsum("bthd,bsd->bhts", q_pe, k_pe)).astype(f32) * attn.scale
        mask = (i * block + jnp.arange(block))[None, None, :] <= pos_q[:, :, None]   # [B, T, Bk]
        sc = jnp.where(mask[:, None], sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)            # rows that saw nothing yet
        p = jnp.exp(sc - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pv = jnp.einsum("bhts,bshd->bhtd", p.astype(x.dtype), v).astype(f32)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((b, h, t), -jnp.inf, f32), jnp.zeros((b, h, t), f32), jnp.zeros((b, h, t, dv), f32))
    n_live = (jnp.max(old_len) + t + block - 1) // block
    _, l, acc = jax.lax.fori_loop(0, n_live, body, init)
    o = (acc / jnp.maximum(l, 1e-30)[..., None]).astype(x.dtype)      # [B, H, T, dv]
    o = o.transpose(0, 2, 1, 3).reshape(b, t, h * dv)
    return o @ attn.o_proj[...], buf


def _block_prefill(blk, x, conv, rec, lat, old_len, n_new, impl, mla_block=None):
    """One block of HybridLM._prefill: (x, the block's new state arrays)."""
    valid = jnp.arange(x.shape[1])[None, :] < n_new[:, None]
    h = blk.input_norm(x)
    if blk.is_mla and mla_block:
        a, lat = mla_prefill_blockwise(blk.attn, h, lat, old_len, mla_block)
    elif blk.is_mla:
        a, lat = blk.attn.prefill(h, lat, old_len)
    else:
        a, conv, rec = blk.attn.prefill(h, conv, rec, valid, n_new, impl)
    x = x + a
    x = x + blk.ffn(blk.post_norm(x))
    return x, conv, rec, lat


@functools.partial(jax.jit, static_argnums=(0, 8, 9))
def _block_jit(graphdef, params, x, conv, rec, lat, old_len, n_new, impl, mla_block):
    trace_counts["prefill_block"] += 1
    return _block_prefill(nnx.merge(graphdef, params), x, conv, rec, lat, old_len, n_new, impl, mla_block)


@jax.jit
def _embed_jit(embed, tokens):
    trace_counts["prefill_embed"] += 1
    return embed[tokens]


@functools.partial(jax.jit, static_argnums=(0,))
def _last_logits_jit(norm_def, norm_params, w, x, n_new):
    """Logits of each row's last valid token only ([B, V]): the full [B, T, V] is never built."""
    trace_counts["prefill_logits"] += 1
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return (nnx.merge(norm_def, norm_params)(last) @ w).astype(jnp.float32)


LayerHook = Callable[[int, str, object, object], None]


class LayerwisePrefill:
    """`run(tokens [B,T], state, n_new [B], on_layer) -> (last-token logits [B, V], new state)`.

    `on_layer(layer, kind, a, b)` fires after each layer is dispatched, with that layer's new
    state: kind "kda" (a = recurrent [B,H,K,V], b = conv [B,W-1,3HK]) or "mla" (a = latent
    [B, C+T, L], b = None). Splitting the model per block also keeps compile time flat in depth:
    three programs (dense KDA, MoE KDA, MoE MLA blocks) instead of one unrolled 27-layer one.
    `mla_block` switches MLA layers to `mla_prefill_blockwise` (long prompts); None keeps the
    model's own MLA.prefill.
    """

    def __init__(self, model, impl: str = "auto", mla_block: int | None = None):
        self.model, self.impl, self.mla_block = model, impl, mla_block
        self.norm_def, self.norm_params = nnx.split(model.norm)
        self.blocks = [nnx.split(blk) for blk in model.layers]

    def run(self, tokens, state: HybridState, n_new, on_layer: LayerHook | None = None):
        m = self.model
        x = _embed_jit(m.embed[...], tokens)
        rec, conv, lat = list(state.recurrent), list(state.conv), list(state.latent)
        ki = mi = 0
        dummy = jnp.zeros((), jnp.float32)
        for layer, ((gd, params), blk) in enumerate(zip(self.blocks, self.model.layers)):
            if blk.is_mla:
                x, _, _, lat[mi] = _block_jit(gd, params, x, dummy, dummy, lat[mi], state.lengths, n_new, self.impl,
                                             self.mla_block)
                if on_layer is not None:
                    on_layer(layer, "mla", lat[mi], None)
                mi += 1
            else:
                x, conv[ki], rec[ki], _ = _block_jit(gd, params, x, conv[ki], rec[ki], dummy, state.lengths,
                                                     n_new, self.impl, None)
                if on_layer is not None:
                    on_layer(layer, "kda", rec[ki], conv[ki])
                ki += 1
        w = m.embed[...].T if m.lm_head is None else m.lm_head[...]
        logits = _last_logits_jit(self.norm_def, self.norm_params, w, x, n_new)
        return logits, HybridState(tuple(rec), tuple(conv), tuple(lat), state.lengths + n_new)

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
    """The model's absorbed MLA.decode over the sequence's pages, then the new row written back."""
    b, n_pages = page_table.shape
    ps = lat_pool.shape[1]
    cache = lat_pool[page_table].reshape(b, n_pages * ps, lat_pool.shape[-1])   # [B, S, L] gather
    out, _ = attn.decode(x, cache, lengths)
    new = attn.latent(x).astype(lat_pool.dtype)                       # [B, L]: the row decode wrote
    page = jnp.take_along_axis(page_table, (lengths // ps)[:, None], axis=1)[:, 0]
    page = jnp.where(valid, page, lat_pool.shape[0])
    lat_pool = lat_pool.at[page, lengths % ps].set(new, mode="drop")
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

def _block_prefill(blk, x, conv, rec, lat, old_len, n_new, impl):
    """One block of HybridLM._prefill: (x, the block's new state arrays)."""
    valid = jnp.arange(x.shape[1])[None, :] < n_new[:, None]
    h = blk.input_norm(x)
    if blk.is_mla:
        a, lat = blk.attn.prefill(h, lat, old_len)
    else:
        a, conv, rec = blk.attn.prefill(h, conv, rec, valid, n_new, impl)
    x = x + a
    x = x + blk.ffn(blk.post_norm(x))
    return x, conv, rec, lat


@functools.partial(jax.jit, static_argnums=(0, 8))
def _block_jit(graphdef, params, x, conv, rec, lat, old_len, n_new, impl):
    trace_counts["prefill_block"] += 1
    return _block_prefill(nnx.merge(graphdef, params), x, conv, rec, lat, old_len, n_new, impl)


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
    """

    def __init__(self, model, impl: str = "auto"):
        self.model, self.impl = model, impl
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
                x, _, _, lat[mi] = _block_jit(gd, params, x, dummy, dummy, lat[mi], state.lengths, n_new, self.impl)
                if on_layer is not None:
                    on_layer(layer, "mla", lat[mi], None)
                mi += 1
            else:
                x, conv[ki], rec[ki], _ = _block_jit(gd, params, x, conv[ki], rec[ki], dummy, state.lengths,
                                                     n_new, self.impl)
                if on_layer is not None:
                    on_layer(layer, "kda", rec[ki], conv[ki])
                ki += 1
        w = m.embed[...].T if m.lm_head is None else m.lm_head[...]
        logits = _last_logits_jit(self.norm_def, self.norm_params, w, x, n_new)
        return logits, HybridState(tuple(rec), tuple(conv), tuple(lat), state.lengths + n_new)

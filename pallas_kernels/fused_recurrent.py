"""Pallas recurrent KDA (decode): one step (or a few) over a slot pool of states, updated in place.

The decode step is bound by moving the fp32 state (H·K·V·4 bytes per sequence, in and out),
so the kernel reads each state tile once, applies every token of the step in registers and
writes it back into the same slot (`input_output_aliases`: with the pool donated, no copy).
Gate, sigmoid and L2 norm are fused. Grid (B, H, V/BV): each program owns a [K, BV] tile of
one sequence's state, so the tiles are independent and need no synchronisation.

A negative slot index marks a padding row of the batch: it reads zeros and writes nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels import reference

_F32 = jnp.float32


def _load(ref, hint):
    """ref[...], with a Triton eviction hint on a GPU (hint None: a plain load, and on the CPU)."""
    if hint is None:
        return ref[...]
    from jax.experimental.pallas import triton as pltriton
    return pltriton.load(ref, eviction_policy=hint)


def _kernel(*refs, T, scale, l2, gate, beta_sigmoid, hints):
    idx_ref, q_ref, k_ref, v_ref, g_ref, b_ref = refs[:6]
    rest = list(refs[6:])
    if gate:
        a_ref, dtb_ref = rest.pop(0), rest.pop(0)
    pool_in, o_ref, pool_out = rest
    del pool_in  # aliased with pool_out: read and write through the output ref
    K = q_ref.shape[-1]
    BV = v_ref.shape[-1]
    b = pl.program_id(0)
    slot = idx_ref[b]
    valid = slot >= 0
    s = jnp.maximum(slot, 0)
    first, last = ("evict_first", "evict_last") if hints else (None, None)
    S = _load(pool_out.at[pl.ds(s, 1), :, :], first).reshape(K, BV).astype(_F32)
    S = jnp.where(valid, S, 0.0)
    for t in range(T):  # T is small and static (decode: 1)
        row = pl.ds(t, 1)
        q = _load(q_ref.at[row, :], last).astype(_F32).reshape(K, 1)
        k = _load(k_ref.at[row, :], last).astype(_F32).reshape(K, 1)
        g = _load(g_ref.at[row, :], last).astype(_F32).reshape(K, 1)
        v = _load(v_ref.at[row, :], first).astype(_F32)  # [1, BV]
        beta = b_ref[row].astype(_F32).reshape(1, 1)
        if l2:
            q = q * lax.rsqrt(jnp.sum(q * q, axis=0, keepdims=True) + reference.L2_EPS)
            k = k * lax.rsqrt(jnp.sum(k * k, axis=0, keepdims=True) + reference.L2_EPS)
        if gate:
            x = g + dtb_ref[...].reshape(K, 1)
            sp = reference.softplus(x)
            g = -a_ref[...].reshape(K, 1) * sp
        if beta_sigmoid:
            beta = 1.0 / (1.0 + jnp.exp(-beta))
        S = S * jnp.exp(g)
        u = v - jnp.sum(S * k, axis=0, keepdims=True)
        S = S + k * (beta * u)
        o = jnp.sum(S * (q * scale), axis=0, keepdims=True)
        o_ref[row, :] = o.astype(o_ref.dtype)

    @pl.when(valid)
    def _():
        new = S.reshape(1, K, BV).astype(pool_out.dtype)
        if hints:
            from jax.experimental.pallas import triton as pltriton
            pltriton.store(pool_out.at[pl.ds(s, 1), :, :], new, eviction_policy="evict_first")
        else:
            pool_out[pl.ds(s, 1), :, :] = new


def _call(q, k, v, g, beta, A_log, dt_bias, idx, pool, *, scale, l2, gate, beta_sigmoid, block_v, num_warps,
          interpret, has_dtb, hints=False):
    B, T, H, K = q.shape
    V = v.shape[-1]
    n_slots = pool.shape[0]
    BV = block_v
    grid = (B, H, V // BV)
    in_specs = [pl.BlockSpec((B,), lambda b, h, j: (0,)),
                pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0)),
                pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0)),
                pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j)),
                pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0)),
                pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))]
    args = [idx, q, k, v, g, beta]
    if gate:
        a_hk = jnp.broadcast_to(jnp.exp(A_log.astype(_F32).reshape(H))[:, None], (H, K))
        dtb = dt_bias.astype(_F32).reshape(H, K) if has_dtb else jnp.zeros((H, K), _F32)
        in_specs += [pl.BlockSpec((None, K), lambda b, h, j: (h, 0))] * 2
        args += [a_hk, dtb]
    pool_spec = pl.BlockSpec((n_slots, None, K, BV), lambda b, h, j: (0, h, 0, j))
    in_specs.append(pool_spec)
    args.append(pool)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=num_warps)
    o, pool = pl.pallas_call(
        functools.partial(_kernel, T=T, scale=scale, l2=l2, gate=gate, beta_sigmoid=beta_sigmoid,
                          hints=hints and not interpret),
        grid=grid, in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j)), pool_spec],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, V), v.dtype), jax.ShapeDtypeStruct(pool.shape, _F32)],
        input_output_aliases={len(args) - 1: 1},
        compiler_params=params, interpret=interpret, name="kda_fused_recurrent",
    )(*args)
    return o, pool


_STATIC = ("scale", "l2", "gate", "beta_sigmoid", "block_v", "num_warps", "interpret", "has_dtb", "hints")
# A slot pool is donated: the kernel updates it in place. A per-call state is not (the caller
# keeps its array; XLA copies it into the aliased output first).
_call_pool = jax.jit(_call, static_argnames=_STATIC, donate_argnames=("pool",))
_call_keep = jax.jit(_call, static_argnames=_STATIC)


def fused_recurrent_kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, state_indices=None,
                               output_final_state=True, use_qk_l2norm=False, A_log=None, dt_bias=None,
                               use_gate_in_kernel=False, use_beta_sigmoid=False, interpret=None, block_v=None,
                               num_warps=4, cache_hints=False):
    """The Pallas decode step; same contract as `reference.fused_recurrent_kda`.

    With `state_indices`, the pool passed as `initial_state` is donated to the kernel and
    updated in place on GPU: use the returned pool, not the argument, afterwards. Two rows
    must not name the same slot (their writes would race). `cache_hints`: Triton eviction hints
    (the state and v evicted first, q/k/g kept), as fla-core's kernel gives its inputs.
    """
    reference._check_shapes(q, k, v, g, beta)
    if use_gate_in_kernel and A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log")
    B, T, H, K = q.shape
    V = v.shape[-1]
    interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
    scale = float(K ** -0.5 if scale is None else scale)
    if state_indices is None:
        pool = reference.initial_state_for(q, v, initial_state, B)
        idx = jnp.arange(B, dtype=jnp.int32)
    else:
        if initial_state is None:
            raise ValueError("state_indices needs initial_state: the slot pool [S, H, K, V]")
        if initial_state.dtype != _F32 or initial_state.shape[1:] != (H, K, V):
            raise ValueError(f"the slot pool must be float32 [S, {H}, {K}, {V}], got {initial_state.dtype} "
                             f"{initial_state.shape}")
        pool, idx = initial_state, state_indices.astype(jnp.int32)
    # 64-wide state tiles measured fastest on an H100 (benchmarks/KDA_NOTES.md)
    bv = block_v or (V if interpret or V <= 64 else (64 if V % 64 == 0 else V))
    call = _call_keep if state_indices is None else _call_pool
    o, pool = call(q, k, v, g, beta, A_log, dt_bias, idx, pool, scale=scale, l2=bool(use_qk_l2norm),
                    gate=bool(use_gate_in_kernel), beta_sigmoid=bool(use_beta_sigmoid), block_v=bv,
                    num_warps=num_warps, interpret=interpret, has_dtb=dt_bias is not None,
                    hints=bool(cache_hints))
    return o, (pool if output_final_state else None)

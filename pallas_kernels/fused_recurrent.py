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
from jaxprfaas.pallas_kernels.chunk_intra import reversed_grid

_F32 = jnp.float32


def _load(ref, hint):
    """ref[...], with a Triton eviction hint on a GPU (hint None: a plain load, and on the CPU)."""
    if hint is None:
        return ref[...]
    from jax.experimental.pallas import triton as pltriton
    return pltriton.load(ref, eviction_policy=hint)


def _kernel(*refs, T, scale, l2, gate, beta_sigmoid, hints, indexed, v_fastest, has_dtb, one_pass):
    if indexed:
        idx_ref, *refs = refs
    q_ref, k_ref, v_ref, g_ref, b_ref = refs[:5]
    rest = list(refs[5:])
    a_ref = dtb_ref = None
    if gate:
        a_ref = rest.pop(0)
        if has_dtb:
            dtb_ref = rest.pop(0)
    state_in, o_ref, state_out = rest
    b = pl.program_id(2 if v_fastest else 0)
    first, last = ("evict_first", "evict_last") if hints else (None, None)
    # Rank-2 state tiles and rank-1 vectors, loaded as such: a [1, K, BV] load reshaped to
    # [K, BV] (and [1, K] to [K, 1]) costs Triton a layout conversion through shared memory.
    if indexed:  # a slot pool, aliased: read and write the slot through the output ref
        slot = idx_ref[b]
        valid = slot >= 0
        s = jnp.maximum(slot, 0)
        S = _load(state_out.at[s], first).astype(_F32)
        S = jnp.where(valid, S, 0.0)
    else:  # one state per row, read from one array and written to another
        valid, s = None, b
        S = _load(state_in.at[s], first).astype(_F32)
    for t in range(T):  # T is small and static (decode: 1)
        q = _load(q_ref.at[t], last).astype(_F32)[:, None]  # [K, 1]
        k = _load(k_ref.at[t], last).astype(_F32)[:, None]
        g = _load(g_ref.at[t], last).astype(_F32)[:, None]
        v = _load(v_ref.at[t], first).astype(_F32)[None, :]  # [1, BV]
        beta = b_ref[t].astype(_F32)
        if l2:
            q = q * lax.rsqrt(jnp.sum(q * q, axis=0, keepdims=True) + reference.L2_EPS)
            k = k * lax.rsqrt(jnp.sum(k * k, axis=0, keepdims=True) + reference.L2_EPS)
        if gate:  # −e^{A_log}·softplus(g + dt_bias), A_log and dt_bias in their own dtype
            x = (g + dtb_ref[...].astype(_F32)[:, None]) if has_dtb else g
            g = -jnp.exp(a_ref[...].astype(_F32)) * reference.softplus(x)  # [1] · [K, 1]
        if beta_sigmoid:
            beta = 1.0 / (1.0 + jnp.exp(-beta))
        S = S * jnp.exp(g)
        qs = q * scale
        if one_pass:  # both reductions over the decayed S at once; o's share of the update is (k·q) β u
            kS, qS = jnp.sum(S * k, axis=0, keepdims=True), jnp.sum(S * qs, axis=0, keepdims=True)
            bu = beta * (v - kS)
            S = S + k * bu
            o = (qS + jnp.sum(k * qs, axis=0, keepdims=True) * bu)[0]  # [BV]
        else:  # o read off the updated S: a second reduction after the first
            u = v - jnp.sum(S * k, axis=0, keepdims=True)
            S = S + k * (beta * u)
            o = jnp.sum(S * qs, axis=0)  # [BV]
        o_ref[t, :] = o.astype(o_ref.dtype)

    def store():
        new = S.astype(state_out.dtype)
        if hints:
            from jax.experimental.pallas import triton as pltriton
            pltriton.store(state_out.at[s], new, eviction_policy="evict_first")
        else:
            state_out[s] = new
    if valid is None:
        store()
    else:
        pl.when(valid)(store)


def _call(q, k, v, g, beta, A_log, dt_bias, idx, pool, *, scale, l2, gate, beta_sigmoid, block_v, num_warps,
          interpret, has_dtb, hints=False, v_fastest=False, one_pass=False):
    B, T, H, K = q.shape
    V = v.shape[-1]
    n_slots = pool.shape[0]
    BV = block_v
    grid = (B, H, V // BV)
    indexed = idx is not None
    in_specs = [pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0)),
                pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0)),
                pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j)),
                pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0)),
                pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))]
    args = [q, k, v, g, beta]
    if indexed:
        in_specs.insert(0, pl.BlockSpec((B,), lambda b, h, j: (0,)))
        args.insert(0, idx)
    if gate:  # as given (reshapes only): an XLA pass here would be a second kernel every step
        in_specs.append(pl.BlockSpec((None, 1), lambda b, h, j: (h, 0)))
        args.append(A_log.reshape(H, 1))
        if has_dtb:
            in_specs.append(pl.BlockSpec((None, K), lambda b, h, j: (h, 0)))
            args.append(dt_bias.reshape(H, K))
    pool_spec = pl.BlockSpec((n_slots, None, K, BV), lambda b, h, j: (0, h, 0, j))
    in_specs.append(pool_spec)
    args.append(pool)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=num_warps)
    out_specs = [pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j)), pool_spec]
    if v_fastest:  # (B, H, V/BV) launches one state's value blocks B·H programs apart; reversed,
        # they run back to back as fla-core orders its grid, reading neighbouring bytes of one state
        grid = grid[::-1]
        in_specs, out_specs = reversed_grid(in_specs), reversed_grid(out_specs)
    o, pool = pl.pallas_call(
        functools.partial(_kernel, T=T, scale=scale, l2=l2, gate=gate, beta_sigmoid=beta_sigmoid,
                          hints=hints and not interpret, indexed=indexed, v_fastest=v_fastest,
                          has_dtb=has_dtb, one_pass=one_pass),
        grid=grid, in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((B, T, H, V), v.dtype), jax.ShapeDtypeStruct(pool.shape, _F32)],
        input_output_aliases={len(args) - 1: 1} if indexed else {},
        compiler_params=params, interpret=interpret, name="kda_fused_recurrent",
    )(*args)
    return o, pool


_STATIC = ("scale", "l2", "gate", "beta_sigmoid", "block_v", "num_warps", "interpret", "has_dtb", "hints", "v_fastest",
           "one_pass")
# A slot pool is donated: the kernel updates it in place, each row's slot read from `idx`. Per-call
# states (idx None) are read from one array and written to a new one: no copy of the caller's
# states (the same time as the pool on an H100: benchmarks/KDA_NOTES.md, session 5).
_call_pool = jax.jit(_call, static_argnames=_STATIC, donate_argnames=("pool",))
_call_keep = jax.jit(_call, static_argnames=_STATIC)


def fused_recurrent_kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, state_indices=None,
                               output_final_state=True, use_qk_l2norm=False, A_log=None, dt_bias=None,
                               use_gate_in_kernel=False, use_beta_sigmoid=False, interpret=None, block_v=None,
                               num_warps=4, cache_hints=False, v_fastest=True, one_pass=True):
    """The Pallas decode step; same contract as `reference.fused_recurrent_kda`.

    With `state_indices`, the pool passed as `initial_state` is donated to the kernel and
    updated in place on GPU: use the returned pool, not the argument, afterwards. Two rows
    must not name the same slot (their writes would race). `cache_hints`: Triton eviction hints
    (the state and v evicted first, q/k/g kept), as fla-core's kernel gives its inputs.
    `v_fastest` (default): launch one state's value blocks back to back (see `_call`): 0.088 against
    0.092 ms at B=64 and 0.309 against 0.327 at B=256 on an H200 (benchmarks/KDA_NOTES.md, session
    7); False launches (B, H, V/BV) in that order. `one_pass` (default): the output from the
    decayed state (o = (S e^g)ᵀq + (k·q) β u), so that its reduction runs beside the one for u
    instead of after the update (the same value within fp32 rounding): 0.084 against 0.087 ms at
    B=64 and 0.303 against 0.310 at B=256 on an H200 (session 9).
    """
    reference._check_shapes(q, k, v, g, beta)
    if use_gate_in_kernel and A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log")
    B, T, H, K = q.shape
    V = v.shape[-1]
    reference.check_block_v(block_v, V)
    interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
    scale = float(K ** -0.5 if scale is None else scale)
    if state_indices is None:
        pool = reference.initial_state_for(q, v, initial_state, B)
        idx = None
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
                    hints=bool(cache_hints), v_fastest=bool(v_fastest), one_pass=bool(one_pass))
    return o, (pool if output_final_state else None)

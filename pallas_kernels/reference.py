"""Pure-jnp references for Kimi Delta Attention (KDA): the oracles every kernel is checked against.

Layout and meaning follow fla-core 0.6.0 (`fla/ops/kda`): q, k `[B, T, H, K]`, v `[B, T, H, V]`,
g `[B, T, H, K]` (log-space decay), beta `[B, T, H]`, state `[N, H, K, V]` float32.
Per head, with S the `[K, V]` state (reference kimi-linear.md §1.1):

    S = S * exp(g_t)[:, None];  u = v_t - Sᵀ k_t;  S = S + k_t ⊗ (β_t u);  o_t = Sᵀ (q_t * scale)

Everything here computes in float32 and never forms exp() of a positive gate difference: the
intra-chunk decay exp(Γ_r − Γ_i) is taken element-wise for r >= i only (a `[C, C, K]` tensor),
so gates of -30 per step and beyond underflow to 0 instead of overflowing (§1.6 step 5).
This module must stay free of Pallas: it is what the Pallas kernels are judged by.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

# fp32 matmuls at full precision on every backend (GPUs would otherwise be allowed TF32): an oracle.
_HI = jax.lax.Precision.HIGHEST

L2_EPS = 1e-6  # fla-core l2norm and fused_recurrent: x / sqrt(sum(x^2) + 1e-6)
SOFTPLUS_THRESHOLD = 20.0  # torch / fla softplus: x above the threshold passes through


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI)


# ----------------------------------------------------------------------------- input preparation

class Prepared(NamedTuple):
    """fp32 operands ready for the recurrence: q already scaled, g already log-decay."""

    q: jax.Array  # [B, T, H, K] float32, L2-normed if asked, times scale
    k: jax.Array  # [B, T, H, K] float32, L2-normed if asked
    v: jax.Array  # [B, T, H, V] float32
    g: jax.Array  # [B, T, H, K] float32, log-space decay (<= 0 in practice)
    beta: jax.Array  # [B, T, H] float32, post-sigmoid


def l2norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def softplus(x: jax.Array) -> jax.Array:
    # log1p(exp(x)) with torch's threshold: identical to F.softplus(x, beta=1, threshold=20).
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def kda_gate(f: jax.Array, A_log: jax.Array, dt_bias: jax.Array | None = None) -> jax.Array:
    """g = -exp(A_log[h]) * softplus(f + dt_bias.reshape(H, K)); f `[..., H, K]`, A_log `[H]` or `[1,1,H,1]`."""
    H, K = f.shape[-2:]
    x = f.astype(jnp.float32)
    if dt_bias is not None:
        x = x + dt_bias.astype(jnp.float32).reshape(H, K)
    a = jnp.exp(A_log.astype(jnp.float32).reshape(H))
    return -a[:, None] * softplus(x)


def prepare_inputs(q, k, v, g, beta, *, scale=None, use_qk_l2norm=False, A_log=None, dt_bias=None,
                   use_gate_in_kernel=False, use_beta_sigmoid=False) -> Prepared:
    """Apply the optional fused pre-processing (L2 norm, gate, sigmoid, scale) in float32."""
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q32, k32 = (l2norm(q), l2norm(k)) if use_qk_l2norm else (q.astype(jnp.float32), k.astype(jnp.float32))
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("use_gate_in_kernel=True needs A_log")
        g32 = kda_gate(g, A_log, dt_bias)
    else:
        g32 = g.astype(jnp.float32)
    b32 = beta.astype(jnp.float32)
    if use_beta_sigmoid:
        b32 = jax.nn.sigmoid(b32)
    return Prepared(q32 * scale, k32, v.astype(jnp.float32), g32, b32)


def _check_shapes(q, k, v, g, beta):
    B, T, H, K = q.shape
    if k.shape != (B, T, H, K) or g.shape != (B, T, H, K):
        raise ValueError(f"q {q.shape}, k {k.shape} and g {g.shape} must all be [B, T, H, K]")
    if v.shape[:3] != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"v {v.shape} must be [B, T, H, V] and beta {beta.shape} [B, T, H] with q {q.shape}")


def check_block_v(block_v, V):
    """A kernel's value tile (`block_v`, None: the kernel's default) must be a power of two dividing V."""
    if block_v is not None and (block_v <= 0 or block_v & (block_v - 1) or V % block_v):
        raise ValueError(f"block_v must be a power of two dividing V = {V}, got {block_v}")


# ----------------------------------------------------------------------------- naive recurrence

def _recurrent_core(p: Prepared, h0: jax.Array):
    """Token-by-token scan. p fields [B, T, H, ...]; h0 [B, H, K, V] fp32 -> (o fp32, S fp32)."""

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B, H, K], [B, H, K], [B, H, V], [B, H, K], [B, H]
        S = S * jnp.exp(g_t)[..., None]
        u = v_t - _einsum("bhkv,bhk->bhv", S, k_t)
        S = S + k_t[..., None] * (b_t[..., None] * u)[..., None, :]
        return S, _einsum("bhkv,bhk->bhv", S, q_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in p)
    S, o = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(o, 0, 1), S


def naive_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The oracle, same contract as fla-core 0.6.0 `naive_recurrent_kda` (no L2 norm, g and beta activated)."""
    _check_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    p = prepare_inputs(q, k, v, g, beta, scale=scale)
    h0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    o, S = _recurrent_core(p, h0)
    return o.astype(v.dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------- chunked WY form

def _chunk_step(S, c):
    """One chunk for every (batch, head). S [B,H,K,V]; c fields [B,H,C,...] -> (S', o [B,H,C,V]).

    With Γ the in-chunk inclusive cumsum of g (reference §1.6):
      Akk[r,i] = β_r Σ_d k_r k_i exp(Γ_r−Γ_i)  (i < r),  Aqk[r,i] = Σ_d q_r k_i exp(Γ_r−Γ_i)  (i <= r)
      (I + Akk) U = diag(β) (V − (K⊙e^Γ) S)
      O = (Q⊙e^Γ) S + Aqk U;   S' = e^{Γ_C} ⊙ S + (K⊙e^{Γ_C−Γ})ᵀ U
    """
    q, k, v, g, beta = c
    C = q.shape[-2]
    G = jnp.cumsum(g, axis=-2)  # [B,H,C,K]
    incl = jnp.tril(jnp.ones((C, C), bool))
    diff = G[..., :, None, :] - G[..., None, :, :]  # [B,H,C(r),C(i),K]
    # masked before exp: the r < i entries would be exp(positive) and overflow.
    decay = jnp.exp(jnp.where(incl[:, :, None], diff, -jnp.inf))
    kd = k[..., None, :, :] * decay  # k_i exp(Γ_r−Γ_i)  [B,H,C,C,K]
    akk = _einsum("bhrd,bhrid->bhri", k, kd) * jnp.tril(jnp.ones((C, C)), -1) * beta[..., :, None]
    aqk = _einsum("bhrd,bhrid->bhri", q, kd)
    eG = jnp.exp(G)
    rhs = beta[..., None] * (v - _einsum("bhck,bhkv->bhcv", k * eG, S))
    u = solve_triangular(jnp.eye(C) + akk, rhs, lower=True, unit_diagonal=True)
    o = _einsum("bhck,bhkv->bhcv", q * eG, S) + _einsum("bhri,bhiv->bhrv", aqk, u)
    gl = G[..., -1, :]  # [B,H,K]
    S = jnp.exp(gl)[..., None] * S + _einsum("bhck,bhcv->bhkv", k * jnp.exp(gl[..., None, :] - G), u)
    return S, o


def _to_chunks(x, C):
    """[B, T, H, ...] with T % C == 0 -> [NT, B, H, C, ...]."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // C, C, H, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)


def _from_chunks(o):
    """[NT, B, H, C, V] -> [B, NT*C, H, V]."""
    NT, B, H, C, V = o.shape
    return jnp.moveaxis(o, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, NT * C, H, V)


def _pad_time(p: Prepared, T_pad: int) -> Prepared:
    # Zero padding is inert: β=0 writes nothing, g=0 decays nothing, k=q=0 read nothing.
    T = p.q.shape[1]
    return Prepared(*(jnp.pad(x, [(0, 0), (0, T_pad - T)] + [(0, 0)] * (x.ndim - 2)) for x in p))


def _chunk_dense(p: Prepared, h0, C):
    B, T = p.q.shape[:2]
    T_pad = -(-T // C) * C
    chunks = tuple(_to_chunks(x, C) for x in _pad_time(p, T_pad))
    S, o = jax.lax.scan(_chunk_step, h0, chunks)
    return _from_chunks(o)[:, :T], S


def varlen_layout(cu_seqlens: jax.Array, T: int, C: int):
    """Place each packed sequence on its own chunk boundary in a padded stream of static length.

    Returns (pos [T] padded position of each token, seq_of_chunk [NT], starts [NT] bool, NT).
    NT = ceil(T/C) + N bounds sum_n ceil(len_n/C); chunks past the last sequence get seq id N.
    """
    cu = cu_seqlens.astype(jnp.int32)
    N = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    nch = (lens + C - 1) // C
    ch_end = jnp.cumsum(nch)
    ch_start = ch_end - nch
    t = jnp.arange(T, dtype=jnp.int32)
    seq_of_tok = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, N - 1)
    pos = ch_start[seq_of_tok] * C + (t - cu[seq_of_tok])
    NT = -(-T // C) + N
    c = jnp.arange(NT, dtype=jnp.int32)
    seq_of_chunk = jnp.searchsorted(ch_end, c, side="right")  # skips empty sequences; N past the end
    starts = c == ch_start[jnp.clip(seq_of_chunk, 0, N - 1)]
    return pos, seq_of_chunk, starts & (seq_of_chunk < N), NT


def _chunk_varlen(p: Prepared, h0, cu_seqlens, C):
    """B == 1 packed stream: the state resets at each sequence and is saved at its end."""
    T = p.q.shape[1]
    N = h0.shape[0]
    pos, seq_of_chunk, starts, NT = varlen_layout(cu_seqlens, T, C)
    padded = Prepared(*(jnp.zeros((1, NT * C) + x.shape[2:], x.dtype).at[:, pos].set(x) for x in p))
    chunks = tuple(_to_chunks(x, C) for x in padded)

    def step(carry, xs):
        S, final = carry
        c, n, start = xs
        S = jnp.where(start, h0[jnp.clip(n, 0, N - 1)][None], S)
        S, o = _chunk_step(S, c)
        final = final.at[n].set(S[0], mode="drop")  # the last chunk of each sequence writes last
        return (S, final), o

    (_, final), o = jax.lax.scan(step, (h0[:1], h0), (chunks, seq_of_chunk, starts))
    return _from_chunks(o)[:, pos], final


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunk_kda_core(p: Prepared, h0, cu_seqlens=None, *, chunk_size=64):
    """Chunked KDA on prepared fp32 operands -> (o fp32 [B,T,H,V], final state fp32 [N,H,K,V])."""
    if cu_seqlens is None:
        return _chunk_dense(p, h0, chunk_size)
    return _chunk_varlen(p, h0, cu_seqlens, chunk_size)


def initial_state_for(q, v, initial_state, N):
    H, K, V = q.shape[2], q.shape[3], v.shape[-1]
    if initial_state is None:
        return jnp.zeros((N, H, K, V), jnp.float32)
    if initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state {initial_state.shape} must be [N, H, K, V] = {(N, H, K, V)}")
    return initial_state.astype(jnp.float32)


def chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              use_qk_l2norm=False, A_log=None, dt_bias=None, use_gate_in_kernel=False, use_beta_sigmoid=False,
              chunk_size=64):
    """Reference chunked KDA with fla-core 0.6.0 `chunk_kda`'s contract (see the module docstring)."""
    _check_shapes(q, k, v, g, beta)
    B = q.shape[0]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs B == 1 (packed sequences), got B = {B}")
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = initial_state_for(q, v, initial_state, N)
    p = prepare_inputs(q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias,
                       use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid=use_beta_sigmoid)
    o, S = chunk_kda_core(p, h0, cu_seqlens, chunk_size=chunk_size)
    return o.astype(v.dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------- decode step

def gather_states(pool, state_indices):
    """Rows of a slot pool; a negative index (an empty batch row) reads zeros."""
    valid = state_indices >= 0
    return jnp.where(valid[:, None, None, None], pool[jnp.maximum(state_indices, 0)], 0.0)


def scatter_states(pool, state_indices, S):
    """Write rows back; negative indices are dropped, so padding rows never touch the pool."""
    idx = jnp.where(state_indices >= 0, state_indices, pool.shape[0])
    return pool.at[idx].set(S.astype(pool.dtype), mode="drop")


def fused_recurrent_kda(q, k, v, g, beta, *, scale=None, initial_state=None, state_indices=None,
                        output_final_state=True, use_qk_l2norm=False, A_log=None, dt_bias=None,
                        use_gate_in_kernel=False, use_beta_sigmoid=False):
    """Reference decode step (small T). With `state_indices` [B], `initial_state` is a pool [S,H,K,V]
    and the whole updated pool is returned; otherwise the state is [B,H,K,V] as in fla-core."""
    _check_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    p = prepare_inputs(q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias,
                       use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid=use_beta_sigmoid)
    if state_indices is not None:
        if initial_state is None:
            raise ValueError("state_indices needs initial_state: the slot pool [S, H, K, V]")
        h0 = gather_states(initial_state.astype(jnp.float32), state_indices)
    else:
        h0 = initial_state_for(q, v, initial_state, B)
    o, S = _recurrent_core(p, h0)
    if state_indices is not None:
        S = scatter_states(initial_state, state_indices, S)
    return o.astype(v.dtype), (S if output_final_state else None)

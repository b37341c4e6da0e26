"""Pallas chunked KDA (prefill): portable Pallas (Triton backend on GPU, interpret mode on CPU),
with Mosaic GPU versions of two kernels that `"auto"` takes on Hopper.

Three kernels and a fix-up (benchmarks/KDA_NOTES.md has each version and what it measured). Two
are parallel over every chunk and keep small working sets: they live in `chunk_intra.py`, with
`diag_fixup`, which rewrites the diagonal blocks of sub-chunks decaying by more than 140 nats
(`diag="split"`, the default). `solve_mosaic.py` holds the solve's Mosaic GPU version, which
`solve_impl="auto"` takes on Hopper GPUs (0.16 against 0.26 ms at 8K on an H100). The third,
here, is the serial pass over chunks, with the output fused in so that per-chunk states are never
written (fla-core stores them); `state_mosaic.py` holds its Mosaic GPU version, which
`state_impl="auto"` takes on Hopper GPUs with its output on a second warpgroup (0.15 against
the Triton kernel's ~0.26 ms at 8K), or for batches that fill the GPU with a head's two value
blocks on one CTA (`auto_state_pass`). End to end: 0.71 ms at 8K on an H200. Before them, `gates`
applies the fused gate and the sigmoid of β as one XLA pass, and `sub_totals` sums each 16-token
sub-chunk's gates (one XLA reduction).

  scores  grid (B, NT, H·4), one 16-token sub-chunk a: padding mask, Γ (from the sub-chunk totals
          and the in-sub-chunk cumsum, rebuilt where needed and never stored), L2 norm and scale; its rows of
          Akk = strict-tril(β k·kᵀ ⊙ e^{Γr−Γi}) (fp32) and Aqk = tril(q·kᵀ ⊙ e^{Γr−Γi}) as 16×16
          block matmuls; qg = q⊙e^Γ, kg = k⊙e^{Γ_C−Γ}, β k⊙e^Γ, β and e^{Γ_C}.
  solve   grid (B, NT, H): T = (I+Akk)⁻¹ by 16×16 blocks (diagonal blocks by repeated squaring,
          a nilpotent series); W = T·β(k⊙e^Γ), U = T·βv.
  state   grid (B, H, V/BV), serial over chunks with the state [K, BV] in registers:
          v' = U − W S;  o = qg S + Aqk v';  S ← e^{Γ_C} ⊙ S + kgᵀ v'.

Stability (reference kimi-linear.md §1.6): every off-diagonal block factors e^{Γr−Γi} through
c = Γ at the end of sub-chunk a−1: e^{Γr−c}·e^{c−Γi}, both factors <= 1. The diagonal block is one
matmul pair through c while the sub-chunk decays by at most DIAG_KEY_MAX (60 nats), else 1 (in
scores), 2 or 4 (in the fix-up) pairs through per-channel references while each part decays by at
most DIAG_SPAN_MAX (140 nats; `chunk_intra.py` derives both bounds), else the exact element-wise
form with every exponent <= 0 (fix-up).
Nothing overflows or loses precision to denormals for any g <= 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels import reference
from jaxprfaas.pallas_kernels.chunk_intra import (  # noqa: F401  (re-exported: tests, benchmarks)
    C, DIAG_KEY_MAX, DIAG_PARTS, DIAG_SPAN_MAX, NSUB, SUB, _F32, _dot, _gpu_params, gates, intra, scores, solve)


def _state_kernel(*refs, nt, cd, varlen):
    if varlen:
        flags_ref, *refs = refs
    w_ref, u_ref, qg_ref, kg_ref, aqk_ref, gl_ref, h0_ref, o_ref, ht_ref = refs
    K = w_ref.shape[-1]
    BV = o_ref.shape[-1]

    def body(c, S):
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        if varlen:
            start, n, end = flags_ref[c, 0], flags_ref[c, 1], flags_ref[c, 2]
            S = jnp.where(start > 0, h0_ref[pl.ds(n, 1), :, :].reshape(K, BV).astype(_F32), S)
        Sc = S.astype(cd)
        vnew = u_ref[rows, :].astype(_F32) - _dot(w_ref[rows, :], Sc, cd)
        vc = vnew.astype(cd)
        o = _dot(qg_ref[rows, :], Sc, cd) + _dot(aqk_ref[rows, :], vc, cd)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        S = gl_ref[pl.ds(c, 1), :].reshape(K)[:, None] * S + _dot(kg_ref[rows, :], vc, cd, trans_a=True)
        if varlen:
            @pl.when(end > 0)
            def _():
                ht_ref[pl.ds(n, 1), :, :] = S.reshape(1, K, BV)
        return S

    S0 = jnp.zeros((K, BV), _F32) if varlen else h0_ref[...].astype(_F32)
    S = lax.fori_loop(0, nt, body, S0)
    if not varlen:
        ht_ref[...] = S


def _interpret():
    return jax.default_backend() != "gpu"


def state(w, u, qg, kg, aqk, gl, h0, flags, *, out_dtype, block_v, num_warps=4, num_stages=None, interpret=False):
    """The serial kernel: o [B,Tp,H,V] and the final states [N,H,K,V] fp32 from the intra outputs."""
    B, H, Tp, K = w.shape
    V = u.shape[-1]
    NT = Tp // C
    BV = block_v
    N = h0.shape[0]
    varlen = flags is not None
    cd = w.dtype
    whole = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, h, j: (b, h, 0, 0))  # noqa: E731
    in_specs = [whole(K), pl.BlockSpec((None, None, Tp, BV), lambda b, h, j: (b, h, 0, j)), whole(K), whole(K),
                whole(C), pl.BlockSpec((None, None, NT, K), lambda b, h, j: (b, h, 0, 0))]
    if varlen:
        in_specs.insert(0, pl.BlockSpec((NT, 3), lambda b, h, j: (0, 0)))
        in_specs.append(pl.BlockSpec((N, None, K, BV), lambda b, h, j: (0, h, 0, j)))
        ht_spec = pl.BlockSpec((N, None, K, BV), lambda b, h, j: (0, h, 0, j))
    else:
        in_specs.append(pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j)))
        ht_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    o, ht = pl.pallas_call(
        functools.partial(_state_kernel, nt=NT, cd=cd, varlen=varlen),
        grid=(B, H, V // BV),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, Tp, None, BV), lambda b, h, j: (b, 0, h, j)), ht_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype), jax.ShapeDtypeStruct((N, H, K, V), _F32)],
        compiler_params=None if interpret else _gpu_params(num_warps, 1 if cd == _F32 else num_stages),
        interpret=interpret, name="kda_chunk_state",
    )(*([flags] if varlen else []), w, u, qg, kg, aqk, gl, h0)
    if varlen:
        # sequences of length 0 own no chunk: their state is the initial one.
        ht = jnp.where(_has_chunks(flags, N)[:, None, None, None], ht, h0)
    return o, ht


@functools.partial(jax.jit, static_argnames=("scale", "l2", "gate", "beta_sigmoid", "T_valid", "block_v",
                                             "num_warps", "num_warps_intra", "num_stages", "diag",
                                             "state_impl", "solve_impl", "akk_bf16", "scores_opts", "interpret",
                                             "akk_storage", "scores_impl"))
def _chunk_call(q, k, v, g, beta, A_log, dt_bias, mask, h0, flags, *, scale, l2, gate, beta_sigmoid, T_valid,
                block_v, num_warps, num_warps_intra, num_stages, diag, state_impl, solve_impl, akk_bf16, interpret,
                scores_opts=(), akk_storage="fp32", scores_impl="triton"):
    w, u, qg, kg, aqk, gl = intra(q, k, v, g, beta, A_log, dt_bias, mask, scale=scale, l2=l2, gate=gate,
                                  beta_sigmoid=beta_sigmoid, num_warps=num_warps_intra, diag=diag,
                                  solve_impl=solve_impl, akk_bf16=akk_bf16, interpret=interpret,
                                  scores_opts=dict(scores_opts),
                                  akk_dtype=jnp.bfloat16 if akk_storage == "bf16" else _F32, scores_impl=scores_impl)
    if state_impl.startswith("mosaic"):
        from jaxprfaas.pallas_kernels.state_mosaic import state_mosaic
        o, ht = state_mosaic(w, u, qg, kg, aqk, gl, h0, block_v=block_v, interpret=interpret,
                             warpgroups=1 if state_impl == "mosaic" else 2, pair=state_impl == "mosaic_pair")
    else:
        o, ht = state(w, u, qg, kg, aqk, gl, h0, flags, out_dtype=v.dtype, block_v=block_v, num_warps=num_warps,
                      num_stages=num_stages, interpret=interpret)
    return o[:, :T_valid], ht


def _has_chunks(flags, N):
    """[N] bool: whether sequence n ends in some chunk (empty sequences own none)."""
    return jnp.zeros((N + 1,), bool).at[jnp.where(flags[:, 2] > 0, flags[:, 1], N)].set(True)[:N]


DIAG_FORMS = ("auto", "split", "inline", "plain", "mm1", "mm2", "mm4", "cols")
SCORES_OPTS = {"channel_pass", "exp2", "heads_fastest", "num_stages", "totals", "unroll"}


def _mosaic_state_fits(q, v, cu_seqlens, interpret):
    """Whether `state_impl="auto"` takes the Mosaic GPU state pass: compiled (not interpreted) on a
    Hopper GPU (sm_90: wgmma, TMA) under JAX >= 0.11 (the API it is written against), bf16 tiles,
    no packing, K and V multiples of 64. Measured at 8K: one warpgroup 0.196 ms against the Triton
    kernel's 0.263 on an H100 (benchmarks/KDA_NOTES.md, session 3), two 0.154 against one's 0.220
    on an H200 (session 9)."""
    if interpret or cu_seqlens is not None or q.dtype == _F32 or q.shape[-1] % 64 or v.shape[-1] % 64:
        return False
    return _has_mosaic_api() and _on_hopper()


IMPLS = ("auto", "triton", "mosaic")
STATE_IMPLS = IMPLS + ("mosaic_2wg", "mosaic_pair")


def _mosaic_solve_misfit(q, v):
    """Why the Mosaic GPU solve cannot take these inputs (None when it can): it is written against
    JAX 0.11's Mosaic GPU API and takes bf16 tiles with K and V of 64 or 128."""
    if not _has_mosaic_api():
        return f"needs JAX >= 0.11 (this is {jax.__version__})"
    if q.dtype == _F32:
        return "takes bf16 q, k, v (fp32 inputs run the Triton solve)"
    K, V = q.shape[-1], v.shape[-1]
    if K not in (64, 128) or V not in (64, 128):
        return f"takes K and V in (64, 128), got K = {K}, V = {V}"
    return None


def _solve_impl(impl, q, v, interpret):
    """"triton" or "mosaic" for the solve. "auto" takes the Mosaic GPU solve compiled on a Hopper
    GPU where the inputs fit it (0.159 against the Triton kernel's 0.264 ms at 8K on an H100,
    benchmarks/KDA_NOTES.md, session 5), else the Triton one (interpreted on the CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"solve_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        return impl
    why = _mosaic_solve_misfit(q, v)
    if impl == "auto":
        return "mosaic" if why is None and not interpret and _on_hopper() else "triton"
    if why is None and not interpret and jax.default_backend() == "gpu" and not _on_hopper():
        why = "runs compiled only on a Hopper GPU (sm_90: wgmma, TMA), or interpreted (interpret=True)"
    if why:
        raise ValueError(f"solve_impl='mosaic' (the Mosaic GPU solve) {why}")
    return "mosaic"


def _scores_impl(impl, q, interpret, *, diag, akk_precision, scores_opts):
    """"triton" or "mosaic" for the scores kernel. "auto" keeps the Triton kernel: the Mosaic GPU one
    (`scores_mosaic.py`) is 1.11x faster alone on an H200, 3–6% end to end with mild gates, but it
    hands sub-chunks decaying by more than 60 nats to the fix-up (the Triton one: 140), so it is
    7–9% slower with Kimi-style gates (benchmarks/KDA_NOTES.md, session 12). "mosaic" takes bf16
    q, k with K in (64, 128) under JAX >= 0.11, compiled on a Hopper GPU or interpreted, with the
    default diagonal handling (diag "auto"/"split"), bf16 Akk products and no Triton scores
    options."""
    if impl not in IMPLS:
        raise ValueError(f"scores_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "mosaic":
        return "triton"
    why = None
    if not _has_mosaic_api():
        why = f"needs JAX >= 0.11 (this is {jax.__version__})"
    elif q.dtype == _F32 or q.shape[-1] not in (64, 128):
        why = f"takes bf16 q, k with K in (64, 128), got {q.dtype} K = {q.shape[-1]}"
    elif not interpret and jax.default_backend() == "gpu" and not _on_hopper():
        why = "runs compiled only on a Hopper GPU (sm_90: wgmma, TMA), or interpreted (interpret=True)"
    elif diag != "split" or akk_precision != "bf16" or {o for o in (scores_opts or {}) if o != "exp2"}:
        why = ("keeps the default diagonal handling (diag='auto') and bf16 Akk products (akk_precision='bf16'); "
               "scores_opts other than 'exp2' are the Triton kernel's")
    if why:
        raise ValueError(f"scores_impl='mosaic' (the Mosaic GPU scores kernel) {why}")
    return "mosaic"


def _has_mosaic_api():
    """Whether this JAX has the Mosaic GPU API the Mosaic kernels are written against (0.11)."""
    return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def auto_state_pass(B, H, V, sms):
    """The Mosaic GPU state pass `state_impl="auto"` takes on Hopper: "mosaic_2wg" (one CTA per 64
    value columns of a head and batch row, its output on a second warpgroup; one CTA an SM by its
    185 KB of shared memory) while those CTAs fit on the `sms` SMs at once, else "mosaic_pair" (a
    head's two 64-column blocks on one CTA sharing the chunk's W, kg, qg and Aqk tiles; V = 128). At
    B=1, T=8192, H=32 (64 CTAs) the 2wg pass is faster end to end (0.714 against 0.828 ms), at B=8,
    T=4096 (512 CTAs, four waves, bound by memory) the pair pass takes 0.402 against 0.636 ms alone
    on an H200 (benchmarks/KDA_NOTES.md, session 10)."""
    return "mosaic_pair" if V == 128 and B * H * (V // 64) > sms else "mosaic_2wg"


def _sm_count():
    """The first GPU's streaming multiprocessors (132 on an H100 SXM or H200 when JAX does not say)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def _on_hopper():
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _default_block_v(V, interpret):
    if interpret or V <= 32:
        return V
    return 32 if V % 32 == 0 else V


def chunk_kda_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, use_qk_l2norm=False, A_log=None, dt_bias=None, use_gate_in_kernel=False,
                     use_beta_sigmoid=False, chunk_size=64, interpret=None, block_v=None, num_warps=4,
                     num_warps_intra=None, num_stages=None, diag="auto", state_impl="auto", solve_impl="auto",
                     akk_precision="bf16", scores_opts=None, akk_storage="fp32", scores_impl="auto"):
    """The Pallas chunked KDA; same contract as `reference.chunk_kda` (fla-core 0.6.0 layout).

    Tuning knobs (defaults measured on an H100, benchmarks/KDA_NOTES.md): `block_v`, `num_warps`,
    `num_stages` of the Triton state kernel; `num_warps_intra` of scores and solve (2);
    `state_impl` "auto" (on Hopper "mosaic_2wg", or "mosaic_pair" for batches whose 2wg CTAs
    outnumber the SMs: `auto_state_pass`; else Triton) | "triton" | "mosaic" (the Mosaic GPU
    pass on one warpgroup) | "mosaic_2wg" (its output on a second warpgroup: 0.154 against 0.220 ms
    alone and 0.711 against 0.766 end to end at 8K on an H200) | "mosaic_pair" (a head's two
    value blocks on two warpgroups of one CTA sharing the chunk's tiles, V = 2·block_v; for
    batches whose CTAs fill the GPU, where the pass is bound by memory: 0.402 against 0.636 ms
    alone at B=8, T=4096 on an H200); `diag`, the
    diagonal-block form: "auto" = "split" (the scores kernel keeps the one-pair forms and a second
    kernel rewrites the rare sub-chunks that decay by more than 140 nats: 1.05 against 1.20 ms at
    8K on an H100), "inline" (every form inside the scores kernel, the first safe one per
    sub-chunk), or one form forced for tests ("plain", "mm1", "mm2", "mm4", "cols"; only "cols"
    is exact for every gate); `solve_impl` "auto" (Mosaic GPU on Hopper where it fits, else
    Triton) | "triton" | "mosaic" (`solve_mosaic.py`: bf16, K and V in 64, 128, JAX >= 0.11;
    compiled on Hopper or interpreted: 0.16 against 0.26 ms at 8K on an H100); `akk_precision`
    "bf16" (Akk's products, which feed the solve, from bf16 operands, as Aqk's) | "tf32" (from fp32
    operands, TF32 on the tensor cores, as fla-core forms them). For bf16 inputs only (fp32 inputs
    stay exact either way). bf16 is the default: 0.824 against 0.945 ms at 8K on an H200, and the
    outputs as close to the fp32 reference as with TF32 at 8K and 32K, keys correlated up to 0.99
    (benchmarks/kda_akk_accuracy.py, KDA_NOTES.md sessions 5 and 6). `scores_opts`: the scores
    kernel's knobs (`chunk_intra.scores`: "channel_pass", "exp2" (also the fix-up's; True by
    default), "heads_fastest", "num_stages", "totals" (True by default), "unroll"), for the
    benchmark. `akk_storage` "fp32" (default) | "bf16" (opt-in, bf16 inputs only): Akk
    stored in bf16 between the scores kernel and the solve, half its bytes (~0.08 ms at B=8,
    T=4096 by bytes); it adds up to 10% to the error the bf16 intermediates already give, with
    correlated keys (`benchmarks/kda_akk_storage.py`); on an H200 2.548 against 2.584 ms at B=8,
    T=4096, inside the spread. `scores_impl` "auto" (the Triton scores kernel) | "triton" |
    "mosaic" (opt-in: the Mosaic GPU scores kernel of `scores_mosaic.py`, bf16 inputs with K in 64,
    128, JAX >= 0.11, Hopper or interpreted; on an H200 3–6% faster end to end with mild gates,
    7–9% slower with strong ones, session 12).
    """
    if diag not in DIAG_FORMS:
        raise ValueError(f"diag must be one of {DIAG_FORMS}, got {diag!r}")
    diag = "split" if diag == "auto" else diag
    if akk_precision not in ("tf32", "bf16"):
        raise ValueError(f"akk_precision must be 'tf32' or 'bf16', got {akk_precision!r}")
    if akk_storage not in ("fp32", "bf16"):
        raise ValueError(f"akk_storage must be 'fp32' or 'bf16', got {akk_storage!r}")
    if akk_storage == "bf16" and q.dtype == _F32:
        raise ValueError("akk_storage='bf16' takes bf16 inputs (fp32 inputs keep Akk exact in fp32)")
    unknown = set(scores_opts or {}) - SCORES_OPTS
    if unknown:
        raise ValueError(f"scores_opts takes {sorted(SCORES_OPTS)}, got {sorted(unknown)}")
    reference._check_shapes(q, k, v, g, beta)
    if chunk_size != C:
        raise ValueError(f"the Pallas chunk kernel uses chunk_size={C}, got {chunk_size}")
    if use_gate_in_kernel and A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log")
    if state_impl not in STATE_IMPLS:
        raise ValueError(f"state_impl must be one of {STATE_IMPLS}, got {state_impl!r}")
    if state_impl.startswith("mosaic") and (cu_seqlens is not None or q.dtype == _F32):
        raise ValueError(f"state_impl={state_impl!r} (the Mosaic GPU state pass) takes bf16 inputs without "
                         "cu_seqlens")
    B, T, H, K = q.shape
    V = v.shape[-1]
    reference.check_block_v(block_v, V)
    interpret = _interpret() if interpret is None else interpret
    solve_impl = _solve_impl(solve_impl, q, v, interpret)
    scores_impl = _scores_impl(scores_impl, q, interpret, diag=diag, akk_precision=akk_precision,
                               scores_opts=scores_opts)
    scale = float(K ** -0.5 if scale is None else scale)
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs B == 1 (packed sequences), got B = {B}")
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = reference.initial_state_for(q, v, initial_state, N)
    out_dtype = v.dtype
    if q.dtype != _F32:  # bf16 / fp16 operands go to the tensor cores as bf16
        q, k, v = (x.astype(jnp.bfloat16) if x.dtype != jnp.bfloat16 else x for x in (q, k, v))
    flags = None
    if cu_seqlens is None:
        Tp = -(-T // C) * C
        mask = None
        if Tp != T:
            q, k, v, g, beta = (jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
                                for x in (q, k, v, g, beta))
            mask = (jnp.arange(Tp) < T).astype(_F32)
    else:
        pos, seq_of_chunk, starts, NT = reference.varlen_layout(cu_seqlens, T, C)
        Tp = NT * C
        scatter = lambda x: jnp.zeros((1, Tp) + x.shape[2:], x.dtype).at[:, pos].set(x)  # noqa: E731
        q, k, v, g, beta = map(scatter, (q, k, v, g, beta))
        mask = jnp.zeros((Tp,), _F32).at[pos].set(1.0)
        ends = jnp.concatenate([seq_of_chunk[1:] != seq_of_chunk[:-1], jnp.ones((1,), bool)]) & (seq_of_chunk < N)
        flags = jnp.stack([starts.astype(jnp.int32), jnp.minimum(seq_of_chunk, N - 1).astype(jnp.int32),
                           ends.astype(jnp.int32)], axis=1)
    if state_impl == "auto":
        fits = block_v in (None, 64) and _mosaic_state_fits(q, v, cu_seqlens, interpret)
        state_impl = auto_state_pass(B, H, V, _sm_count()) if fits else "triton"
    bv = block_v or (64 if state_impl.startswith("mosaic") else _default_block_v(V, interpret))
    if state_impl == "mosaic_pair" and V != 2 * bv:
        raise ValueError(f"state_impl='mosaic_pair' runs a head's two value blocks on one CTA: V must be "
                         f"2 * block_v, got V = {V}, block_v = {bv}")
    o, ht = _chunk_call(q, k, v, g, beta, A_log, dt_bias, mask, h0, flags, scale=scale, l2=bool(use_qk_l2norm),
                        gate=bool(use_gate_in_kernel), beta_sigmoid=bool(use_beta_sigmoid),
                        T_valid=T if cu_seqlens is None else Tp, block_v=bv, num_warps=num_warps,
                        num_warps_intra=num_warps_intra, num_stages=num_stages, diag=diag,
                        state_impl=state_impl, solve_impl=solve_impl, akk_bf16=akk_precision == "bf16",
                        scores_opts=tuple(sorted((scores_opts or {}).items())),
                        interpret=interpret, akk_storage=akk_storage, scores_impl=scores_impl)
    if cu_seqlens is not None:
        o = o[:, pos]
    return o.astype(out_dtype), (ht if output_final_state else None)

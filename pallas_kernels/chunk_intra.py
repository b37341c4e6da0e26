"""The parallel part of the Pallas chunked KDA (see `chunk.py` for the whole): the fused gate as
one XLA pass (`gates`), then per 16-token sub-chunk Γ and the 16×16 blocks of Akk / Aqk
(`scores`), per chunk the block solve (`solve`); `intra` chains the two kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels import reference

C = 64  # chunk
SUB = 16  # sub-chunk: the granularity of the safe factoring and of the block solve
NSUB = C // SUB
# One matmul pair of the diagonal block covers a part of its key rows i and factors e^{Γr−Γi} through
# a reference m (per channel): key factor e^{m−Γi}, query factor e^{Γr−m}. With c = Γ before the
# part and s its decay span in that channel, m = c − max(0, s − DIAG_KEY_MAX): key factors lie in
# [e^{−(s−60)}, e^{min(s,60)}] and query factors (rows r at or after the part) are at most
# e^{max(0,s−60)}; an entry of size e^{−D} has a query factor >= e^{−D−60}. fp32 (and TF32, bf16:
# the same exponent) is normal from e^{−87.3} to e^{88.7}, so while s <= DIAG_SPAN_MAX = 140 nothing
# overflows, every key factor is normal and every entry down to e^{−27} ≈ 2e−12 is exact (smaller
# ones may lose digits to denormal query factors: below fp32's resolution of the sums they join).
# With m = c alone (session 2) s had to stay <= 60; at 80, entries of e^{−8} lost their precision.
DIAG_KEY_MAX = 60.0
DIAG_SPAN_MAX = 140.0
DIAG_PARTS = (1, 2, 4)  # the diagonal block as 1, 2 or 4 matmul pairs, the first whose parts all fit
_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


def _gpu_params(num_warps, num_stages=None):
    from jax.experimental.pallas import triton as pltriton
    kw = {"num_warps": num_warps}
    if num_stages is not None:
        kw["num_stages"] = num_stages
    return pltriton.CompilerParams(**kw)


def _dot(a, b, cd, trans_a=False, trans_b=False):
    """a @ b with fp32 accumulation; operands in `cd` (bf16 on the tensor cores, or exact fp32)."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    prec = _HI if cd == _F32 else None
    return lax.dot_general(a.astype(cd), b.astype(cd), dims, precision=prec, preferred_element_type=_F32)


def _dot32(a, b, trans_b=False):
    return _dot(a, b, _F32, trans_b=trans_b)


def _unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower-triangular a [16,16]: (I−a)(I+a²)(I+a⁴)(I+a⁸), as a^16 = 0."""
    n = a.shape[0]
    eye = (lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(_F32)
    p = -a
    inv = eye + p
    for _ in range(3):  # n = 16 = 2^4
        p = _dot32(p, p)
        inv = _dot32(inv, eye + p)
    return inv


def gates(g, beta, A_log, dt_bias, *, gate, beta_sigmoid):
    """The fused gate (−e^{A_log}·softplus(g + dt_bias)) and sigmoid of beta as one elementwise XLA
    pass, fp32, before any padding: padded rows are then exact zeros (no decay, no write), and no
    kernel program recomputes softplus for rows it shares with its neighbours."""
    g = g.astype(_F32)
    beta = beta.astype(_F32)
    if gate:
        g = reference.kda_gate(g, A_log, dt_bias)
    if beta_sigmoid:
        beta = 1.0 / (1.0 + jnp.exp(-beta))
    return g, beta


def _scores_kernel(q_ref, k_ref, g_ref, b_ref, akk_ref, aqk_ref, qg_ref, kg_ref, kb_ref, gl_ref, *, scale, l2, cd,
                   diag="auto"):
    """One 16-row sub-chunk a of one chunk (v4): its rows of Akk (fp32) and Aqk, qg, kg, β k e^Γ,
    and e^{Γ_C}; only the blocks b <= a are computed.

    The channels go in passes of 64 (`KH`): every block is a sum over channels, so each pass adds
    its part into [16, 16] accumulators, and only [16, 64] tiles are live at a time (a [16, 128]
    fp32 tile is 32 registers per thread of a 2-warp program: v3 held seven of them and spilled,
    Nsight Compute showed 255 registers and 6.5M local-memory requests at 8K). Row quantities that
    need every channel (the L2 norms, the diagonal form's decay spans) come first.

    Γ is rebuilt from the gates where needed, never stored: c_b (the sub-chunk totals before b)
    plus the in-sub-chunk cumsum; every difference of Γ is summed from the gates between its rows.
    All blocks b < a factor e^{Γr−Γi} through c_a = Γ at the end of sub-chunk a−1: both factors
    <= 1. The diagonal block (see DIAG_KEY_MAX, DIAG_SPAN_MAX) takes the first form that is safe:
    "plain", one pair through c_a (decay span <= 60 nats); "mm1" / "mm2" / "mm4", 1, 2 or 4 pairs
    through per-channel references (each part's span <= 140); else "cols", element-wise, one column
    at a time with exponents <= 0. `diag` forces one form (tests, benchmarks).
    """
    K = q_ref.shape[-1]
    KH = 64 if K % 64 == 0 else K
    passes = [pl.ds(h * KH, KH) for h in range(K // KH)]
    a = pl.program_id(2) % NSUB
    ra = pl.ds(pl.multiple_of(a * SUB, SUB), SUB)
    srow = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    rows = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    cols = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    sub_rows = lambda m: pl.ds(m * SUB, SUB)  # noqa: E731
    last = lambda x: jnp.sum(jnp.where(srow == SUB - 1, x, 0.0), axis=0, keepdims=True)  # noqa: E731
    zero_blk = lambda: jnp.zeros((SUB, SUB), _F32)  # noqa: E731

    def l2_factor(ref, rs):  # [16, 1]: the rows' L2 factor over every channel
        if not l2:
            return jnp.ones((SUB, 1), _F32)
        ss = None
        for ch in passes:
            x = ref[rs, ch].astype(_F32)
            t = jnp.sum(x * x, axis=1, keepdims=True)
            ss = t if ss is None else ss + t
        return lax.rsqrt(ss + reference.L2_EPS)

    def kk_dot(x, y):  # Akk feeds the solve: fp32 operands (TF32 on GPU) for bf16 inputs
        if cd != _F32:
            return lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        return _dot(x, y, cd, trans_b=True)

    beta = b_ref[ra].astype(_F32)
    nq = l2_factor(q_ref, ra) * scale
    nk = l2_factor(k_ref, ra)

    # The diagonal form, from each part's decay span (the largest over channels).
    forms = ("plain", "mm1", "mm2", "mm4", "cols")
    if diag == "auto":
        s1 = s2 = s4 = None
        for ch in passes:
            ga = g_ref[ra, ch].astype(_F32)
            p4 = [jnp.sum(jnp.where((srow >= 4 * p) & (srow < 4 * p + 4), ga, 0.0), axis=0, keepdims=True)
                  for p in range(4)]
            p2 = [p4[0] + p4[1], p4[2] + p4[3]]
            t1 = jnp.max(-(p2[0] + p2[1]))
            t2 = jnp.maximum(jnp.max(-p2[0]), jnp.max(-p2[1]))
            t4 = functools.reduce(jnp.maximum, [jnp.max(-x) for x in p4])
            s1, s2, s4 = (t1, t2, t4) if s1 is None else (jnp.maximum(s1, t1), jnp.maximum(s2, t2),
                                                         jnp.maximum(s4, t4))
        fits = (s1 <= DIAG_KEY_MAX, s1 <= DIAG_SPAN_MAX, s2 <= DIAG_SPAN_MAX, s4 <= DIAG_SPAN_MAX)
    else:
        form = forms.index(diag)

    def first_fit(branches, i=0):  # nested conds (lax.switch's index clamp does not verify in Triton)
        if i == len(branches) - 1:
            return branches[i]()
        return lax.cond(fits[i], branches[i], lambda: first_fit(branches, i + 1))

    def between(tots, lo, hi):  # the gates of sub-chunks lo..hi−1, per channel [1, KH]
        acc = None
        for m, t in enumerate(tots):
            t = jnp.where((m >= lo) & (m < hi), t, 0.0)
            acc = t if acc is None else acc + t
        return acc

    akk_d = aqk_d = zero_blk()
    off_k = [zero_blk() for _ in range(NSUB - 1)]
    off_q = [zero_blk() for _ in range(NSUB - 1)]
    for ch in passes:
        ga = g_ref[ra, ch].astype(_F32)
        Gl = jnp.cumsum(ga, axis=0)  # Γ − c_a, in-sub-chunk
        tots = [jnp.sum(g_ref[sub_rows(m), ch].astype(_F32), axis=0, keepdims=True) for m in range(NSUB)]
        ca = between(tots, 0, a)
        gl_ref[:, ch] = jnp.exp(between(tots, 0, NSUB))
        q = q_ref[ra, ch].astype(_F32) * nq
        k = k_ref[ra, ch].astype(_F32) * nk
        eG = jnp.exp(ca + Gl)
        qg_ref[:, ch] = (q * eG).astype(qg_ref.dtype)
        kb_ref[:, ch] = (beta[:, None] * k * eG).astype(kb_ref.dtype)
        kg_ref[:, ch] = (k * jnp.exp((last(Gl) - Gl) + between(tots, a + 1, NSUB))).astype(kg_ref.dtype)  # Γ_C − Γ
        ea = jnp.exp(Gl)  # e^{Γr−c_a} <= 1
        qa, ka = q * ea, k * ea

        def plain():
            kc = k * jnp.exp(-Gl)
            return kk_dot(ka, kc), _dot(qa, kc, cd, trans_b=True)

        def parts(P):
            L = SUB // P
            dk = dq = None
            for p in range(P):
                inp = (srow >= p * L) & (srow < (p + 1) * L)
                cp = jnp.sum(jnp.where(srow < p * L, ga, 0.0), axis=0, keepdims=True)  # c_p − c_a
                sp = -jnp.sum(jnp.where(inp, ga, 0.0), axis=0, keepdims=True)  # the part's decay, per channel
                m = cp - jnp.maximum(sp - DIAG_KEY_MAX, 0.0)
                kc = jnp.where(inp, k * jnp.exp(jnp.where(inp, m - Gl, 0.0)), 0.0)
                e = jnp.where(srow >= p * L, jnp.exp(jnp.minimum(Gl - m, DIAG_SPAN_MAX - DIAG_KEY_MAX)), 0.0)
                xk, xq = kk_dot(k * e, kc), _dot(q * e, kc, cd, trans_b=True)
                dk, dq = (xk, xq) if dk is None else (dk + xk, dq + xq)
            return dk, dq

        def by_cols():
            dk = dq = zero_blk()
            for i in range(SUB):
                ki = jnp.sum(jnp.where(srow == i, k, 0.0), axis=0, keepdims=True)
                Gi = jnp.sum(jnp.where(srow == i, Gl, 0.0), axis=0, keepdims=True)
                kd = ki * jnp.exp(jnp.minimum(Gl - Gi, 0.0))
                dk = jnp.where(cols == i, jnp.sum(k * kd, axis=1, keepdims=True), dk)
                dq = jnp.where(cols == i, jnp.sum(q * kd, axis=1, keepdims=True), dq)
            return dk, dq

        branches = (plain, functools.partial(parts, 1), functools.partial(parts, 2), functools.partial(parts, 4),
                    by_cols)
        xk, xq = first_fit(branches) if diag == "auto" else branches[form]()
        akk_d, aqk_d = akk_d + xk, aqk_d + xq

        for b in range(NSUB - 1):  # block b < a: e^{Γr−c_a}·e^{c_a−Γi}, both <= 1
            def block(b=b):
                gb = g_ref[sub_rows(b), ch].astype(_F32)
                Glb = jnp.cumsum(gb, axis=0)
                kbb = k_ref[sub_rows(b), ch].astype(_F32) * l2_factor(k_ref, sub_rows(b))
                kbb = kbb * jnp.exp(jnp.minimum((last(Glb) - Glb) + between(tots, b + 1, a), 0.0))  # c_a − Γi
                return kk_dot(ka, kbb), _dot(qa, kbb, cd, trans_b=True)
            xk, xq = lax.cond(b < a, block, lambda: (zero_blk(), zero_blk()))
            off_k[b], off_q[b] = off_k[b] + xk, off_q[b] + xq

    akk_ref[:, ra] = jnp.where(rows > cols, akk_d, 0.0) * beta[:, None]
    aqk_ref[:, ra] = jnp.where(rows >= cols, aqk_d, 0.0).astype(aqk_ref.dtype)
    for b in range(NSUB):
        if b < NSUB - 1:
            @pl.when(b < a)
            def _(b=b):
                akk_ref[:, sub_rows(b)] = off_k[b] * beta[:, None]
                aqk_ref[:, sub_rows(b)] = off_q[b].astype(aqk_ref.dtype)
        if b > 0:
            @pl.when(b > a)
            def _(b=b):
                akk_ref[:, sub_rows(b)] = zero_blk()
                aqk_ref[:, sub_rows(b)] = zero_blk().astype(aqk_ref.dtype)


def _solve_kernel(akk_ref, kb_ref, v_ref, b_ref, w_ref, u_ref, *, cd):
    """T = (I + Akk)^-1 by 16×16 blocks; W = T (β k e^Γ), U = T (β v), in passes of 64 columns
    (only [16, 64] accumulators live at a time, as in `_scores_kernel`)."""
    blk = lambda a, b: akk_ref[pl.ds(a * SUB, SUB), pl.ds(b * SUB, SUB)]  # noqa: E731
    X = {}
    for a in range(NSUB):
        X[a, a] = _unit_lower_inverse(blk(a, a))
        for b in range(a - 1, -1, -1):  # X_ab = −X_aa Σ_{m=b}^{a−1} A_am X_mb
            acc = _dot32(blk(a, b), X[b, b])
            for m in range(b + 1, a):
                acc = acc + _dot32(blk(a, m), X[m, b])
            X[a, b] = -_dot32(X[a, a], acc)

    def passes(d):
        w = 64 if d % 64 == 0 else d
        return [pl.ds(h * w, w) for h in range(d // w)]

    for a in range(NSUB):
        ra = pl.ds(a * SUB, SUB)
        for ch in passes(kb_ref.shape[-1]):
            w = None
            for b in range(a + 1):
                dw = _dot(X[a, b], kb_ref[pl.ds(b * SUB, SUB), ch], cd)
                w = dw if w is None else w + dw
            w_ref[ra, ch] = w.astype(w_ref.dtype)
        for ch in passes(v_ref.shape[-1]):
            u = None
            for b in range(a + 1):
                rb = pl.ds(b * SUB, SUB)
                du = _dot(X[a, b], b_ref[rb][:, None] * v_ref[rb, ch].astype(_F32), cd)
                u = du if u is None else u + du
            u_ref[ra, ch] = u.astype(u_ref.dtype)


def scores(q, k, g, beta, *, scale, l2, num_warps=2, interpret=False, form="auto"):
    """Scores per 16-row sub-chunk from gated g [B,Tp,H,K] and β [B,Tp,H] (fp32, `gates`): Akk
    [B,H,Tp,C] fp32, Aqk [B,H,Tp,C], qg, kg, β k e^Γ [B,H,Tp,K] (operand dtype), e^{Γ_C} [B,H,NT,K]."""
    B, Tp, H, K = q.shape
    NT = Tp // C
    cd = _F32 if q.dtype == _F32 else jnp.bfloat16
    chunk_s = lambda d: pl.BlockSpec((None, C, None, d), lambda b, c, p: (b, c, p // NSUB, 0))  # noqa: E731
    sub = lambda d: pl.BlockSpec((None, None, SUB, d), lambda b, c, p: (b, p // NSUB, c * NSUB + p % NSUB, 0))  # noqa: E731
    in_specs = [chunk_s(K), chunk_s(K), chunk_s(K), pl.BlockSpec((None, C, None), lambda b, c, p: (b, c, p // NSUB))]
    return pl.pallas_call(
        functools.partial(_scores_kernel, scale=scale, l2=l2, cd=cd, diag=form),
        grid=(B, NT, H * NSUB),
        in_specs=in_specs,
        out_specs=[sub(C), sub(C), sub(K), sub(K), sub(K),
                   pl.BlockSpec((None, None, 1, K), lambda b, c, p: (b, p // NSUB, c, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, C), _F32), jax.ShapeDtypeStruct((B, H, Tp, C), cd),
                   jax.ShapeDtypeStruct((B, H, Tp, K), cd), jax.ShapeDtypeStruct((B, H, Tp, K), cd),
                   jax.ShapeDtypeStruct((B, H, Tp, K), cd), jax.ShapeDtypeStruct((B, H, NT, K), _F32)],
        compiler_params=None if interpret else _gpu_params(num_warps), interpret=interpret,
        name="kda_chunk_scores",
    )(q, k, g.astype(_F32), beta.astype(_F32))


def solve(akk, kb, v, beta_e, *, num_warps=2, interpret=False):
    """W = (I+Akk)⁻¹ β k e^Γ, U = (I+Akk)⁻¹ β v, [B,H,Tp,K|V] in the operand dtype."""
    B, H, Tp, K = kb.shape
    V = v.shape[-1]
    NT = Tp // C
    cd = kb.dtype
    chunk = lambda d: pl.BlockSpec((None, C, None, d), lambda b, c, h: (b, c, h, 0))  # noqa: E731
    tile = lambda d: pl.BlockSpec((None, None, C, d), lambda b, c, h: (b, h, c, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_solve_kernel, cd=cd),
        grid=(B, NT, H),
        in_specs=[tile(C), tile(K), chunk(V), pl.BlockSpec((None, C, None), lambda b, c, h: (b, c, h))],
        out_specs=[tile(K), tile(V)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, K), cd), jax.ShapeDtypeStruct((B, H, Tp, V), cd)],
        compiler_params=None if interpret else _gpu_params(num_warps), interpret=interpret,
        name="kda_chunk_solve",
    )(akk, kb, v, beta_e)


def intra(q, k, v, g, beta, *, scale, l2, num_warps=None, diag="auto", interpret=False):
    """The parallel part, two kernels: scores (per 16-row sub-chunk) and the block solve (per
    chunk), from gated, zero-padded g and β (`gates`). Returns w, u, qg, kg [B,H,Tp,D] and Aqk
    [B,H,Tp,C] in the operand dtype, e^{Γ_C} [B,H,NT,K] fp32."""
    nw = {} if num_warps is None else {"num_warps": num_warps}
    akk, aqk, qg, kg, kb, gl = scores(q, k, g, beta, scale=scale, l2=l2, interpret=interpret, form=diag, **nw)
    w, u = solve(akk, kb, v, beta.astype(_F32), interpret=interpret, **nw)
    return w, u, qg, kg, aqk, gl

"""The parallel part of the Pallas chunked KDA (see `chunk.py` for the whole): per 16-token
sub-chunk Γ and the 16×16 blocks of Akk / Aqk (`scores`), per chunk the block solve (`solve`);
`intra` chains them after the fused gate and sigmoid, one elementwise XLA pass (`gates`).
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
_LOG2E = 1.4426950408889634


def _exp2(x):
    """e^x as 2^(x·log2 e): the Triton backend lowers jnp.exp to libdevice's accurate expf, about
    ten instructions, and exp2 to a few around the hardware's ex2. Relative error about |x|·6e-8
    (the rounding of x·log2 e): 4e-6 at the 60-nat bound of the factored forms, far under the bf16
    operands these factors scale. 28% fewer instructions in the scores kernel, 1-3% faster on an
    H200, outputs as close to the reference (benchmarks/KDA_NOTES.md, session 7)."""
    return jnp.exp2(x * _LOG2E)


def _exp_fn(exp2):
    return _exp2 if exp2 else jnp.exp


EXP2_DEFAULT = True  # the scores and fix-up kernels' exponentials as `_exp2` (False: jnp.exp)
# The sub-chunk gate totals from one XLA reduction before the scores kernel (`sub_totals`), not summed
# by each program over its chunk's 64 gate rows: 0.400 against 0.454 ms at 8K on an H200, reduction
# included (benchmarks/KDA_NOTES.md, session 8)
TOTALS_DEFAULT = True


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
    """The fused gate (−e^{A_log}·softplus(g + dt_bias)) and the sigmoid of beta, fp32, as one
    elementwise XLA pass before the kernels (at bandwidth): a scores program would otherwise
    recompute softplus for every gate row it reads (session 2: the fused-gate form took 2x the
    time of precomputed gates)."""
    g = g.astype(_F32)
    beta = beta.astype(_F32)
    if gate:
        g = reference.kda_gate(g, A_log, dt_bias)
    if beta_sigmoid:
        beta = 1.0 / (1.0 + jnp.exp(-beta))
    return g, beta


def _kk_dot(x, y, cd, bf16=False):
    """x·yᵀ for Akk, which feeds the solve: exact fp32 operands for fp32 inputs, fp32 (TF32 on
    GPU) for bf16 inputs, or with `bf16` bf16 operands as Aqk's (`scores(..., kk_bf16=True)`)."""
    if cd != _F32 and not bf16:
        return lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    return _dot(x, y, cd, trans_b=True)


def _diag_parts(P, q, k, ga, Gl, cd, kk_bf16=False, ex=jnp.exp):
    """The diagonal block (Akk, Aqk before masks and β) as P matmul pairs, one per part of L = 16/P
    key rows i, each through its own per-channel reference m_p (see DIAG_KEY_MAX):
    e^{Γr−m_p}·e^{m_p−Γi}, every part's decay span s_p <= DIAG_SPAN_MAX. Query rows before the
    part (masked entries) get 0. q, k [16, K] (normed, scaled), ga the gates, Gl their cumsum."""
    srow = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    L = SUB // P
    akk_d = aqk_d = None
    for p in range(P):
        inp = (srow >= p * L) & (srow < (p + 1) * L)
        cp = jnp.sum(jnp.where(srow < p * L, ga, 0.0), axis=0, keepdims=True)  # c_p − c_a
        sp = -jnp.sum(jnp.where(inp, ga, 0.0), axis=0, keepdims=True)  # the part's decay, per channel
        m = cp - jnp.maximum(sp - DIAG_KEY_MAX, 0.0)
        kc = jnp.where(inp, k * ex(jnp.where(inp, m - Gl, 0.0)), 0.0)
        e = jnp.where(srow >= p * L, ex(jnp.minimum(Gl - m, DIAG_SPAN_MAX - DIAG_KEY_MAX)), 0.0)
        lq, lk = q * e, k * e
        dk, dq = _kk_dot(lk, kc, cd, kk_bf16), _dot(lq, kc, cd, trans_b=True)
        akk_d, aqk_d = (dk, dq) if p == 0 else (akk_d + dk, aqk_d + dq)
    return akk_d, aqk_d


def _diag_cols(q, k, Gl, ex=jnp.exp):
    """The diagonal block element-wise, one column at a time, every exponent <= 0 (any gate)."""
    srow = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    akk_d = jnp.zeros((SUB, SUB), _F32)
    aqk_d = jnp.zeros((SUB, SUB), _F32)
    for i in range(SUB):
        ki = jnp.sum(jnp.where(srow == i, k, 0.0), axis=0, keepdims=True)
        Gi = jnp.sum(jnp.where(srow == i, Gl, 0.0), axis=0, keepdims=True)
        kd = ki * ex(jnp.minimum(Gl - Gi, 0.0))
        akk_d = jnp.where(cols == i, jnp.sum(k * kd, axis=1, keepdims=True), akk_d)
        aqk_d = jnp.where(cols == i, jnp.sum(q * kd, axis=1, keepdims=True), aqk_d)
    return akk_d, aqk_d


def _max_part_span(ga, P):
    """The largest decay over one part of 16/P rows of ga [16, K], any channel (a scalar)."""
    srow = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    L = SUB // P
    part = [jnp.max(-jnp.sum(jnp.where((srow >= p * L) & (srow < (p + 1) * L), ga, 0.0), axis=0))
            for p in range(P)]
    return functools.reduce(jnp.maximum, part)


def _row_gates(g_ref, b_ref, m_ref, rows):
    """The gates [n, K] and β [n] of rows `rows`, padding rows masked (no decay, no write)."""
    g, beta = g_ref[rows, :].astype(_F32), b_ref[rows].astype(_F32)
    if m_ref is not None:
        m = m_ref[rows].astype(_F32)
        g, beta = g * m[:, None], beta * m
    return g, beta


def _l2_factor(x, l2):
    """Per-row L2 factor [n, 1] of x [n, K] (ones without `l2`)."""
    return lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + reference.L2_EPS) if l2 else jnp.ones_like(x[:, :1])


def _store_diag(akk_ref, aqk_ref, ra, beta, block):
    """Writes a diagonal block: Akk strictly lower and scaled by β, Aqk lower with its diagonal."""
    akk_d, aqk_d = block
    rows = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    cols = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    akk_ref[:, ra] = (jnp.where(rows > cols, akk_d, 0.0) * beta[:, None]).astype(akk_ref.dtype)
    aqk_ref[:, ra] = jnp.where(rows >= cols, aqk_d, 0.0).astype(aqk_ref.dtype)


def _scores_kernel(*refs, scale, l2, cd, masked, diag="inline", kk_bf16=False, unroll=False, sub_axis=2,
                   exp2=EXP2_DEFAULT, totals=False):
    """One 16-row sub-chunk a of one chunk (the v3 form), cumsum fused: its rows of Akk (fp32) and
    Aqk, qg, kg, β k e^Γ, β (masked), and e^{Γ_C}; only the blocks b <= a are computed.

    Γ is rebuilt from the (gated) g where it is needed: c_b (the sub-chunk totals before b) plus
    the in-sub-chunk cumsum, so Γ is never written to memory. The blocks b < a factor e^{Γr−Γi}
    through c = c_a = Γ at the end of sub-chunk a−1: e^{Γr−c}·e^{c−Γi}, both factors <= 1. The
    diagonal block takes the first safe form (bounds at DIAG_KEY_MAX): "plain", one pair through
    c_a, while the sub-chunk decays by at most 60 nats; "mm1" / "mm2" / "mm4", pairs through
    per-channel references, while each part decays by at most 140; else "cols", element-wise with
    every exponent <= 0. `diag` forces one form (tests, benchmarks), or "split" keeps the one-pair
    forms here and flags the rest for `diag_fixup`. `totals`: the sub-chunk totals come as an
    input (`sub_totals`, [4, K] per chunk) instead of being summed here from the chunk's 64 gate
    rows, and a sub-chunk's end is its total rather than its cumsum's last row.
    """
    q_ref, k_ref, g_ref, b_ref, *rest = refs
    m_ref = None
    if masked:
        m_ref, *rest = rest
    if totals:
        tot_ref, *rest = rest
    akk_ref, aqk_ref, qg_ref, kg_ref, kb_ref, beta_ref, gl_ref, *flag_ref = rest
    a = pl.program_id(sub_axis) % NSUB
    a0 = pl.multiple_of(a * SUB, SUB)
    kk = functools.partial(_kk_dot, bf16=kk_bf16)
    ex = _exp_fn(exp2)
    ra = pl.ds(a0, SUB)

    row_gates = functools.partial(_row_gates, g_ref, b_ref, m_ref)
    norm = functools.partial(_l2_factor, l2=l2)

    # Differences of Γ are summed from the gates between their two rows (never by subtracting two
    # large prefix sums), so their rounding stays at the scale of the decay between the rows (with
    # `totals` the sub-chunk's end comes from another summation order than its cumsum: a row's
    # e^{Γ_C−Γ} at the chunk's last row is 1 within the rounding of one sub-chunk's total, not exactly).
    srow = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    # each sub-chunk's gate total once, then sums of whole totals
    if totals:  # read from `sub_totals`
        tots = [tot_ref[pl.ds(m, 1), :] for m in range(NSUB)]
    else:
        tots = [jnp.sum(row_gates(pl.ds(m * SUB, SUB))[0], axis=0, keepdims=True) for m in range(NSUB)]

    def between_sub(lo, hi):  # the gates of sub-chunks lo..hi−1, per channel
        acc = None
        for m, t in enumerate(tots):
            t = jnp.where((m >= lo) & (m < hi), t, 0.0)
            acc = t if acc is None else acc + t
        return acc
    gC = between_sub(0, NSUB)
    ca = between_sub(0, a)  # Γ before sub-chunk a
    ga, beta = row_gates(ra)
    Gl = jnp.cumsum(ga, axis=0)  # Γ − c_a, in-sub-chunk
    last = lambda x: jnp.sum(jnp.where(srow == SUB - 1, x, 0.0), axis=0, keepdims=True)  # noqa: E731
    # Γ at the end of a sub-chunk m, relative to its start: the cumsum's last row, or with `totals`
    # the given total (same sum, another order: no reduction across rows)
    end = (lambda m, Gl: between_sub(m, m + 1)) if totals else (lambda m, Gl: last(Gl))
    beta_ref[...] = beta
    gl_ref[...] = ex(gC)

    q = q_ref[ra, :].astype(_F32)
    k = k_ref[ra, :].astype(_F32)
    q, k = q * (norm(q) * scale), k * norm(k)
    ea = ex(Gl)  # e^{Γr−c_a} <= 1
    # e^Γ = e^{c_a}·e^{Γ−c_a}: both factors <= 1, one exponential a channel for the first
    eG = ea * ex(ca) if exp2 else ex(ca + Gl)
    qg_ref[...] = (q * eG).astype(qg_ref.dtype)
    tail = jnp.minimum(end(a, Gl) - Gl, 0.0)  # c_{a+1} − Γ
    kg_ref[...] = (k * ex(tail + between_sub(a + 1, NSUB))).astype(kg_ref.dtype)  # Γ_C − Γ
    kb_ref[...] = (beta[:, None] * k * eG).astype(kb_ref.dtype)

    qa, ka = q * ea, k * ea
    store_diag = functools.partial(_store_diag, akk_ref, aqk_ref, ra, beta)

    def diag_parts(P):
        store_diag(_diag_parts(P, q, k, ga, Gl, cd, kk_bf16, ex))

    def diag_plain():
        """One pair through c_a itself when the sub-chunk decays by at most DIAG_KEY_MAX: the query
        and key factors of the off-diagonal blocks, e^{−Γi} (relative to c_a) for the keys."""
        kc = k * ex(-Gl)
        store_diag((kk(ka, kc, cd), _dot(qa, kc, cd, trans_b=True)))

    def diag_cols():
        store_diag(_diag_cols(q, k, Gl, ex))

    if diag == "cols":
        diag_cols()
    elif diag == "plain":
        diag_plain()
    elif diag == "split":  # the one-pair forms here; `diag_fixup` rewrites the flagged sub-chunks
        s1 = jnp.max(-end(a, Gl)) if totals else _max_part_span(ga, 1)
        pl.when(s1 <= DIAG_KEY_MAX)(diag_plain)
        pl.when(s1 > DIAG_KEY_MAX)(functools.partial(diag_parts, 1))
        # Not jnp.where(…, 1, 0): JAX 0.11's Triton lowering gives a select between integer literals
        # its predicate's i1 type (harmless for 1 and 0, but codes 2, 4, 16 came out as 0 on a GPU).
        flag_ref[0][...] = (s1 > DIAG_SPAN_MAX).astype(_F32).astype(jnp.int32).reshape(1)
    elif diag != "inline":  # "mm1" / "mm2" / "mm4": that many parts, whatever the gates
        diag_parts(int(diag[2:]))
    else:  # the fewest parts whose spans all fit, else the element-wise form
        spans = [_max_part_span(ga, P) for P in DIAG_PARTS]
        pl.when(spans[0] <= DIAG_KEY_MAX)(diag_plain)
        for j, P in enumerate(DIAG_PARTS):  # P parts where every coarser split overflows and this one fits
            cond = (spans[j] <= DIAG_SPAN_MAX) & (spans[0] > DIAG_KEY_MAX)
            for sp in spans[:j]:
                cond = cond & (sp > DIAG_SPAN_MAX)
            pl.when(cond)(functools.partial(diag_parts, P))
        cond = spans[0] > DIAG_SPAN_MAX
        for sp in spans[1:]:
            cond = cond & (sp > DIAG_SPAN_MAX)
        pl.when(cond)(diag_cols)

    for b in range(1, NSUB):  # the zero blocks above the diagonal
        cs = pl.ds(b * SUB, SUB)

        @pl.when(b > a)
        def _():
            akk_ref[:, cs] = jnp.zeros((SUB, SUB), akk_ref.dtype)
            aqk_ref[:, cs] = jnp.zeros((SUB, SUB), aqk_ref.dtype)

    def off(b, carry):  # block b < a: e^{Γr−c_a}·e^{c_a−Γi}, both <= 1
        rb = pl.ds(b * SUB if isinstance(b, int) else pl.multiple_of(b * SUB, SUB), SUB)
        gb, _ = row_gates(rb)
        Glb = jnp.cumsum(gb, axis=0)
        kbb = k_ref[rb, :].astype(_F32)
        kbb = kbb * norm(kbb) * ex(jnp.minimum((end(b, Glb) - Glb) + between_sub(b + 1, a), 0.0))  # c_a − Γi
        akk_ref[:, rb] = (beta[:, None] * kk(ka, kbb, cd)).astype(akk_ref.dtype)
        aqk_ref[:, rb] = _dot(qa, kbb, cd, trans_b=True).astype(aqk_ref.dtype)
        return carry

    if unroll:  # every block b < a in straight-line code (each under its own condition)
        for b in range(NSUB - 1):
            pl.when(b < a)(lambda b=b: off(b, None))
    else:
        lax.fori_loop(0, a, off, 0)


def _scores_passes_kernel(*refs, scale, l2, cd, masked, kk_bf16, cp, sub_axis):
    """The split form of `_scores_kernel` with the key channels in passes of `cp` (`fori_loop`s), so
    that only [16, cp] tiles stay live. Three phases: the rows' L2 norms and the sub-chunk's largest
    decays; the sub-chunk's own rows (qg, kg, β k e^Γ, e^{Γ_C}) and its diagonal block; then each
    block b < a, its 16×16 products accumulated over the passes. Same math; with the registers
    this frees (165 at passes of 32, 128 at 16, against 255: benchmarks/kda_registers.py) it also
    forms the two-pair diagonal itself, so it flags only the sub-chunks whose halves decay by more
    than DIAG_SPAN_MAX (the fix-up's four-pair and element-wise forms)."""
    q_ref, k_ref, g_ref, b_ref, *rest = refs
    m_ref = None
    if masked:
        m_ref, *rest = rest
    akk_ref, aqk_ref, qg_ref, kg_ref, kb_ref, beta_ref, gl_ref, flag_ref = rest
    K = q_ref.shape[-1]
    npass = K // cp
    a = pl.program_id(sub_axis) % NSUB
    ra = pl.ds(pl.multiple_of(a * SUB, SUB), SUB)
    blocks = [pl.ds(b * SUB, SUB) for b in range(NSUB)]
    srow = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    last = lambda x: jnp.sum(jnp.where(srow == SUB - 1, x, 0.0), axis=0, keepdims=True)  # noqa: E731
    sq = lambda x: jnp.sum(x * x, axis=1, keepdims=True)  # noqa: E731
    kk = functools.partial(_kk_dot, bf16=kk_bf16)
    zero = jnp.zeros((SUB, SUB), _F32)
    rows = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    cols = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)

    def chans(c):
        return pl.ds(pl.multiple_of(c * cp, cp), cp)

    def gates_of(rows_, ch):  # [16, cp] gates, padding rows masked (no decay)
        g = g_ref[rows_, ch].astype(_F32)
        return g * m_ref[rows_].astype(_F32)[:, None] if m_ref is not None else g

    def totals(ch):  # each sub-chunk's gate total per channel, [1, cp] each
        return [jnp.sum(gates_of(blocks[m], ch), axis=0, keepdims=True) for m in range(NSUB)]

    def between_sub(tots, lo, hi):  # the gates of sub-chunks lo..hi−1, per channel
        acc = None
        for m, t in enumerate(tots):
            t = jnp.where((m >= lo) & (m < hi), t, 0.0)
            acc = t if acc is None else acc + t
        return acc

    beta = b_ref[ra].astype(_F32)
    if m_ref is not None:
        beta = beta * m_ref[ra].astype(_F32)
    beta_ref[...] = beta

    def norms(c, carry):  # squared norms of a's rows; the largest decay of a, of its halves, in one channel
        qs, ks, s1, s2 = carry
        ch = chans(c)
        qs = qs + sq(q_ref[ra, ch].astype(_F32))
        ks = ks + sq(k_ref[ra, ch].astype(_F32))
        ga = gates_of(ra, ch)
        return qs, ks, jnp.maximum(s1, _max_part_span(ga, 1)), jnp.maximum(s2, _max_part_span(ga, 2))

    col = jnp.zeros((SUB, 1), _F32)
    inf = jnp.float32(-jnp.inf)
    qs, ks, s1, s2 = lax.fori_loop(0, npass, norms, (col, col, inf, inf))
    norm = (lambda x: lax.rsqrt(x + reference.L2_EPS)) if l2 else (lambda x: jnp.ones_like(x))
    nq, nk = norm(qs) * scale, norm(ks)
    # The diagonal's form: one pair through c_a, one per-channel pair, or (unlike the one-pass
    # kernel, which leaves it to the fix-up) two per-channel pairs; only sub-chunks whose halves
    # decay by more than DIAG_SPAN_MAX are flagged for `diag_fixup`.
    plain, one = s1 <= DIAG_KEY_MAX, (s1 <= DIAG_SPAN_MAX) | (s2 > DIAG_SPAN_MAX)

    def rows_of_a(ch):  # a's normed q, k and in-sub-chunk Γ for channels ch
        ga = gates_of(ra, ch)
        return q_ref[ra, ch].astype(_F32) * nq, k_ref[ra, ch].astype(_F32) * nk, ga, jnp.cumsum(ga, axis=0)

    def own(c, carry):  # a's rows of qg, kg, β k e^Γ, e^{Γ_C}, and its diagonal block
        akk_d, aqk_d = carry
        ch = chans(c)
        q, k, ga, Gl = rows_of_a(ch)
        tots = totals(ch)
        eG = jnp.exp(between_sub(tots, 0, a) + Gl)
        qg_ref[:, ch] = (q * eG).astype(qg_ref.dtype)
        kg_ref[:, ch] = (k * jnp.exp((last(Gl) - Gl) + between_sub(tots, a + 1, NSUB))).astype(kg_ref.dtype)
        kb_ref[:, ch] = (beta[:, None] * k * eG).astype(kb_ref.dtype)
        gl_ref[:, ch] = jnp.exp(between_sub(tots, 0, NSUB))

        def diag_plain():  # one pair through c_a while the sub-chunk decays by at most DIAG_KEY_MAX
            ea, kc = jnp.exp(Gl), k * jnp.exp(-Gl)
            return kk(k * ea, kc, cd), _dot(q * ea, kc, cd, trans_b=True)
        dk, dq = lax.cond(plain, diag_plain, lambda: lax.cond(
            one, lambda: _diag_parts(1, q, k, ga, Gl, cd, kk_bf16), lambda: _diag_parts(2, q, k, ga, Gl, cd, kk_bf16)))
        return akk_d + dk, aqk_d + dq

    akk_d, aqk_d = lax.fori_loop(0, npass, own, (zero, zero))
    akk_ref[:, ra] = (jnp.where(rows > cols, akk_d, 0.0) * beta[:, None]).astype(akk_ref.dtype)
    aqk_ref[:, ra] = jnp.where(rows >= cols, aqk_d, 0.0).astype(aqk_ref.dtype)
    for b in range(1, NSUB):  # the zero blocks above the diagonal
        @pl.when(b > a)
        def _():
            akk_ref[:, blocks[b]] = zero.astype(akk_ref.dtype)
            aqk_ref[:, blocks[b]] = zero.astype(aqk_ref.dtype)

    def off(b, carry):  # block b < a: e^{Γr−c_a}·e^{c_a−Γi}, both <= 1
        rb = pl.ds(pl.multiple_of(b * SUB, SUB), SUB)

        nkb = norm(lax.fori_loop(0, npass, lambda c, acc: acc + sq(k_ref[rb, chans(c)].astype(_F32)), col)
                   ) if l2 else 1.0

        def part(c, carry):
            acc_k, acc_q = carry
            ch = chans(c)
            q, k, _, Gl = rows_of_a(ch)
            ea = jnp.exp(Gl)
            Glb = jnp.cumsum(gates_of(rb, ch), axis=0)
            kbb = k_ref[rb, ch].astype(_F32) * nkb
            kbb = kbb * jnp.exp(jnp.minimum((last(Glb) - Glb) + between_sub(totals(ch), b + 1, a), 0.0))
            return acc_k + kk(k * ea, kbb, cd), acc_q + _dot(q * ea, kbb, cd, trans_b=True)
        acc_k, acc_q = lax.fori_loop(0, npass, part, (zero, zero))
        akk_ref[:, rb] = (acc_k * beta[:, None]).astype(akk_ref.dtype)
        aqk_ref[:, rb] = acc_q.astype(aqk_ref.dtype)
        return carry

    lax.fori_loop(0, a, off, 0)
    flag_ref[...] = (s2 > DIAG_SPAN_MAX).astype(_F32).astype(jnp.int32).reshape(1)


def _solve_kernel(akk_ref, kb_ref, v_ref, b_ref, w_ref, u_ref, *, cd):
    """T = (I + Akk)^-1 by 16×16 blocks; W = T (β k e^Γ), U = T (β v)."""
    blk = lambda a, b: akk_ref[pl.ds(a * SUB, SUB), pl.ds(b * SUB, SUB)].astype(_F32)  # noqa: E731
    X = {}
    for a in range(NSUB):
        X[a, a] = _unit_lower_inverse(blk(a, a))
        for b in range(a - 1, -1, -1):  # X_ab = −X_aa Σ_{m=b}^{a−1} A_am X_mb
            acc = _dot32(blk(a, b), X[b, b])
            for m in range(b + 1, a):
                acc = acc + _dot32(blk(a, m), X[m, b])
            X[a, b] = -_dot32(X[a, a], acc)
    for a in range(NSUB):
        w = u = None
        for b in range(a + 1):
            rb = pl.ds(b * SUB, SUB)
            dw = _dot(X[a, b], kb_ref[rb, :], cd)
            du = _dot(X[a, b], b_ref[rb][:, None] * v_ref[rb, :].astype(_F32), cd)
            w = dw if w is None else w + dw
            u = du if u is None else u + du
        ra = pl.ds(a * SUB, SUB)
        w_ref[ra, :] = w.astype(w_ref.dtype)
        u_ref[ra, :] = u.astype(u_ref.dtype)


def scores(q, k, g, beta, mask, *, scale, l2, num_warps=2, interpret=False, form="split", kk_bf16=False,
           num_stages=1, unroll=False, heads_fastest=False, channel_pass=None, exp2=EXP2_DEFAULT,
           totals=TOTALS_DEFAULT, akk_dtype=_F32):
    """Cumsum and scores per 16-row sub-chunk from gated g and β (`gates`): Akk [B,H,Tp,C] fp32,
    Aqk [B,H,Tp,C], qg, kg, β k e^Γ [B,H,Tp,K] (operand dtype), β masked [B,Tp,H] fp32 and e^{Γ_C}
    [B,H,NT,K] fp32. `mask` [Tp] (or None) marks the real rows; padding rows neither decay nor write.
    `kk_bf16`: Akk's products from bf16 operands instead of TF32 ones (bf16 inputs only; 0.52
    against 0.64 ms at 8K on an H100, Akk within 2.4e-3 of the TF32 products). `num_stages` 1 (no
    software pipelining of the loop over the blocks below the diagonal): 0.471 against 0.507 ms with
    Triton's default and 0.500 with 2 stages at 8K on an H200; `unroll` (those blocks in straight-line
    code) 0.554, so the loop stays. `heads_fastest` (opt-in): launch order (H·4, NT, B) instead of
    (B, NT, H·4), so the four sub-chunk programs of one chunk and head, then the heads of one
    chunk, run back to back: 0.698 against 0.471 ms at 8K on an H200. `channel_pass` (opt-in; form
    "split" only): the key channels in passes of that many (`_scores_passes_kernel`), so that fewer
    registers stay live (165 at 32, 128 at 16) and fewer sub-chunks are flagged (6% against 48% of
    Kimi-style gates), yet 1.08 (32) and 1.19 ms (16) against 0.471 (benchmarks/KDA_NOTES.md,
    session 7). `exp2` (default `EXP2_DEFAULT`): the one-pass kernel's exponentials as `_exp2`.
    One program per chunk and head (the four sub-chunks in straight-line code sharing their loads)
    measured slower: 0.519 ms at 4 warps, 0.771 at 8, against 0.468 on an H200 (session 8; commit
    0dc5067 has it). `totals` (default `TOTALS_DEFAULT`; the one-pass kernel): the sub-chunk gate totals
    from `sub_totals`, one XLA reduction, instead of each program summing its chunk's 64 gate rows
    (21% of the kernel's stall samples): 0.400 against 0.454 ms, the reduction included.
    `akk_dtype`: Akk's storage (fp32, or bf16 for `akk_storage="bf16"`).
    """
    B, Tp, H, K = q.shape
    NT = Tp // C
    cd = _F32 if q.dtype == _F32 else jnp.bfloat16
    in_specs, args = _chunk_inputs(q, k, g, beta, mask)
    sub_axis = 0 if heads_fastest else 2
    if channel_pass:
        if form != "split" or K % channel_pass:
            raise ValueError(f"channel_pass needs form='split' and a divisor of K = {K}, got {channel_pass} "
                             f"with form {form!r}")
        kern = functools.partial(_scores_passes_kernel, scale=scale, l2=l2, cd=cd, masked=mask is not None,
                                 kk_bf16=kk_bf16, cp=channel_pass, sub_axis=sub_axis)
    else:
        kern = functools.partial(_scores_kernel, scale=scale, l2=l2, cd=cd, masked=mask is not None, diag=form,
                                 kk_bf16=kk_bf16, unroll=unroll, sub_axis=sub_axis, exp2=exp2, totals=totals)
        if totals:
            in_specs.append(pl.BlockSpec((None, None, NSUB, K), lambda b, c, p: (b, p // NSUB, c, 0)))
            args.append(sub_totals(g, mask))
    out_specs = [_sub_spec(C), _sub_spec(C), _sub_spec(K), _sub_spec(K), _sub_spec(K),
                 pl.BlockSpec((None, SUB, None), lambda b, c, p: (b, c * NSUB + p % NSUB, p // NSUB)),
                 pl.BlockSpec((None, None, 1, K), lambda b, c, p: (b, p // NSUB, c, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, H, Tp, C), akk_dtype), jax.ShapeDtypeStruct((B, H, Tp, C), cd),
                 jax.ShapeDtypeStruct((B, H, Tp, K), cd), jax.ShapeDtypeStruct((B, H, Tp, K), cd),
                 jax.ShapeDtypeStruct((B, H, Tp, K), cd), jax.ShapeDtypeStruct((B, Tp, H), _F32),
                 jax.ShapeDtypeStruct((B, H, NT, K), _F32)]
    if form == "split":  # one flag per sub-chunk: its diagonal block needs `diag_fixup`
        out_specs.append(_flag_spec())
        out_shape.append(jax.ShapeDtypeStruct((B, H, NT * NSUB), jnp.int32))
    grid = (B, NT, H * NSUB)
    if heads_fastest:
        grid = grid[::-1]
        in_specs, out_specs = reversed_grid(in_specs), reversed_grid(out_specs)
    return pl.pallas_call(
        kern,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if interpret else _gpu_params(num_warps, num_stages), interpret=interpret,
        name="kda_chunk_scores",
    )(*args)


def sub_totals(g, mask):
    """Each sub-chunk's gate total, [B, H, NT·4, K] fp32 (padding rows masked), as one XLA
    reduction (`scores(..., totals=True)`)."""
    B, Tp, H, K = g.shape
    if mask is not None:
        g = g * mask[None, :, None, None]
    return g.reshape(B, Tp // SUB, SUB, H, K).sum(2).transpose(0, 2, 1, 3)


def reversed_grid(specs):
    """The same blocks for a 3-axis grid launched in reverse order (CUDA runs the first axis
    fastest): index maps over (z, y, x) instead of (x, y, z)."""
    return [pl.BlockSpec(s.block_shape, lambda p, c, b, f=s.index_map: f(b, c, p)) for s in specs]


def _chunk_inputs(q, k, g, beta, mask):
    """BlockSpecs and arguments of the per-sub-chunk kernels' inputs, grid (B, NT, H·4): the
    chunk's rows of q, k, g [B,Tp,H,K], β [B,Tp,H] and the padding mask [Tp] (when given)."""
    K = q.shape[-1]
    chunk = pl.BlockSpec((None, C, None, K), lambda b, c, p: (b, c, p // NSUB, 0))
    in_specs = [chunk, chunk, chunk, pl.BlockSpec((None, C, None), lambda b, c, p: (b, c, p // NSUB))]
    args = [q, k, g, beta]
    if mask is not None:
        in_specs.append(pl.BlockSpec((C,), lambda b, c, p: (c,)))
        args.append(mask)
    return in_specs, args


def _sub_spec(d):
    """One sub-chunk's rows [16, d] of a [B,H,Tp,d] output, grid (B, NT, H·4)."""
    return pl.BlockSpec((None, None, SUB, d), lambda b, c, p: (b, p // NSUB, c * NSUB + p % NSUB, 0))


def _flag_spec():
    return pl.BlockSpec((None, None, 1), lambda b, c, p: (b, p // NSUB, c * NSUB + p % NSUB))


def _fixup_kernel(*refs, scale, l2, cd, masked, kk_bf16=False, exp2=EXP2_DEFAULT):
    """The diagonal block of one flagged sub-chunk (decaying by more than DIAG_SPAN_MAX nats in one
    pair), rewritten in place: 2 or 4 pairs, else element-wise. Unflagged programs do nothing."""
    q_ref, k_ref, g_ref, b_ref, *rest = refs
    m_ref = rest.pop(0) if masked else None
    f_ref, _, _, akk_ref, aqk_ref = rest  # the aliased inputs are read and written through the outputs

    ra = pl.ds(pl.multiple_of(pl.program_id(2) % NSUB * SUB, SUB), SUB)

    @pl.when(f_ref[0] > 0)
    def _():
        ga, beta = _row_gates(g_ref, b_ref, m_ref, ra)
        Gl = jnp.cumsum(ga, axis=0)
        q, k = q_ref[ra, :].astype(_F32), k_ref[ra, :].astype(_F32)
        q, k = q * (_l2_factor(q, l2) * scale), k * _l2_factor(k, l2)
        store = functools.partial(_store_diag, akk_ref, aqk_ref, ra, beta)

        s2, s4 = _max_part_span(ga, 2), _max_part_span(ga, 4)
        ex = _exp_fn(exp2)
        pl.when(s2 <= DIAG_SPAN_MAX)(lambda: store(_diag_parts(2, q, k, ga, Gl, cd, kk_bf16, ex)))
        pl.when((s2 > DIAG_SPAN_MAX) & (s4 <= DIAG_SPAN_MAX))(
            lambda: store(_diag_parts(4, q, k, ga, Gl, cd, kk_bf16, ex)))
        pl.when(s4 > DIAG_SPAN_MAX)(lambda: store(_diag_cols(q, k, Gl, ex)))


def diag_fixup(q, k, g, beta, mask, flags, akk, aqk, *, scale, l2, num_warps=2, interpret=False, kk_bf16=False,
               num_stages=None, exp2=EXP2_DEFAULT):
    """After `scores(..., form="split")`: the flagged sub-chunks' diagonal blocks of Akk and Aqk,
    rewritten in place (the two arrays are aliased to the outputs). One kernel for the three forms:
    one kernel per form measured slower on an H100 (1.51 against 1.43 ms end to end with the fused
    gate, session 4), though each compiles to fewer registers. `kk_bf16` as in `scores`."""
    B, Tp, H, K = q.shape
    NT = Tp // C
    cd = _F32 if q.dtype == _F32 else jnp.bfloat16
    sub = _sub_spec(C)
    in_specs, args = _chunk_inputs(q, k, g, beta, mask)
    in_specs += [_flag_spec(), sub, sub]
    args += [flags, akk, aqk]
    return pl.pallas_call(
        functools.partial(_fixup_kernel, scale=scale, l2=l2, cd=cd, masked=mask is not None, kk_bf16=kk_bf16,
                          exp2=exp2),
        grid=(B, NT, H * NSUB),
        in_specs=in_specs,
        out_specs=[sub, sub],
        out_shape=[jax.ShapeDtypeStruct(akk.shape, akk.dtype), jax.ShapeDtypeStruct(aqk.shape, aqk.dtype)],
        input_output_aliases={len(args) - 2: 0, len(args) - 1: 1},
        compiler_params=None if interpret else _gpu_params(num_warps, num_stages), interpret=interpret,
        name="kda_chunk_diag_fixup",
    )(*args)


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


def intra(q, k, v, g, beta, A_log, dt_bias, mask, *, scale, l2, gate, beta_sigmoid, num_warps=None,
          diag="split", solve_impl="triton", akk_bf16=False, interpret=False, scores_opts=None, akk_dtype=_F32,
          scores_impl="triton"):
    """The parallel part: the fused gate and sigmoid (`gates`, one XLA pass), then two kernels:
    cumsum + scores (per 16-row sub-chunk) and the block solve (per chunk; `solve_impl` "mosaic":
    the Mosaic GPU kernel of `solve_mosaic.py`, the caller checks that the inputs fit it). Returns
    w, u, qg, kg [B,H,Tp,D] and Aqk [B,H,Tp,C] in the operand dtype, e^{Γ_C} [B,H,NT,K] fp32."""
    nw = {} if num_warps is None else {"num_warps": num_warps}
    g, beta = gates(g, beta, A_log, dt_bias, gate=gate, beta_sigmoid=beta_sigmoid)
    if scores_impl == "mosaic":
        return _intra_mosaic(q, k, v, g, beta, mask, scale=scale, l2=l2, solve_impl=solve_impl, interpret=interpret,
                             akk_dtype=akk_dtype, exp2=(scores_opts or {}).get("exp2", EXP2_DEFAULT), nw=nw)
    out = scores(q, k, g, beta, mask, scale=scale, l2=l2, interpret=interpret, form=diag, kk_bf16=akk_bf16, **nw,
                 akk_dtype=akk_dtype, **(scores_opts or {}))
    akk, aqk, qg, kg, kb, beta_e, gl = out[:7]
    if diag == "split":  # the default: the rare diagonal forms in a second kernel
        akk, aqk = diag_fixup(q, k, g, beta, mask, out[7], akk, aqk, scale=scale, l2=l2, interpret=interpret,
                              kk_bf16=akk_bf16, exp2=(scores_opts or {}).get("exp2", EXP2_DEFAULT), **nw)
    if solve_impl == "mosaic":
        from jaxprfaas.pallas_kernels.solve_mosaic import solve_mosaic
        w, u = solve_mosaic(akk, kb, v, beta_e, interpret=interpret)
    else:
        w, u = solve(akk, kb, v, beta_e, interpret=interpret, **nw)
    return w, u, qg, kg, aqk, gl


def _intra_mosaic(q, k, v, g, beta, mask, *, scale, l2, solve_impl, interpret, akk_dtype, exp2, nw):
    """`intra` with the Mosaic GPU scores kernel (`scores_mosaic.py`; bf16 inputs, diag "split" and bf16
    Akk products only): its sub-chunk totals give e^{Γ_C} and the fix-up's flags (sub-chunks decaying
    by more than DIAG_KEY_MAX nats in some channel, whose diagonal blocks it clamped)."""
    from jaxprfaas.pallas_kernels.scores_mosaic import scores_mosaic
    if mask is not None:  # padding rows neither decay nor write
        g, beta = g * mask[None, :, None, None], beta * mask[None, :, None]
    akk, aqk, qg, kg, kb, tot = scores_mosaic(q, k, g, beta, scale=scale, l2=l2, akk_dtype=akk_dtype,
                                              interpret=interpret)
    B, H, nsub, K = tot.shape
    flags = (jnp.max(-tot, axis=-1) > DIAG_KEY_MAX).astype(jnp.int32)
    gl = jnp.exp(tot.reshape(B, H, nsub // NSUB, NSUB, K).sum(3))
    akk, aqk = diag_fixup(q, k, g, beta, mask, flags, akk, aqk, scale=scale, l2=l2, interpret=interpret,
                          kk_bf16=True, exp2=exp2, **nw)
    if solve_impl == "mosaic":
        from jaxprfaas.pallas_kernels.solve_mosaic import solve_mosaic
        w, u = solve_mosaic(akk, kb, v, beta, interpret=interpret)
    else:
        w, u = solve(akk, kb, v, beta, interpret=interpret, **nw)
    return w, u, qg, kg, aqk, gl

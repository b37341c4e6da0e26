"""The scores kernel of the chunked KDA as a Mosaic GPU kernel (Hopper: TMA, wgmma).

What `chunk_intra.scores` computes, one CTA of one warpgroup per (chunk, head, batch row) instead
of four Triton programs per chunk (one a 16-row sub-chunk, each re-reading the gate rows before
its own). From q, k [B,Tp,H,K] bf16, the gated g [B,Tp,H,K] fp32 (padding rows 0) and β [B,H,Tp]
fp32 (padding rows 0), per chunk:

    Akk = strict-tril(β k·kᵀ ⊙ e^{Γr−Γi})   [B,H,Tp,64] fp32 (or bf16: akk_storage="bf16")
    Aqk = tril(q·kᵀ ⊙ e^{Γr−Γi})           [B,H,Tp,64] bf16
    qg = q⊙e^Γ,  kg = k⊙e^{Γ_C−Γ},  kb = β k⊙e^Γ      [B,H,Tp,K] bf16
    the sub-chunk gate totals               [B,H,NT·4,K] fp32

q and k L2-normed (`l2`), q scaled. The caller derives e^{Γ_C} and the fix-up flags from the totals.

Γ inside each 16-row sub-chunk is one product on the tensor cores: Γloc = L·g with L the
block-diagonal lower-triangular ones, g split into bf16 hi + lo parts (16 significant bits), fp32
accumulation. Every gate is <= 0, so the sums never cancel: an entry e^{−D} carries a relative
error of about D·2⁻¹⁸, 1e-4 at D = 30 (entries below e^{−30} do not matter at fp32 scale).

Stability (reference §1.6): with t_m the total of sub-chunk m and c_a = Σ_{m<a} t_m (Γ before
sub-chunk a), row r of sub-chunk a and key i of sub-chunk b meet through the reference c_{b+1},
the end of the key's sub-chunk:

    e^{Γr−Γi} = e^{Γr−c_{b+1}} · e^{c_{b+1}−Γi}

The key factor e^{c_{b+1}−Γi} = e^{t_b − Γloc_i} is <= 1 (one exponential a key, `kr`). The
query factor for a > b is e^{Γloc_r} · e^{c_a−c_{b+1}}, a product of two factors <= 1 (the second
per channel and pair of sub-chunks), so it never overflows and underflows only where the entry is
below fp32's range. On the diagonal (a = b) it is e^{Γloc_r} · e^{−t_a}, at most e^{s} for a
sub-chunk decaying by s: exact while s <= DIAG_KEY_MAX (60 nats, the Triton kernel's one-pair
bound), clamped beyond; such sub-chunks are flagged and `chunk_intra.diag_fixup` rewrites their
diagonal blocks (two or four pairs, or element-wise). Column block b of Akk and Aqk is then one
wgmma each, [64,K] (the query factors of column block b) · [K,16] (block b's keys, transposed).

Every exponent is its own product W·g (`_left`: W of 0 and ±1 picks the gates to sum), so no
per-channel vector is held (each costs 32 registers a thread in the WGMMA layout; the first
version, which held a dozen, took 10.4 ms end to end at B=8, T=4096).

Status: opt-in (`chunk_kda_pallas(..., scores_impl="mosaic")`). Correct on an H200 against the
reference and the Triton kernel, and 1.11x faster than the Triton kernel alone: 1.463 against
1.622 ms at B=8, T=4096, H=32 (benchmarks/RESULTS.md, session 12), with the column blocks as a
loop (unrolled, the code took 4.34 ms). 255 registers and 107,520 bytes of shared memory: two
warpgroups an SM, latency-bound. End to end it gains 3–6% with mild gates and loses 7–9% with
Kimi-style ones, whose sub-chunks beyond 60 nats go to the fix-up (the Triton kernel's bound is
140). Raising this one's to 120 by shifting each key sub-chunk's reference (session 12, run 4)
made it slower (1.78 ms) and left non-finite kg values on the GPU, so it was reverted.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels import reference
from jaxprfaas.pallas_kernels.mosaic_common import plgpu as _plgpu, tiles as _tiles, wgmma_layout as _wg

C = 64  # chunk
SUB = 16  # sub-chunk
NSUB = C // SUB
DIAG_KEY_MAX = 60.0  # as chunk_intra.DIAG_KEY_MAX: the diagonal's query factor is at most e^{60}
_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _load(ref, layout=None):
    return _plgpu().load(ref, layout=_wg() if layout is None else layout, optimized=False)


def _iota(shape, dim):
    return _plgpu().broadcasted_iota(jnp.int32, shape, dim, layout=_wg())


def _col():
    return _plgpu().Layout.WGMMA.reduce(0)  # one value per column (channel)


def _row():
    return _plgpu().Layout.WGMMA.reduce(1)  # one value per row (token)


def _wgmma(acc, x, b_ref, stage):
    """acc += x @ b_ref for a bf16 register array x; in the interpreter (whose wgmma reads both
    operands from shared memory) x goes through `stage` first."""
    plgpu = _plgpu()
    if stage is None:
        plgpu.wgmma(acc, x, b_ref)
    else:
        buf = stage[x.shape[1]]
        plgpu.commit_smem()
        buf[...] = x
        plgpu.commit_smem()
        plgpu.wgmma(acc, buf, b_ref)


def _left(kind, j=None):
    """The [64,64] bf16 left factor W of a product W·g (g [64,K] the chunk's gates; r the row, i the
    gate's row, a(·) the sub-chunk): every exponent the kernel needs, each a sum of gates of one
    sign (no cancellation):

        "full"    Γr                   i <= r
        "after"   Γ_C − Γr             i > r
        "tail"    c_{a+1} − Γr         i > r in a(r)
        "totals"  t_r (rows 0..3)      a(i) = r
        "col", j  Γr − c_{j+1}         16(j+1) <= i <= r   for a(r) > j  (<= 0)
                                       −(i > r in a(r))    for a(r) = j  (>= 0, the diagonal)
    """
    r, i = _iota((C, C), 0), _iota((C, C), 1)
    a, b = r >> 4, i >> 4
    if kind == "full":
        w = jnp.where(i <= r, 1.0, 0.0)
    elif kind == "after":
        w = jnp.where(i > r, 1.0, 0.0)
    elif kind == "tail":
        w = jnp.where((i > r) & (a == b), 1.0, 0.0)
    elif kind == "totals":
        w = jnp.where(b == r, 1.0, 0.0)
    else:
        w = jnp.where((a > j) & (b > j) & (i <= r), 1.0, jnp.where((a == j) & (b == j) & (i > r), -1.0, 0.0))
    return w.astype(_BF16)


def _body(q_ref, k_ref, g_ref, beta_ref, akk_ref, aqk_ref, qg_ref, kg_ref, kb_ref, tot_ref,
          q_s, k_s, gh_s, gl_s, beta_s, bar_g, bar_x, *stage, scale, l2, akk_dtype, skip=()):
    plgpu = _plgpu()
    n, h, b = lax.axis_index("n"), lax.axis_index("h"), lax.axis_index("b")
    tok = pl.ds(n * C, C)
    stage = stage[0] if stage else None
    K = q_s.shape[-1]
    plgpu.copy_gmem_to_smem(q_ref.at[b, tok, h], q_s, bar_x)
    plgpu.copy_gmem_to_smem(k_ref.at[b, tok, h], k_s, bar_x)
    plgpu.copy_gmem_to_smem(beta_ref.at[b, h, tok], beta_s, bar_x)

    def product(w):
        """W·g [64,K] fp32: g as bf16 hi + lo (16 significant bits), fp32 accumulation."""
        def run(acc):
            _wgmma(acc, w, gl_s, stage)
            _wgmma(acc, w, gh_s, stage)
            return acc[...]
        return pl.run_scoped(run, plgpu.ACC((C, K), _F32))

    def gates(g_s):  # g in, split into gh_s, gl_s; the totals out through g_s
        plgpu.copy_gmem_to_smem(g_ref.at[b, tok, h], g_s, bar_g)
        plgpu.barrier_wait(bar_g)
        g = _load(g_s)
        gh = g.astype(_BF16)
        gh_s[...] = gh
        gl_s[...] = (g - gh.astype(_F32)).astype(_BF16)
        plgpu.commit_smem()
        g_s[...] = product(_left("totals"))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(g_s.at[pl.ds(0, NSUB)], tot_ref.at[b, h, pl.ds(n * NSUB, NSUB)])
        plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(gates, plgpu.SMEM((C, K), _F32))

    ex = jnp.exp
    plgpu.barrier_wait(bar_x)
    beta = _load(beta_s, _row())
    rows = lambda v: lax.broadcast_in_dim(v, (C, K), [0])  # noqa: E731

    def factor(x_s, s):  # the rows' L2 factors times s, broadcast over the channels
        if not l2:
            return s
        x = _load(x_s, _wg()).astype(_F32)
        return rows(lax.rsqrt(jnp.sum(x * x, axis=1) + reference.L2_EPS) * s)
    fq, fk = factor(q_s, scale), factor(k_s, 1.0)
    key = lambda: _plgpu().load(k_s, layout=_wg()).astype(_F32) * fk  # noqa: E731
    query = lambda: _plgpu().load(q_s, layout=_wg()).astype(_F32) * fq  # noqa: E731

    def outputs(kr_s, o_s):  # kr (the keys' factors e^{c_{b+1} − Γi} <= 1), then qg, kb, kg through o_s
        kr_s[...] = (key() * ex(product(_left("tail")))).astype(_BF16)
        if "outputs" in skip:
            plgpu.commit_smem()
            return
        eg = ex(product(_left("full")))
        values = ((lambda: query() * eg, qg_ref), (lambda: key() * eg * rows(beta), kb_ref),
                  (lambda: key() * ex(product(_left("after"))), kg_ref))
        for value, dst in values:  # each formed after the last store read o_s (fewer live registers)
            x = value().astype(_BF16)
            plgpu.wait_smem_to_gmem(0)
            o_s[...] = x
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, dst.at[b, h, tok])
        plgpu.wait_smem_to_gmem(0)  # o_s's memory is akk_s's and aqk_s's next

    blk = _iota((C, K), 0) >> 4
    r, i = _iota((C, SUB), 0), _iota((C, SUB), 1)
    bsub = lax.broadcast_in_dim(beta, (C, SUB), [0])

    def blocks(kr_s, akk_s, aqk_s):
        """Column block j: [64,K] query factors · [K,16] keys of sub-chunk j, stored by TMA as [64,16]
        column blocks (a loop, not four unrolled copies: the kernel's code stays small)."""
        def column(j, carry):
            f = jnp.where(blk >= j, ex(jnp.minimum(product(_left("col", j)), DIAG_KEY_MAX)), 0.0)
            keys = kr_s.at[pl.ds(pl.multiple_of(j * SUB, SUB), SUB)].T

            def run(acc_k, acc_q):
                _wgmma(acc_k, (key() * f).astype(_BF16), keys, stage)
                _wgmma(acc_q, (query() * f).astype(_BF16), keys, stage)
                return acc_k[...], acc_q[...]
            kk, qk = pl.run_scoped(run, plgpu.ACC((C, SUB), _F32), plgpu.ACC((C, SUB), _F32))
            akk_s[j] = jnp.where(r > i + j * SUB, kk * bsub, 0.0).astype(akk_s.dtype)
            aqk_s[j] = jnp.where(r >= i + j * SUB, qk, 0.0).astype(_BF16)
            plgpu.commit_smem()
            cols = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)  # each its own buffer: no wait before the next
            plgpu.copy_smem_to_gmem(akk_s.at[j], akk_ref.at[b, h, tok, cols])
            plgpu.copy_smem_to_gmem(aqk_s.at[j], aqk_ref.at[b, h, tok, cols])
            return carry
        lax.fori_loop(0, 0 if "blocks" in skip else NSUB, column, 0)
        plgpu.wait_smem_to_gmem(0)

    def keys_phase(kr_s):  # kr lives from the outputs to the blocks' products
        pl.run_scoped(functools.partial(outputs, kr_s), _tiles((C, K)))
        pl.run_scoped(functools.partial(blocks, kr_s), plgpu.SMEM((NSUB, C, SUB), akk_dtype),
                      plgpu.SMEM((NSUB, C, SUB), _BF16))
    # shared memory: q, k, gh, gl (64 KB at K = 128) and one scoped region reused (g 32 KB; then kr 16 KB
    # with the output staging 16 KB, then with Akk + Aqk 24 KB): ~104 KB, so two CTAs share an SM
    pl.run_scoped(keys_phase, _tiles((C, K)))


def scores_mosaic(q, k, g, beta, *, scale, l2, akk_dtype=_F32, interpret=False, skip=()):
    """Akk [B,H,Tp,64] (`akk_dtype`), Aqk [B,H,Tp,64] bf16, qg, kg, β k e^Γ [B,H,Tp,K] bf16 and the
    sub-chunk gate totals [B,H,Tp/16,K] fp32 from q, k [B,Tp,H,K] bf16, gated g [B,Tp,H,K] and β
    [B,Tp,H] (padding rows of g and β zero), Tp a multiple of 64. `interpret`: True (or a
    `plgpu.InterpretGPUParams`) runs JAX's Mosaic GPU interpreter. `skip` (for timing only: the
    outputs are then wrong): "blocks" leaves out the Akk/Aqk products, "outputs" qg, kb, kg."""
    plgpu = _plgpu()
    B, Tp, H, K = q.shape
    if (k.shape != q.shape or g.shape != q.shape or beta.shape != (B, Tp, H) or Tp % C or K not in (64, 128)
            or q.dtype != _BF16 or k.dtype != _BF16):
        raise ValueError(f"the Mosaic GPU scores kernel takes q, k [B,Tp,H,K] bf16 with K in (64, 128), g of "
                         f"the same shape and beta [B,Tp,H], Tp % {C} == 0: got q {q.shape} {q.dtype}, k "
                         f"{k.shape} {k.dtype}, g {g.shape}, beta {beta.shape}")
    if akk_dtype not in (_F32, _BF16):
        raise ValueError(f"akk_dtype must be float32 or bfloat16, got {akk_dtype}")
    beta_t = jnp.transpose(beta.astype(_F32), (0, 2, 1))  # [B,H,Tp]: one head's chunk contiguous
    scratch = [_tiles((C, K)), _tiles((C, K)), _tiles((C, K)), _tiles((C, K)),
               plgpu.SMEM((C,), _F32), plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=3)]
    if interpret:  # the staged register operands, by width (see `_wgmma`)
        scratch.append({n: _tiles((C, n)) for n in sorted({C, K})})
    bhd = lambda d, dt: jax.ShapeDtypeStruct((B, H, Tp, d), dt)  # noqa: E731
    out = (bhd(C, akk_dtype), bhd(C, _BF16), bhd(K, _BF16), bhd(K, _BF16), bhd(K, _BF16),
           jax.ShapeDtypeStruct((B, H, Tp // SUB, K), _F32))
    kern = plgpu.kernel(
        functools.partial(_body, scale=float(scale), l2=bool(l2), akk_dtype=akk_dtype, skip=tuple(skip)),
        out_type=out, scratch_types=tuple(scratch),
        grid=(Tp // C, H, B), grid_names=("n", "h", "b"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret is True else (interpret or None),
        kernel_name="kda_chunk_scores_mosaic")
    akk, aqk, qg, kg, kb, tot = kern(q, k, g.astype(_F32), beta_t)
    return akk, aqk, qg, kg, kb, tot

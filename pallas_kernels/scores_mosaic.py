"""The cumsum + scores kernel of the chunked KDA as a Mosaic GPU kernel (Hopper: TMA, wgmma).

Same contract as `chunk_intra.scores(q, k, g, beta, None, scale=scale, l2=l2, form="split")` for
bf16 q, k [B,Tp,H,128] (Tp % 64 == 0, no padding mask), fp32 gates g <= 0 and β: returns Akk
[B,H,Tp,64] fp32, Aqk [B,H,Tp,64], qg, kg, β k e^Γ [B,H,Tp,128] (bf16), β [B,Tp,H] fp32,
e^{Γ_C} [B,H,NT,128] fp32 and the diagonal-fixup flags [B,H,NT·4] int32 (`diag_fixup` rewrites
the flagged sub-chunks' diagonal blocks).

One CTA of one warpgroup per (chunk, head, batch row). Every in-chunk sum of gates is one matmul
of a 0/1 mask [64,64] (register operand, built from iotas) with g split exactly into three bf16
parts g₁ + g₂ + g₃ (fp32 accumulation), each part a 128-byte-swizzled [64,128] tile in shared
memory. The masks give each quantity directly, never as a difference of two large prefix sums:

    L  = Γr − c_a          same sub-chunk, j <= r     (c_a: Γ before row r's sub-chunk a)
    Γr                     j <= r                     (qg, β k e^Γ; e^{Γ_C} is row 63's)
    Γ_C − Γr               j > r                      (kg: exactly 1 at the last row)
    T_a = c_{a+1} − c_a    same sub-chunk             (the sub-chunk's decay s_a = −T_a)
    P_a = c_a − Γi         i < j < 16a, a = 1, 2, 3   (key side of the blocks left of a)

Scores (as the Triton kernel's "split" form): the four diagonal 16×16 blocks in one wgmma pair
through the per-channel reference m = c_a − max(0, s_a − 60) (row factor e^{min(L+off, 80)},
key factor e^{−L−off}, off = max(0, s_a − 60)); the blocks left of the diagonal one wgmma pair
per row sub-chunk a, e^{L}·e^{P_a} (both <= 1). Entries outside each product's region are
dropped by selects (they may be inf there). A sub-chunk whose largest per-channel decay exceeds
DIAG_SPAN_MAX = 140 is flagged; its diagonal block holds finite values only.

Akk feeds the solve, so with `precise` (the default) its products are bf16 triples of split
operands, x = xh + xl, y = yh + yl: xl yh + xh yl + xh yh (≈2⁻¹⁶ relative, finer than the Triton
kernel's TF32); Aqk is a plain bf16 product, as there. The q, k rows are read again from shared
memory at each use (only their per-row L2 factors stay in registers).

Shared memory per CTA (K = 128): q, k 32 KB, g 32 KB, its three parts 48 KB, the diagonal key
operand 16 KB, one off-diagonal key operand 16 KB (reused for a = 1, 2, 3), the bf16 output stage
16 KB (qg, β k e^Γ, kg in turn), Akk 16 KB, Aqk 8 KB, β and flags 0.5 KB: 188 KB (192,520 bytes
in the lowering); `precise` adds the two key operands' low parts, 220 KB (225,288 bytes of the
232,448 an H100 block may opt into). One CTA an SM either way.

Written against JAX 0.11's Mosaic GPU API (lane semantics, explicit WGMMA layouts); checked in
the Mosaic GPU interpreter on the CPU and through the real lowering for an H100
(`tests/jax11/test_scores_mosaic.py`); not yet run or timed on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels import reference

C = 64  # chunk
SUB = 16  # sub-chunk
NSUB = C // SUB
DIAG_KEY_MAX = 60.0  # as chunk_intra
DIAG_SPAN_MAX = 140.0
_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return plgpu


def _wg():
    return _plgpu().Layout.WGMMA


def _row():
    return _plgpu().Layout.WGMMA.reduce(1)  # one value per row of a WGMMA-layout array


def _tiles(shape):
    """bf16 wgmma operand in shared memory: [8, 64] tiles, 128-byte swizzle."""
    plgpu = _plgpu()
    return plgpu.SMEM(shape, _BF16, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _load(ref, layout=None):
    return _plgpu().load(ref, layout=_wg() if layout is None else layout, optimized=False)


def _iota(shape, dim):
    return _plgpu().broadcasted_iota(jnp.int32, shape, dim, layout=_wg())


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _wgmma(acc, x, b_ref, stage):
    """acc += x @ b_ref for a bf16 register array x. The interpreter's wgmma reads both operands
    from shared memory, so there x goes through `stage` (None when lowered for the GPU)."""
    plgpu = _plgpu()
    if stage is None:
        plgpu.wgmma(acc, x, b_ref)
    else:
        stage[...] = x
        plgpu.commit_smem()
        plgpu.wgmma(acc, stage, b_ref)


def _split(x):
    """x ≈ hi + lo, both bf16: about 16 significant bits together."""
    hi = x.astype(_BF16)
    return hi, (x - hi.astype(_F32)).astype(_BF16)


def _body(q_ref, k_ref, g_ref, beta_ref, akk_ref, aqk_ref, qg_ref, kg_ref, kb_ref, gl_ref, fl_ref,
          q_s, k_s, g_s, gp_s, o_s, kd_s, ka_s, akk_s, aqk_s, beta_s, fl_s, bar, *stage, scale, l2, precise):
    plgpu = _plgpu()
    n, h, b = lax.axis_index("n"), lax.axis_index("h"), lax.axis_index("b")
    tok = pl.ds(n * C, C)
    K = q_s.shape[-1]
    full, sq = (C, K), (C, C)
    if precise:
        (kdl_s, kal_s), stage = stage[:2], stage[2:]
    st_m, st_r = (stage[0], stage[1]) if stage else (None, None)

    def kk_products(acc, x, y_s, yl_s):
        """acc += x y_sᵀ for Akk (it feeds the solve): with `precise`, x = xh + xl and y = yh + yl
        in bf16 and xl yh + xh yl + xh yh (≈2⁻¹⁶ relative, finer than TF32), else bf16 x yh."""
        if not precise:
            _wgmma(acc, x.astype(_BF16), y_s.T, st_r)
            return
        xh, xl = _split(x)
        _wgmma(acc, xl, y_s.T, st_r)
        _wgmma(acc, xh, yl_s.T, st_r)
        _wgmma(acc, xh, y_s.T, st_r)

    def key_operand(x, y_s, yl_s):
        if precise:
            yh, yl = _split(x)
            y_s[...] = yh
            yl_s[...] = yl
        else:
            y_s[...] = x.astype(_BF16)
        plgpu.commit_smem()

    plgpu.copy_gmem_to_smem(q_ref.at[b, tok, h], q_s, bar)
    plgpu.copy_gmem_to_smem(k_ref.at[b, tok, h], k_s, bar)
    plgpu.copy_gmem_to_smem(g_ref.at[b, tok, h], g_s, bar)
    plgpu.copy_gmem_to_smem(beta_ref.at[b, h, tok], beta_s, bar)
    plgpu.barrier_wait(bar)

    # g = g1 + g2 + g3 in bf16 (24 significant bits): the right operands of the mask products
    g = _load(g_s)
    g1 = g.astype(_BF16)
    r1 = g - g1.astype(_F32)
    g2 = r1.astype(_BF16)
    g3 = (r1 - g2.astype(_F32)).astype(_BF16)
    gp_s.at[0][...] = g1
    gp_s.at[1][...] = g2
    gp_s.at[2][...] = g3
    plgpu.commit_smem()  # also: every thread has read g_s (it takes e^Γ below)

    r, j = _iota(sq, 0), _iota(sq, 1)
    rb, jb = r >> 4, j >> 4

    def cum(mask):
        """Σ_j mask[r, j] g[j, :] [64, K] fp32."""
        m = jnp.where(mask, 1.0, 0.0).astype(_BF16)

        def scoped(acc):
            if st_m is None:
                for p in range(3):
                    plgpu.wgmma(acc, m, gp_s.at[p])
            else:
                st_m[...] = m
                plgpu.commit_smem()
                for p in range(3):
                    plgpu.wgmma(acc, st_m, gp_s.at[p])
            return acc[...]
        return pl.run_scoped(scoped, plgpu.ACC(full, _F32))

    def factor(x_s, s):
        """The per-row factor (L2 norm and scale) of the raw rows in x_s, per row or a scalar."""
        if not l2:
            return s
        x = _load(x_s).astype(_F32)
        return lax.rsqrt(jnp.sum(x * x, axis=1) + reference.L2_EPS) * s

    def rows_of(x_s, f):
        """The normalised rows [64, K] fp32, read again from shared memory at each use (fewer
        live registers than holding q and k through the kernel)."""
        x = _load(x_s).astype(_F32)
        if l2:
            return x * _rows(f, full)
        return x * f if f != 1.0 else x

    def store(x, dst):
        """A bf16 [64, K] output through the one stage tile (its previous store has read it)."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_s[...] = x.astype(_BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, dst)

    fq, fk = factor(q_s, scale), factor(k_s, 1.0)
    q = functools.partial(rows_of, q_s, fq)
    k = functools.partial(rows_of, k_s, fk)
    beta = _load(beta_s, _row())

    # qg = q e^Γ, β k e^Γ and e^{Γ_C} (row 63 of e^Γ)
    eG = jnp.exp(cum(j <= r))
    g_s[...] = eG
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(g_s.at[C - 1], gl_ref.at[b, h, n])
    store(q() * eG, qg_ref.at[b, h, tok])
    store(k() * eG * _rows(beta, full), kb_ref.at[b, h, tok])
    del eG
    # kg = k e^{Γ_C − Γ}
    store(k() * jnp.exp(cum(j > r)), kg_ref.at[b, h, tok])

    # the sub-chunk's decay and the flags
    span = -cum(jb == rb)
    fl_s[...] = (jnp.max(span, axis=1) > DIAG_SPAN_MAX).astype(jnp.int32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(fl_s, fl_ref.at[b, h, tok])
    off = jnp.maximum(span - DIAG_KEY_MAX, 0.0)
    del span

    # the diagonal blocks: e^{min(L + off, 80)} · e^{−L − off}
    L = cum((jb == rb) & (j <= r))
    key_operand(k() * jnp.exp(-L - off), kd_s, kdl_s if precise else None)
    ed = jnp.exp(jnp.minimum(L + off, DIAG_SPAN_MAX - DIAG_KEY_MAX))
    del off

    def diag(acc_kk, acc_qk):
        kk_products(acc_kk, k() * ed, kd_s, kdl_s if precise else None)
        _wgmma(acc_qk, (q() * ed).astype(_BF16), kd_s.T, st_r)
        return acc_kk[...], acc_qk[...]
    dkk, dqk = pl.run_scoped(diag, plgpu.ACC(sq, _F32), plgpu.ACC(sq, _F32))
    del ed
    same = rb == jb
    akk = jnp.where(same & (j < r), dkk, 0.0)
    aqk = jnp.where(same & (j <= r), dqk, 0.0)
    del dkk, dqk

    # the blocks left of the diagonal, per row sub-chunk a: e^{Γr − c_a} · e^{c_a − Γi}
    eo = jnp.exp(L)
    ko, qo = k() * eo, (q() * eo).astype(_BF16)
    del L, eo
    ri = _iota(full, 0)
    for a in range(1, NSUB):
        P = cum((j > r) & (j < SUB * a))  # c_a − Γi for rows i < 16a
        ka = jnp.where(ri < SUB * a, k() * jnp.exp(jnp.minimum(P, 0.0)), 0.0)
        key_operand(ka, ka_s, kal_s if precise else None)  # the previous a's wgmmas are done (read)
        del P, ka

        def offd(acc_kk, acc_qk):
            kk_products(acc_kk, ko, ka_s, kal_s if precise else None)
            _wgmma(acc_qk, qo, ka_s.T, st_r)
            return acc_kk[...], acc_qk[...]
        okk, oqk = pl.run_scoped(offd, plgpu.ACC(sq, _F32), plgpu.ACC(sq, _F32))
        sel = (rb == a) & (jb < a)
        akk = jnp.where(sel, okk, akk)
        aqk = jnp.where(sel, oqk, aqk)

    akk_s[...] = akk * _rows(beta, sq)
    aqk_s[...] = aqk.astype(_BF16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(akk_s, akk_ref.at[b, h, tok])
    plgpu.copy_smem_to_gmem(aqk_s, aqk_ref.at[b, h, tok])
    plgpu.wait_smem_to_gmem(0)


def scores_mosaic(q, k, g, beta, *, scale, l2, precise=True, interpret=False):
    """Akk, Aqk, qg, kg, β k e^Γ, β, e^{Γ_C} and the fixup flags, as `chunk_intra.scores(q, k, g,
    beta, None, scale=scale, l2=l2, form="split")` (module docstring)."""
    plgpu = _plgpu()
    B, Tp, H, K = q.shape
    if (q.dtype != _BF16 or k.dtype != _BF16 or k.shape != q.shape or g.shape != q.shape
            or beta.shape != (B, Tp, H) or K != 128 or Tp % C):
        raise ValueError(f"the Mosaic GPU scores take bf16 q, k [B,Tp,H,128] with Tp % {C} == 0, g of their "
                         f"shape and beta [B,Tp,H]: got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
                         f"g {g.shape}, beta {beta.shape}")
    NT = Tp // C
    beta = beta.astype(_F32)
    beta_t = jnp.transpose(beta, (0, 2, 1))  # [B,H,Tp]: one head's chunk is contiguous
    scratch = (_tiles((C, K)), _tiles((C, K)), plgpu.SMEM((C, K), _F32), _tiles((3, C, K)), _tiles((C, K)),
               _tiles((C, K)), _tiles((C, K)), plgpu.SMEM((C, C), _F32), _tiles((C, C)),
               plgpu.SMEM((C,), _F32), plgpu.SMEM((C,), jnp.int32), plgpu.Barrier(num_arrivals=4))
    if precise:  # the bf16 low parts of the two Akk key operands
        scratch = (*scratch, _tiles((C, K)), _tiles((C, K)))
    if interpret:  # the staged register operands (see `_wgmma`)
        scratch = (*scratch, _tiles((C, C)), _tiles((C, K)))
    out = (jax.ShapeDtypeStruct((B, H, Tp, C), _F32), jax.ShapeDtypeStruct((B, H, Tp, C), _BF16),
           *(jax.ShapeDtypeStruct((B, H, Tp, K), _BF16) for _ in range(3)),
           jax.ShapeDtypeStruct((B, H, NT, K), _F32), jax.ShapeDtypeStruct((B, H, Tp), jnp.int32))
    kern = plgpu.kernel(
        functools.partial(_body, scale=float(scale), l2=l2, precise=precise),
        out_type=out, scratch_types=scratch, grid=(NT, H, B), grid_names=("n", "h", "b"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name="kda_chunk_scores_mosaic",
    )
    akk, aqk, qg, kg, kb, gl, fl = kern(q, k, g.astype(_F32), beta_t)
    return akk, aqk, qg, kg, kb, beta, gl, fl[..., ::SUB]

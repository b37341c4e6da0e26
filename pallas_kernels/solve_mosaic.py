"""The chunk solve of the chunked KDA as a Mosaic GPU kernel (Hopper: TMA, wgmma).

Same contract as `chunk_intra.solve`: from Akk [B,H,Tp,64] fp32 (per 64-row chunk a strictly
lower-triangular A, already scaled by β), β k e^Γ [B,H,Tp,K] bf16, v [B,Tp,H,V] bf16 and β
[B,Tp,H] fp32, per chunk T = (I + A)⁻¹ and w = T (β k e^Γ), u = T (β v) [B,H,Tp,K|V] bf16. The
Triton kernel it replaces on Hopper is register-bound (255 registers, spills, 12.5% occupancy:
0.27 ms at B=1, T=8192, H=32, K=V=128 on an H100, against a memory floor of ~0.11 ms).

One CTA of one warpgroup per (chunk, head, batch row). T must keep ~fp32 accuracy (its errors
feed the recurrent state over thousands of chunks), so no product of T is a plain bf16 one:

    D  = diag((I + A_aa)⁻¹)       the four 16×16 diagonal blocks, exact fp32 on the CUDA cores:
                                  right-looking elimination of all four at once, 15 pivot steps
                                  on a [64,16] tile (8 values a thread)
    D₂ = D − D (L₁ D)             16 → 32: L₁ the (1,0) and (3,2) blocks of A
    T  = D₂ − D₂ (L₂ D₂)          32 → 64: L₂ the lower-left 32×32 quadrant
    w  = T kb,  u = (T diag β) v

(inv([[P,0],[L,Q]]) = D − D L D for D = diag(P⁻¹, Q⁻¹).) Each of the four merge products is a
"precise" product of fp32 operands split into bf16 hi + lo parts, x_lo y_hi + x_hi y_lo + x_hi y_hi
with fp32 accumulation (≈2⁻¹⁶ relative to Σ|x||y|); its left factor is zero outside half of its
columns (L₁: blocks 0 and 2; D over P's rows: 1 and 3; L₂: the left half; D₂ over Q's rows: the
right half), so it runs over that half of K only (wgmma K = 16 or 32, hence 32-byte swizzled
right operands). The last two products split T (and T diag β, so β is exact) into hi + lo
against the bf16 kb and v, exact in bf16: two wgmmas each. Left operands stay in registers
(staged through shared memory in the interpreter, whose wgmma reads only shared memory).

Shared memory at K = V = 128: Akk 16 KB (fp32, plain), the pivot rows 4 KB, the split right
operand 2 × 8 KB, kb and v 16 KB each (128-byte swizzle; w and u replace them before the TMA
store), β 256 B, plus Mosaic's 2 KB reduction scratch: 70 KB, so three CTAs share an SM. Akk
arrives on its own barrier, so the inverse starts while kb, v and β are still in flight.

Work per (chunk, head) at K = V = 128: the merges are 12 wgmmas of 64×64×32 (3.1 MFLOP), the
products 4 of 64×128×64 (4.2 MFLOP): 7.3 MFLOP, plus 15 elimination steps on the CUDA cores. At
B=1, T=8192, H=32 (4096 chunk-heads) that is 30 GFLOP: 0.05 ms at a realistic 600 TFLOP/s bf16
(0.03 ms at peak), under the memory floor: 80 KB a chunk-head (Akk 16 KB, kb 16, v 16, β 0.25 in;
w 16, u 16 out), 329 MB, 0.11 ms at 3 TB/s. Three resident CTAs an SM overlap one CTA's loads
with another's work. Measured on an H100 (benchmarks/RESULTS.md, session 5): 0.159 ms, 1.67x the
Triton kernel's 0.265 in the same run; `chunk_kda_pallas(..., solve_impl="auto")` takes it there.

Checked in JAX 0.11's Mosaic GPU interpreter on the CPU (against the Triton kernel, fp64 numpy,
and its race detector) and through Mosaic GPU's real lowering for an H100
(`tests/jax11/test_solve_mosaic.py`). Written against the JAX 0.11 API with lane semantics
(explicit WGMMA layouts); Pallas' automatic barriers around shared-memory stores stay on.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels.mosaic_common import plgpu as _plgpu, tiles as _tiles, wgmma_layout as _wg

C = 64  # chunk
SUB = 16  # the diagonal blocks inverted exactly on the CUDA cores
NSUB = C // SUB
_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _col():
    return _plgpu().Layout.WGMMA.reduce(0)  # one value per column


def _load(ref, layout=None):
    return _plgpu().load(ref, layout=_wg() if layout is None else layout, optimized=False)


def _iota(shape, dim):
    return _plgpu().broadcasted_iota(jnp.int32, shape, dim, layout=_wg())


def _split(x):
    """x ≈ hi + lo, both bf16: about 16 significant bits together."""
    hi = x.astype(_BF16)
    return hi, (x - hi.astype(_F32)).astype(_BF16)


def _wgmma(acc, x, b_ref, stage):
    """acc += x @ b_ref for a bf16 register array x. The interpreter's wgmma reads both operands
    from shared memory, so there x goes through `stage` (by width; None when lowered for a GPU)."""
    plgpu = _plgpu()
    if stage is None:
        plgpu.wgmma(acc, x, b_ref)
    else:
        buf = stage[x.shape[1]]
        buf[...] = x
        plgpu.commit_smem()
        plgpu.wgmma(acc, buf, b_ref)


def _precise_matmul(parts, y, yh_s, yl_s, stage):
    """Σ x @ y[k0:k0+n] over the `parts` (x fp32 [64,n] in registers, k0), y fp32 [64,64]: the
    product with an x that is zero outside those columns, as three bf16 wgmmas of split parts."""
    plgpu = _plgpu()
    yh, yl = _split(y)
    plgpu.commit_smem()  # every warp is past the wgmmas that last read yh_s, yl_s
    yh_s[...] = yh
    yl_s[...] = yl
    plgpu.commit_smem()
    split = [(*_split(x), pl.ds(k0, x.shape[1])) for x, k0 in parts]

    def scoped(acc):  # the small terms first
        for xh, xl, rows in split:
            _wgmma(acc, xl, yh_s.at[rows], stage)
            _wgmma(acc, xh, yl_s.at[rows], stage)
        for xh, _, rows in split:
            _wgmma(acc, xh, yh_s.at[rows], stage)
        return acc[...]
    return pl.run_scoped(scoped, plgpu.ACC((C, C), _F32))


def _diag_inverse(a_s, s_s):
    """The four (I + A_aa)⁻¹ stacked as [64,16] (row i holds row i of its own block's inverse),
    exact fp32: right-looking elimination of the four blocks at once, row j final at step j."""
    tile = (C, SUB)
    trow, tcol = _iota(tile, 0), _iota(tile, 1)
    off, blk = trow & (SUB - 1), trow >> 4
    adiag = None  # adiag[i, j] = A[i, 16·blk(i) + j]
    for m in range(NSUB):
        part = _load(a_s.at[:, pl.ds(m * SUB, SUB)]).astype(_F32)
        adiag = part if adiag is None else jnp.where(blk == m, part, adiag)
    s = jnp.where(tcol == off, 1.0, 0.0)
    for j in range(SUB - 1):
        if j:  # row j of every block is final: share it (at j = 0 it is e₀). Pallas brackets
            # a shared-memory store with warpgroup barriers (`unsafe_no_auto_barriers` off): the
            # last step's loads finish before it, this step's start after it.
            s_s[...] = s
            piv = None
            for m in range(NSUB):
                r = lax.broadcast_in_dim(_load(s_s.at[m * SUB + j], _col()), tile, [1])
                piv = r if piv is None else jnp.where(blk == m, r, piv)
        else:
            piv = jnp.where(tcol == 0, 1.0, 0.0)
        coef = lax.broadcast_in_dim(jnp.sum(jnp.where(tcol == j, adiag, 0.0), axis=1), tile, [0])
        s = jnp.where(off > j, s - coef * piv, s)
    return s


def _inverse(a_s, s_s, yh_s, yl_s, stage):
    """T = (I + A)⁻¹ [64,64] fp32 in registers from A in a_s (plain fp32 or bf16). Every merge product
    has a factor that is zero outside a half of the columns: it runs over that half of K only."""
    blk = _iota((C, SUB), 0) >> 4
    s = _diag_inverse(a_s, s_s)
    d = jnp.concatenate([jnp.where(blk == m, s, 0.0) for m in range(NSUB)], axis=1)
    mm = functools.partial(_precise_matmul, yh_s=yh_s, yl_s=yl_s, stage=stage)
    a10 = jnp.where(blk == 1, _load(a_s.at[:, pl.ds(0, SUB)]).astype(_F32), 0.0)  # L₁: A's (1,0), (3,2) blocks
    a32 = jnp.where(blk == 3, _load(a_s.at[:, pl.ds(2 * SUB, SUB)]).astype(_F32), 0.0)
    p = mm([(a10, 0), (a32, 2 * SUB)], d)  # L₁ D: rows of blocks 1 and 3
    d = d - mm([(d[:, SUB:2 * SUB], SUB), (d[:, 3 * SUB:], 3 * SUB)], p)
    half = _iota((C, 2 * SUB), 0) >> 5
    l2 = jnp.where(half == 1, _load(a_s.at[:, pl.ds(0, 2 * SUB)]).astype(_F32), 0.0)  # L₂: lower-left quadrant
    q = mm([(l2, 0)], d)  # L₂ D₂: the lower half of the rows
    return d - mm([(d[:, 2 * SUB:], 2 * SUB)], q)


def _solve_body(a_ref, kb_ref, v_ref, beta_ref, w_ref, u_ref,
                a_s, s_s, yh_s, yl_s, kb_s, v_s, beta_s, bar_a, bar_x, *stage):
    plgpu = _plgpu()
    n, h, b = lax.axis_index("n"), lax.axis_index("h"), lax.axis_index("b")
    tok = pl.ds(n * C, C)
    stage = stage[0] if stage else None
    plgpu.copy_gmem_to_smem(a_ref.at[b, h, tok], a_s, bar_a)
    plgpu.copy_gmem_to_smem(kb_ref.at[b, h, tok], kb_s, bar_x)
    plgpu.copy_gmem_to_smem(v_ref.at[b, tok, h], v_s, bar_x)
    plgpu.copy_gmem_to_smem(beta_ref.at[b, h, tok], beta_s, bar_x)
    plgpu.barrier_wait(bar_a)
    t = _inverse(a_s, s_s, yh_s, yl_s, stage)
    plgpu.barrier_wait(bar_x)

    # w first, then u: one 64×D accumulator and two split operands live at a time (w waits in
    # bf16), to keep a thread under the 168 registers of three CTAs an SM (not yet measured);
    # u's wgmmas run while w is stored.
    def products_w(acc):
        th, tl = _split(t)
        _wgmma(acc, tl, kb_s, stage)
        _wgmma(acc, th, kb_s, stage)
        return acc[...].astype(_BF16)
    w = pl.run_scoped(products_w, plgpu.ACC(kb_s.shape, _F32))
    bh, bl = _split(t * lax.broadcast_in_dim(_load(beta_s, _col()), (C, C), [1]))  # T diag β

    def products_u(acc):
        _wgmma(acc, bl, v_s, stage)
        _wgmma(acc, bh, v_s, stage)
        _store(w, kb_s, w_ref.at[b, h, tok])
        return acc[...]
    u = pl.run_scoped(products_u, plgpu.ACC(v_s.shape, _F32))
    _store(u, v_s, u_ref.at[b, h, tok])
    plgpu.wait_smem_to_gmem(0)


def _store(x, x_s, dst):
    """x (registers) to dst in bf16 through x_s, which the last wgmmas read."""
    plgpu = _plgpu()
    plgpu.commit_smem()  # every warp is past the wgmmas that read x_s
    x_s[...] = x.astype(_BF16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_s, dst)


def _inverse_body(a_ref, t_ref, a_s, s_s, yh_s, yl_s, bar, *stage):
    plgpu = _plgpu()
    n, h, b = lax.axis_index("n"), lax.axis_index("h"), lax.axis_index("b")
    tok = pl.ds(n * C, C)
    plgpu.copy_gmem_to_smem(a_ref.at[b, h, tok], a_s, bar)
    plgpu.barrier_wait(bar)
    t = _inverse(a_s, s_s, yh_s, yl_s, stage[0] if stage else None)
    plgpu.commit_smem()
    a_s[...] = t
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(a_s, t_ref.at[b, h, tok])
    plgpu.wait_smem_to_gmem(0)


def _kernel(body, out_type, scratch, grid, name, interpret):
    plgpu = _plgpu()
    if interpret:  # the staged register operands, by width (see `_wgmma`)
        scratch = (*scratch, {n: plgpu.SMEM((C, n), _BF16) for n in (SUB, 2 * SUB, C)})
    return plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("n", "h", "b"),
        # lane semantics: the WGMMA layouts are explicit; automatic store barriers stay on (see
        # `_diag_inverse`)
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret is True else (interpret or None), kernel_name=name,
    )


def _inverse_scratch(a_dtype=_F32):
    plgpu = _plgpu()
    return (plgpu.SMEM((C, C), a_dtype), plgpu.SMEM((C, SUB), _F32), _tiles((C, C), SUB), _tiles((C, C), SUB))


def _check_akk(akk, dtypes=(_F32,)):
    if akk.ndim != 4 or akk.shape[-1] != C or akk.shape[2] % C or akk.dtype not in dtypes:
        names = " or ".join("fp32" if d == _F32 else "bf16" for d in dtypes)
        raise ValueError(f"the Mosaic GPU solve takes Akk [B,H,Tp,{C}] {names} with Tp % {C} == 0, "
                         f"got {akk.shape} {akk.dtype}")


def solve_mosaic(akk, kb, v, beta_e, *, interpret=False):
    """w = (I+Akk)⁻¹ kb, u = (I+Akk)⁻¹ (β v), [B,H,Tp,K|V] bf16, as `chunk_intra.solve`.
    `interpret`: True (or a `plgpu.InterpretGPUParams`) runs JAX's Mosaic GPU interpreter. Akk may
    come in bf16 (`chunk_kda_pallas(..., akk_storage="bf16")`): half the bytes, widened to fp32 as
    it is read, the inverse exact for the rounded A."""
    plgpu = _plgpu()
    _check_akk(akk, (_F32, _BF16))
    B, H, Tp, _ = akk.shape
    K, V = kb.shape[-1], v.shape[-1]
    if (kb.shape != (B, H, Tp, K) or v.shape != (B, Tp, H, V) or beta_e.shape != (B, Tp, H)
            or kb.dtype != _BF16 or v.dtype != _BF16 or K not in (64, 128) or V not in (64, 128)):
        raise ValueError(f"the Mosaic GPU solve takes kb [B,H,Tp,K] and v [B,Tp,H,V] bf16 with K, V in "
                         f"(64, 128) and beta_e [B,Tp,H], for Akk {akk.shape}: got kb {kb.shape} "
                         f"{kb.dtype}, v {v.shape} {v.dtype}, beta_e {beta_e.shape}")
    beta = jnp.transpose(beta_e.astype(_F32), (0, 2, 1))  # [B,H,Tp]: one head's chunk is contiguous
    # two barriers (one arrival per TMA copy): Akk alone, so the inverse starts on it, and kb, v, β
    scratch = (*_inverse_scratch(akk.dtype), _tiles((C, K)), _tiles((C, V)), plgpu.SMEM((C,), _F32),
               plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=3))
    out = (jax.ShapeDtypeStruct((B, H, Tp, K), _BF16), jax.ShapeDtypeStruct((B, H, Tp, V), _BF16))
    kern = _kernel(_solve_body, out, scratch, (Tp // C, H, B), "kda_chunk_solve_mosaic", interpret)
    return kern(akk, kb, v, beta)


def inverse_mosaic(akk, *, interpret=False):
    """T = (I + A)⁻¹ [B,H,Tp,64] fp32 per chunk, the inverse `solve_mosaic` applies (for tests)."""
    plgpu = _plgpu()
    _check_akk(akk)
    B, H, Tp, _ = akk.shape
    scratch = (*_inverse_scratch(), plgpu.Barrier(num_arrivals=1))
    kern = _kernel(_inverse_body, jax.ShapeDtypeStruct(akk.shape, _F32), scratch, (Tp // C, H, B),
                   "kda_chunk_inverse_mosaic", interpret)
    return kern(akk)

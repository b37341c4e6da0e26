"""The cumsum + scores kernel of the chunked KDA as a Mosaic GPU kernel, two warpgroups a CTA.

Same contract as `chunk_intra.scores(q, k, g, beta, None, scale=scale, l2=l2, form="split",
kk_bf16=True)` for bf16 q, k [B,Tp,H,128] (Tp % 64 == 0, no padding mask), fp32 gates g <= 0 and
β: returns Akk [B,H,Tp,64] fp32, Aqk [B,H,Tp,64], qg, kg, β k e^Γ [B,H,Tp,128] (bf16), β
[B,Tp,H] fp32, e^{Γ_C} [B,H,NT,128] fp32 and the diagonal-fixup flags [B,H,NT·4] int32
(`chunk_intra.diag_fixup` rewrites the flagged sub-chunks' diagonal blocks).

Why a second version: the first (one warpgroup holding [64,128] fp32 arrays) spilled registers
and needed 188 KB of shared memory, one CTA an SM: 2.89 ms against Triton's 0.62 at B=1, T=8192,
H=32 on an H100. Here one CTA per (chunk, head, batch row) runs two warpgroups, and warpgroup w
owns the key channels [64w, 64w+64): every per-channel quantity (Γ, qg, kg, β k e^Γ, e^{Γ_C}) is
its slab alone, and a thread holds [64,64] fp32 tiles (32 registers each). The only things that
cross slabs are sums over channels: the L2 norms (each warpgroup reads both slabs of q and k from
shared memory), the partial Akk and Aqk (each a sum over one slab) and the flags (a max over
channels). Those partials meet in shared memory behind one mbarrier each way: warpgroup 1 leaves
its Akk partial and its spans, warpgroup 0 its Aqk partial; each thread arrives (release) after
its stores, the other warpgroup waits (acquire) and finishes one of the two outputs.

Every in-chunk sum of gates is one wgmma of a 0/1 mask [64,64] (register operand from iotas)
against the slab of g split exactly into three bf16 parts g₁ + g₂ + g₃ (fp32 accumulation). The
masks give each quantity directly, never as a difference of two large prefix sums, so e^{Γ_C−Γ}
is exactly 1 at the chunk's last row:

    Γr                     j <= r                     (qg, β k e^Γ)
    Γ_C − Γr               j > r                      (kg)
    s_a                    same sub-chunk             (minus the sub-chunk's decay: flags, off)
    L = Γr − c_a           same sub-chunk, j <= r     (c_a: Γ before row r's sub-chunk a)
    P_a = c_a − Γi         i < j < 16a, a = 1, 2, 3   (key side of the blocks left of a)

and Γ_C per channel as gᵀ·1 (the parts transposed against ones: a column, so no reduction
crosses warps; Mosaic's one reduction scratch would be shared by the two warpgroups, and the
kernel reserves none, so such a reduction fails to lower).

Scores as the portable kernel's "split" form with bf16 products: the four diagonal blocks in one
wgmma pair through the per-channel reference m = c_a − off, off = max(0, s_a − 60) (the "plain"
form where off = 0 in every channel, "mm1" otherwise): row factor e^{min(L+off, 80)}, key factor
e^{−L−off}; the blocks left of the diagonal one pair per row sub-chunk a, e^{L}·e^{P_a} (both
<= 1), added onto the masked diagonal blocks in their accumulators (each such product is exactly
zero outside its blocks). A sub-chunk whose largest decay (any channel) exceeds DIAG_SPAN_MAX =
140 is flagged. Per warpgroup: 24 wgmmas of 64×64×64 for the sums of gates (7 masks and Γ_C,
3 parts each) and 8 for the scores.

Fences: `commit_smem` (a proxy fence, then a warpgroup barrier) after every register store that
a wgmma or a TMA reads; Pallas' automatic warpgroup barriers around shared-memory stores stay on,
and a buffer a TMA store read is reused only after `wait_smem_to_gmem(..., wait_read_only=True)`
(the issuing thread waits, the store's leading barrier holds the others); a key operand is
rewritten only after `wgmma_wait(0)`. Between the warpgroups: mbarriers only (the TMA loads', the
partials' and two syncs of both, `sync_both`).

Shared memory (K = 128, both warpgroups): q, k 32 KB; g (fp32), then its bf16 parts, then the
exchanged partials, one 48 KB region (`RefUnion`; each warpgroup's 24 KB slot is the same in
every view, so one warpgroup's cumsums never meet the other's g or partials); one key operand /
output stage 16 KB; β, e^{Γ_C}, spans and flags 1.3 KB: 102,448 bytes in the lowering (no
reduction scratch), so two CTAs (16 warps) share an SM's 227 KB.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels import reference
from jaxprfaas.pallas_kernels.chunk_intra import DIAG_KEY_MAX, DIAG_SPAN_MAX
from jaxprfaas.pallas_kernels.mosaic_common import plgpu as _plgpu, tiles as _tiles, wgmma_layout as _wg

C = 64  # chunk
SUB = 16  # sub-chunk
NSUB = C // SUB
K = 128  # key channels
KW = 64  # one warpgroup's slab of them
NWG = K // KW
_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _row():
    return _plgpu().Layout.WGMMA.reduce(1)  # one value per row of a WGMMA-layout array


def _load(ref, layout=None):
    return _plgpu().load(ref, layout=_wg() if layout is None else layout, optimized=False)


def _iota(dim):
    return _plgpu().broadcasted_iota(jnp.int32, (C, KW), dim, layout=_wg())


def _rows(x):
    return lax.broadcast_in_dim(x, (C, KW), [0])


def _split3(x):
    """x = x₁ + x₂ + x₃ in bf16, exact for fp32 x (8 significant bits each)."""
    x1 = x.astype(_BF16)
    r = x - x1.astype(_F32)
    x2 = r.astype(_BF16)
    return x1, x2, (r - x2.astype(_F32)).astype(_BF16)


def _body(q_ref, k_ref, g_ref, beta_ref, akk_ref, aqk_ref, qg_ref, kg_ref, kb_ref, gl_ref, fl_ref,
          q_s, k_s, gu_s, y_s, beta_s, gl_s, span_s, fl_s, bar_in, bar_x, both, *stage, scale, l2):
    plgpu = _plgpu()
    n, h, b, w = (lax.axis_index(a) for a in ("n", "h", "b", "wg"))
    tok, cols = pl.ds(n * C, C), pl.ds(w * KW, KW)
    stage = stage[0].at[w] if stage else None
    # g's slabs [64,64] fp32 (each in a [96,64] slot) and its bf16 parts share memory: each
    # warpgroup's slot is the same 24 KB in both views. g, then the parts, then the partials.
    g_s, gp_s = gu_s

    def wgmma(acc, x, b_ref):
        """acc += x @ b_ref, x bf16 in registers (staged through shared memory when interpreting:
        the interpreter's wgmma reads both operands from there)."""
        if stage is None:
            plgpu.wgmma(acc, x, b_ref)
        else:
            stage[...] = x
            plgpu.commit_smem()
            plgpu.wgmma(acc, stage, b_ref)

    def sync_both(i):
        """Both warpgroups past this point. The union's slots are disjoint, so the hardware needs
        none of these: they order its two views for the interpreter's race detector, which sees
        a union as one buffer (two syncs of equal work, at little cost)."""
        plgpu.barrier_arrive(both.at[i])
        plgpu.barrier_wait(both.at[i])

    # this warpgroup's slabs of q, k, g and (a copy of) β
    for src, dst in ((q_ref, q_s.at[w]), (k_ref, k_s.at[w]), (g_ref, g_s.at[w, pl.ds(0, C)])):
        plgpu.copy_gmem_to_smem(src.at[b, tok, h, cols], dst, bar_in.at[w])
    plgpu.copy_gmem_to_smem(beta_ref.at[b, h, tok], beta_s.at[w], bar_in.at[w])
    plgpu.barrier_wait(bar_in.at[w])
    if l2:  # the norms need the other slab of q and k too
        plgpu.barrier_wait(bar_in.at[1 - w])

    parts = _split3(_load(g_s.at[w, pl.ds(0, C)]))
    sync_both(0)
    for p, part in enumerate(parts):  # over g itself (the store's leading barrier: all have read it)
        gp_s.at[w, p][...] = part
    plgpu.commit_smem()
    del parts

    r, j = _iota(0), _iota(1)
    rb, jb = r >> 4, j >> 4

    def cum(mask):
        """Σ_j mask[r, j] g[j, slab] [64, 64] fp32."""
        m = jnp.where(mask, 1.0, 0.0).astype(_BF16)

        def scoped(acc):
            for p in range(3):
                wgmma(acc, m, gp_s.at[w, p])
            return acc[...]
        return pl.run_scoped(scoped, plgpu.ACC((C, KW), _F32))

    def factor(x_s, s):
        """The per-row factor (L2 norm over both slabs, and scale): [64] or a scalar."""
        if not l2:
            return s
        ss = None
        for v in range(NWG):
            x = _load(x_s.at[v]).astype(_F32)
            ss = jnp.sum(x * x, axis=1) if ss is None else ss + jnp.sum(x * x, axis=1)
        return lax.rsqrt(ss + reference.L2_EPS) * s

    def rows_of(x_s, f):
        """This slab's normalised rows [64, 64] fp32, read again from shared memory at each use."""
        x = _load(x_s.at[w]).astype(_F32)
        return x * _rows(f) if l2 else (x * f if f != 1.0 else x)

    def stage_out(x):
        """x into this warpgroup's key operand / output stage, once its last TMA store read it."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        y_s.at[w][...] = x.astype(_BF16)
        plgpu.commit_smem()

    q = functools.partial(rows_of, q_s, factor(q_s, scale))
    k = functools.partial(rows_of, k_s, factor(k_s, 1.0))
    beta = _load(beta_s.at[w], _row())

    # e^{Γ_C}: Γ_C per channel down the rows of gᵀ·1 (the parts transposed, against ones in the
    # stage), then a max within each row. Not row 63 of Γ through a column sum: that reduction
    # crosses warps through Mosaic's one reduction scratch, which both warpgroups would share.
    y_s.at[w][...] = jnp.where(r >= 0, 1.0, 0.0).astype(_BF16)
    plgpu.commit_smem()

    def total(acc):
        for p in range(3):
            plgpu.wgmma(acc, gp_s.at[w, p].T, y_s.at[w])
        return acc[...]
    gl_s.at[w][...] = jnp.exp(jnp.max(pl.run_scoped(total, plgpu.ACC((KW, KW), _F32)), axis=1))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(gl_s.at[w], gl_ref.at[b, h, n, cols])

    # qg = q e^Γ, β k e^Γ
    eG = jnp.exp(cum(j <= r))
    stage_out(q() * eG)
    plgpu.copy_smem_to_gmem(y_s.at[w], qg_ref.at[b, h, tok, cols])
    stage_out(k() * eG * _rows(beta))
    plgpu.copy_smem_to_gmem(y_s.at[w], kb_ref.at[b, h, tok, cols])
    del eG
    stage_out(k() * jnp.exp(cum(j > r)))  # kg = k e^{Γ_C − Γ}
    plgpu.copy_smem_to_gmem(y_s.at[w], kg_ref.at[b, h, tok, cols])

    span = -cum(jb == rb)  # the sub-chunk's decay, per channel
    span_max = jnp.max(span, axis=1)  # over this slab
    off = jnp.maximum(span - DIAG_KEY_MAX, 0.0)
    del span

    # the diagonal blocks: e^{min(L + off, 80)} · e^{−L − off}
    L = cum((jb == rb) & (j <= r))
    stage_out(k() * jnp.exp(-L - off))
    ed = jnp.exp(jnp.minimum(L + off, DIAG_SPAN_MAX - DIAG_KEY_MAX))
    del off

    def products(acc_kk, acc_qk, x_kk, x_qk):
        wgmma(acc_kk, x_kk, y_s.at[w].T)
        wgmma(acc_qk, x_qk, y_s.at[w].T)
        return acc_kk[...], acc_qk[...]

    acc2 = (plgpu.ACC((C, C), _F32), plgpu.ACC((C, C), _F32))
    xk, xq = (k() * ed).astype(_BF16), (q() * ed).astype(_BF16)
    del ed
    dkk, dqk = pl.run_scoped(lambda a, c: products(a, c, xk, xq), *acc2)
    same = rb == jb
    akk = jnp.where(same & (j < r), dkk, 0.0)
    aqk = jnp.where(same & (j <= r), dqk, 0.0)
    del dkk, dqk

    # the blocks left of the diagonal, per row sub-chunk a: e^{Γr − c_a} · e^{c_a − Γi}, added onto
    # the diagonal blocks in their accumulators. The query side is zero outside sub-chunk a's rows
    # and the key side outside rows i < 16a, so each product is exactly zero elsewhere (and no
    # [64,64] product is live beside the two sums).
    eo = jnp.exp(L)
    ko, qo = (k() * eo).astype(_BF16), (q() * eo).astype(_BF16)
    del L, eo

    def off_diagonal(accs):
        acc_kk, acc_qk = accs
        for a in range(1, NSUB):
            P = cum((j > r) & (j < SUB * a))  # c_a − Γi for rows i < 16a
            if stage is None:  # (the interpreter's wgmmas are synchronous)
                plgpu.wgmma_wait(0)  # the last a's products have read the key operand
            stage_out(jnp.where(r < SUB * a, k() * jnp.exp(jnp.minimum(P, 0.0)), 0.0))
            del P
            rows = rb == a
            wgmma(acc_kk, jnp.where(rows, ko, 0.0), y_s.at[w].T)
            wgmma(acc_qk, jnp.where(rows, qo, 0.0), y_s.at[w].T)
    if stage is None:
        akk, aqk = pl.run_state(off_diagonal)((plgpu.ACC.init(akk), plgpu.ACC.init(aqk)))
    else:  # the interpreter has no initialised accumulators: the same sums (disjoint supports)
        okk, oqk = pl.run_scoped(lambda x, y: off_diagonal((x, y)) or (x[...], y[...]), *acc2)
        akk, aqk = akk + okk, aqk + oqk

    # the two slabs' partial sums meet in g's view of the union (the cumsums are done): warpgroup
    # 1 finishes Aqk (through its key operand, its wgmmas done), warpgroup 0 Akk and the flags
    ex = lambda v: g_s.at[v, pl.ds(0, C)]  # noqa: E731
    sync_both(1)

    @pl.when(w == 1)
    def _():
        ex(1)[...] = akk
        span_s[...] = span_max
        plgpu.barrier_arrive(bar_x.at[1])
        plgpu.barrier_wait(bar_x.at[0])
        out = y_s.at[1]
        out[...] = (_load(ex(0)) + aqk).astype(_BF16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out, aqk_ref.at[b, h, tok])

    @pl.when(w == 0)
    def _():
        ex(0)[...] = aqk
        plgpu.barrier_arrive(bar_x.at[0])
        plgpu.barrier_wait(bar_x.at[1])
        ex(1)[...] = (_load(ex(1)) + akk) * lax.broadcast_in_dim(beta, (C, C), [0])
        fl_s[...] = (jnp.maximum(_load(span_s, _row()), span_max) > DIAG_SPAN_MAX).astype(jnp.int32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ex(1), akk_ref.at[b, h, tok])
        plgpu.copy_smem_to_gmem(fl_s, fl_ref.at[b, h, tok])

    plgpu.wait_smem_to_gmem(0)


def scores_mosaic2(q, k, g, beta, *, scale, l2, interpret=False):
    """Akk, Aqk, qg, kg, β k e^Γ, β, e^{Γ_C} and the fix-up flags, as `chunk_intra.scores(q, k, g,
    beta, None, scale=scale, l2=l2, form="split", kk_bf16=True)` (module docstring). `interpret`:
    True (or a `plgpu.InterpretGPUParams`) runs JAX's Mosaic GPU interpreter."""
    plgpu = _plgpu()
    B, Tp, H, Kq = q.shape
    if (q.dtype != _BF16 or k.dtype != _BF16 or k.shape != q.shape or g.shape != q.shape
            or beta.shape != (B, Tp, H) or Kq != K or Tp % C):
        raise ValueError(f"the Mosaic GPU scores take bf16 q, k [B,Tp,H,{K}] with Tp % {C} == 0, g of their "
                         f"shape and beta [B,Tp,H]: got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
                         f"g {g.shape}, beta {beta.shape}")
    NT = Tp // C
    beta = beta.astype(_F32)
    beta_t = jnp.transpose(beta, (0, 2, 1))  # [B,H,Tp]: one head's chunk is contiguous
    union = plgpu.RefUnion(plgpu.SMEM((NWG, 3 * C // 2, KW), _F32), _tiles((NWG, 3, C, KW)))
    scratch = (_tiles((NWG, C, KW)), _tiles((NWG, C, KW)), union, _tiles((NWG, C, KW)),
               plgpu.SMEM((NWG, C), _F32), plgpu.SMEM((NWG, KW), _F32), plgpu.SMEM((C,), _F32),
               plgpu.SMEM((C,), jnp.int32),
               plgpu.Barrier(num_arrivals=4, num_barriers=NWG),  # per slab: q, k, g, β
               plgpu.Barrier(num_arrivals=1, num_barriers=NWG),  # per warpgroup: its partials are in
               plgpu.Barrier(num_arrivals=NWG, num_barriers=2))  # both warpgroups (`sync_both`)
    if interpret:  # the staged register operands (see `wgmma` in `_body`)
        scratch = (*scratch, _tiles((NWG, C, KW)))
    out = (jax.ShapeDtypeStruct((B, H, Tp, C), _F32), jax.ShapeDtypeStruct((B, H, Tp, C), _BF16),
           *(jax.ShapeDtypeStruct((B, H, Tp, K), _BF16) for _ in range(3)),
           jax.ShapeDtypeStruct((B, H, NT, K), _F32), jax.ShapeDtypeStruct((B, H, Tp), jnp.int32))
    kern = plgpu.kernel(
        functools.partial(_body, scale=float(scale), l2=l2),
        out_type=out, scratch_types=scratch, grid=(NT, H, B), grid_names=("n", "h", "b"),
        num_threads=NWG, thread_name="wg",
        # no reduction scratch: the two warpgroups would share it, so no reduction may cross warps
        # (the lowering fails if one does)
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                             reduction_scratch_bytes=0),
        interpret=plgpu.InterpretGPUParams() if interpret is True else (interpret or None),
        kernel_name="kda_chunk_scores_mosaic2",
    )
    akk, aqk, qg, kg, kb, gl, fl = kern(q, k, g.astype(_F32), beta_t)
    return akk, aqk, qg, kg, kb, beta, gl, fl[..., ::SUB]

"""The serial state pass of the chunked KDA as a Mosaic GPU kernel (Hopper: TMA, wgmma).

Same contract as `chunk.state` without packing (`flags is None`): from the parallel kernels'
w, u, qg, kg [B,H,Tp,D], Aqk [B,H,Tp,C] (bf16) and e^{Γ_C} [B,H,NT,K] fp32, the output
o [B,Tp,H,V] and the final states [B,H,K,V] fp32. One CTA of one warpgroup per
(value block, head, batch row); per chunk, with the state S [K, BV] in fp32 registers:

    v' = U − W S          wgmma [C,K]·[K,BV], issued with qg S
    o  = qg S + Aqk v'    two wgmmas into one accumulator, stored by TMA
    S  ← e^{Γ_C} ⊙ S + kgᵀ v'   issued with Aqk v'

The next chunk's five tiles are fetched by TMA into the other of two shared-memory slots
while this one computes. `chunk_kda_pallas(..., state_impl="auto")` takes it on Hopper GPUs
under JAX >= 0.11 (the API it is written against) for bf16 inputs without packing: on an H100 at
8K it takes 0.20 ms against the Triton state kernel's 0.26 ms (benchmarks/KDA_NOTES.md, session
3). Checked in JAX 0.11's Mosaic GPU interpreter on the CPU (`tests/jax11/`) and against the
Triton kernel on the GPU. One warpgroup per CTA and 64 CTAs at B=1, H=32: 6% occupancy (Nsight
Compute). `block_v=32` (128 CTAs, every tile 64-byte swizzled): 0.191 against 0.220 ms at 8K on an
H200, 1.18 against 0.64 at 8×4K (session 9); opt-in. `warpgroups=2` (`_body_two`, session 8) puts
the output on a second warpgroup, so that the serial chain holds two products a chunk instead of
four and no output store: 0.154 against 0.220 ms at 8K on an H200 (equal at 8×4K, 0.641 against
0.636, where 512 CTAs keep the memory busy either way); `state_impl="auto"` takes it (session 9).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxprfaas.pallas_kernels.mosaic_common import plgpu as _plgpu, tiles as _tiles

C = 64
_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _interpret_params(interpret):
    """True (or a `plgpu.InterpretGPUParams`, e.g. with `detect_races=True`) runs JAX's Mosaic GPU
    interpreter; False compiles."""
    return _plgpu().InterpretGPUParams() if interpret is True else (interpret or None)


def _chunk_fetch(b, h, vcols, bars, tiles):
    """fetch(n, slot): TMA copies of chunk n's tiles into their `slot`, completing on bars[slot].
    `tiles`: (gmem ref, smem buffer, what of it): "rows" [b, h, the chunk's rows], "value rows"
    [b, h, rows, the value block] or "chunk" [b, h, n]."""
    plgpu = _plgpu()

    def fetch(n, slot):
        tok = pl.ds(n * C, C)
        views = {"rows": lambda r: r.at[b, h, tok], "value rows": lambda r: r.at[b, h, tok, vcols],
                 "chunk": lambda r: r.at[b, h, n]}
        for ref, buf, what in tiles:
            plgpu.copy_gmem_to_smem(views[what](ref), buf.at[slot], bars.at[slot])
    return fetch


def _next_and_wait(n, nt, fetch, bars):
    """Starts fetching chunk n + 1 into the other slot and waits for chunk n's; returns its slot."""
    slot = lax.rem(n, 2)
    pl.when(n + 1 < nt)(lambda: fetch(n + 1, 1 - slot))
    _plgpu().barrier_wait(bars.at[slot])
    return slot


def _decay_row(gl_slot):
    """e^{Γ_C} [K] of a slot, in the layout of S's rows. Read right after the slot's barrier wait:
    a `commit_smem` (proxy fence) must come between this generic-proxy read and the TMA copy that
    refills the slot, and each step has one after it (the interpreter's race detector reports the
    read as racing that copy when it comes at the end of the step instead)."""
    plgpu = _plgpu()
    return plgpu.load(gl_slot, layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)


def _decayed(s, decay):
    """e^{Γ_C} ⊙ S, the decay a row of S [K, BV] (WGMMA layout) per key channel."""
    return s * lax.broadcast_in_dim(decay, s.shape, [0])


def _store_output(o, o_s, dst):
    """A chunk's output o (registers) to `dst` by TMA through `o_s`, once the previous chunk's store
    has read `o_s`."""
    plgpu = _plgpu()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_s[...] = o.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, dst)


def _chunk_products(w, qg, kg, a, s_buf, vn_buf, u, *, bv):
    """One chunk's four products on one warpgroup, S already in `s_buf` (bf16): v' = U − W S
    (written to `vn_buf`), kgᵀ v' and o = qg S + Aqk v'. wgmmas run asynchronously until an
    accumulator is read: W S and qg S together, then Aqk v' (onto qg S) and kgᵀ v' together, so
    the output's matmuls overlap the state's instead of lengthening the serial chain.
    Returns (kgᵀ v', o)."""
    plgpu = _plgpu()
    K = w.shape[-1]

    def chunk(acc_v, acc_o, acc_s):
        plgpu.wgmma(acc_v, w, s_buf)
        plgpu.wgmma(acc_o, qg, s_buf)
        vn_buf[...] = (u - acc_v[...]).astype(_BF16)
        plgpu.commit_smem()
        plgpu.wgmma(acc_s, kg.T, vn_buf)
        plgpu.wgmma(acc_o, a, vn_buf)
        return acc_s[...], acc_o[...]

    return pl.run_scoped(chunk, plgpu.ACC((C, bv), _F32), plgpu.ACC((C, bv), _F32), plgpu.ACC((K, bv), _F32))


def _body(w_ref, u_ref, qg_ref, kg_ref, a_ref, gl_ref, h0_ref, o_ref, ht_ref,
          w_s, kg_s, qg_s, a_s, u_s, gl_s, s_s, vn_s, o_s, bars, *, nt, bv):
    plgpu = _plgpu()
    wg = plgpu.Layout.WGMMA
    j, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
    vcols = pl.ds(j * bv, bv)
    fetch = _chunk_fetch(b, h, vcols, bars, [(w_ref, w_s, "rows"), (kg_ref, kg_s, "rows"), (qg_ref, qg_s, "rows"),
                                             (a_ref, a_s, "rows"), (u_ref, u_s, "value rows"),
                                             (gl_ref, gl_s, "chunk")])
    fetch(0, 0)
    s0 = plgpu.load(h0_ref.at[b, h, :, vcols], layout=wg, optimized=False)

    def step(n, s):
        slot = _next_and_wait(n, nt, fetch, bars)
        decay = _decay_row(gl_s.at[slot])
        s_s[...] = s.astype(_BF16)
        plgpu.commit_smem()
        u = plgpu.load(u_s.at[slot], layout=wg, optimized=False).astype(_F32)
        kv, o = _chunk_products(w_s.at[slot], qg_s.at[slot], kg_s.at[slot], a_s.at[slot], s_s, vn_s, u, bv=bv)
        _store_output(o, o_s, o_ref.at[b, pl.ds(n * C, C), h, vcols])
        return _decayed(s, decay) + kv

    s = lax.fori_loop(0, nt, step, s0)
    ht_ref.at[b, h, :, vcols][...] = s
    plgpu.wait_smem_to_gmem(0)


def _body_two(w_ref, u_ref, qg_ref, kg_ref, a_ref, gl_ref, h0_ref, o_ref, ht_ref,
              w_s, kg_s, qg_s, a_s, u_s, gl_s, s_s, vn_s, o_s, bars, out_bars, ready, free, done, *, nt, bv):
    """`_body` with the output on a second warpgroup, so that the serial chain holds only the
    state's two products a chunk. Warpgroup 0 carries S: it fetches W, kg, U, e^{Γ_C}, publishes the
    chunk's S (bf16) and v' in one of two shared-memory slots (`ready`), then updates S. Warpgroup 1
    fetches qg and Aqk, waits for the slot, forms o = qg S + Aqk v' and stores it, and frees the
    slot (`free`), which warpgroup 0 waits for before writing it again two chunks later. One
    barrier of each kind per slot: an mbarrier tells only the parity of its phase, so a barrier may
    complete again only after its waiter has seen the last completion."""
    plgpu = _plgpu()
    wg_layout = plgpu.Layout.WGMMA
    j, h, b, wg = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    vcols = pl.ds(j * bv, bv)
    K = w_s.shape[-1]

    @pl.when(wg == 0)
    def _():
        fetch = _chunk_fetch(b, h, vcols, bars, [(w_ref, w_s, "rows"), (kg_ref, kg_s, "rows"),
                                                 (u_ref, u_s, "value rows"), (gl_ref, gl_s, "chunk")])
        fetch(0, 0)
        s0 = plgpu.load(h0_ref.at[b, h, :, vcols], layout=wg_layout, optimized=False)

        def step(n, s):
            slot = _next_and_wait(n, nt, fetch, bars)
            decay = _decay_row(gl_s.at[slot])
            pl.when(n > 1)(lambda: plgpu.barrier_wait(free.at[slot]))  # warpgroup 1 has read chunk n − 2's
            u = plgpu.load(u_s.at[slot], layout=wg_layout, optimized=False).astype(_F32)
            s_s[slot] = s.astype(_BF16)
            plgpu.commit_smem()

            def chunk(acc_v, acc_s):
                plgpu.wgmma(acc_v, w_s.at[slot], s_s.at[slot])
                vn_s[slot] = (u - acc_v[...]).astype(_BF16)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready.at[slot])
                plgpu.wgmma(acc_s, kg_s.at[slot].T, vn_s.at[slot])
                decayed = _decayed(s, decay)  # while the product runs: off the chain
                return decayed + acc_s[...]

            return pl.run_scoped(chunk, plgpu.ACC((C, bv), _F32), plgpu.ACC((K, bv), _F32))

        s = lax.fori_loop(0, nt, step, s0)
        ht_ref.at[b, h, :, vcols][...] = s
        for last in (nt - 2, nt - 1):  # warpgroup 1's last arrivals, one per slot
            if last >= 0:
                plgpu.barrier_wait(free.at[last % 2])

    @pl.when(wg == 1)
    def _():
        fetch = _chunk_fetch(b, h, vcols, out_bars, [(qg_ref, qg_s, "rows"), (a_ref, a_s, "rows")])
        fetch(0, 0)

        def step(n, carry):
            slot = _next_and_wait(n, nt, fetch, out_bars)
            plgpu.barrier_wait(ready.at[slot])

            def chunk(acc_o):
                plgpu.wgmma(acc_o, qg_s.at[slot], s_s.at[slot])
                plgpu.wgmma(acc_o, a_s.at[slot], vn_s.at[slot])
                return acc_o[...]

            o = pl.run_scoped(chunk, plgpu.ACC((C, bv), _F32))
            plgpu.barrier_arrive(free.at[slot])
            _store_output(o, o_s, o_ref.at[b, pl.ds(n * C, C), h, vcols])
            return carry

        lax.fori_loop(0, nt, step, None)
        plgpu.wait_smem_to_gmem(0)

    # Neither warpgroup exits while the other still issues wgmmas (one exiting early has been seen
    # to end a Hopper kernel in an illegal instruction).
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)


def _body_pair(w_ref, u_ref, qg_ref, kg_ref, a_ref, gl_ref, h0_ref, o_ref, ht_ref,
               w_s, kg_s, qg_s, a_s, u_s, gl_s, s_s, vn_s, o_s, bars, free, done, *, nt, bv):
    """`_body` on two warpgroups of one CTA per (head, batch row), each carrying the state of one
    half of the value columns: the chunk's W, kg, qg, Aqk and e^{Γ_C} arrive once for both
    (`_body` with 64-column blocks fetches them once per block, so twice a head). Warpgroup 0
    fetches; each warpgroup arrives on its slot's `free` barrier once it has read the slot, and
    warpgroup 0 refills a slot only when both have (two arrivals)."""
    plgpu = _plgpu()
    wg_layout = plgpu.Layout.WGMMA
    h, b, wg = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("wg")
    vcols = pl.ds(wg * bv, bv)

    def fetch(n, slot):
        tok = pl.ds(n * C, C)
        for ref, buf in ((w_ref, w_s), (kg_ref, kg_s), (qg_ref, qg_s), (a_ref, a_s)):
            plgpu.copy_gmem_to_smem(ref.at[b, h, tok], buf.at[slot], bars.at[slot])
        for half in range(2):
            plgpu.copy_gmem_to_smem(u_ref.at[b, h, tok, pl.ds(half * bv, bv)], u_s.at[slot, half], bars.at[slot])
        plgpu.copy_gmem_to_smem(gl_ref.at[b, h, n], gl_s.at[slot], bars.at[slot])

    pl.when(wg == 0)(lambda: fetch(0, 0))
    s0 = plgpu.load(h0_ref.at[b, h, :, vcols], layout=wg_layout, optimized=False)
    s_mine, vn_mine, o_mine = s_s.at[wg], vn_s.at[wg], o_s.at[wg]

    def step(n, s):
        slot = lax.rem(n, 2)

        @pl.when((wg == 0) & (n + 1 < nt))
        def _():
            pl.when(n > 0)(lambda: plgpu.barrier_wait(free.at[1 - slot]))  # both have read chunk n − 1
            fetch(n + 1, 1 - slot)

        plgpu.barrier_wait(bars.at[slot])
        decay = _decay_row(gl_s.at[slot])
        s_mine[...] = s.astype(_BF16)
        plgpu.commit_smem()
        u = plgpu.load(u_s.at[slot, wg], layout=wg_layout, optimized=False).astype(_F32)

        kv, o = _chunk_products(w_s.at[slot], qg_s.at[slot], kg_s.at[slot], a_s.at[slot], s_mine, vn_mine, u,
                                bv=bv)
        s_next = _decayed(s, decay) + kv
        plgpu.barrier_arrive(free.at[slot])
        _store_output(o, o_mine, o_ref.at[b, pl.ds(n * C, C), h, vcols])
        return s_next

    s = lax.fori_loop(0, nt, step, s0)
    ht_ref.at[b, h, :, vcols][...] = s
    plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 0)
    def _():
        for last in (nt - 2, nt - 1):  # the last two chunks' `free` completions, one per slot
            if last >= 0:
                plgpu.barrier_wait(free.at[last % 2])

    # Neither warpgroup exits while the other still issues wgmmas (see `_body_two`).
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)


def state_mosaic(w, u, qg, kg, aqk, gl, h0, *, block_v=64, warpgroups=1, pair=False, interpret=False):
    """o [B,Tp,H,V] bf16 and the final states [B,H,K,V] fp32 (one state per batch row).
    `warpgroups=2` puts the output on a second warpgroup (`_body_two`; the library's default).
    `pair=True` runs the two value blocks of a head (V = 2·block_v) on two warpgroups of one CTA
    that share the chunk's tiles (`_body_pair`; for batches that fill the GPU: 0.402 against 0.636 ms
    with two warpgroups at B=8, T=4096, H=32 on an H200)."""
    plgpu = _plgpu()
    B, H, Tp, K = w.shape
    V = u.shape[-1]
    NT = Tp // C
    bv = block_v
    if w.dtype != _BF16 or V % bv or K % 64 or bv not in (32, 64):
        raise ValueError(f"the Mosaic GPU state pass takes bf16 tiles with K % 64 == 0, block_v 32 or 64 and "
                         f"V % block_v == 0, got {w.dtype}, K={K}, V={V}, block_v={bv}")
    if warpgroups not in (1, 2):
        raise ValueError(f"the Mosaic GPU state pass runs on 1 or 2 warpgroups, got {warpgroups}")
    if pair:
        if V != 2 * bv:
            raise ValueError(f"pair=True runs two value blocks a CTA: V must be 2 * block_v, got V={V}, "
                             f"block_v={bv}")
        return _state_pair(w, u, qg, kg, aqk, gl, h0, bv=bv, interpret=interpret)
    t = functools.partial(_tiles, m=bv)
    slots = () if warpgroups == 1 else (2,)  # the two-warpgroup pass publishes S and v' in two slots
    scratch = (t((2, C, K)), t((2, C, K)), t((2, C, K)), t((2, C, C)), t((2, C, bv)),
               plgpu.SMEM((2, K), _F32), t(slots + (K, bv)), t(slots + (C, bv)), t((C, bv)))
    if warpgroups == 1:
        body, extra = _body, {}
        scratch += (plgpu.Barrier(num_arrivals=6, num_barriers=2),)
    else:
        body, extra = _body_two, {"num_threads": 2, "thread_name": "wg"}
        scratch += (plgpu.Barrier(num_arrivals=4, num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=2),
                    plgpu.Barrier(num_arrivals=1, num_barriers=2), plgpu.Barrier(num_arrivals=1, num_barriers=2),
                    plgpu.Barrier(num_arrivals=2))
    kern = plgpu.kernel(
        functools.partial(body, nt=NT, bv=bv),
        out_type=(jax.ShapeDtypeStruct((B, Tp, H, V), _BF16), jax.ShapeDtypeStruct((B, H, K, V), _F32)),
        scratch_types=scratch, grid=(V // bv, H, B), grid_names=("v", "h", "b"),
        interpret=_interpret_params(interpret),
        kernel_name="kda_chunk_state_mosaic" + ("" if warpgroups == 1 else "_2wg"), **extra,
    )
    return kern(w, u, qg, kg, aqk, gl, h0.astype(_F32))


def _state_pair(w, u, qg, kg, aqk, gl, h0, *, bv, interpret):
    plgpu = _plgpu()
    B, H, Tp, K = w.shape
    V = u.shape[-1]
    NT = Tp // C
    t = functools.partial(_tiles, m=bv)
    scratch = (t((2, C, K)), t((2, C, K)), t((2, C, K)), t((2, C, C)), t((2, 2, C, bv)),
               plgpu.SMEM((2, K), _F32), t((2, K, bv)), t((2, C, bv)), t((2, C, bv)),
               plgpu.Barrier(num_arrivals=7, num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=2),
               plgpu.Barrier(num_arrivals=2))
    kern = plgpu.kernel(
        functools.partial(_body_pair, nt=NT, bv=bv),
        out_type=(jax.ShapeDtypeStruct((B, Tp, H, V), _BF16), jax.ShapeDtypeStruct((B, H, K, V), _F32)),
        scratch_types=scratch, grid=(H, B), grid_names=("h", "b"), num_threads=2, thread_name="wg",
        interpret=_interpret_params(interpret), kernel_name="kda_chunk_state_mosaic_pair",
    )
    return kern(w, u, qg, kg, aqk, gl, h0.astype(_F32))

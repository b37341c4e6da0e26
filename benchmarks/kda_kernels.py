"""KDA kernels on an NVIDIA GPU: ours (Pallas) against fla-core 0.6.0 (Triton) and
jax-linear-attention 0.1.0 (Pallas Mosaic GPU), checked on the same inputs, timed in one run.

Run on the GPU machine (the `device` tool), with the two pure-Python wheels carried in `.whl`:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:. python3 benchmarks/kda_kernels.py --out $OUT

Prints a table last; writes `log.txt` and `results.json` under --out (updated after every
measurement, so a run cut short still returns what it measured). Time: JAX functions are
jitted, warmed up, then timed as the median over `outer` samples of `inner` back-to-back calls
ended by block_until_ready; torch functions with triton.testing.do_bench (median).
FLOPs per head follow the Kimi Linear report §6.3 (6·T·d² + 3·T·C·d + T·C²); bytes are the
fewest the op must move (inputs read once, outputs and states written once).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import sys
import time
import traceback

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from jaxprfaas.pallas_kernels import reference  # noqa: E402
from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas  # noqa: E402
from jaxprfaas.pallas_kernels.chunk_intra import EXP2_DEFAULT, TOTALS_DEFAULT  # noqa: E402
from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas  # noqa: E402

PEAK_TFLOPS = 800.0  # H100 bf16 dense matmul, measured here (KINDS.md / METHOD.md)
PEAK_TBPS = 3.0  # H100 device-to-device copy, bytes read + written
H200_PEAK_TFLOPS, H200_PEAK_TBPS = 790.0, 4.3  # the same, measured on an H200 (KINDS.md)
C = 64
INTERP = jax.default_backend() != "gpu"  # the smoke run on a CPU interprets the kernels
RES: dict = {"meta": {}, "checks": [], "timings": []}
ARGS = None
_LOG = None
T0 = time.time()


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    if _LOG:
        _LOG.write(s + "\n")
        _LOG.flush()


def save():
    with open(os.path.join(ARGS.out, "results.json"), "w") as f:
        json.dump(RES, f, indent=1)


def flops_chunk(B, T, H, K):
    return B * H * (6 * T * K * K + 3 * T * C * K + T * C * C)


def bytes_chunk(B, T, H, K, V):
    per_tok = 2 * K * 2 + V * 2 + K * 4 + 4 + V * 2  # q, k, v bf16, g fp32, beta fp32, o bf16
    return B * T * H * per_tok + 2 * B * H * K * V * 4  # + initial and final state fp32


def bytes_decode(B, H, K, V):
    return 2 * B * H * K * V * 4 + B * H * (2 * K * 2 + V * 2 + K * 4 + 4 + V * 2)


# ----------------------------------------------------------------------------- timing

def time_jax(fn, *args, inner=10, outer=7):
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(outer):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / inner)
    return float(np.median(samples)) * 1e3, float(np.max(samples) - np.min(samples)) * 1e3


def time_jax_pool(step, pool, inner=50, outer=7):
    """A step that donates and returns the pool: thread it through the calls."""
    o, pool = step(pool)
    jax.block_until_ready(pool)
    samples = []
    for _ in range(outer):
        t = time.perf_counter()
        for _ in range(inner):
            o, pool = step(pool)
        jax.block_until_ready(pool)
        samples.append((time.perf_counter() - t) / inner)
    return float(np.median(samples)) * 1e3, float(np.max(samples) - np.min(samples)) * 1e3


def time_jax_pool_loop(step, pool, n=50, outer=7, unroll=False):
    """`n` steps threading the pool inside one jitted program (a fori_loop), per step: the kernel's
    device time without one host dispatch per step (as a model's decode loop runs it). `unroll`:
    the steps in straight-line code, without XLA's while loop (whose trip test is read back by the
    host every iteration on GPUs)."""
    loop = jax.jit(lambda pool: lax.fori_loop(0, n, lambda i, p: step(p)[1], pool, unroll=unroll),
                   donate_argnums=0)
    pool = loop(pool)
    jax.block_until_ready(pool)
    samples = []
    for _ in range(outer):
        t = time.perf_counter()
        pool = loop(pool)
        jax.block_until_ready(pool)
        samples.append((time.perf_counter() - t) / n)
    return float(np.median(samples)) * 1e3, float(np.max(samples) - np.min(samples)) * 1e3


def time_torch(fn):
    import triton
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")), 0.0


def time_torch_graph(step, n=50):
    """`n` calls of `step` (which updates its state pool in place) captured in one CUDA graph and
    replayed under `do_bench`, per step: back to back on the device with no host dispatch between
    steps and one L2 flush per `n` steps, as `time_jax_pool_loop` times ours."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compiles, autotunes)
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            step()
    return time_torch(graph.replay)[0] / n


def record(kind, shape, impl, ms, spread, flops=None, nbytes=None, **extra):
    row = dict(kind=kind, shape=shape, impl=impl, ms=ms, spread_ms=spread, **extra)
    if flops:
        row["tflops"] = flops / ms / 1e9
    if nbytes:
        row["gbps"] = nbytes / ms / 1e6
    RES["timings"].append(row)
    save()
    log(f"  time {kind:8s} {shape:14s} {impl:28s} {ms:9.3f} ms (spread {spread:.3f})"
        + (f"  {row['tflops']:7.1f} TFLOP/s" if flops else "") + (f"  {row['gbps']:7.0f} GB/s" if nbytes else ""))


def rel(a, b):
    """||a - b|| / ||b|| in fp32 (and the max-abs relative error)."""
    a = jnp.asarray(a).astype(jnp.float32)
    b = jnp.asarray(b).astype(jnp.float32)
    fro = float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))
    mx = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    return fro, mx, bool(jnp.isfinite(a).all())


def check(name, a, b, tol):
    fro, mx, finite = rel(a, b)
    ok = finite and fro < tol
    RES["checks"].append(dict(name=name, rel_fro=fro, rel_max=mx, finite=finite, tol=tol, ok=ok))
    save()
    log(f"  check {name:60s} rel_fro {fro:.2e} rel_max {mx:.2e} {'OK' if ok else 'FAIL'}")
    return ok


def out_of_time():
    return time.time() - T0 > ARGS.budget


def section(title, fn):
    log(f"\n== {title}")
    if out_of_time():
        log("  skipped: past the time budget")
        return
    t = time.time()
    try:
        fn()
    except Exception as e:  # keep going: a later section may still measure something
        log(f"  SECTION FAILED: {type(e).__name__}: {str(e)[:2000]}")
        log(traceback.format_exc()[-4000:])
        RES.setdefault("errors", []).append(dict(section=title, error=f"{type(e).__name__}: {str(e)[:2000]}"))
        save()
    log(f"  ({time.time() - t:.1f} s)")


# ----------------------------------------------------------------------------- inputs

def inputs(seed, B, T, H, K, V, *, gated=False, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32).astype(dtype)
    h0 = 0.1 * jax.random.normal(ks[5], (B, H, K, V), jnp.float32)
    if gated:  # raw gate input f, beta logits, A_log [H], dt_bias [H*K] (Kimi Linear's fused form)
        g = jax.random.normal(ks[3], (B, T, H, K), jnp.float32)
        beta = jax.random.normal(ks[4], (B, T, H), jnp.float32)
        A_log = jnp.log(jax.random.uniform(ks[6], (H,), jnp.float32, 1.0, 16.0))
        dt_bias = jax.random.normal(ks[7], (H * K,), jnp.float32) - 2.0
        return dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0, A_log=A_log, dt_bias=dt_bias)
    g = -jnp.exp(jax.random.uniform(ks[3], (B, T, H, K), jnp.float32, -5.0, 0.5))  # log decay in [-1.65, -0.007]
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32))
    return dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0)


def to_torch(x):
    import torch
    return torch.from_dlpack(x)


def from_torch(t):
    return jnp.from_dlpack(t.contiguous())


# ----------------------------------------------------------------------------- implementations

def ours_chunk(gated=False, block_v=None, num_warps=4, num_warps_intra=None, state_impl="auto", diag="auto",
               solve_impl="auto", akk_precision="bf16", scores_opts=None, akk_storage="fp32", scores_impl="auto"):
    """Our chunk kernel; num_warps_intra=None keeps the library's per-kernel warps (scores and
    solve 2), the configuration `chunk_kda` runs."""
    def f(x):
        kw = dict(A_log=x["A_log"], dt_bias=x["dt_bias"], use_gate_in_kernel=True, use_beta_sigmoid=True) if gated else {}
        return chunk_kda_pallas(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                output_final_state=True, use_qk_l2norm=True, interpret=INTERP, block_v=block_v,
                                num_warps=num_warps, num_warps_intra=num_warps_intra,
                                state_impl=state_impl, diag=diag, solve_impl=solve_impl,
                                akk_precision=akk_precision, scores_opts=scores_opts, akk_storage=akk_storage,
                                scores_impl=scores_impl,
                                **kw)
    return jax.jit(f)


def variant_name(v):
    bv, nw, wi, st, diag, so, ak, sc, ast, sci = v
    return (f"ours pallas-triton bv{bv} w{nw}" + (f" wi{wi}" if wi else "") + (f" diag-{diag}" if diag != "auto" else "")
            + (" state-" + st.replace("_", "-") if st.startswith("mosaic") else "")
            + (" solve-triton" if so == "triton" else "")
            + (" akk-tf32" if ak == "tf32" else "") + (" akk-stored-bf16" if ast == "bf16" else "")
            + (" scores-mosaic" if sci == "mosaic" else "")
            + "".join(f" scores-{k}={v}" for k, v in sc))


def variant_kw(v):
    bv, nw, wi, st, diag, so, ak, sc, ast, sci = v
    return dict(block_v=bv, num_warps=nw, num_warps_intra=wi, state_impl=st, diag=diag, solve_impl=so,
                akk_precision=ak, scores_opts=dict(sc), akk_storage=ast, scores_impl=sci)


def ref_chunk(gated=False):
    def f(x):
        kw = dict(A_log=x["A_log"], dt_bias=x["dt_bias"], use_gate_in_kernel=True, use_beta_sigmoid=True) if gated else {}
        return reference.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                   output_final_state=True, use_qk_l2norm=True, **kw)
    return jax.jit(f)


def fla_chunk_fn(x, gated=False):
    import torch
    from fla.ops.kda import chunk_kda
    t = {n: to_torch(a) for n, a in x.items()}

    def run():
        with torch.inference_mode():
            kw = dict(A_log=t["A_log"], dt_bias=t["dt_bias"], use_gate_in_kernel=True,
                      use_beta_sigmoid_in_kernel=True) if gated else {}
            return chunk_kda(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["h0"],
                             output_final_state=True, use_qk_l2norm_in_kernel=True, **kw)
    return run


def jla_chunk():
    import jla.ops.mosaic_gpu  # noqa: F401  (registers impl="mosaic_gpu")
    from jla.ops import linear_attention

    def f(x):
        return linear_attention("kda", x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], impl="mosaic_gpu",
                                use_qk_l2norm=True, initial_state=x["h0"], output_final_state=True)
    return jax.jit(f)


# ----------------------------------------------------------------------------- sections

def gpu_correctness():
    """Our compiled kernels against the jnp reference (fp32 exact path, bf16, varlen, tail)."""
    x = inputs(1, 2, 300, 4, 128, 128, dtype=jnp.float32)
    o, S = ours_chunk()(x)
    o_r, S_r = ref_chunk()(x)
    check("ours fp32 (2,300,4,128) vs reference: o", o, o_r, 1e-4)
    check("ours fp32 (2,300,4,128) vs reference: state", S, S_r, 1e-4)
    x = inputs(2, 1, 2048, 8, 128, 128)
    o, S = ours_chunk()(x)
    o_r, S_r = ref_chunk()(x)
    check("ours bf16 (1,2048,8,128) vs reference: o", o, o_r, 2e-2)
    check("ours bf16 (1,2048,8,128) vs reference: state", S, S_r, 2e-2)
    xg = inputs(3, 1, 1000, 4, 128, 128, gated=True)
    o, S = ours_chunk(gated=True)(xg)
    o_r, S_r = ref_chunk(gated=True)(xg)
    check("ours bf16 gated (1,1000,4,128) vs reference: o", o, o_r, 2e-2)
    xs = inputs(4, 1, 1024, 4, 128, 128, dtype=jnp.float32)  # 0 / 8 / 16 / 40 nats per token by 256-token quarter
    per = jnp.repeat(jnp.array([0.0, 8.0, 16.0, 40.0]), 256)[None, :, None, None]
    xs["g"] = jnp.where(per > 0, -per * jax.random.uniform(jax.random.PRNGKey(5), xs["g"].shape, minval=0.8), xs["g"])
    o, S = ours_chunk()(xs)
    o_r, S_r = ref_chunk()(xs)
    check("ours fp32 strong gates (every diagonal form) vs reference: o", o, o_r, 1e-4)
    check("ours fp32 strong gates vs reference: state", S, S_r, 1e-4)
    cu = jnp.array([0, 100, 100, 700, 1000], jnp.int32)
    h0 = 0.1 * jax.random.normal(jax.random.PRNGKey(9), (4, 4, 128, 128), jnp.float32)
    args = (x["q"][:, :1000, :4], x["k"][:, :1000, :4], x["v"][:, :1000, :4], x["g"][:, :1000, :4],
            x["beta"][:, :1000, :4])
    o, S = jax.jit(lambda *a: chunk_kda_pallas(*a, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                               use_qk_l2norm=True, interpret=INTERP))(*args)
    o_r, S_r = reference.chunk_kda(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                   use_qk_l2norm=True)
    check("ours bf16 varlen cu=[0,100,100,700,1000] vs reference: o", o, o_r, 2e-2)
    check("ours bf16 varlen vs reference: states", S, S_r, 2e-2)


def chunk_shapes(shapes):
    H, K, V = (32, 128, 128) if not ARGS.smoke else (2, 128, 64)
    if ARGS.smoke:
        shapes = [(1, 256), (2, 128)][:len(shapes)]
    for i, (B, T) in enumerate(shapes):
        if out_of_time():
            log("  skipping the rest: past the time budget")
            break
        name = f"B{B}xT{T}"
        x = inputs(10 + T // 1024 + B, B, T, H, K, V)
        fl, nb = flops_chunk(B, T, H, K), bytes_chunk(B, T, H, K, V)
        variants = ARGS.chunk_variants if T == shapes[0][1] and B == shapes[0][0] else ARGS.chunk_variants[:1]
        outs = {}
        for v in variants:
            try:
                f = ours_chunk(**{**variant_kw(v), "block_v": min(v[0], V)})
                outs[v] = f(x)
                ms, sp = time_jax(f, x, inner=3 if T >= 65536 else 10)
                record("chunk", name, variant_name(v), ms, sp, fl, nb, variant=list(v))
            except Exception as e:
                log(f"  {variant_name(v)} failed: {type(e).__name__}: {str(e)[:1500]}")
        o, S = next(iter(outs.values())) if outs else (None, None)
        if T <= 8192 and o is not None:
            fr = ref_chunk()
            o_r, S_r = fr(x)
            if ARGS.time_reference:
                ms, sp = time_jax(fr, x, inner=2, outer=3)
                record("chunk", name, "ours xla reference (jnp)", ms, sp, fl, nb)
            for key, (oo, SS) in outs.items():
                check(f"{name} ours {key} vs reference: o", oo, o_r, 2e-2)
                check(f"{name} ours {key} vs reference: state", SS, S_r, 2e-2)
        if not ARGS.no_peers:
            try:
                run = fla_chunk_fn(x)
                o_f, S_f = run()
                if o is not None:
                    check(f"{name} ours vs fla-core: o", o, from_torch(o_f), 2e-2)
                    check(f"{name} ours vs fla-core: state", S, from_torch(S_f), 2e-2)
                ms, sp = time_torch(run)
                record("chunk", name, "fla-core 0.6.0 triton", ms, sp, fl, nb)
                del o_f, S_f, run
            except Exception as e:
                log(f"  fla failed: {type(e).__name__}: {str(e)[:1500]}")
            try:
                f = jla_chunk()
                o_j, S_j = f(x)
                if o is not None:
                    check(f"{name} ours vs jax-linear-attention: o", o, o_j, 2e-2)
                    check(f"{name} ours vs jax-linear-attention: state", S, S_j, 2e-2)
                ms, sp = time_jax(f, x, inner=3 if T >= 65536 else 10)
                record("chunk", name, "jax-linear-attention mosaic_gpu", ms, sp, fl, nb)
                del o_j, S_j
            except Exception as e:
                log(f"  jla failed: {type(e).__name__}: {str(e)[:1500]}")
        del x, outs, o, S
        _free()


def split_8k():
    """Where our time goes at 8K: the scores kernel in its diagonal forms, the solve, then the
    serial pass in its variants (--state-variants: Triton or Mosaic GPU, block_v, warps, stages)."""
    from jaxprfaas.pallas_kernels import chunk as ck
    B, T = ARGS.split_shape
    B, T, H, K, V = (B, T, 32, 128, 128) if not ARGS.smoke else (1, 128, 2, 128, 64)
    name = f"B{B}xT{T}"
    x = inputs(40, B, T, H, K, V)
    first = None
    for spec in ARGS.scores_variants:  # form[-bf16]:num_warps[:sN num_stages][:unroll]
        form, nw, *opts = spec.split(":")
        form, _, kk = form.partition("-")
        ns = next((int(o[1:]) or None for o in opts if o.startswith("s")), 1)  # s0: Triton's default
        cp = next((int(o[2:]) for o in opts if o.startswith("cp")), None)
        e2 = "e2" in opts or ("x" not in opts and EXP2_DEFAULT)
        tot = "tot" in opts or ("nt" not in opts and TOTALS_DEFAULT)
        fsc = jax.jit(lambda x, form=form, nw=int(nw), kk=kk == "bf16", ns=ns, un="unroll" in opts,
                      hf="heads" in opts, cp=cp, e2=e2, tot=tot: ck.scores(
            x["q"], x["k"], x["g"], x["beta"], None, scale=K ** -0.5, l2=True, interpret=INTERP, form=form,
            num_warps=nw, kk_bf16=kk, num_stages=ns, unroll=un, heads_fastest=hf, channel_pass=cp, exp2=e2,
            totals=tot))
        out = fsc(x)
        if first is None:
            first = out
        else:
            for nm, a_, b_ in zip(("akk", "aqk", "qg", "kg", "kb", "beta", "gl"), out, first):
                check(f"scores {spec} vs the first: {nm}", a_, b_, 2e-2)
        record("part", name, f"ours scores {spec}", *time_jax(fsc, x))
    akk, aqk, qg, kg, kb, beta_e, gl = first[:7]  # (form "split" adds its flags)
    for nw in ARGS.solve_warps:
        fso = jax.jit(lambda akk, kb, v, be, nw=nw: ck.solve(akk, kb, v, be, interpret=INTERP, num_warps=nw))
        w, u = fso(akk, kb, x["v"], beta_e)
        record("part", name, f"ours solve w{nw}", *time_jax(fso, akk, kb, x["v"], beta_e))
    mosaic_solve_8k(name, x, first, (w, u))
    parts = (w, u, qg, kg, aqk, gl)
    ref = None
    for spec in ARGS.state_variants:
        mode, bv, nw, ns = spec.split(":")
        bv, nw, ns = min(int(bv), V), int(nw), (int(ns) or None)
        try:
            if mode in ("mosaic", "mosaic2", "pair"):
                from jaxprfaas.pallas_kernels.state_mosaic import state_mosaic
                fs = jax.jit(lambda p, h0, bv=bv, wgs=1 + (mode != "mosaic"), pair=mode == "pair": state_mosaic(
                    *p, h0, block_v=bv, warpgroups=wgs, pair=pair, interpret=INTERP))
            else:
                fs = jax.jit(lambda p, h0, bv=bv, nw=nw, ns=ns: ck.state(
                    *p, h0, None, out_dtype=jnp.bfloat16, block_v=bv, num_warps=nw, num_stages=ns,
                    interpret=INTERP))
            o, S = fs(parts, x["h0"])
            if ref is None:
                ref = (o, S)
            else:
                check(f"state variant {spec} vs the first: o", o, ref[0], 2e-2)
                check(f"state variant {spec} vs the first: final state", S, ref[1], 1e-4)
            record("part", name, f"ours state {spec}", *time_jax(fs, parts, x["h0"]))
        except Exception as e:
            log(f"  state {spec} failed: {type(e).__name__}: {str(e)[:1500]}")
    fixup_8k(name, B, T, H, K, V)


def mosaic_solve_8k(name, x, tri_scores, tri_wu):
    """The Mosaic GPU solve alone (the default on Hopper), checked against the Triton solve's output
    on the same inputs; `solve w2` above times the Triton one."""
    try:
        from jaxprfaas.pallas_kernels.solve_mosaic import solve_mosaic
        akk, kb, beta_e = tri_scores[0], tri_scores[4], tri_scores[5]
        fso = jax.jit(lambda akk, kb, v, be: solve_mosaic(akk, kb, v, be, interpret=INTERP))
        w, u = fso(akk, kb, x["v"], beta_e)
        check("solve mosaic vs triton: w", w, tri_wu[0], 2e-2)
        check("solve mosaic vs triton: u", u, tri_wu[1], 2e-2)
        record("part", name, "ours solve mosaic", *time_jax(fso, akk, kb, x["v"], beta_e))
    except Exception as e:
        log(f"  solve mosaic failed: {type(e).__name__}: {str(e)[:1500]}")


def fixup_8k(name, B, T, H, K, V):
    """The split form's fix-up kernels on the fused-gate inputs (where most sub-chunks decay by
    more than 140 nats): the scores kernel alone, then scores + fix-up, on the same gated g and β
    (timing the fix-up alone would add copies of its aliased Akk and Aqk)."""
    from jaxprfaas.pallas_kernels import chunk as ck
    from jaxprfaas.pallas_kernels.chunk_intra import diag_fixup
    xg = inputs(41, B, T, H, K, V, gated=True)
    fgates = jax.jit(lambda x: ck.gates(x["g"], x["beta"], x["A_log"], x["dt_bias"], gate=True, beta_sigmoid=True))
    g, beta = fgates(xg)
    record("part", name, "ours gates: the fused gate and beta sigmoid, one XLA pass", *time_jax(fgates, xg))
    sc = jax.jit(lambda q, k, g, b, cp=None, e2=EXP2_DEFAULT: ck.scores(
        q, k, g, b, None, scale=K ** -0.5, l2=True, interpret=INTERP, form="split", kk_bf16=True, channel_pass=cp,
        exp2=e2), static_argnames=("cp", "e2"))

    def with_fixup(q, k, g, b, ns=None, cp=None, e2=EXP2_DEFAULT):
        out = sc(q, k, g, b, cp=cp, e2=e2)
        akk, aqk = diag_fixup(q, k, g, b, None, out[7], out[0], out[1], scale=K ** -0.5, l2=True, interpret=INTERP,
                              kk_bf16=True, num_stages=ns, exp2=e2)
        return akk, aqk, out[7]

    args = (xg["q"], xg["k"], g, beta)
    flags = np.asarray(sc(*args)[7]).ravel()
    log(f"  fused-gate sub-chunks flagged for the fix-up: {np.mean(flags != 0):.1%}")
    record("part", name, "ours scores split-bf16:2 (fused-gate inputs)", *time_jax(sc, *args))
    fix = jax.jit(with_fixup)
    record("part", name, "ours scores split-bf16:2 + diag_fixup (fused-gate inputs)", *time_jax(fix, *args))
    for ns in ARGS.fixup_stages:
        record("part", name, f"ours scores split-bf16:2 + diag_fixup s{ns} (fused-gate inputs)",
               *time_jax(jax.jit(functools.partial(with_fixup, ns=ns)), *args))
    ref = fix(*args)
    e2 = not EXP2_DEFAULT  # the other exponential of the scores kernel and the fix-up
    fe2 = jax.jit(functools.partial(with_fixup, e2=e2))
    out = fe2(*args)
    check(f"scores + fix-up with exp2={e2} vs the default (fused-gate inputs): akk", out[0], ref[0], 1e-3)
    check(f"scores + fix-up with exp2={e2} vs the default (fused-gate inputs): aqk", out[1], ref[1], 2e-2)
    record("part", name, f"ours scores split-bf16:2 + diag_fixup, exp2={e2} (fused-gate inputs)", *time_jax(fe2, *args))
    for cp in ARGS.fixup_channel_passes:  # the channel-pass kernel forms two-pair diagonals itself: fewer flagged
        fcp = jax.jit(functools.partial(with_fixup, cp=cp))
        out = fcp(*args)
        check(f"scores cp{cp} + fix-up vs split + fix-up (fused-gate inputs): akk", out[0], ref[0], 1e-3)
        check(f"scores cp{cp} + fix-up vs split + fix-up (fused-gate inputs): aqk", out[1], ref[1], 2e-2)
        log(f"  scores cp{cp}: sub-chunks flagged for the fix-up: {np.mean(np.asarray(out[2]) != 0):.1%}")
        record("part", name, f"ours scores split-bf16:2:cp{cp} + diag_fixup (fused-gate inputs)", *time_jax(fcp, *args))


def model_check():
    """The model on the GPU: `impl="auto"` picks the Pallas kernels and its logits match the jnp path.

    fp32 runs with every matmul at full precision (a GPU otherwise uses TF32, and the two programs
    may pick different GEMM kernels: 1e-3 apart before any KDA difference), so 1e-4 checks KDA.
    bf16 cannot be pinned that way: there the greedy tokens must agree and the logits stay within
    5e-2 (relative Frobenius) of the jnp path's."""
    from jaxprfaas.model.config import ModelConfig
    from jaxprfaas.model.hybrid_lm import HybridLM
    from jaxprfaas.pallas_kernels import dispatch
    for dtype in ("float32", "bfloat16"):
        picked = [dispatch._resolve("auto", kind) for kind in ("chunk", "recurrent")]
        log(f"  {dtype}: impl='auto' resolves to {picked} (chunk, recurrent)")
        RES.setdefault("model", []).append(dict(dtype=dtype, auto=picked))
        cfg = ModelConfig.preset("tiny").replace(hidden_size=256, kda_num_heads=4, kda_head_dim=128 if not ARGS.smoke
                                                 else 32, dtype=dtype)
        tol = 1e-4 if dtype == "float32" else 5e-2
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            m = HybridLM(cfg, seed=3)
            toks = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 300))
            lens = np.array([300, 141])
            la, sa = m.prefill(toks, lengths=lens, impl="auto")
            lx, sx = m.prefill(toks, lengths=lens, impl="xla")
            valid = (np.arange(300)[None, :] < lens[:, None])[..., None]
            check(f"model {dtype} prefill logits, auto vs xla", jnp.where(valid, la, 0), jnp.where(valid, lx, 0), tol)
            last = la[np.arange(2), lens - 1]
            nxt = np.asarray(jnp.argmax(lx[np.arange(2), lens - 1], -1)).reshape(-1)
            same = [bool((np.asarray(jnp.argmax(last, -1)) == nxt).all())]
            for step in range(3):
                la, sa = m.decode(nxt, sa, impl="auto")
                lx, sx = m.decode(nxt, sx, impl="xla")
                check(f"model {dtype} decode step {step} logits, auto vs xla", la, lx, tol)
                same.append(bool((np.asarray(jnp.argmax(la, -1)) == np.asarray(jnp.argmax(lx, -1))).all()))
                nxt = np.asarray(jnp.argmax(lx, -1)).reshape(-1)
        RES["checks"].append(dict(name=f"model {dtype} greedy tokens equal (prefill + 3 decode steps)",
                                  rel_fro=0.0, rel_max=0.0, tol=0.0, ok=all(same)))
        log(f"  model {dtype} greedy tokens equal: {same}")


def gated_shapes():
    shapes = [(1, 8192), (1, 32768)][:ARGS.gated_shapes] if not ARGS.smoke else [(1, 256)]
    H, K, V = (32, 128, 128) if not ARGS.smoke else (2, 128, 64)
    for i, (B, T) in enumerate(shapes):
        if out_of_time():
            log("  skipping the rest: past the time budget")
            break
        name = f"B{B}xT{T}"
        x = inputs(20 + i, B, T, H, K, V, gated=True)
        fl, nb = flops_chunk(B, T, H, K), bytes_chunk(B, T, H, K, V)
        o = S = None
        for v in ARGS.chunk_variants if i == 0 else ARGS.chunk_variants[:1]:
            try:
                f = ours_chunk(gated=True, **{**variant_kw(v), "block_v": min(v[0], V)})
                out = f(x)
                ms, sp = time_jax(f, x)
                record("gated", name, variant_name(v), ms, sp, fl, nb, variant=list(v))
                if o is None:
                    o, S = out
                else:
                    check(f"gated {name} {variant_name(v)} vs the first variant: o", out[0], o, 2e-2)
                    check(f"gated {name} {variant_name(v)} vs the first variant: state", out[1], S, 2e-2)
            except Exception as e:
                log(f"  {variant_name(v)} failed: {type(e).__name__}: {str(e)[:1500]}")
        if not ARGS.no_peers:
            try:
                run = fla_chunk_fn(x, gated=True)
                o_f, S_f = run()
                check(f"gated {name} ours vs fla-core: o", o, from_torch(o_f), 2e-2)
                check(f"gated {name} ours vs fla-core: state", S, from_torch(S_f), 2e-2)
                ms, sp = time_torch(run)
                record("gated", name, "fla-core 0.6.0 triton (gate+sigmoid in kernel)", ms, sp, fl, nb)
            except Exception as e:
                log(f"  fla gated failed: {type(e).__name__}: {str(e)[:1500]}")
        del x
        _free()


def decode_shapes():
    H, K, V = (32, 128, 128) if not ARGS.smoke else (2, 32, 32)
    for B in (ARGS.decode_batches if not ARGS.smoke else (4,)):
        if out_of_time():
            log("  skipping the rest: past the time budget")
            break
        name = f"B{B}"
        x = inputs(30 + B, B, 1, H, K, V, gated=True)
        nb = bytes_decode(B, H, K, V)
        idx = jnp.arange(B, dtype=jnp.int32)[::-1]
        kw = dict(use_qk_l2norm=True, use_gate_in_kernel=True, use_beta_sigmoid=True, A_log=x["A_log"],
                  dt_bias=x["dt_bias"])
        o_r, S_r = reference.fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                                 state_indices=idx, **kw)
        if ARGS.time_reference:
            fr = jax.jit(lambda pool: reference.fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                                    initial_state=pool, state_indices=idx, **kw))
            ms, sp = time_jax_pool(fr, jnp.copy(x["h0"]))
            record("decode", name, "ours xla reference (jnp)", ms, sp, None, nb)
        shown = False
        for bv, nw, hint, vf, op in ARGS.decode_variants:
            if bv > V:
                continue
            try:
                opk = {} if op is None else {"one_pass": op}
                step = jax.jit(lambda pool, bv=bv, nw=nw, hint=hint, vf=vf, opk=opk: fused_recurrent_kda_pallas(
                    x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=pool, state_indices=idx,
                    interpret=INTERP, block_v=bv, num_warps=nw, cache_hints=hint, v_fastest=vf, **opk, **kw),
                    donate_argnums=0)
                o, P = step(jnp.copy(x["h0"]))
                if not shown:
                    log(f"  decode {name}: what XLA launches per step: {_launches(step, P)}")
                    shown = True
                ptag = "" if op is None else (" one-pass" if op else " two-pass")
                tag = f"bv{bv}" + (" hints" if hint else "") + ("" if vf else " batch-fastest") + ptag
                check(f"decode {name} ours {tag} vs reference: o", o, o_r, 2e-2)
                check(f"decode {name} ours {tag} vs reference: pool", P, S_r, 1e-4)
                label = f"ours pallas-triton bv{bv} w{nw}" + tag[len(f"bv{bv}"):]
                ms, sp = time_jax_pool(step, P)
                record("decode", name, label, ms, sp, None, nb)
                if ARGS.decode_loop:
                    ms, sp = time_jax_pool_loop(step, jnp.copy(x["h0"]))
                    record("decode", name, label + " (50 steps in one program)", ms, sp, None, nb)
                    ms, sp = time_jax_pool_loop(step, jnp.copy(x["h0"]), unroll=True)
                    record("decode", name, label + " (50 steps in one program, unrolled)", ms, sp, None, nb)
            except Exception as e:
                log(f"  ours decode bv{bv} failed: {type(e).__name__}: {str(e)[:1500]}")
        try:  # per-call states (no indices): what fla-core's public kernel does
            bv, nw = ARGS.decode_variants[0][:2]  # (the library's other defaults)
            bv = min(bv, V)
            h0_perm = x["h0"][idx]  # state b for row b
            fpc = jax.jit(lambda h0, bv=bv, nw=nw: fused_recurrent_kda_pallas(
                x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=h0, output_final_state=True,
                interpret=INTERP, block_v=bv, num_warps=nw, **kw))
            o, S = fpc(h0_perm)
            check(f"decode {name} ours per-call states vs reference: o", o, o_r, 2e-2)
            check(f"decode {name} ours per-call states vs reference: state", S, S_r[idx], 1e-4)
            ms, sp = time_jax(fpc, h0_perm, inner=50)
            record("decode", name, f"ours pallas-triton bv{bv} w{nw} per-call states (no indices)", ms, sp, None, nb)
            del o, S, h0_perm
        except Exception as e:
            log(f"  ours per-call decode failed: {type(e).__name__}: {str(e)[:1500]}")
        if not ARGS.no_peers:
            try:
                import torch
                from fla.ops.kda import fused_recurrent_kda
                t = {n: to_torch(a) for n, a in x.items()}
                h0_perm = to_torch(x["h0"][idx])  # fla reads state b for row b

                def run():
                    with torch.inference_mode():
                        return fused_recurrent_kda(t["q"], t["k"], t["v"], t["g"], t["beta"], A_log=t["A_log"],
                                                   dt_bias=t["dt_bias"], initial_state=h0_perm,
                                                   output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                   use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
                o_f, S_f = run()
                check(f"decode {name} fla vs reference: o", from_torch(o_f), o_r, 2e-2)
                check(f"decode {name} fla vs reference: state", from_torch(S_f), S_r[idx], 1e-4)
                ms, sp = time_torch(run)
                record("decode", name, "fla-core 0.6.0 fused_recurrent", ms, sp, None, nb)
                if ARGS.decode_loop:  # each step reads the state the one before wrote
                    held = [h0_perm]

                    def chained():
                        with torch.inference_mode():
                            held[0] = fused_recurrent_kda(
                                t["q"], t["k"], t["v"], t["g"], t["beta"], A_log=t["A_log"], dt_bias=t["dt_bias"],
                                initial_state=held[0], output_final_state=True, use_qk_l2norm_in_kernel=True,
                                use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)[1]
                    ms = time_torch_graph(chained)
                    record("decode", name, "fla-core 0.6.0 fused_recurrent (50 chained steps in one CUDA graph)",
                           ms, 0.0, None, nb)
            except Exception as e:
                log(f"  fla decode failed: {type(e).__name__}: {str(e)[:1500]}")
            try:  # fla-core's slot-pool path (vLLM's): state indices, the pool updated in place
                import torch
                from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
                t = {n: to_torch(a) for n, a in x.items()}
                pool_t, idx_t = to_torch(jnp.copy(x["h0"])), to_torch(idx)

                def run_pool():
                    with torch.inference_mode():
                        return fused_recurrent_kda_fwd(
                            t["q"], t["k"], t["v"], t["g"], t["beta"], A_log=t["A_log"], dt_bias=t["dt_bias"],
                            initial_state=pool_t, output_final_state=True, inplace_final_state=True,
                            ssm_state_indices=idx_t, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                            use_beta_sigmoid_in_kernel=True)
                o_f, _ = run_pool()
                check(f"decode {name} fla slot pool vs reference: o", from_torch(o_f), o_r, 2e-2)
                check(f"decode {name} fla slot pool vs reference: pool", from_torch(pool_t), S_r, 1e-4)
                ms, sp = time_torch(run_pool)
                record("decode", name, "fla-core 0.6.0 fused_recurrent slot pool (in place)", ms, sp, None, nb)
                if ARGS.decode_loop:
                    ms = time_torch_graph(run_pool)
                    record("decode", name, "fla-core 0.6.0 fused_recurrent slot pool (50 steps in one CUDA graph)",
                           ms, 0.0, None, nb)
            except Exception as e:
                log(f"  fla slot-pool decode failed: {type(e).__name__}: {str(e)[:1500]}")
        del x
        _free()


def _launches(fn, *args):
    """The instructions of a compiled program's entry computation, by kind, less parameters,
    constants, tuples and bitcasts: fusions, custom calls (our kernels), copies, command buffers
    (`call`: XLA's CUDA graphs of several kernels)."""
    text = fn.lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    kinds = {}
    for op in re.findall(r"^\s*(?:ROOT )?\S+ = .*? ([a-z][a-z-]*)\(", entry, re.M):
        if op in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        kinds[op] = kinds.get(op, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"


def _free():
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:
        pass


def summary():
    log("\n== summary (ratios: the peer's time / ours; > 1 means ours is faster; ours = the first variant, "
        "the library's defaults)")
    rows = RES["timings"]
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["shape"]), []).append(r)
    for (kind, shape), rs in by.items():
        mine = next((r for r in rs if r["impl"].startswith("ours pallas")), None)
        line = f"{kind:7s} {shape:12s}"
        if mine:
            line += f" ours {mine['ms']:8.3f} ms"
            if "tflops" in mine:
                line += f" ({mine['tflops']:.0f} TFLOP/s = {mine['tflops'] / PEAK_TFLOPS:.1%} of peak,"
                line += f" {mine['gbps']:.0f} GB/s)"
            elif "gbps" in mine:
                line += f" ({mine['gbps']:.0f} GB/s = {mine['gbps'] / PEAK_TBPS / 1e3:.1%} of copy)"
        for r in rs:
            if not r["impl"].startswith("ours"):
                line += f" | {r['impl'].replace(' 0.6.0', '').replace(' 0.1.0', '')} {r['ms']:.3f} ms"
                if mine:
                    line += f" x{r['ms'] / mine['ms']:.2f}"
                    RES.setdefault("ratios", []).append(dict(kind=kind, shape=shape, peer=r["impl"],
                                                             peer_ms=r["ms"], ours_ms=mine["ms"],
                                                             ours_impl=mine["impl"], ratio=r["ms"] / mine["ms"]))
        log(line)
    bad = [c for c in RES["checks"] if not c["ok"]]
    log(f"checks: {len(RES['checks']) - len(bad)}/{len(RES['checks'])} OK"
        + "".join(f"\n  FAIL {c['name']} rel_fro {c['rel_fro']:.2e}" for c in bad))
    save()


def _decode_variant(spec):
    """"block_v:num_warps[:1 (eviction hints)][:b (batch rows launched fastest; else value blocks, the
    library's default)][:p / :np (one_pass on / off)]" -> (bv, nw, hints, v_fastest, one_pass or None
    for the library's default)."""
    parts = spec.split(":")
    flags = parts[2:]
    unknown = set(flags) - {"1", "b", "p", "np"}
    if unknown:
        raise SystemExit(f"--decode-variants: unknown flags {sorted(unknown)} in {spec!r}")
    one_pass = True if "p" in flags else (False if "np" in flags else None)
    return int(parts[0]), int(parts[1]), "1" in flags, "b" not in flags, one_pass


def _chunk_variant(spec):
    """"block_v:num_warps[:intra_warps][:mosaic][:2wg][:inline][:ts][:kt][:cpN][:heads]" -> (bv, nw, intra
    warps or None, state pass "triton" | "mosaic" | "mosaic_2wg" (2wg) | "mosaic_pair" (pair), diagonal "auto"
    (= split) |
    "inline", solve "auto" (Mosaic
    GPU on Hopper) | "triton" (ts), Akk's products "bf16" | "tf32" (kt), the scores kernel's options:
    key channels in passes of N (cpN), heads launched fastest (heads), sub-chunk gate totals from an XLA
    reduction or not (tot / nt))."""
    parts = spec.split(":")
    flags = {p for p in parts[2:] if not p.isdigit()}
    sc = tuple(sorted([("channel_pass", int(f[2:])) for f in flags if f.startswith("cp")]
                      + [("heads_fastest", True)] * ("heads" in flags) + [("exp2", True)] * ("e2" in flags)
                      + [("exp2", False)] * ("x" in flags)
                      + [("totals", True)] * ("tot" in flags) + [("totals", False)] * ("nt" in flags)))
    flags = {f for f in flags if not f.startswith("cp")}
    unknown = flags - {"mosaic", "2wg", "pair", "auto", "inline", "ts", "kt", "heads", "e2", "x", "tot", "nt", "ab",
                       "sm"}
    if unknown:
        raise SystemExit(f"--chunk-variants: unknown flags {sorted(unknown)} in {spec!r}")
    nums = [int(p) for p in parts if p.isdigit()]
    state = ({"2wg": "mosaic_2wg", "pair": "mosaic_pair", "auto": "auto"}.get(
        next(iter(flags & {"2wg", "pair", "auto"}), ""), "mosaic") if "mosaic" in flags else "triton")
    return (nums[0], nums[1], nums[2] if len(nums) > 2 else None, state,
            "inline" if "inline" in flags else "auto", "triton" if "ts" in flags else "auto",
            "tf32" if "kt" in flags else "bf16", sc, "bf16" if "ab" in flags else "fp32",
            "mosaic" if "sm" in flags else "auto")


def main():
    global ARGS, _LOG, PEAK_TFLOPS, PEAK_TBPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/kda_bench"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a dry run of the script itself)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--sections", default="chunk8k,split,decode,correct,gated,chunkrest")
    ap.add_argument("--chunk-variants", default="64:4:mosaic:auto,64:4:mosaic:2wg",
                    help="block_v:num_warps of the state kernel[:num_warps of scores and solve][:mosaic (the "
                         "Mosaic GPU state pass, the library's default on Hopper)][:2wg (with :mosaic: its output on "
                         "a second warpgroup)][:pair (with :mosaic: a head's two value blocks on one CTA)][:auto "
                         "(with :mosaic: state_impl=\"auto\", the library's choice by shape)][:inline "
                         "(diag=\"inline\": every "
                         "diagonal form in the scores kernel)][:ts (the Triton solve; else the library's default, "
                         "Mosaic GPU on Hopper)][:kt (akk_precision=\"tf32\")][:ab (akk_storage=\"bf16\")]"
                         "[:sm (scores_impl=\"mosaic\")]"
                         "[:cpN (scores: key channels in "
                         "passes of N)][:heads (scores: heads launched fastest)][:e2 / :x (scores and fix-up: exponentials "
                         "as exp2 / as libdevice's expf)][:tot / :nt (scores: "
                         "sub-chunk gate totals from one XLA reduction / summed in the kernel)],... (all at the "
                         "first shape, the "
                         "first elsewhere)")
    ap.add_argument("--decode-variants", default="64:4,64:4:np,64:4:b,32:4",
                    help="block_v:num_warps[:1 (eviction hints)][:b (batch rows launched fastest, not one state's "
                         "value blocks back to back)][:p / :np (the output's reduction beside u's / after the "
                         "update)],...")
    ap.add_argument("--decode-batches", default="64,256",
                    help="decode batch sizes (the issue's are 64 and 256; more show the fixed cost per step)")
    ap.add_argument("--decode-loop", action="store_true",
                    help="also time each decode variant as 50 steps inside one jitted program (no per-step dispatch)")
    ap.add_argument("--scores-variants", default="split-bf16:2,split-bf16:2:x",
                    help="diagonal form (split: the library's default, without its fix-up kernel; inline, plain, mm1, "
                         "mm2, mm4, cols)[-bf16: bf16 Akk products, the default]:num_warps of the scores kernel"
                         "[:sN: N pipeline stages, default 1 as the library; s0 Triton's default][:unroll: the blocks below the "
                         "diagonal unrolled][:heads: heads and sub-chunks launched fastest][:cpN: key channels in passes of N]"
                         "[:e2 / :x: exponentials as exp2 / as libdevice's expf, against the library's default]"
                         "[:tot / :nt: sub-chunk gate totals from one XLA reduction / summed by "
                         "each program, against the library's default]")
    ap.add_argument("--solve-warps", default="2")
    ap.add_argument("--fixup-stages", default="", help="also time the fix-up kernel at these num_stages (e.g. 1,2)")
    ap.add_argument("--fixup-channel-passes", default="",
                    help="also time scores in key-channel passes of these widths + the fix-up on the fused-gate "
                         "inputs (e.g. 32,16; 2.2x slower than the default in session 7)")
    ap.add_argument("--state-variants", default="mosaic:64:0:0,mosaic2:64:0:0,mosaic:32:0:0,fused:32:4:0",
                    help="fused|mosaic|mosaic2 (the output on a second warpgroup)|pair (a head's two value "
                         "blocks on one CTA):block_v:num_warps:num_stages "
                         "(0 = default) of the serial pass timed by `split`")
    ap.add_argument("--split-shape", default="1x8192",
                    help="BxT of the `split` section (our kernels one by one; the issue's shapes: 1x8192, 8x4096, ...)")
    ap.add_argument("--gated-shapes", type=int, default=2)
    ap.add_argument("--time-reference", action="store_true", help="also time the jnp reference (8K, decode)")
    ap.add_argument("--budget", type=float, default=440.0, help="seconds after which sections are skipped")
    ARGS = ap.parse_args()
    ARGS.chunk_variants = [_chunk_variant(v) for v in ARGS.chunk_variants.split(",")]
    ARGS.decode_variants = [_decode_variant(v) for v in ARGS.decode_variants.split(",")]
    ARGS.decode_batches = [int(b) for b in ARGS.decode_batches.split(",")]
    ARGS.state_variants = ARGS.state_variants.split(",")
    ARGS.split_shape = tuple(int(n) for n in ARGS.split_shape.lower().split("x"))
    ARGS.fixup_channel_passes = [int(c) for c in ARGS.fixup_channel_passes.split(",") if c]
    ARGS.scores_variants = ARGS.scores_variants.split(",")
    ARGS.solve_warps = [int(t) for t in ARGS.solve_warps.split(",")]
    ARGS.fixup_stages = [int(t) for t in ARGS.fixup_stages.split(",") if t]
    os.makedirs(ARGS.out, exist_ok=True)
    _LOG = open(os.path.join(ARGS.out, "log.txt"), "w")
    meta = RES["meta"]
    meta.update(python=platform.python_version(), jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                command="python3 benchmarks/kda_kernels.py " + " ".join(sys.argv[1:]))
    for mod in ("jaxlib", "torch", "triton", "fla", "jla"):
        try:
            m = __import__(mod)
            meta[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            meta[mod] = f"unavailable ({type(e).__name__})"
    try:
        import torch
        meta["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    if "H200" in meta.get("gpu", ""):
        PEAK_TFLOPS, PEAK_TBPS = H200_PEAK_TFLOPS, H200_PEAK_TBPS
    meta.update(peak_tflops=PEAK_TFLOPS, peak_copy_tbps=PEAK_TBPS)
    log(json.dumps(meta, indent=1))
    save()
    table = {"correct": ("GPU correctness of our kernels vs the jnp reference", gpu_correctness),
             "chunk8k": ("chunk prefill at 8K, precomputed g and beta (H=32, K=V=128, bf16, L2 norm in op)",
                         lambda: chunk_shapes([(1, 8192)])),
             "chunkrest": ("chunk prefill, the other shapes", lambda: chunk_shapes([(1, 32768), (8, 4096), (1, 131072)])),
             "chunk8x4k": ("chunk prefill at 8x4K, every variant", lambda: chunk_shapes([(8, 4096)])),
             "decode": ("decode step (T=1), slot pool, fused gate / L2 / sigmoid", decode_shapes),
             "gated": ("chunk prefill, fused gate (A_log, dt_bias) and beta sigmoid", gated_shapes),
             "split": ("our kernels one by one at 8K", split_8k),
             "model": ("the model on the GPU: impl='auto' against the jnp path", model_check)}
    for name in ARGS.sections.split(","):
        section(*table[name])
    summary()


if __name__ == "__main__":
    main()

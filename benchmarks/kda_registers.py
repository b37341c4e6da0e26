"""Registers, spills and occupancy of our Triton-backend KDA kernels on Hopper, found on a CPU.

Pallas lowers each kernel to Triton IR for an (abstract) H100 without a GPU; the `triton` wheel
from PyPI then compiles that IR for sm_90 and its bundled `ptxas -v` reports what each thread
holds. Registers per thread bound how many CTAs an SM keeps resident (64K registers an SM), which
is what bounds our latency-bound scores kernel (KDA_NOTES.md, session 6). This measures no time:
use it to choose which variants are worth the GPU's minutes.

The triton wheel's compiler is not necessarily the one jaxlib runs on the GPU machine, so counts
can differ a little from Nsight Compute's there.

    python3.12 -m venv /tmp/v12 && /tmp/v12/bin/pip install jax==0.11.2 jaxlib==0.11.2 triton==3.6.0
    /tmp/v12/bin/pip install --no-deps --no-build-isolation -e .
    cd /tmp && /tmp/v12/bin/python $REPO/benchmarks/kda_registers.py
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

REGS_PER_SM, MAX_WARPS_PER_SM = 65536, 64


def _capture_triton_modules():
    """Makes Pallas's Triton lowering keep each module it builds."""
    from jax._src.pallas.triton import lowering, pallas_call_registration as reg
    modules = []
    lower = lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result)
        return result
    reg.lowering.lower_jaxpr_to_triton_module = keep
    return modules


def _h100():
    from jax._src.mesh import AbstractDevice, AbstractMesh
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=device))


def _variants(T, H, K):
    from jaxprfaas.pallas_kernels.chunk_intra import C, NSUB, diag_fixup, scores
    from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas
    q, g, beta = jnp.zeros((1, T, H, K), jnp.bfloat16), jnp.zeros((1, T, H, K)), jnp.zeros((1, T, H))

    def sc(nw=2, **opts):
        return nw, lambda: scores(q, q, g, beta, None, scale=K ** -0.5, l2=True, kk_bf16=True, num_warps=nw, **opts)

    def fix(nw=2, **opts):
        flags = jnp.zeros((1, H, T // C * NSUB), jnp.int32)
        akk, aqk = jnp.zeros((1, H, T, C)), jnp.zeros((1, H, T, C), jnp.bfloat16)
        return nw, lambda: diag_fixup(q, q, g, beta, None, flags, akk, aqk, scale=K ** -0.5, l2=True, kk_bf16=True,
                                      num_warps=nw, **opts)

    n = 64
    qd, gd, bd = jnp.zeros((n, 1, H, K), jnp.bfloat16), jnp.zeros((n, 1, H, K)), jnp.zeros((n, 1, H))

    def dec(bv, nw, **opts):
        return nw, lambda: fused_recurrent_kda_pallas(
            qd, qd, qd, gd, bd, initial_state=jnp.zeros((n, H, K, K)), state_indices=jnp.arange(n, dtype=jnp.int32),
            use_qk_l2norm=True, use_gate_in_kernel=True, use_beta_sigmoid=True, A_log=jnp.zeros((H,)),
            dt_bias=jnp.zeros((H * K,)), interpret=False, block_v=bv, num_warps=nw, **opts)

    return {
        "scores (default: split, 2 warps, 1 stage)": sc(),
        "scores, exponentials as exp2": sc(exp2=True),
        "scores, heads launched fastest": sc(heads_fastest=True),
        "scores, 4 warps": sc(4),
        "scores, totals precomputed": sc(totals=True),
        "scores, channel passes of 64": sc(channel_pass=64),
        "scores, channel passes of 32": sc(channel_pass=32),
        "scores, channel passes of 16": sc(channel_pass=16),
        "scores, channel passes of 32, 4 warps": sc(4, channel_pass=32),
        "scores, channel passes of 16, heads fastest": sc(channel_pass=16, heads_fastest=True),
        "fix-up of the diagonal blocks (default: 2 warps)": fix(),
        "fix-up, exponentials as exp2": fix(exp2=True),
        "decode, block_v 64, 4 warps (default: value blocks fastest)": dec(64, 4),
        "decode, block_v 64, batch rows fastest": dec(64, 4, v_fastest=False),
        "decode, block_v 64, two passes": dec(64, 4, one_pass=False),
        "decode, block_v 32, 4 warps": dec(32, 4),
    }


def _ptxas_report(ttir, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="substring: report only the variants whose name contains it")
    args = ap.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("needs the triton wheel (pip install triton==3.6.0): it compiles the lowered kernels for sm_90")
    modules = _capture_triton_modules()
    print(f"{'kernel':48s} {'warps':>5s} {'registers':>9s} {'spill B':>7s} {'CTAs/SM':>7s} {'warps/SM':>8s}")
    for name, (nw, build) in _variants(8192, 32, 128).items():
        if args.only not in name:
            continue
        modules.clear()
        with _h100():
            jax.jit(build).trace().lower(lowering_platforms=("cuda",))
        regs, spill = _ptxas_report(str(modules[-1].module), nw, 1 if name.startswith("scores") else 3)
        alloc = -(-regs // 8) * 8 * 32 * nw  # registers are allocated per warp, in units of 256
        ctas = min(REGS_PER_SM // alloc, MAX_WARPS_PER_SM // nw)
        print(f"{name:48s} {nw:5d} {regs:9d} {spill:7d} {ctas:7d} {ctas * nw:8d}")


if __name__ == "__main__":
    main()

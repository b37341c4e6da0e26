"""One call of our chunked KDA at a benchmark shape, for a profiler (the GPU machine has Nsight
Compute): `ncu -k regex:kda python3 benchmarks/kda_once.py` (benchmarks/kda_ncu.sh)."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--gated", action="store_true", help="Kimi's fused gate (raw input, A_log, dt_bias)")
    ap.add_argument("--diag", default="auto", help="diagonal form of the scores kernel (auto, split, ...)")
    args = ap.parse_args()
    B, T, H, K = 1, args.T, args.H, 128
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    q, k, v = (jax.random.normal(x, (B, T, H, K)).astype(jnp.bfloat16) for x in ks[:3])
    kw = {}
    if args.gated:
        g = jax.random.normal(ks[3], (B, T, H, K))
        beta = jax.random.normal(ks[4], (B, T, H))
        kw = dict(A_log=jnp.log(jax.random.uniform(ks[6], (H,), minval=1.0, maxval=16.0)),
                  dt_bias=jax.random.normal(ks[7], (H * K,)) - 2.0, use_gate_in_kernel=True, use_beta_sigmoid=True)
    else:
        g = -jnp.exp(jax.random.uniform(ks[3], (B, T, H, K), minval=-5.0, maxval=0.5))
        beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    f = jax.jit(lambda *a: chunk_kda_pallas(*a, use_qk_l2norm=True, output_final_state=True, diag=args.diag, **kw))
    jax.block_until_ready(f(q, k, v, g, beta))
    print("done")


if __name__ == "__main__":
    main()

"""Whether Akk's products can be bf16 (`akk_precision="bf16"`) instead of TF32: the chunked KDA at
long lengths, with random and with strongly correlated keys (which make I + Akk worse conditioned),
against the jnp reference run in fp32 on the same bf16-rounded inputs. On the GPU machine, after
`. benchmarks/gpu_env.sh && cd /tmp`: `python3 $REPO/benchmarks/kda_akk_accuracy.py`."""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxprfaas.pallas_kernels import reference
from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas


def inputs(T, H, K, V, rho, seed):
    """bf16 q, k, v; k_t = sqrt(rho) shared + sqrt(1 - rho) own, per head (rho: key correlation)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (1, T, H, K))
    shared = jax.random.normal(ks[1], (1, 1, H, K))
    k = np.sqrt(rho) * shared + np.sqrt(1 - rho) * jax.random.normal(ks[2], (1, T, H, K))
    v = jax.random.normal(ks[3], (1, T, H, V))
    g = -jnp.exp(jax.random.uniform(ks[4], (1, T, H, K), minval=-5.0, maxval=0.5))
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (1, T, H)))
    h0 = jax.random.normal(ks[6], (1, H, K, V))
    return [x.astype(jnp.bfloat16) for x in (q, k, v)] + [g, beta, h0]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--rhos", default="0,0.9")
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args()
    H, K, V = args.heads, 128, 128
    kw = dict(output_final_state=True, use_qk_l2norm=True)
    rows = []
    for T in (int(t) for t in args.lengths.split(",")):
        for rho in (float(r) for r in args.rhos.split(",")):
            q, k, v, g, beta, h0 = inputs(T, H, K, V, rho, seed=T + int(rho * 10))
            ref = jax.jit(lambda *a: reference.chunk_kda(*a, initial_state=h0, **kw))(
                *(x.astype(jnp.float32) for x in (q, k, v)), g, beta)
            row = dict(T=T, rho=rho)
            for prec in ("tf32", "bf16"):
                o, S = jax.jit(lambda *a, p=prec: chunk_kda_pallas(*a, initial_state=h0, akk_precision=p, **kw))(
                    q, k, v, g, beta)
                row[f"o_{prec}"], row[f"state_{prec}"] = rel(o.astype(jnp.float32), ref[0]), rel(S, ref[1])
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

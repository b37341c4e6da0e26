"""Is a chunk kernel hanging on the GPU, or just slow to compile? Runs `chunk_kda_pallas` on one
or more shapes and compares each with the jnp reference, printing when each starts and ends;
faulthandler dumps every thread's stack every 45 s, so a stuck call shows where it waits.

On the GPU machine, after `. benchmarks/gpu_env.sh && cd /tmp`, one process per shape so that a
hang costs only its own `timeout`:

    for c in 1:2048:8:mosaic:auto 1:8192:32:triton:auto; do
      timeout 80 python3 $REPO/benchmarks/kda_hang_probe.py $c; done

A shape is B:T:H:state_impl:diag (K = V = 128, bf16, L2 norm in the op).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
faulthandler.dump_traceback_later(45, repeat=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxprfaas.pallas_kernels import reference  # noqa: E402
from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas  # noqa: E402

D = 128


def probe(B, T, H, state_impl, diag):
    ks = jax.random.split(jax.random.PRNGKey(T + H), 6)
    q, k, v = (jax.random.normal(ks[i], (B, T, H, D)).astype(jnp.bfloat16) for i in range(3))
    g = -jnp.exp(jax.random.uniform(ks[3], (B, T, H, D), minval=-6.0, maxval=-2.0))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    h0 = jax.random.normal(ks[5], (B, H, D, D))
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    label = f"B={B} T={T} H={H} state_impl={state_impl} diag={diag}"
    t = time.time()
    print("start", label, flush=True)
    f = jax.jit(lambda *a: chunk_kda_pallas(*a, state_impl=state_impl, diag=diag, **kw))
    o, _ = jax.block_until_ready(f(q, k, v, g, beta))
    o_r, _ = reference.chunk_kda(q, k, v, g, beta, **kw)
    o, o_r = o.astype(jnp.float32), o_r.astype(jnp.float32)
    err = float(jnp.abs(o - o_r).max() / jnp.abs(o_r).max())
    print("done ", label, f"{time.time() - t:.1f} s, max error {err:.2e} of the largest output", flush=True)


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        B, T, H, state_impl, diag = spec.split(":")
        probe(int(B), int(T), int(H), state_impl, diag)

"""One decode step of ours and one of fla-core's public kernel at B=256, H=32, K=V=128 (fused gate,
sigmoid, L2 norm), for Nsight Compute to compare the two kernels side by side. On the GPU machine,
after `. benchmarks/gpu_env.sh && cd /tmp`:

    ncu -k regex:"kda_fused_recurrent|fused_recurrent_kda_fwd" --section LaunchStats \\
        --section Occupancy --section SpeedOfLight --section WarpStateStats \\
        python3 $REPO/benchmarks/kda_decode_ncu.py
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--block-v", type=int, default=64)
    args = ap.parse_args()
    B, H, K, V = args.B, 32, 128, 128
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    q, k = (jax.random.normal(x, (B, 1, H, K)).astype(jnp.bfloat16) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, 1, H, V)).astype(jnp.bfloat16)
    g = jax.random.normal(ks[3], (B, 1, H, K)).astype(jnp.bfloat16)
    beta = jax.random.normal(ks[4], (B, 1, H)).astype(jnp.bfloat16)
    A_log = jnp.log(jax.random.uniform(ks[5], (H,), minval=1.0, maxval=16.0))
    dt_bias = jax.random.normal(ks[6], (H * K,))
    h0 = jax.random.normal(ks[7], (B, H, K, V))
    kw = dict(use_qk_l2norm=True, use_gate_in_kernel=True, use_beta_sigmoid=True, A_log=A_log, dt_bias=dt_bias)
    o, S = fused_recurrent_kda_pallas(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      block_v=args.block_v, **kw)
    jax.block_until_ready(S)

    import torch
    from fla.ops.kda import fused_recurrent_kda
    t = lambda x: torch.from_dlpack(x)  # noqa: E731
    with torch.inference_mode():
        fused_recurrent_kda(t(q), t(k), t(v), t(g), t(beta), A_log=t(A_log), dt_bias=t(dt_bias),
                            initial_state=t(h0), output_final_state=True, use_qk_l2norm_in_kernel=True,
                            use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

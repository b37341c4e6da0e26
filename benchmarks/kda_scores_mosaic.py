"""The scores kernel alone on a GPU: the Triton kernel (`chunk_intra.scores`, the library's form:
"split", bf16 Akk products, with its sub-chunk totals reduction) against the Mosaic GPU one
(`scores_mosaic.py`), same inputs, medians of 7 samples of 10 jitted calls. Also checks that the two
agree (outside the diagonal blocks the fix-up rewrites). Run with MOSAIC_GPU_DUMP_PTXAS=1 to see
the Mosaic kernel's registers and spills.

    python benchmarks/kda_scores_mosaic.py [--shapes 8x4096,1x8192]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprfaas.pallas_kernels import chunk_intra as ci
from jaxprfaas.pallas_kernels.scores_mosaic import scores_mosaic


def timed(f, *a, inner=10, outer=7):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(outer):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*a)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner * 1e3)
    return float(np.median(ts))


OUTPUTS = ("akk", "aqk", "qg", "kg", "kb", "totals")


def inputs(seed, B, T, H, K, gate_scale=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16),
            jax.random.normal(ks[1], (B, T, H, K)).astype(jnp.bfloat16),
            jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H, K))) * gate_scale,
            jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))))


def report_nonfinite(outputs):
    """Prints where any non-finite values of the Mosaic kernel's outputs are; returns how many."""
    total = 0
    for name, x in zip(OUTPUTS, outputs):
        bad = np.argwhere(~np.isfinite(np.asarray(x, np.float32)))
        total += len(bad)
        if len(bad):
            print(f"  mosaic {name}: {len(bad)} non-finite of {x.size}; [b, h, row, col] first "
                  f"{bad[:4].tolist()}, heads {np.unique(bad[:, 1]).tolist()[:8]}, "
                  f"chunks {np.unique(bad[:, 2] // 64).tolist()[:8]}")
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x4096,1x8192")
    ap.add_argument("--ablate", default="blocks,outputs,blocks+outputs",
                    help="Mosaic kernels timed with parts left out (timing only; scores_mosaic's `skip`: "
                         "blocks, outputs; + joins), comma-separated")
    ap.add_argument("--seeds", type=int, default=1,
                    help="also run the Mosaic kernel on this many further random inputs a shape, reporting any "
                         "non-finite outputs (a stress check: a race shows as a few non-finite values)")
    args = ap.parse_args()
    args.ablate = [a for a in args.ablate.split(",") if a]
    H, K = 32, 128
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for spec in args.shapes.split(","):
        B, T = map(int, spec.split("x"))
        q, k, g, beta = inputs(0, B, T, H, K)
        tri = jax.jit(lambda q, k, g, b: ci.scores(q, k, g, b, None, scale=K ** -0.5, l2=True, kk_bf16=True))
        mos = jax.jit(lambda q, k, g, b: scores_mosaic(q, k, g, b, scale=K ** -0.5, l2=True))
        t_tri, t_mos = timed(tri, q, k, g, beta), timed(mos, q, k, g, beta)
        a, m = tri(q, k, g, beta), mos(q, k, g, beta)
        errs = []
        for name, x, y in zip(OUTPUTS[:5], m, a):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            errs.append(f"{name} {np.abs(x - y).max() / np.abs(y).max():.1e}")
        print(f"B={B} T={T}: triton scores {t_tri:.3f} ms, mosaic scores {t_mos:.3f} ms "
              f"(ratio triton/mosaic {t_tri / t_mos:.2f}); rel max diff: {', '.join(errs)}")
        report_nonfinite(m)
        for seed in range(1, args.seeds):
            bad = report_nonfinite(mos(*inputs(seed, B, T, H, K, gate_scale=1 + seed % 4)))
            print(f"  seed {seed} (gates x{1 + seed % 4}): {bad} non-finite values")
        for skip in args.ablate:
            ms = jax.jit(lambda q, k, g, b, s=skip: scores_mosaic(q, k, g, b, scale=K ** -0.5, l2=True,
                                                                  skip=tuple(x for x in s.split("+") if x)))
            print(f"  mosaic, skip={skip or 'nothing'}: {timed(ms, q, k, g, beta):.3f} ms "
                  f"(triton {t_tri:.3f} in this run)")


if __name__ == "__main__":
    main()

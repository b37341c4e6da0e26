"""Would storing Akk in bf16 between the scores kernel and the solve cost accuracy? A CPU study on
the jnp chunk form (reference §1.6): per chunk Akk exactly as the reference forms it, then either
kept in fp32 or rounded to bf16 before the triangular solve (everything else fp32), against a
float64 run of the same bf16-rounded inputs; beside them, the error the bf16 rounding of w, u
(what the kernels store between passes) alone gives. Random and correlated keys (rho: the share of
one key direction each key carries, which makes I + Akk worse conditioned).

    python benchmarks/kda_akk_storage.py [--T 2048 --H 2 --rhos 0,0.9,0.99]   (CPU, ~1 min)
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from kda_akk_accuracy import inputs as akk_accuracy_inputs  # benchmarks/, the script's own folder

jax.config.update("jax_enable_x64", True)
C = 64


def inputs(T, H, K, V, rho, seed):
    """`kda_akk_accuracy.inputs` (bf16 q, k, v; keys correlated by rho), L2-normed and scaled as
    the op does, in float64."""
    q, k, v, g, beta, _ = akk_accuracy_inputs(T, H, K, V, rho, seed)
    l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k, v, g, beta = (x.astype(jnp.float64) for x in (q, k, v, g, beta))
    return l2(q) * K ** -0.5, l2(k), v, g, beta


def run(x, dtype, akk_store=None, wu_store=None):
    """The chunked form in `dtype`; `akk_store` / `wu_store`: a dtype Akk / the solved u and
    (K e^Γ) go through before use (None: none)."""
    q, k, v, g, beta = (a.astype(dtype) for a in x)
    B, T, H, K = q.shape
    to = lambda a: jnp.moveaxis(a.reshape(B, T // C, C, H, *a.shape[3:]), 3, 2)[0]  # [NT,H,C,...]  # noqa: E731
    rnd = lambda a, d: a if d is None else a.astype(d).astype(dtype)  # noqa: E731

    def step(S, c):
        q, k, v, g, beta = c
        G = jnp.cumsum(g, axis=-2)
        incl = jnp.tril(jnp.ones((C, C), bool))
        decay = jnp.exp(jnp.where(incl[:, :, None], G[:, :, None, :] - G[:, None, :, :], -jnp.inf))
        kd = k[:, None, :, :] * decay
        akk = jnp.einsum("hrd,hrid->hri", k, kd) * jnp.tril(jnp.ones((C, C), dtype), -1) * beta[..., None]
        akk = rnd(akk, akk_store)
        aqk = jnp.einsum("hrd,hrid->hri", q, kd)
        eG = jnp.exp(G)
        eye = jnp.eye(C, dtype=dtype)
        # w = T (β K e^Γ), u = T (β V): what the state pass reads
        w = rnd(solve_triangular(eye + akk, beta[..., None] * k * eG, lower=True, unit_diagonal=True), wu_store)
        u = rnd(solve_triangular(eye + akk, beta[..., None] * v, lower=True, unit_diagonal=True), wu_store)
        vn = u - jnp.einsum("hck,hkv->hcv", w, S)
        o = jnp.einsum("hck,hkv->hcv", q * eG, S) + jnp.einsum("hri,hiv->hrv", aqk, vn)
        gl = G[:, -1, :]
        S = jnp.exp(gl)[..., None] * S + jnp.einsum("hck,hcv->hkv", k * jnp.exp(gl[:, None, :] - G), vn)
        return S, o

    S0 = jnp.zeros((H, K, v.shape[-1]), dtype)
    S, o = jax.lax.scan(step, S0, tuple(to(a) for a in (q, k, v, g, beta)))
    return np.asarray(o, np.float64), np.asarray(S, np.float64)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--rhos", default="0,0.9,0.99")
    args = ap.parse_args()
    print(f"T={args.T} H={args.H} K=V=128; relative Frobenius error against float64 (o / final state)")
    heads = ("fp32", "fp32, Akk in bf16", "fp32, w u in bf16", "w u and Akk bf16")
    print(f"{'rho':>5} | " + " | ".join(f"{h:>19}" for h in heads))
    for rho in (float(r) for r in args.rhos.split(",")):
        x = inputs(args.T, args.H, 128, 128, rho, seed=int(rho * 100) + 1)
        o64, S64 = run(x, jnp.float64)
        cells = []
        for akk, wu in ((None, None), (jnp.bfloat16, None), (None, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)):
            o, S = run(x, jnp.float32, akk, wu)
            cells.append(f"{rel(o, o64):.2e} / {rel(S, S64):.2e}")
        print(f"{rho:>5} | " + " | ".join(f"{c:>19}" for c in cells))


if __name__ == "__main__":
    main()

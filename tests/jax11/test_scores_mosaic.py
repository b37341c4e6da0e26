"""The Mosaic GPU scores kernel (`scores_mosaic.py`) in JAX 0.11's Mosaic GPU interpreter on the
CPU: against a float64 numpy oracle of the scores (every output, gates from mild to -30 a step,
K = 128 and 64), end to end through `chunk_kda_pallas(..., scores_impl="mosaic")` against the jnp
reference (padding, fused gate, flagged sub-chunks for the fix-up), its input errors, and Mosaic
GPU's real lowering for an H100."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import reference
from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
from jaxprfaas.pallas_kernels.scores_mosaic import DIAG_KEY_MAX, scores_mosaic

C = 64
GATES = {"mild": (-8.0, -3.0), "strong": (-1.0, 1.5), "flagged": (-3.0, 3.4)}  # log of the decay rate


def _inputs(key, B, T, H, K, gate):
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[2], (B, T, H, K), minval=GATES[gate][0], maxval=GATES[gate][1]))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    return q, k, g, beta


def _oracle(q, k, g, beta):
    """Akk, Aqk, qg, kg, kb [B,H,T,D] and the sub-chunk totals [B,H,T/16,K] in float64."""
    q, k, g, b = (np.asarray(x, np.float64) for x in (q, k, g, beta))
    B, T, H, K = q.shape
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + reference.L2_EPS) * K ** -0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + reference.L2_EPS)
    out = [np.zeros((B, H, T, d)) for d in (C, C, K, K, K)]
    r = np.arange(C)
    for bb in range(B):
        for h in range(H):
            for c in range(T // C):
                s = slice(c * C, (c + 1) * C)
                G = np.cumsum(g[bb, s, h], 0)
                qq, kk, be = q[bb, s, h], k[bb, s, h], b[bb, s, h]
                M = np.exp(np.minimum(G[:, None] - G[None], 0.0))
                out[0][bb, h, s] = np.where(r[:, None] > r, np.einsum("rk,ik,rik->ri", kk, kk, M) * be[:, None], 0)
                out[1][bb, h, s] = np.where(r[:, None] >= r, np.einsum("rk,ik,rik->ri", qq, kk, M), 0)
                out[2][bb, h, s] = qq * np.exp(G)
                out[3][bb, h, s] = kk * np.exp(G[-1] - G)
                out[4][bb, h, s] = be[:, None] * kk * np.exp(G)
    tot = g.reshape(B, T // 16, 16, H, K).sum(2).transpose(0, 2, 1, 3)
    return out, tot


@pytest.mark.parametrize("gate,K,akk_dtype", [("mild", 128, jnp.float32), ("strong", 128, jnp.float32),
                                              ("flagged", 128, jnp.float32), ("strong", 64, jnp.bfloat16)])
def test_scores_against_fp64(gate, K, akk_dtype):
    B, T, H = 2, 192, 2
    q, k, g, beta = _inputs(jax.random.PRNGKey(1), B, T, H, K, gate)
    out = scores_mosaic(q, k, g, beta, scale=K ** -0.5, l2=True, akk_dtype=akk_dtype, interpret=True)
    ref, tot_ref = _oracle(q, k, g, beta)
    tot = np.asarray(out[5], np.float64)
    np.testing.assert_allclose(tot, tot_ref, rtol=2e-5, atol=1e-5)
    flagged = np.repeat((-tot).max(-1) > DIAG_KEY_MAX, 16, axis=2) if gate == "flagged" else None
    if gate == "flagged":
        assert flagged.mean() > 0.5
    else:
        assert not ((-tot).max(-1) > DIAG_KEY_MAX).any()
    own_block = (np.arange(T)[:, None] // 16 % 4) == (np.arange(C)[None] // 16)
    for j, (x, y) in enumerate(zip(out[:5], ref)):
        x = np.asarray(x, np.float64)
        assert np.isfinite(x).all()
        if j < 2 and flagged is not None:  # the fix-up rewrites those diagonal blocks
            x = np.where(flagged[..., None] & own_block, y, x)
        assert np.abs(x - y).max() <= 5e-3 * np.abs(y).max(), j
    assert out[0].dtype == akk_dtype and all(x.dtype == jnp.bfloat16 for x in out[1:5])


@pytest.mark.parametrize("gated", [False, True])
def test_chunk_with_mosaic_scores_matches_the_reference(gated):
    B, T, H, K, V = 2, 200, 2, 128, 64  # T pads to 256
    ks = jax.random.split(jax.random.PRNGKey(3), 8)
    q, k = (jax.random.normal(x, (B, T, H, K)).astype(jnp.bfloat16) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(jnp.bfloat16)
    graw, braw = jax.random.normal(ks[3], (B, T, H, K)), jax.random.normal(ks[4], (B, T, H))
    h0 = jax.random.normal(ks[7], (B, H, K, V))
    if gated:  # Kimi's fused gate: many sub-chunks decay by more than 60 nats (the fix-up's)
        kw = dict(A_log=jax.random.uniform(ks[5], (H,), minval=-1, maxval=2.5),
                  dt_bias=jax.random.normal(ks[6], (H * K,)) * 0.5, use_gate_in_kernel=True, use_beta_sigmoid=True)
        g, b = graw, braw
    else:
        kw, g, b = {}, jax.nn.log_sigmoid(graw) * 3, jax.nn.sigmoid(braw)
    o_r, s_r = reference.chunk_kda(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), g, b,
                                   initial_state=h0, output_final_state=True, use_qk_l2norm=True, **kw)
    o, s = chunk_kda_pallas(q, k, v, g, b, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                            interpret=True, state_impl="triton", scores_impl="mosaic", **kw)
    rel = lambda x, y: float(jnp.abs(x.astype(jnp.float32) - y).max() / jnp.abs(y).max())  # noqa: E731
    assert rel(o, o_r) < 1e-2 and rel(s, s_r) < 1e-2


def test_rejects_unsupported_inputs():
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    g, beta = jnp.zeros((1, 64, 1, 128)), jnp.zeros((1, 64, 1))
    with pytest.raises(ValueError, match="the Mosaic GPU scores kernel takes q, k"):
        scores_mosaic(q.astype(jnp.float32), q, g, beta, scale=1.0, l2=True, interpret=True)
    with pytest.raises(ValueError, match="the Mosaic GPU scores kernel takes q, k"):
        scores_mosaic(q[:, :48], q[:, :48], g[:, :48], beta[:, :48], scale=1.0, l2=True, interpret=True)
    v = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"scores_impl='mosaic' .* takes bf16 q, k"):
        chunk_kda_pallas(q.astype(jnp.float32), q, v, g, beta, scores_impl="mosaic", interpret=True)
    with pytest.raises(ValueError, match=r"scores_impl='mosaic' .* keeps the default diagonal"):
        chunk_kda_pallas(q, q, v, g, beta, scores_impl="mosaic", diag="inline", interpret=True)
    with pytest.raises(ValueError, match="scores_impl must be one of"):
        chunk_kda_pallas(q, q, v, g, beta, scores_impl="cuda", interpret=True)


@pytest.mark.parametrize("K,akk_dtype", [(128, jnp.float32), (128, jnp.bfloat16), (64, jnp.float32)])
def test_mosaic_scores_lower_for_an_h100(K, akk_dtype):
    """Through Mosaic GPU's own lowering (layouts, swizzles, TMA descriptors), not the interpreter."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
    from test_gpu_lowering import _h100_context

    B, T, H = 1, 256, 2
    args = (jnp.zeros((B, T, H, K), jnp.bfloat16),) * 2 + (jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H)))
    f = lambda q, k, g, b: scores_mosaic(q, k, g, b, scale=0.1, l2=True, akk_dtype=akk_dtype)  # noqa: E731
    with _h100_context():
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text

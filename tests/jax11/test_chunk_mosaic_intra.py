"""`chunk_kda_pallas` with the Mosaic GPU solve (`solve_impl="mosaic"`, the default on Hopper) in
JAX 0.11's Mosaic GPU interpreter on the CPU, against the jnp reference: a length that is not a
multiple of 64 (padding rows), packed sequences of unequal lengths, strong gates through the
diagonal fix-up, the fused gate; the errors a misfit input gets; the lowering for an H100 of the
program `impl="auto"` runs there. Run under JAX 0.11.2 (`.ci/run`'s second stage)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk_kda
from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas

MOSAIC = dict(solve_impl="mosaic", interpret=True)


def _inputs(T, H=2, K=128, V=64, *, seed=0, lo=-6.0, hi=-1.0, strong=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q, k = (jax.random.normal(x, (1, T, H, K)).astype(jnp.bfloat16) for x in ks[:2])
    v = jax.random.normal(ks[2], (1, T, H, V)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[3], (1, T, H, K), minval=lo, maxval=hi))
    if strong:  # down to -30 a step in 40% of the channels: most sub-chunks go through the fix-up
        u = jax.random.uniform(ks[6], g.shape)
        g = g - 30.0 * u * (u > 0.6)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, T, H)))
    h0 = jax.random.normal(ks[5], (1, H, K, V))
    return q, k, v, g, beta, h0


def _close(x, y, tol):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.isfinite(x).all()
    assert np.abs(x - y).max() <= tol * np.abs(y).max(), np.abs(x - y).max() / np.abs(y).max()


@pytest.mark.parametrize("T,strong", [(150, False), (128, True)])
def test_mosaic_solve_equals_the_reference(T, strong):
    q, k, v, g, beta, h0 = _inputs(T, seed=T, strong=strong)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    o, S = chunk_kda_pallas(q, k, v, g, beta, **kw, **MOSAIC)
    o_r, S_r = chunk_kda(q, k, v, g, beta, impl="xla", **kw)
    _close(o, o_r, 2e-2)
    _close(S, S_r, 2e-2)


def test_mosaic_solve_with_packed_sequences_and_the_fused_gate():
    """Three sequences (70, 1 and 57 tokens) packed with cu_seqlens, the gate and β sigmoid fused:
    padding rows inside the packed stream must neither decay nor write."""
    T, H, K, V = 128, 2, 128, 64
    q, k, v, g, beta, _ = _inputs(T, H, K, V, seed=5)
    g_raw = jax.random.normal(jax.random.PRNGKey(9), g.shape)
    A_log = jnp.log(jnp.linspace(1.0, 16.0, H))
    dt_bias = 0.1 * jax.random.normal(jax.random.PRNGKey(10), (H * K,)).reshape(H, K)
    cu = jnp.array([0, 70, 71, 128], jnp.int32)
    h0 = jax.random.normal(jax.random.PRNGKey(11), (3, H, K, V))
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True, cu_seqlens=cu, A_log=A_log,
              dt_bias=dt_bias, use_gate_in_kernel=True, use_beta_sigmoid=True)
    o, S = chunk_kda_pallas(q, k, v, g_raw, beta, **kw, **MOSAIC)
    o_r, S_r = chunk_kda(q, k, v, g_raw, beta, impl="xla", **kw)
    _close(o, o_r, 2e-2)
    _close(S, S_r, 2e-2)


def test_the_mosaic_solve_refuses_inputs_it_does_not_take():
    q, k, v, g, beta, _ = _inputs(64, K=32)
    with pytest.raises(ValueError, match=r"solve_impl='mosaic' \(the Mosaic GPU solve\) takes K and V in \(64, 128\), "
                                         r"got K = 32, V = 64"):
        chunk_kda_pallas(q, k, v, g, beta, solve_impl="mosaic", interpret=True)
    q, k, v, g, beta, _ = _inputs(64)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with pytest.raises(ValueError, match=r"solve_impl='mosaic' .* takes bf16 q, k, v"):
        chunk_kda_pallas(*f32, g, beta, solve_impl="mosaic", interpret=True)
    with pytest.raises(ValueError, match=r"solve_impl must be one of \('auto', 'triton', 'mosaic'\), got 'wgmma'"):
        chunk_kda_pallas(q, k, v, g, beta, solve_impl="wgmma", interpret=True)


def test_chunk_kda_with_every_mosaic_kernel_lowers_for_an_h100():
    """Through Mosaic GPU's own lowering (layouts, swizzles, TMA descriptors), not the interpreter:
    the Triton scores and fix-up, the Mosaic solve and state passes in one program."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
    from test_gpu_lowering import _h100_context

    B, T, H, K, V = 1, 256, 2, 128, 128
    z = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    f = jax.jit(lambda q, k, v, g, b, h0: chunk_kda_pallas(
        q, k, v, g, b, initial_state=h0, output_final_state=True, use_qk_l2norm=True, interpret=False,
        state_impl="mosaic", solve_impl="mosaic"))
    with _h100_context():
        text = f.trace(z(B, T, H, K), z(B, T, H, K), z(B, T, H, V), jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H)),
                       jnp.zeros((B, H, K, V))).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("kda_chunk_scores", "kda_chunk_diag_fixup", "kda_chunk_solve_mosaic", "kda_chunk_state_mosaic"):
        assert name in text, name

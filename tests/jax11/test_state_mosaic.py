"""The Mosaic GPU state pass in JAX 0.11's Mosaic GPU interpreter on the CPU, against the
portable kernel (`chunk.state`) on the same intermediates. Run by `.ci/run`'s JAX 0.11.2 stage
(JAX 0.10 has another Mosaic GPU API)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk as ck
from jaxprfaas.pallas_kernels.state_mosaic import state_mosaic


def _parts(B=2, T=192, H=2, K=64, V=128):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[3], (B, T, H, K), minval=-8.0, maxval=-3.0))  # mild: the state carries over
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    h0 = jax.random.normal(ks[5], (B, H, K, V))
    parts = ck.intra(q, k, v, g, beta, None, None, None, scale=K ** -0.5, l2=True, gate=False,
                     beta_sigmoid=False, interpret=True)
    return parts, h0


@pytest.mark.parametrize("block_v,kw", [(32, {}), (64, {}), (64, dict(warpgroups=2)), (32, dict(warpgroups=2)),
                                        (64, dict(pair=True))])
def test_mosaic_state_pass_equals_the_portable_one(block_v, kw):
    """One warpgroup, the output on a second (`_body_two`), and a head's two value blocks on one
    CTA (`_body_pair`), over two batch rows and three chunks."""
    parts, h0 = _parts()
    V = h0.shape[-1]
    o_ref, S_ref = ck.state(*parts, h0, None, out_dtype=jnp.bfloat16, block_v=V, interpret=True)
    o, S = state_mosaic(*parts, h0, block_v=block_v, interpret=True, **kw)
    o, o_ref = np.asarray(o, np.float32), np.asarray(o_ref, np.float32)
    assert np.abs(o - o_ref).max() <= 2e-2 * np.abs(o_ref).max()
    assert np.abs(np.asarray(S) - np.asarray(S_ref)).max() <= 1e-2 * np.abs(np.asarray(S_ref)).max()


def test_mosaic_state_passes_have_no_races():
    """The interpreter's race detector over each body: TMA copies, barriers, the reuse of both
    slots and (with two warpgroups) the shared buffers. It reported the decay row, read at the end
    of a step, as racing the copy that refills its slot (no proxy fence between them) until the
    row was read right after the slot's wait."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    for T in (64, 192):  # one chunk (no refill) and three (both slots reused)
        parts, h0 = _parts(B=1, T=T, H=1)
        for kw in (dict(warpgroups=1), dict(warpgroups=2), dict(pair=True)):
            params = plgpu.InterpretGPUParams(detect_races=True)
            jax.block_until_ready(state_mosaic(*parts, h0, block_v=64, interpret=params, **kw))
            assert not gpu_callbacks.get_races().races_found, (T, kw)


def test_mosaic_pair_needs_two_value_blocks():
    parts, h0 = _parts(B=1, H=1)
    with pytest.raises(ValueError, match="V must be 2 \\* block_v, got V=128, block_v=32"):
        state_mosaic(*parts, h0, block_v=32, pair=True, interpret=True)


@pytest.mark.parametrize("state_impl,B,V", [("mosaic", 1, 64), ("mosaic_pair", 2, 128)])
def test_chunk_kda_with_the_mosaic_state_pass_equals_the_reference(state_impl, B, V):
    from jaxprfaas.pallas_kernels import chunk_kda
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    T, H, K = 150, 2, 64
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    q, k = (jax.random.normal(x, (B, T, H, K)).astype(jnp.bfloat16) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[3], (B, T, H, K), minval=-8.0, maxval=-3.0))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    h0 = jax.random.normal(ks[5], (B, H, K, V))
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    o, S = chunk_kda_pallas(q, k, v, g, beta, state_impl=state_impl, interpret=True, **kw)
    o_r, S_r = chunk_kda(q, k, v, g, beta, impl="xla", **kw)
    o, o_r = np.asarray(o, np.float32), np.asarray(o_r, np.float32)
    assert np.abs(o - o_r).max() <= 2e-2 * np.abs(o_r).max()
    assert np.abs(np.asarray(S) - np.asarray(S_r)).max() <= 2e-2 * np.abs(np.asarray(S_r)).max()


@pytest.mark.parametrize("block_v,state_impl", [(32, "mosaic"), (64, "mosaic"), (64, "mosaic_2wg"),
                                                 (64, "mosaic_pair")])
def test_mosaic_state_pass_lowers_for_an_h100(block_v, state_impl):
    """Through Mosaic GPU's own lowering (layouts, swizzles, TMA descriptors), not the interpreter."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
    from test_gpu_lowering import _h100_context

    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    B, T, H, K, V = 1, 256, 2, 128, 128
    z = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    f = jax.jit(lambda q, k, v, g, b, h0: chunk_kda_pallas(q, k, v, g, b, initial_state=h0, output_final_state=True,
                                                           use_qk_l2norm=True, interpret=False, state_impl=state_impl,
                                                           block_v=block_v))
    with _h100_context():
        text = f.trace(z(B, T, H, K), z(B, T, H, K), z(B, T, H, V), jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H)),
                       jnp.zeros((B, H, K, V))).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic" in text.lower()

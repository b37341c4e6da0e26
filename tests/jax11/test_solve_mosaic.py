"""The Mosaic GPU chunk solve in JAX 0.11's Mosaic GPU interpreter on the CPU: against the Triton
kernel (`chunk_intra.solve`) on the real Akk of `chunk_intra.scores`, against fp64 numpy on
adversarial chunks, and through Mosaic GPU's real lowering for an H100. Run by `.ci/run`'s JAX
0.11.2 stage (JAX 0.10 has another Mosaic GPU API)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk_intra as ci
from jaxprfaas.pallas_kernels.solve_mosaic import inverse_mosaic, solve_mosaic

C = 64
GATES = {"mild": (-8.0, -3.0), "strong": (-1.0, 1.5)}  # log of the per-token decay rate


def _scores(key, B, T, H, K, V, gate=None, keys=None):
    """Akk, kb, β of `chunk_intra.scores` and v from random inputs; `gate=None` means no decay and
    β = 1, `keys` [T, K] fixes every head's keys."""
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K)) if keys is None else jnp.broadcast_to(keys[None, :, None], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(jnp.bfloat16)
    if gate is None:
        g, beta = jnp.zeros((B, T, H, K)), jnp.ones((B, T, H))
    else:
        g = -jnp.exp(jax.random.uniform(ks[3], (B, T, H, K), minval=GATES[gate][0], maxval=GATES[gate][1]))
        beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    out = ci.scores(q, k.astype(jnp.bfloat16), g, beta, None, scale=K ** -0.5, l2=True, form="inline", interpret=True)
    return out[0], out[4], v, out[5]


def _chunks(x):
    """[B,H,Tp,D] -> [B,H,NT,64,D] fp64."""
    B, H, Tp, _ = x.shape
    return np.asarray(x, np.float64).reshape(B, H, Tp // C, C, -1)


def _fp64(akk, kb, v, beta_e):
    """T, w and u per chunk in fp64: [B,H,NT,64,64|K|V]."""
    m = np.eye(C) + _chunks(akk)
    bv = _chunks(jnp.transpose(v.astype(jnp.float32) * beta_e[..., None], (0, 2, 1, 3)))
    return np.linalg.inv(m), np.linalg.solve(m, _chunks(kb)), np.linalg.solve(m, bv)


def _rel(x, ref):
    x = np.asarray(x, np.float64).reshape(ref.shape)
    return np.abs(x - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("gate", ["mild", "strong"])
@pytest.mark.parametrize("K,V", [(128, 128), (64, 64)])
def test_mosaic_solve_equals_the_triton_solve(gate, K, V):
    B, T, H = 2, 192, 2
    akk, kb, v, beta_e = _scores(jax.random.PRNGKey(0), B, T, H, K, V, gate)
    w, u = solve_mosaic(akk, kb, v, beta_e, interpret=True)
    w_ref, u_ref = ci.solve(akk, kb, v, beta_e, interpret=True)
    assert w.shape == w_ref.shape and u.shape == u_ref.shape and w.dtype == u.dtype == jnp.bfloat16
    for x, ref in ((w, w_ref), (u, u_ref)):
        x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
        assert np.abs(x - ref).max() <= 1e-2 * np.abs(ref).max()
    # and within the outputs' bf16 rounding (2⁻⁸ of the largest entry) of fp64, everywhere below
    _, w64, u64 = _fp64(akk, kb, v, beta_e)
    assert _rel(w, w64) <= 5e-3 and _rel(u, u64) <= 5e-3


@pytest.mark.parametrize("gate", ["mild", "strong"])
def test_mosaic_solve_takes_akk_in_bf16(gate):
    """Akk stored in bf16 (`akk_storage="bf16"`): the same w and u as the fp32 path given the same
    (bf16-rounded) A, and the Triton solve's on that A."""
    B, T, H, K, V = 2, 192, 2, 128, 128
    akk, kb, v, beta_e = _scores(jax.random.PRNGKey(3), B, T, H, K, V, gate)
    a16 = akk.astype(jnp.bfloat16)
    w, u = solve_mosaic(a16, kb, v, beta_e, interpret=True)
    w32, u32 = solve_mosaic(a16.astype(jnp.float32), kb, v, beta_e, interpret=True)
    np.testing.assert_array_equal(np.asarray(w, np.float32), np.asarray(w32, np.float32))
    np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(u32, np.float32))
    w_t, u_t = ci.solve(a16, kb, v, beta_e, interpret=True)
    for x, ref in ((w, w_t), (u, u_t)):
        x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
        assert np.abs(x - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("gate", ["mild", "strong"])
def test_mosaic_inverse_has_fp32_accuracy(gate):
    akk, *_ = _scores(jax.random.PRNGKey(1), 1, 192, 2, 128, 128, gate)
    t, m = _chunks(inverse_mosaic(akk, interpret=True)), np.eye(C) + _chunks(akk)
    assert np.abs(t @ m - np.eye(C)).max() <= 1e-5
    assert _rel(t, np.linalg.inv(m)) <= 1e-5


def test_identical_keys_cancel_exactly():
    """β = 1, no decay, one normalized key everywhere: A is all ones below the diagonal, T = I − the
    subdiagonal, and every row of w but a chunk's first is kb_i − kb_{i−1} = 0 (total cancellation)."""
    K = V = 128
    keys = jax.random.normal(jax.random.PRNGKey(2), (1, K))
    akk, kb, v, beta_e = _scores(jax.random.PRNGKey(3), 1, 128, 1, K, V, keys=jnp.tile(keys, (128, 1)))
    w, u = solve_mosaic(akk, kb, v, beta_e, interpret=True)
    _, w64, u64 = _fp64(akk, kb, v, beta_e)
    w = np.asarray(w, np.float64).reshape(w64.shape)
    assert np.abs(w[..., 1:, :]).max() <= 1e-6 * np.abs(w[..., 0, :]).max()
    assert _rel(w, w64) <= 5e-3 and _rel(u, u64) <= 5e-3


def test_near_degenerate_keys_against_fp64():
    """β = 1, no decay, keys near a plane: entries of A near ±1 and heavy cancellation in w."""
    K = V = 128
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    plane = jax.random.normal(ks[1], (2, K))
    keys = jax.random.normal(ks[0], (192, 2)) @ plane + 0.01 * jax.random.normal(ks[2], (192, K))
    akk, kb, v, beta_e = _scores(jax.random.PRNGKey(5), 1, 192, 1, K, V, keys=keys)
    assert np.abs(np.asarray(akk)).max() > 0.99
    w, u = solve_mosaic(akk, kb, v, beta_e, interpret=True)
    t64, w64, u64 = _fp64(akk, kb, v, beta_e)
    assert _rel(w, w64) <= 5e-3 and _rel(u, u64) <= 5e-3
    assert _rel(inverse_mosaic(akk, interpret=True), t64) <= 1e-4


def test_large_inverse_against_fp64():
    """A synthetic A with entries ±[0.9, 1] below the diagonal: T grows to ~1e6, yet stays within
    ~2⁻¹⁶ of its largest entry, and w, u within bf16 rounding of fp64's."""
    B, T, H, K, V = 1, 128, 1, 128, 128
    rng = np.random.default_rng(6)
    a = np.tril(rng.choice([-1.0, 1.0], (T // C, C, C)) * rng.uniform(0.9, 1.0, (T // C, C, C)), -1)
    akk = jnp.asarray(a.reshape(B, H, T, C), jnp.float32)
    kb = jnp.asarray(rng.normal(size=(B, H, T, K)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.bfloat16)
    beta_e = jnp.asarray(rng.uniform(0.5, 1.0, (B, T, H)), jnp.float32)
    t64, w64, u64 = _fp64(akk, kb, v, beta_e)
    assert np.abs(t64).max() > 1e5
    assert _rel(inverse_mosaic(akk, interpret=True), t64) <= 1e-4
    w, u = solve_mosaic(akk, kb, v, beta_e, interpret=True)
    assert _rel(w, w64) <= 5e-3 and _rel(u, u64) <= 5e-3


def test_rejects_unsupported_inputs():
    z = lambda *s, dt=jnp.bfloat16: jnp.zeros(s, dt)  # noqa: E731
    akk, beta = z(1, 2, 128, C, dt=jnp.float32), z(1, 128, 2, dt=jnp.float32)
    with pytest.raises(ValueError, match="K, V in"):
        solve_mosaic(akk, z(1, 2, 128, 96), z(1, 128, 2, 128), beta)
    with pytest.raises(ValueError, match="bf16"):
        solve_mosaic(akk, z(1, 2, 128, 128, dt=jnp.float32), z(1, 128, 2, 128), beta)
    with pytest.raises(ValueError, match="Tp % 64"):
        solve_mosaic(z(1, 2, 100, C, dt=jnp.float32), z(1, 2, 100, 128), z(1, 100, 2, 128), z(1, 100, 2))
    with pytest.raises(ValueError, match="fp32"):
        inverse_mosaic(z(1, 2, 128, C))


@pytest.mark.parametrize("K,V,a_dtype", [(128, 128, jnp.float32), (64, 64, jnp.float32), (128, 64, jnp.float32),
                                         (128, 128, jnp.bfloat16)])
def test_mosaic_solve_lowers_for_an_h100(K, V, a_dtype):
    """Through Mosaic GPU's own lowering (layouts, swizzles, TMA descriptors), not the interpreter."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
    from test_gpu_lowering import _h100_context

    B, T, H = 1, 256, 2
    args = (jnp.zeros((B, H, T, C), a_dtype), jnp.zeros((B, H, T, K), jnp.bfloat16),
            jnp.zeros((B, T, H, V), jnp.bfloat16), jnp.zeros((B, T, H)))
    with _h100_context():
        text = jax.jit(solve_mosaic).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        text_t = jax.jit(inverse_mosaic).trace(args[0].astype(jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "mosaic_gpu" in text_t


def test_no_races_between_tma_and_the_warpgroup():
    """The interpreter's race detector (it models the warpgroup as one thread, so this pins the
    ordering of TMA copies, barriers and shared-memory reuse; wgmmas are synchronous there)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    akk, kb, v, beta_e = _scores(jax.random.PRNGKey(7), 1, 64, 1, 128, 128, "mild")
    params = plgpu.InterpretGPUParams(detect_races=True)
    jax.block_until_ready(solve_mosaic(akk, kb, v, beta_e, interpret=params))
    assert not gpu_callbacks.get_races().races_found
    jax.block_until_ready(inverse_mosaic(akk, interpret=params))
    assert not gpu_callbacks.get_races().races_found

"""The jnp references: chunked WY form == naive lax.scan recurrence == fla-core 0.6.0's torch oracle."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk_kda, fused_recurrent_kda, naive_recurrent_kda

TOL = 1e-4  # fp32, relative to the largest magnitude of the oracle


@pytest.mark.parametrize("B,T,H,K,V,strong,h0", [
    (2, 130, 2, 32, 48, False, True),   # crosses two chunk boundaries, T % 64 != 0, K != V
    (1, 1, 3, 16, 8, False, True),      # a single token
    (1, 64, 2, 32, 16, True, False),    # exactly one chunk, gates down to -30
    (2, 200, 2, 32, 48, True, True),    # strong gates across chunks with an initial state
])
def test_chunk_equals_naive_and_fla(fla_naive, kin, B, T, H, K, V, strong, h0):
    q, k, v, g, beta, s0 = kin.make(B * 1000 + T, B, T, H, K, V, strong=strong, h0_n=B if h0 else None)
    o_ref, S_ref = fla_naive(q, k, v, g, beta, initial_state=s0)
    init = None if s0 is None else jnp.asarray(s0)
    o, S = chunk_kda(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=init, output_final_state=True, impl="xla")
    o_n, S_n = naive_recurrent_kda(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=init, output_final_state=True)
    assert o.shape == (B, T, H, V) and S.shape == (B, H, K, V) and S.dtype == jnp.float32
    assert kin.rel_err(o, o_ref) < TOL and kin.rel_err(S, S_ref) < TOL
    assert kin.rel_err(o_n, o_ref) < TOL and kin.rel_err(S_n, S_ref) < TOL
    assert np.isfinite(np.asarray(o)).all()


def test_strong_gates_erase_the_past(kin):
    """A gate of -30 on every channel makes the state forget everything before it (and nothing overflows)."""
    q, k, v, g, beta, s0 = kin.make(7, 1, 100, 2, 16, 16, h0_n=1)
    g[:, 70] = -30.0
    o, _ = chunk_kda(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=jnp.asarray(s0), impl="xla")
    o_tail, _ = chunk_kda(*(jnp.asarray(x[:, 70:]) for x in (q, k, v, g, beta)), impl="xla")
    np.testing.assert_allclose(np.asarray(o[:, 70:]), np.asarray(o_tail), atol=1e-5)


def test_varlen_gives_each_sequence_its_own_state(fla_naive, kin):
    cu = np.array([0, 37, 37, 150, 151, 230], np.int32)  # an empty sequence, one of a single token
    N, T, H, K, V = len(cu) - 1, int(cu[-1]), 2, 32, 24
    q, k, v, g, beta, s0 = kin.make(3, 1, T, H, K, V, strong=True, h0_n=N)
    o, S = chunk_kda(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=jnp.asarray(s0), output_final_state=True,
                     cu_seqlens=jnp.asarray(cu), impl="xla")
    assert o.shape == (1, T, H, V) and S.shape == (N, H, K, V)
    for n in range(N):
        a, b = cu[n], cu[n + 1]
        if a == b:
            np.testing.assert_array_equal(np.asarray(S[n]), s0[n])
            continue
        o_ref, S_ref = fla_naive(*(x[:, a:b] for x in (q, k, v, g, beta)), initial_state=s0[n:n + 1])
        assert kin.rel_err(o[:, a:b], o_ref) < TOL and kin.rel_err(S[n], S_ref[0]) < TOL


def test_fused_gate_beta_and_l2norm(fla_naive, kin):
    """use_gate_in_kernel / use_beta_sigmoid / use_qk_l2norm == the same maths done beforehand in numpy."""
    rng = np.random.default_rng(11)
    B, T, H, K, V = 1, 90, 2, 16, 24
    q, k, v, _, _, s0 = kin.make(5, B, T, H, K, V, normalize=False, h0_n=B)
    f = rng.standard_normal((B, T, H, K)).astype(np.float32) * 3
    f[0, 5, 0, :4] = 25.0  # above the softplus threshold
    A_log = np.log(rng.uniform(1, 16, (1, 1, H, 1))).astype(np.float32)
    dt_bias = rng.standard_normal(H * K).astype(np.float32)
    b_logit = rng.standard_normal((B, T, H)).astype(np.float32)
    scale = 0.3
    o_ref, S_ref = fla_naive(kin.l2n(q), kin.l2n(k), v, kin.gate(f, A_log, dt_bias), kin.sigmoid(b_logit),
                             scale=scale, initial_state=s0)
    kw = dict(scale=scale, initial_state=jnp.asarray(s0), use_qk_l2norm=True, use_gate_in_kernel=True,
              use_beta_sigmoid=True, dt_bias=jnp.asarray(dt_bias))
    args = tuple(map(jnp.asarray, (q, k, v, f, b_logit)))
    for A in (A_log, A_log.reshape(H)):  # both A_log layouts
        o, S = chunk_kda(*args, A_log=jnp.asarray(A), output_final_state=True, impl="xla", **kw)
        assert kin.rel_err(o, o_ref) < TOL and kin.rel_err(S, S_ref) < TOL
    o, S = fused_recurrent_kda(*args, A_log=jnp.asarray(A_log), impl="xla", **kw)
    assert kin.rel_err(o, o_ref) < TOL and kin.rel_err(S, S_ref) < TOL


def test_recurrent_slot_pool(fla_naive, kin):
    """Rows read and write their slot; other slots and padding rows (index -1) leave the pool untouched."""
    B, T, H, K, V, n_slots = 4, 2, 2, 16, 24, 6
    q, k, v, g, beta, _ = kin.make(9, B, T, H, K, V, strong=True)
    pool = np.random.default_rng(1).standard_normal((n_slots, H, K, V)).astype(np.float32)
    idx = np.array([4, 0, -1, 2], np.int32)
    o, new_pool = fused_recurrent_kda(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=jnp.asarray(pool),
                                      state_indices=jnp.asarray(idx), impl="xla")
    assert new_pool.shape == pool.shape
    for b, s in enumerate(idx):
        h0 = pool[s:s + 1] if s >= 0 else np.zeros((1, H, K, V), np.float32)
        o_ref, S_ref = fla_naive(*(x[b:b + 1] for x in (q, k, v, g, beta)), initial_state=h0)
        assert kin.rel_err(o[b:b + 1], o_ref) < TOL
        if s >= 0:
            assert kin.rel_err(new_pool[s], S_ref[0]) < TOL
    for s in (1, 3, 5):
        np.testing.assert_array_equal(np.asarray(new_pool[s]), pool[s])


def test_bf16_inputs_keep_fp32_state(fla_naive, kin):
    q, k, v, g, beta, s0 = kin.make(13, 1, 70, 2, 32, 32, h0_n=1)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    o, S = chunk_kda(bf(q), bf(k), bf(v), jnp.asarray(g), jnp.asarray(beta), initial_state=jnp.asarray(s0),
                     output_final_state=True, impl="xla")
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    rt = lambda x: np.asarray(bf(x).astype(jnp.float32))  # noqa: E731
    o_ref, S_ref = fla_naive(rt(q), rt(k), rt(v), g, beta, initial_state=s0)
    assert kin.rel_err(o.astype(jnp.float32), o_ref) < 1e-2 and kin.rel_err(S, S_ref) < 1e-4


def test_bad_shapes_are_rejected():
    x = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match="cu_seqlens needs B == 1"):
        chunk_kda(x, x, x, x, jnp.zeros((2, 8, 2)), cu_seqlens=jnp.array([0, 8]), impl="xla")
    with pytest.raises(ValueError, match="impl must be one of"):
        chunk_kda(x, x, x, x, jnp.zeros((2, 8, 2)), impl="cuda")

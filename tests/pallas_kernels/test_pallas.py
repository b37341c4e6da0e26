"""The Pallas kernels (interpret mode on CPU) against the jnp references and fla-core's torch oracle."""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk_kda, fused_recurrent_kda

warnings.filterwarnings("ignore", message=".*donat.*")
F32_TOL, BF16_TOL = 1e-4, 1e-2


def _both(fn, *args, **kw):
    return fn(*args, impl="pallas", **kw), fn(*args, impl="xla", **kw)


@pytest.mark.parametrize("B,T,strong,l2", [(2, 130, True, True), (1, 1, False, False), (1, 64, True, False)])
def test_chunk_pallas_equals_reference_and_fla(fla_naive, kin, B, T, strong, l2):
    H, K, V = 2, 32, 48
    q, k, v, g, beta, s0 = kin.make(T + 17, B, T, H, K, V, strong=strong, normalize=not l2, h0_n=B)
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    (o, S), (o_r, S_r) = _both(chunk_kda, *args, initial_state=jnp.asarray(s0), output_final_state=True,
                               use_qk_l2norm=l2)
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float32 and S.shape == (B, H, K, V)
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(S, S_r) < F32_TOL
    qn, kn = (kin.l2n(q), kin.l2n(k)) if l2 else (q, k)
    o_f, S_f = fla_naive(qn, kn, v, g, beta, initial_state=s0)
    assert kin.rel_err(o, o_f) < F32_TOL and kin.rel_err(S, S_f) < F32_TOL


def test_chunk_pallas_head_dim_128(fla_naive, kin):
    """K = 128 (Kimi's head dim), V = 64, with gates mild, then up to 10, then up to 66 nats per
    token, so that the sub-chunks take several diagonal forms."""
    B, T, H, K, V = 1, 150, 1, 128, 64
    q, k, v, g, beta, s0 = kin.make(5, B, T, H, K, V, normalize=False, h0_n=B)
    g[:, 64:128] *= 6.0  # mild gates first (plain), then up to 10 nats per token, then up to 66
    g[:, 128:] *= 40.0
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    (o, S), (o_r, S_r) = _both(chunk_kda, *args, initial_state=jnp.asarray(s0), output_final_state=True,
                               use_qk_l2norm=True)
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(S, S_r) < F32_TOL
    o_f, S_f = fla_naive(kin.l2n(q), kin.l2n(k), v, g, beta, initial_state=s0)
    assert kin.rel_err(o, o_f) < F32_TOL and kin.rel_err(S, S_f) < F32_TOL


def _part_spans(g, P):
    """Per sub-chunk and head, the largest decay over one part of 16/P rows (the kernel's test)."""
    from jaxprfaas.pallas_kernels.chunk import SUB
    sums = np.add.reduceat(g, np.arange(0, g.shape[1], SUB // P), axis=1)  # [B, parts, H, K]
    parts = -sums.min(-1)
    return parts.reshape(parts.shape[0], -1, P, parts.shape[-1]).max(2) if parts.shape[1] % P == 0 else None


@pytest.mark.parametrize("diag", ["auto", "inline"])
def test_chunk_pallas_diagonal_forms_on_mixed_gates(fla_naive, kin, diag):
    """The diagonal block is one matmul pair through the sub-chunk's start while it decays by at
    most DIAG_KEY_MAX, else 1, 2 or 4 pairs through per-channel references while their parts'
    decays stay <= DIAG_SPAN_MAX, else element-wise: one sequence whose sub-chunks take every form
    matches the oracles, with the rare forms in the fix-up kernel ("auto", i.e. "split") or every
    form in the scores kernel ("inline")."""
    from jaxprfaas.pallas_kernels.chunk_intra import DIAG_KEY_MAX, DIAG_SPAN_MAX
    B, T, H, K, V = 1, 320, 2, 32, 16
    q, k, v, g, beta, s0 = kin.make(41, B, T, H, K, V, h0_n=B)
    rng = np.random.default_rng(7)
    per_step = np.repeat([0.0, 6.0, 16.0, 25.0, 45.0], 64)[None, :, None, None]  # nats per token, one per chunk
    g = np.where(per_step > 0, -per_step * rng.uniform(0.8, 1.0, g.shape), g).astype(np.float32)
    s1, s2, s4 = (_part_spans(g, P) for P in (1, 2, 4))
    M = DIAG_SPAN_MAX
    forms = [s1 <= DIAG_KEY_MAX, (s1 > DIAG_KEY_MAX) & (s1 <= M), (s1 > M) & (s2 <= M), (s2 > M) & (s4 <= M),
             (s4 > M)]
    assert all(f.any() for f in forms)
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    o, S = chunk_kda_pallas(*args, initial_state=jnp.asarray(s0), output_final_state=True, diag=diag)
    o_r, S_r = chunk_kda(*args, initial_state=jnp.asarray(s0), output_final_state=True, impl="xla")
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(S, S_r) < F32_TOL
    o_f, S_f = fla_naive(q, k, v, g, beta, initial_state=s0)
    assert kin.rel_err(o, o_f) < F32_TOL and kin.rel_err(S, S_f) < F32_TOL


@pytest.mark.parametrize("diag", ["plain", "mm1", "mm2", "mm4", "cols"])
def test_chunk_pallas_each_diagonal_form_on_mild_gates(kin, diag):
    """Where every form is safe (mild gates), each one alone matches the reference."""
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    q, k, v, g, beta, s0 = kin.make(43, 2, 100, 2, 32, 16, h0_n=2)
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    o, S = chunk_kda_pallas(*args, initial_state=jnp.asarray(s0), output_final_state=True, diag=diag)
    o_r, S_r = chunk_kda(*args, initial_state=jnp.asarray(s0), output_final_state=True, impl="xla")
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(S, S_r) < F32_TOL


def test_chunk_pallas_strong_fused_gate_equals_fla(fla_naive, kin):
    """Kimi's gate with decays of 20–50 nats per token: diagonal parts spanning up to the matmul
    limit (the query factor then nears fp32's denormals: 80 nats was too many) still match the
    oracle to 1e-4."""
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    B, T, H, K, V = 2, 250, 2, 32, 16
    q, k, v, _, _, s0 = kin.make(41, B, T, H, K, V, h0_n=B)
    rng = np.random.default_rng(7)
    rng.uniform(size=(B, T, H, K))  # (this draw makes seed 7 hit the case: a part spanning 79.95 nats)
    f = (rng.standard_normal((B, T, H, K)) * 3).astype(np.float32)
    A_log = np.log(rng.uniform(1, 16, (H,))).astype(np.float32)
    dt_bias = rng.standard_normal(H * K).astype(np.float32)
    b_logit = rng.standard_normal((B, T, H)).astype(np.float32)
    o, S = chunk_kda_pallas(*map(jnp.asarray, (q, k, v, f, b_logit)), initial_state=jnp.asarray(s0),
                            output_final_state=True, use_qk_l2norm=True, use_gate_in_kernel=True,
                            use_beta_sigmoid=True, A_log=jnp.asarray(A_log), dt_bias=jnp.asarray(dt_bias))
    o_f, S_f = fla_naive(kin.l2n(q), kin.l2n(k), v, kin.gate(f, A_log, dt_bias), kin.sigmoid(b_logit),
                         initial_state=s0)
    assert kin.rel_err(o, o_f) < F32_TOL and kin.rel_err(S, S_f) < F32_TOL


def test_chunk_pallas_varlen(kin):
    cu = jnp.asarray(np.array([0, 50, 50, 131, 140], np.int32))  # with an empty sequence
    N, T, H, K, V = 4, 140, 2, 32, 16
    q, k, v, g, beta, s0 = kin.make(21, 1, T, H, K, V, strong=True, h0_n=N)
    (o, S), (o_r, S_r) = _both(chunk_kda, *map(jnp.asarray, (q, k, v, g, beta)), initial_state=jnp.asarray(s0),
                               output_final_state=True, cu_seqlens=cu)
    assert S.shape == (N, H, K, V)
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(S, S_r) < F32_TOL
    np.testing.assert_array_equal(np.asarray(S[1]), s0[1])


def test_chunk_pallas_fused_gate_and_beta(kin):
    rng = np.random.default_rng(4)
    B, T, H, K, V = 1, 100, 2, 16, 32
    q, k, v, _, _, _ = kin.make(8, B, T, H, K, V, normalize=False)
    f = (rng.standard_normal((B, T, H, K)) * 3).astype(np.float32)
    b_logit = rng.standard_normal((B, T, H)).astype(np.float32)
    kw = dict(use_qk_l2norm=True, use_gate_in_kernel=True, use_beta_sigmoid=True, output_final_state=True,
              A_log=jnp.asarray(np.log(rng.uniform(1, 16, (1, 1, H, 1))).astype(np.float32)),
              dt_bias=jnp.asarray(rng.standard_normal(H * K).astype(np.float32)))
    (o, S), (o_r, S_r) = _both(chunk_kda, *map(jnp.asarray, (q, k, v, f, b_logit)), **kw)
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(S, S_r) < F32_TOL


def test_chunk_pallas_bf16(kin):
    q, k, v, g, beta, s0 = kin.make(31, 1, 130, 2, 32, 32, strong=True, h0_n=1)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    (o, S), (o_r, S_r) = _both(chunk_kda, bf(q), bf(k), bf(v), jnp.asarray(g), jnp.asarray(beta),
                               initial_state=jnp.asarray(s0), output_final_state=True)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert kin.rel_err(o.astype(jnp.float32), o_r.astype(jnp.float32)) < BF16_TOL
    assert kin.rel_err(S, S_r) < BF16_TOL


@pytest.mark.parametrize("opt", [dict(akk_precision="tf32"), dict(akk_storage="bf16")])
def test_chunk_pallas_akk_options(kin, opt):
    """The non-default Akk options: its products from fp32 operands (akk_precision="tf32"), or Akk
    stored in bf16 between the scores kernel and the solve (akk_storage="bf16", the fix-up writing
    bf16 too): bf16 inputs within bf16 tolerance of the jnp reference, strong gates (every diagonal
    form), two batch rows, a length crossing chunks."""
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    q, k, v, g, beta, s0 = kin.make(32, 2, 150, 2, 64, 32, strong=True, h0_n=2)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    args = (bf(q), bf(k), bf(v), jnp.asarray(g), jnp.asarray(beta))
    kw = dict(initial_state=jnp.asarray(s0), output_final_state=True, use_qk_l2norm=True)
    o, S = chunk_kda_pallas(*args, **opt, **kw)
    o_r, S_r = chunk_kda(*args, impl="xla", **kw)
    assert kin.rel_err(o.astype(jnp.float32), o_r.astype(jnp.float32)) < BF16_TOL
    assert kin.rel_err(S, S_r) < BF16_TOL


@pytest.mark.parametrize("fused", [False, True, "no dt_bias", "bf16 gate params"])
def test_recurrent_pallas_slot_pool(kin, fused):
    """In place over a slot pool with a padding row; the fused gate with A_log and dt_bias in fp32,
    without dt_bias, and with both in bf16 (the kernel casts them itself)."""
    rng = np.random.default_rng(5)
    B, T, H, K, V, n_slots = 4, 2, 2, 32, 16, 6
    q, k, v, g, beta, _ = kin.make(10, B, T, H, K, V, strong=not fused, normalize=not fused)
    pool = rng.standard_normal((n_slots, H, K, V)).astype(np.float32)
    idx = jnp.asarray(np.array([3, -1, 0, 5], np.int32))
    kw = dict(state_indices=idx)
    if fused:
        g = (rng.standard_normal(g.shape) * 2).astype(np.float32)
        beta = rng.standard_normal(beta.shape).astype(np.float32)
        kw.update(use_qk_l2norm=True, use_gate_in_kernel=True, use_beta_sigmoid=True,
                  A_log=jnp.asarray(np.log(rng.uniform(1, 16, (H,))).astype(np.float32)),
                  dt_bias=jnp.asarray(rng.standard_normal(H * K).astype(np.float32)))
        if fused == "no dt_bias":
            kw["dt_bias"] = None
        elif fused == "bf16 gate params":
            kw.update(A_log=kw["A_log"].astype(jnp.bfloat16), dt_bias=kw["dt_bias"].astype(jnp.bfloat16))
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    o, P = fused_recurrent_kda(*args, initial_state=jnp.asarray(pool), impl="pallas", **kw)
    o_r, P_r = fused_recurrent_kda(*args, initial_state=jnp.asarray(pool), impl="xla", **kw)
    assert kin.rel_err(o, o_r) < F32_TOL and kin.rel_err(P, P_r) < F32_TOL
    for s in (1, 2, 4):  # untouched slots
        np.testing.assert_array_equal(np.asarray(P[s]), pool[s])


@pytest.mark.parametrize("opt,tol", [("exp2", 1e-5), ("totals", F32_TOL)])
def test_scores_exponentials_and_gate_totals_either_way_agree(kin, opt, tol):
    """Each of the scores kernel's two defaults against its alternative, every output of the scores
    kernel and of the fix-up, the flags equal, on gates strong enough to take every diagonal form:
    - exp2(x·log2 e) against jnp.exp (scores and fix-up), within fp32 rounding;
    - the gate totals from `sub_totals` against each program summing them (totals=False, the old
      default), within the fp32 acceptance bound: the totals come in another summation order than
      the in-kernel cumsum, so kg's factor e^{Γ_C−Γ} near a sub-chunk's end moves by the rounding
      of a sum of up to 16 gates of -30 (2.3e-5 relative; the other outputs 7e-6)."""
    from jaxprfaas.pallas_kernels.chunk_intra import diag_fixup, scores
    q, k, _, g, beta, _ = kin.make(22, 2, 128, 3, 32, 16, strong=True)
    args = tuple(jnp.asarray(x) for x in (q, k, g, beta))
    mask = (jnp.arange(128) < 100).astype(jnp.float32)
    kw = dict(scale=32 ** -0.5, l2=True, interpret=True)
    outs = []
    for on in (True, False):
        out = scores(*args, mask, **{opt: on}, **kw)
        akk, aqk = diag_fixup(*args, mask, out[7], out[0], out[1], **({opt: on} if opt == "exp2" else {}), **kw)
        outs.append((akk, aqk, *out[2:]))
    np.testing.assert_array_equal(np.asarray(outs[0][-1]), np.asarray(outs[1][-1]))
    assert np.asarray(outs[0][-1]).any()
    for a, b in zip(outs[0][:-1], outs[1][:-1]):
        assert kin.rel_err(b, a) < tol


@pytest.mark.parametrize("opts", [dict(heads_fastest=True), dict(unroll=True)])
def test_scores_variants_give_the_same_bits(kin, opts):
    """The scores kernel's launch-order and unrolled variants compute the same bits as the default,
    every output and the fix-up flags included: two batch rows, padding rows, gates strong enough
    to flag sub-chunks."""
    from jaxprfaas.pallas_kernels.chunk_intra import scores
    q, k, _, g, beta, _ = kin.make(21, 2, 128, 3, 32, 16, strong=True)
    args = tuple(jnp.asarray(x) for x in (q, k, g, beta))
    mask = (jnp.arange(128) < 100).astype(jnp.float32)
    kw = dict(scale=32 ** -0.5, l2=True, interpret=True)
    first, second = scores(*args, mask, **kw), scores(*args, mask, **kw, **opts)
    assert np.asarray(first[7]).any()  # some sub-chunk is flagged for the fix-up
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("l2,masked", [(True, True), (False, False)])
def test_scores_in_channel_passes_equal_the_whole_rows(kin, l2, masked):
    """channel_pass: after the fix-up, the same outputs as the one-pass kernel up to fp32 summation
    order, on sub-chunks that take every form (plain, one per-channel pair, two, beyond). It flags
    fewer sub-chunks: only those whose halves decay by more than 140 nats (it forms two pairs
    itself)."""
    from jaxprfaas.pallas_kernels.chunk_intra import DIAG_SPAN_MAX, diag_fixup, scores
    q, k, _, g, beta, _ = kin.make(22, 2, 256, 2, 64, 16)
    sub = (np.arange(256) // 16 % 4)[None, :, None, None]  # mild, 60-140 nats, halves <= 140, beyond
    u = np.random.default_rng(3).uniform(0, 1, g.shape)  # per-step decays: 16-step spans 80-112, 160-224, 320-400
    g = np.select([sub == 1, sub == 2, sub == 3], [-5 - 2 * u, -10 - 4 * u, -20 - 5 * u], g).astype(np.float32)
    args = tuple(jnp.asarray(x) for x in (q, k, g, beta))
    mask = (jnp.arange(256) < 230).astype(jnp.float32) if masked else None
    kw = dict(scale=64 ** -0.5, l2=l2, interpret=True)
    # against the one-pass kernel with its gate totals summed in the kernel too (the default takes
    # them from an XLA reduction: another summation order, test_scores_totals_in_kernel_...)
    first = scores(*args, mask, totals=False, **kw)
    second = scores(*args, mask, channel_pass=16, heads_fastest=True, **kw)
    halves = -g.reshape(2, 16, 2, 8, 2, 64).sum(axis=3).max(axis=(2, 4))  # [B, sub-chunk, H]
    if masked:
        halves[:, 230 // 16:] = -np.inf  # (approximately: the partly padded sub-chunk keeps its real rows' span)
    whole = -g.reshape(2, 16, 16, 2, 64).sum(axis=2).max(axis=-1)
    assert (whole <= 60).any() and ((whole > 60) & (whole <= DIAG_SPAN_MAX)).any()
    f1, f2 = np.asarray(first[7]), np.asarray(second[7])
    assert (f2 <= f1).all() and f2.sum() < f1.sum() and f2.any()
    np.testing.assert_array_equal(f2.transpose(0, 2, 1) > 0, halves > DIAG_SPAN_MAX)
    fixed = [diag_fixup(*args, mask, out[7], out[0], out[1], **kw) for out in (first, second)]
    for a, b in zip(fixed[0], fixed[1]):
        assert kin.rel_err(b, a) < 1e-6
    for a, b in zip(first[2:7], second[2:7]):
        assert kin.rel_err(b, a) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunk_with_scores_in_channel_passes_equals_fla(fla_naive, kin, dtype):
    """The whole chunked KDA with the channel-pass scores kernel, packed sequences of unequal
    lengths crossing chunks, initial states, gates down to -30 per step, against fla-core's naive
    recurrence (fp32: 1e-4; bf16 inputs: bf16 tolerance)."""
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    lens = [70, 1, 130]
    cu = np.cumsum([0] + lens)
    q, k, v, g, beta, s0 = kin.make(23, 1, int(cu[-1]), 2, 32, 24, strong=True, normalize=False,
                                    h0_n=len(lens))
    dt = jnp.dtype(dtype)
    o, S = chunk_kda_pallas(*(jnp.asarray(x, dt) for x in (q, k, v)), jnp.asarray(g), jnp.asarray(beta),
                            initial_state=jnp.asarray(s0), output_final_state=True, use_qk_l2norm=True,
                            cu_seqlens=jnp.asarray(cu, jnp.int32), scores_opts=dict(channel_pass=16))
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    for n in range(len(lens)):
        sl = slice(cu[n], cu[n + 1])
        o_f, S_f = fla_naive(kin.l2n(q[:, sl]), kin.l2n(k[:, sl]), v[:, sl], g[:, sl], beta[:, sl],
                             initial_state=s0[n:n + 1])
        assert kin.rel_err(np.asarray(o[:, sl], np.float32), o_f) < tol
        assert kin.rel_err(S[n:n + 1], S_f) < tol


@pytest.mark.parametrize("pooled", [True, False])
def test_recurrent_pallas_launch_orders_give_the_same_bits(kin, pooled):
    """v_fastest only reorders the launch: outputs and states bit-equal in both orders, over a
    slot pool with a padding row and over per-call states, with V split into several blocks."""
    from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas
    B, H, K, V = 3, 2, 32, 32
    q, k, v, g, beta, s0 = kin.make(14, B, 1, H, K, V, strong=True, h0_n=B)
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    kw = dict(block_v=8, use_qk_l2norm=True)
    if pooled:
        pool = np.random.default_rng(2).standard_normal((B + 2, H, K, V)).astype(np.float32)
        kw.update(state_indices=jnp.asarray([4, -1, 1], jnp.int32))
        first = fused_recurrent_kda_pallas(*args, initial_state=jnp.asarray(pool), v_fastest=False, **kw)
        second = fused_recurrent_kda_pallas(*args, initial_state=jnp.asarray(pool), **kw)
    else:
        first = fused_recurrent_kda_pallas(*args, initial_state=jnp.asarray(s0), v_fastest=False, **kw)
        second = fused_recurrent_kda_pallas(*args, initial_state=jnp.asarray(s0), **kw)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("T", [1, 3])
def test_recurrent_pallas_output_from_the_decayed_state_agrees(fla_naive, kin, T):
    """one_pass (o from the decayed state plus (k·q) β u, its reduction beside u's) against the
    two-pass form and fla-core's naive recurrence: a slot pool with a padding row, the fused gate,
    V in two blocks, steps of 1 and 3 tokens; within fp32 rounding of each other."""
    from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas
    rng = np.random.default_rng(21)
    B, H, K, V = 3, 2, 32, 32
    q, k, v, g, beta, _ = kin.make(15, B, T, H, K, V, strong=True)
    pool = rng.standard_normal((B + 2, H, K, V)).astype(np.float32)
    idx = np.array([4, -1, 1], np.int32)
    args = tuple(map(jnp.asarray, (q, k, v, g, beta)))
    kw = dict(block_v=16, use_qk_l2norm=True, state_indices=jnp.asarray(idx))
    o1, P1 = fused_recurrent_kda_pallas(*args, initial_state=jnp.asarray(pool), one_pass=True, **kw)
    o2, P2 = fused_recurrent_kda_pallas(*args, initial_state=jnp.asarray(pool), one_pass=False, **kw)
    assert kin.rel_err(o1, o2) < 1e-6 and kin.rel_err(P1, P2) < 1e-6
    for row in (0, 2):  # the padding row (1) writes nothing
        o_f, S_f = fla_naive(kin.l2n(q[row:row + 1]), kin.l2n(k[row:row + 1]), v[row:row + 1], g[row:row + 1],
                             beta[row:row + 1], initial_state=pool[idx[row]][None])
        assert kin.rel_err(o1[row:row + 1], o_f) < F32_TOL
        assert kin.rel_err(P1[idx[row]][None], S_f) < F32_TOL
    for s in (0, 2, 3):  # untouched slots
        np.testing.assert_array_equal(np.asarray(P1[s]), pool[s])


def test_recurrent_pallas_without_pool_equals_fla(fla_naive, kin):
    q, k, v, g, beta, s0 = kin.make(12, 3, 1, 2, 32, 16, strong=True, h0_n=3)
    o, S = fused_recurrent_kda(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=jnp.asarray(s0), impl="pallas")
    o_f, S_f = fla_naive(q, k, v, g, beta, initial_state=s0)
    assert kin.rel_err(o, o_f) < F32_TOL and kin.rel_err(S, S_f) < F32_TOL


@pytest.mark.parametrize("kw,message", [
    (dict(diag="mm3"), "diag must be one of"),
    (dict(state_impl="cuda"), r"state_impl must be one of \('auto', 'triton', 'mosaic', 'mosaic_2wg', 'mosaic_pair'\)"),
    (dict(state_impl="mosaic", cu_seqlens=jnp.array([0, 10], jnp.int32)), "takes bf16 inputs without cu_seqlens"),
    (dict(solve_impl="cuda"), r"solve_impl must be one of \('auto', 'triton', 'mosaic'\)"),
    (dict(solve_impl="mosaic"), r"solve_impl='mosaic' \(the Mosaic GPU solve\) (needs JAX >= 0.11|takes bf16)"),
    (dict(akk_precision="fp8"), "akk_precision must be 'tf32' or 'bf16', got 'fp8'"),
    (dict(chunk_size=32), "uses chunk_size=64"),
    (dict(use_gate_in_kernel=True), "needs A_log"),
    (dict(block_v=32), "block_v must be a power of two dividing V = 16, got 32"),
    (dict(scores_opts=dict(warps=4)),
     r"scores_opts takes \['channel_pass', 'exp2', 'heads_fastest', 'num_stages', 'totals', 'unroll'\], "
     r"got \['warps'\]"),
    (dict(scores_opts=dict(channel_pass=5)), "channel_pass needs form='split' and a divisor of K = 16, got 5"),
    (dict(block_v=12), "block_v must be a power of two dividing V = 16, got 12"),
    (dict(akk_storage="fp16"), "akk_storage must be 'fp32' or 'bf16', got 'fp16'"),
    (dict(akk_storage="bf16"), r"akk_storage='bf16' takes bf16 inputs \(fp32 inputs keep Akk exact in fp32\)"),
    (dict(scores_impl="cuda"), r"scores_impl must be one of \('auto', 'triton', 'mosaic'\)"),
    (dict(scores_impl="mosaic"),
     r"scores_impl='mosaic' \(the Mosaic GPU scores kernel\) (needs JAX >= 0.11|takes bf16)"),
])
def test_chunk_pallas_rejects_bad_options(kin, kw, message):
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    q, k, v, g, beta, _ = kin.make(1, 1, 10, 1, 16, 16)
    with pytest.raises(ValueError, match=message):
        chunk_kda_pallas(*map(jnp.asarray, (q, k, v, g, beta)), **kw)


def test_chunk_pallas_mosaic_pair_needs_v_of_two_value_blocks(kin):
    from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
    q, k, v, g, beta, _ = kin.make(1, 1, 10, 1, 16, 16)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    with pytest.raises(ValueError, match=r"V must be 2 \* block_v, got V = 16, block_v = 64"):
        chunk_kda_pallas(bf(q), bf(k), bf(v), jnp.asarray(g), jnp.asarray(beta), state_impl="mosaic_pair")


@pytest.mark.parametrize("B,H,V,sms,expected", [
    (1, 32, 128, 132, "mosaic_2wg"),  # 64 CTAs of the 2wg pass: one wave
    (2, 32, 128, 132, "mosaic_2wg"),  # 128
    (3, 32, 128, 132, "mosaic_pair"),  # 192: more than one wave
    (8, 32, 128, 132, "mosaic_pair"),  # the 8x4K
    (8, 32, 128, 1024, "mosaic_2wg"),  # a GPU with more SMs
    (8, 32, 64, 132, "mosaic_2wg"),  # one value block a head: nothing to pair
    (8, 32, 256, 132, "mosaic_2wg"),  # four value blocks: the pair pass takes two
])
def test_auto_state_pass_pairs_value_blocks_when_the_2wg_ctas_outnumber_the_sms(B, H, V, sms, expected):
    from jaxprfaas.pallas_kernels.chunk import auto_state_pass
    assert auto_state_pass(B, H, V, sms) == expected


@pytest.mark.parametrize("block_v", [32, 0, 6])
def test_recurrent_pallas_rejects_a_value_tile_that_does_not_divide_v(kin, block_v):
    """A tile wider than V (or not dividing it) is refused, not run into garbage states."""
    from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas
    q, k, v, g, beta, s0 = kin.make(3, 2, 1, 2, 32, 16, h0_n=2)
    with pytest.raises(ValueError, match=f"block_v must be a power of two dividing V = 16, got {block_v}"):
        fused_recurrent_kda_pallas(*map(jnp.asarray, (q, k, v, g, beta)), initial_state=jnp.asarray(s0),
                                   block_v=block_v)

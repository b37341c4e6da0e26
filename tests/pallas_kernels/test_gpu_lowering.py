"""The kernels lower to Triton for a GPU, checked on the CPU: `lower(lowering_platforms=("cuda",))`
runs Pallas's Triton lowering without a GPU, so a primitive the Triton backend lacks (one that
interpret mode runs happily) fails here instead of on the GPU machine. Each Triton module is also
verified (MLIR's op verifiers: operand types, for one), which XLA does first on the GPU: session 3
lost a GPU run to an `arith.maxsi` on mismatched types that lowered fine but did not verify."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxprfaas.pallas_kernels.chunk import chunk_kda_pallas
from jaxprfaas.pallas_kernels.fused_recurrent import fused_recurrent_kda_pallas

B, T, H, K, V = 1, 200, 2, 64, 64


def _h100_context():
    """JAX 0.11+ asks which GPU it lowers for when none is present: an abstract H100. (0.10 lowers
    for a generic target without it.)"""
    import contextlib
    try:
        from jax._src.mesh import AbstractDevice, AbstractMesh
        device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
        mesh = AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=device)
    except (ImportError, TypeError):
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.fixture(autouse=True)
def _verify_triton_modules(monkeypatch):
    from jax._src.pallas.triton import lowering, pallas_call_registration as reg
    lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises on an invalid module
        return result
    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)


def _lower(fn, *args):
    with _h100_context():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()  # the kernels went through the Triton lowering, not interpret mode
    return text


def _inputs(dtype):
    z = lambda *s: jnp.zeros(s, dtype)  # noqa: E731
    return z(B, T, H, K), z(B, T, H, K), z(B, T, H, V), jnp.zeros((B, T, H, K)), jnp.zeros((B, T, H))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("variant", ["auto", "gated", "varlen", "plain", "mm1", "mm4", "cols", "inline"])
def test_chunk_kernels_lower_for_gpu(dtype, variant):
    q, k, v, g, beta = _inputs(dtype)
    kw = dict(output_final_state=True, use_qk_l2norm=True, interpret=False)
    h0 = jnp.zeros((B, H, K, V))
    if variant == "gated":
        kw.update(use_gate_in_kernel=True, use_beta_sigmoid=True, A_log=jnp.zeros((H,)), dt_bias=jnp.zeros((H * K,)))
    if variant == "varlen":
        kw["cu_seqlens"] = jnp.array([0, 70, 70, T], jnp.int32)
        h0 = jnp.zeros((3, H, K, V))
    if variant in ("plain", "mm1", "mm4", "cols", "inline"):
        kw["diag"] = variant
    _lower(lambda q, k, v, g, beta, h0: chunk_kda_pallas(q, k, v, g, beta, initial_state=h0, **kw),
           q, k, v, g, beta, h0)


def test_chunk_kernels_with_akk_in_bf16_lower_for_gpu():
    """akk_storage="bf16": the scores kernel and the fix-up write Akk in bf16, the solve reads it."""
    q, k, v, g, beta = _inputs(jnp.bfloat16)
    _lower(lambda q, k, v, g, beta: chunk_kda_pallas(q, k, v, g, beta, use_qk_l2norm=True, interpret=False,
                                                     akk_storage="bf16"), q, k, v, g, beta)


@pytest.mark.parametrize("opts", [dict(heads_fastest=True), dict(unroll=True), dict(num_stages=None),
                                  dict(channel_pass=32), dict(channel_pass=64, heads_fastest=True),
                                  dict(totals=False)])
def test_scores_kernel_variants_lower_for_gpu(opts):
    """The scores kernel's benchmark variants: heads launched fastest, unrolled blocks, Triton's
    stages, the key channels in passes, the gate totals summed in the kernel."""
    from jaxprfaas.pallas_kernels.chunk_intra import scores
    q, k, _, g, beta = _inputs(jnp.bfloat16)
    Tp = -(-T // 64) * 64
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    _lower(lambda q, k, g, beta: scores(q, k, g, beta, None, scale=K ** -0.5, l2=True, kk_bf16=True, **opts),
           *map(pad, (q, k, g, beta)))


@pytest.mark.parametrize("fused,hints,pool,v_fastest,one_pass", [
    (False, False, True, False, False), (True, False, True, False, False), (True, True, True, False, False),
    (True, False, False, False, False), (True, False, True, True, False), (True, False, False, True, False),
    (True, False, True, True, True)])
def test_recurrent_kernel_lowers_for_gpu(fused, hints, pool, v_fastest, one_pass):
    """Over a slot pool (state_indices, in place) and over per-call states (no indices), in either
    launch order, with the output's reduction after the update or beside u's."""
    n = 8
    q, k, v = (jnp.zeros((n, 1, H, d), jnp.bfloat16) for d in (K, K, V))
    g, beta = jnp.zeros((n, 1, H, K)), jnp.zeros((n, 1, H))
    kw = dict(use_qk_l2norm=True, interpret=False, cache_hints=hints, v_fastest=v_fastest, one_pass=one_pass)
    if fused:
        kw.update(use_gate_in_kernel=True, use_beta_sigmoid=True, A_log=jnp.zeros((H,)), dt_bias=jnp.zeros((H * K,)))
    if not pool:
        _lower(lambda h0: fused_recurrent_kda_pallas(q, k, v, g, beta, initial_state=h0, **kw),
               jnp.zeros((n, H, K, V)))
        return
    idx = jnp.arange(n, dtype=jnp.int32)
    _lower(lambda pool: fused_recurrent_kda_pallas(q, k, v, g, beta, initial_state=pool, state_indices=idx, **kw),
           jnp.zeros((n + 2, H, K, V)))

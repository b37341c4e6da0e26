"""The one entry point per KDA operator: picks the Pallas kernel or the jnp reference.

Callers (the model's KDA layer, the engines) never branch on the backend; they call
`chunk_kda` / `fused_recurrent_kda` with `impl="auto"` and this module decides:
  "xla"    the pure-jnp reference (`reference.py`), any backend;
  "pallas" the Pallas kernel: compiled on GPU, interpret mode elsewhere;
  "auto"   the Pallas kernel where it was compiled, checked and measured faster on a GPU
           (`pallas_auto` in __init__.py says where), else "xla".
"""
from __future__ import annotations

import jax

from jaxprfaas.pallas_kernels import reference

IMPLS = ("auto", "pallas", "xla")


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _resolve(impl, kind):
    _check_impl(impl)
    if impl != "auto":
        return impl
    from jaxprfaas.pallas_kernels import pallas_auto
    return "pallas" if jax.default_backend() == "gpu" and pallas_auto(kind) else "xla"


def chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              use_qk_l2norm=False, A_log=None, dt_bias=None, use_gate_in_kernel=False, use_beta_sigmoid=False,
              chunk_size=64, impl="auto"):
    """Chunked KDA, fla-core 0.6.0 `chunk_kda` layout: q,k,g [B,T,H,K], v [B,T,H,V], beta [B,T,H],
    initial_state [N,H,K,V] fp32 -> (o [B,T,H,V] in v.dtype, final state [N,H,K,V] fp32 or None)."""
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias,
              use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid=use_beta_sigmoid, chunk_size=chunk_size)
    if _resolve(impl, "chunk") == "pallas":
        from jaxprfaas.pallas_kernels import chunk
        return chunk.chunk_kda_pallas(q, k, v, g, beta, **kw)
    return reference.chunk_kda(q, k, v, g, beta, **kw)


def fused_recurrent_kda(q, k, v, g, beta, *, scale=None, initial_state=None, state_indices=None,
                        output_final_state=True, use_qk_l2norm=False, A_log=None, dt_bias=None,
                        use_gate_in_kernel=False, use_beta_sigmoid=False, impl="auto"):
    """Recurrent KDA for decode (T small). With `state_indices` [B] int32, `initial_state` is a slot
    pool [S,H,K,V] fp32; row b reads and writes slot state_indices[b] (negative: padding row) and
    the whole updated pool is returned (updated in place by the compiled Pallas kernel)."""
    kw = dict(scale=scale, initial_state=initial_state, state_indices=state_indices,
              output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias,
              use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid=use_beta_sigmoid)
    if _resolve(impl, "recurrent") == "pallas":
        from jaxprfaas.pallas_kernels import fused_recurrent
        return fused_recurrent.fused_recurrent_kda_pallas(q, k, v, g, beta, **kw)
    return reference.fused_recurrent_kda(q, k, v, g, beta, **kw)

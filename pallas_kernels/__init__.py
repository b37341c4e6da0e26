"""KDA kernels for jaxprfaas: Pallas kernels beside their pure-jnp references.

Public entry points (`impl="auto" | "pallas" | "xla"`, see `dispatch.py`):
  chunk_kda            prefill, chunked WY form, fla-core 0.6.0 layout
  fused_recurrent_kda  decode step over a slot pool of states
  naive_recurrent_kda  the token-by-token `lax.scan` oracle
"""
from jaxprfaas.pallas_kernels.dispatch import chunk_kda, fused_recurrent_kda
from jaxprfaas.pallas_kernels.reference import kda_gate, l2norm, naive_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda", "naive_recurrent_kda", "kda_gate", "l2norm"]


def pallas_auto(kind: str, *, dtype, varlen: bool) -> bool:
    """Whether `impl="auto"` on a GPU picks the Pallas kernel for this call.

    From the H100 runs in benchmarks/RESULTS.md ("## KDA kernels"), on the configurations that
    were compiled and checked there against the jnp reference, fla-core and jax-linear-attention:
      recurrent  bf16 decode step: checked, at HBM bandwidth (0.95-1.19x fla-core) -> Pallas.
      chunk      bf16, no cu_seqlens: checked, 3.4 ms at 8K vs 11.7 ms for the jnp reference
                 (but 0.46x fla-core) -> Pallas. fp32 inputs and cu_seqlens were not run on a GPU
                 -> the jnp reference until they are.
    """
    import jax.numpy as jnp

    if kind == "recurrent":
        return True
    return kind == "chunk" and jnp.dtype(dtype) != jnp.float32 and not varlen

"""KDA kernels for jaxprfaas: Pallas kernels beside their pure-jnp references.

Public entry points (`impl="auto" | "pallas" | "xla"`, see `dispatch.py`):
  chunk_kda            prefill, chunked WY form, fla-core 0.6.0 layout
  fused_recurrent_kda  decode step over a slot pool of states
  naive_recurrent_kda  the token-by-token `lax.scan` oracle
"""
from jaxprfaas.pallas_kernels.dispatch import chunk_kda, fused_recurrent_kda
from jaxprfaas.pallas_kernels.reference import kda_gate, l2norm, naive_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda", "naive_recurrent_kda", "kda_gate", "l2norm"]


def pallas_auto(kind: str) -> bool:
    """Whether `impl="auto"` on a GPU picks the Pallas kernel for this call.

    From the H100 runs in benchmarks/RESULTS.md ("## KDA kernels"): every configuration was
    compiled there and checked against the jnp reference (bf16 and fp32 inputs, cu_seqlens with an
    empty sequence, the fused gate, the model's logits), and the Pallas kernels are faster than
    the jnp reference on every shape measured (chunk at 8K: 1.3 ms for v3b against the reference's
    11.5 ms in one run, 1.56 ms for v3c, 1.21 ms in session 3, 1.05 ms in session 4, 1.00 ms in
    session 5 with the Mosaic GPU solve; recurrent:
    at HBM bandwidth, 5.9x the reference). So the
    GPU path is always Pallas; elsewhere "auto" is the jnp reference, since the CPU can only
    interpret the kernels.
    """
    return kind in ("chunk", "recurrent")

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
    """Whether `impl="auto"` on a GPU picks the Pallas kernel for `kind` ("chunk" | "recurrent").

    Set from the measurements in benchmarks/RESULTS.md ("## KDA kernels"): the Pallas kernel is
    chosen only where it was compiled, checked against the reference and found faster.
    """
    return _PALLAS_ON_GPU.get(kind, False)


_PALLAS_ON_GPU = {"chunk": False, "recurrent": False}

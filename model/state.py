"""`HybridState`: everything a Kimi Linear sequence carries from one step to the next.

This pytree is what a prefill produces, what crosses datacenters and what a decode node
continues from. Per KDA layer: the recurrent state `[B, H, K, V]` (float32, as fla and vLLM keep
it) and the short-conv tail `[B, W-1, 3*H*K]` (the last W-1 pre-conv q|k|v projections, model
dtype). Per MLA layer: the latent cache `[B, C, kv_lora_rank + rope_dim]` (model dtype) of
which the first `lengths[b]` rows are valid (C is the capacity, >= max length).

`HybridState.nbytes(config, length)` is S_kv(l), the size the scheduler's profiles use; it is
exactly the byte size of a one-sequence state of that length at capacity == length.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxprfaas.model.config import ModelConfig

try:  # the scheduler imports `state_nbytes` without JAX; everything else needs it
    import jax
    import jax.numpy as jnp
    from flax import struct
except ImportError:  # pragma: no cover - scheduler-only installs
    jax = None

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def state_nbytes(config: ModelConfig, length: int, batch: int = 1) -> int:
    """Bytes of a `batch`-sequence HybridState holding `length` tokens each (S_kv(l))."""
    item = _ITEMSIZE[config.dtype]
    h, k = config.kda_num_heads, config.kda_head_dim
    per_kda = h * k * k * 4 + (config.conv_kernel_size - 1) * 3 * h * k * item
    per_mla_token = config.latent_dim * item
    return batch * (len(config.kda_layers) * per_kda
                    + len(config.mla_layers) * per_mla_token * length
                    + 4)  # lengths (int32)


def state_bytes_split(config: ModelConfig) -> tuple[int, int]:
    """(fixed bytes per sequence, bytes per token) of a HybridState."""
    fixed = state_nbytes(config, 0)
    return fixed, state_nbytes(config, 1) - fixed


if jax is not None:

    @struct.dataclass
    class HybridState:
        recurrent: tuple  # per KDA layer: [B, H, K, V] float32
        conv: tuple       # per KDA layer: [B, W-1, 3*H*K] model dtype (q|k|v pre-conv inputs)
        latent: tuple     # per MLA layer: [B, C, kv_lora_rank + rope_dim] model dtype
        lengths: jax.Array  # [B] int32: tokens seen by each sequence

        # ---- construction ----------------------------------------------------------------
        @staticmethod
        def zeros(config: ModelConfig, batch: int, capacity: int = 0) -> "HybridState":
            dt = jnp.dtype(config.dtype)
            h, k, w = config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
            n_kda, n_mla = len(config.kda_layers), len(config.mla_layers)
            return HybridState(
                recurrent=tuple(jnp.zeros((batch, h, k, k), jnp.float32) for _ in range(n_kda)),
                conv=tuple(jnp.zeros((batch, w - 1, 3 * h * k), dt) for _ in range(n_kda)),
                latent=tuple(jnp.zeros((batch, capacity, config.latent_dim), dt) for _ in range(n_mla)),
                lengths=jnp.zeros((batch,), jnp.int32),
            )

        # ---- sizes -------------------------------------------------------------------------
        nbytes = staticmethod(state_nbytes)

        @property
        def size_bytes(self) -> int:
            """Actual bytes held by this state's arrays (capacity included)."""
            return sum(int(math.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(self))

        @property
        def batch(self) -> int:
            return int(self.lengths.shape[0])

        @property
        def capacity(self) -> int:
            return int(self.latent[0].shape[1]) if self.latent else 0

        # ---- reshaping -----------------------------------------------------------------------
        def with_capacity(self, capacity: int) -> "HybridState":
            """Grow (zero-pad) or shrink the MLA latent buffers to `capacity` rows."""
            def fix(a):
                c = a.shape[1]
                if c == capacity:
                    return a
                if c > capacity:
                    return a[:, :capacity]
                return jnp.pad(a, ((0, 0), (0, capacity - c), (0, 0)))
            return self.replace(latent=tuple(fix(a) for a in self.latent))

        def select(self, rows: Sequence[int] | np.ndarray) -> "HybridState":
            """The sub-batch of the given sequence rows."""
            idx = jnp.asarray(np.asarray(rows, dtype=np.int32))
            return jax.tree.map(lambda a: a[idx], self)

        def trimmed(self) -> "HybridState":
            """Capacity cut to the longest sequence (what gets shipped or stored)."""
            return self.with_capacity(int(jnp.max(self.lengths)) if self.batch else 0)

        @staticmethod
        def concat(states: Sequence["HybridState"]) -> "HybridState":
            """Stack states along the batch axis (capacities are padded to the largest)."""
            cap = max(s.capacity for s in states)
            states = [s.with_capacity(cap) for s in states]
            return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *states)

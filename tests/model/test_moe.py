"""The MoE's buffered expert path (per-expert capacity) equals the exact grouped path."""

import jax.numpy as jnp
import numpy as np

from jaxprfaas.model import ModelConfig
from jaxprfaas.model.ffn import MoE, expert_capacity
from flax import nnx


def test_buffered_experts_equal_grouped_and_fall_back_when_over_capacity():
    cfg = ModelConfig.preset("tiny").replace(num_experts=16, num_experts_per_token=4)
    moe = MoE(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for rows, skew in ((40, False), (40, True), (7, False)):
        xs = jnp.asarray(rng.normal(size=(rows, cfg.hidden_size)), jnp.float32)
        expert = rng.integers(0, 3 if skew else 16, rows)    # skewed: far over capacity
        expert = jnp.asarray(np.sort(expert), jnp.int32)
        cap = expert_capacity(rows, 16)
        exact = moe.experts(xs, expert, capacity=None)
        fast = moe.experts(xs, expert, capacity=cap)
        assert np.abs(np.asarray(fast) - np.asarray(exact)).max() <= 1e-5 * np.abs(np.asarray(exact)).max()
        assert (np.bincount(np.asarray(expert)).max() > cap) == skew
    assert expert_capacity(512, 256) == 8 and expert_capacity(2048, 256) == 32 and expert_capacity(6, 8) == 6
    assert expert_capacity(32768, 256) is None   # prefill-sized: grouped path only

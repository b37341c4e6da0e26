"""Random KDA inputs and numpy versions of the fused pre-processing, independent of the code under test."""
from __future__ import annotations

import numpy as np


def l2n(x):
    x = np.asarray(x, np.float32)
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def gate(f, A_log, dt_bias):
    H, K = f.shape[-2:]
    return (-np.exp(A_log.reshape(H))[:, None] * softplus(f + dt_bias.reshape(H, K))).astype(np.float32)


def sigmoid(x):
    return (1 / (1 + np.exp(-x))).astype(np.float32)


def make(seed, B, T, H, K, V, *, strong=False, normalize=True, h0_n=None):
    """q, k (L2-normed unless normalize=False), v, log-decay g, post-sigmoid beta, h0 [h0_n,H,K,V].

    strong=True puts per-step gates down to -30 on a random half of the channels, the regime
    where factoring exp(Γr−Γi) into two exponentials overflows.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K), np.float32)
    k = rng.standard_normal((B, T, H, K), np.float32)
    if normalize:
        q, k = l2n(q), l2n(k)
    v = rng.standard_normal((B, T, H, V), np.float32)
    g = -np.exp(rng.uniform(-5, 0.5, (B, T, H, K))).astype(np.float32)
    if strong:
        g = np.where(rng.random((B, T, H, K)) < 0.5, rng.uniform(-30, -10, (B, T, H, K)), g).astype(np.float32)
    beta = rng.uniform(0.05, 1, (B, T, H)).astype(np.float32)
    h0 = None if h0_n is None else rng.standard_normal((h0_n, H, K, V), np.float32)
    return q, k, v, g, beta, h0


def rel_err(a, b):
    """max |a - b| / max |b|: the relative error the acceptance criteria quote."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

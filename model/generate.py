"""The single-process reference generation loop, and token sampling.

`generate` is the oracle the serving engines are checked against: one ragged prefill of all
prompts, then one decode step per new token for the whole batch. Sampling is a pure function
of (logits, params, key), so a seeded request gives the same tokens wherever it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprfaas.errors import JaxprfaasError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16          # new tokens to generate at most
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = no top-k cut
    top_p: float = 1.0            # 1 = no nucleus cut
    seed: int = 0                 # per-request RNG seed (sampling only)
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these

    def __post_init__(self):
        if self.max_tokens < 0:
            raise JaxprfaasError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise JaxprfaasError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise JaxprfaasError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise JaxprfaasError(f"top_p must be in (0, 1], got {self.top_p}")


@jax.jit
def sample_tokens(logits, temperature, top_k, top_p, keys):
    """One token per row. logits [B, V] fp32; temperature/top_p [B] f32; top_k [B] i32; keys [B]."""
    greedy = jnp.argmax(logits, axis=-1)
    v = logits.shape[-1]
    x = logits / jnp.maximum(temperature, 1e-6)[:, None]
    srt = jnp.sort(x, axis=-1)[:, ::-1]
    # top-k: everything below the k-th largest goes
    kth = jnp.take_along_axis(srt, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
    x = jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
    # top-p: the smallest prefix of the sorted distribution with mass >= top_p stays
    srt = jnp.where((top_k[:, None] > 0) & (srt < kth), -jnp.inf, srt)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cut = jnp.min(jnp.where(before < top_p[:, None], srt, jnp.inf), axis=-1)
    x = jnp.where(x < cut[:, None], -jnp.inf, x)
    sampled = jax.vmap(jax.random.categorical)(keys, x)
    return jnp.where(temperature <= 0, greedy, sampled).astype(jnp.int32)


def step_keys(seeds: Sequence[int], steps: Sequence[int]):
    """The RNG key of each request at its own step count (independent of batch composition)."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(
        jnp.asarray(seeds, jnp.uint32), jnp.asarray(steps, jnp.int32))


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, impl: str = "auto") -> list[list[int]]:
    """Generate for every prompt; returns the new tokens of each (stop token included)."""
    n = len(prompts)
    if n == 0:
        return []
    ps = list(params) if isinstance(params, (list, tuple)) else [params] * n
    if len(ps) != n:
        raise JaxprfaasError(f"{n} prompts but {len(ps)} sampling params")
    if any(len(p) == 0 for p in prompts):
        raise JaxprfaasError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((n, lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    logits, state = model.prefill(tokens, lengths=lengths, impl=impl)
    max_new = max(p.max_tokens for p in ps)
    state = state.with_capacity(int(lengths.max()) + max_new)
    last = logits[jnp.arange(n), jnp.asarray(lengths - 1)]
    temp = jnp.asarray([p.temperature for p in ps], jnp.float32)
    topk = jnp.asarray([p.top_k for p in ps], jnp.int32)
    topp = jnp.asarray([p.top_p for p in ps], jnp.float32)
    seeds = [p.seed for p in ps]
    out: list[list[int]] = [[] for _ in range(n)]
    done = np.array([p.max_tokens == 0 for p in ps])
    for step in range(max_new):
        tok = np.asarray(sample_tokens(last, temp, topk, topp, step_keys(seeds, [step] * n)))
        for i in range(n):
            if not done[i]:
                out[i].append(int(tok[i]))
                done[i] = len(out[i]) >= ps[i].max_tokens or int(tok[i]) in ps[i].stop_token_ids
        if done.all():
            break
        last, state = model.decode(tok, state, impl=impl)
    return out

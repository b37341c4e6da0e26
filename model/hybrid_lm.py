"""`HybridLM`: the Kimi Linear decoder stack with a prefill and a decode entry point.

    prefill(tokens [B, T], state=None, lengths=None) -> (logits [B, T, V] fp32, HybridState)
    decode(tokens [B], state)                         -> (logits [B, V] fp32, HybridState)

Prefill continues from any state, so prefix reuse, chunked prefill and remote prefill are one
code path. Ragged batches are right-padded: `lengths[b]` tokens of row b are real; the rest
neither touch the state nor the row's valid logits. Input checks happen here, on the host,
so a bad token id or shape is one clear error instead of a trace from inside XLA.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.ffn import MLP, MoE
from jaxprfaas.model.kda import KDA
from jaxprfaas.model.mla import MLA
from jaxprfaas.model.norms import RMSNorm, dense_init
from jaxprfaas.model.state import HybridState


class Block(nnx.Module):
    """Pre-norm block: h += mixer(norm(h)); h += ffn(norm(h))."""

    def __init__(self, config: ModelConfig, layer: int, rngs: nnx.Rngs):
        dt = jnp.dtype(config.dtype)
        self.is_mla = config.is_mla(layer)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.attn = MLA(config, rngs) if self.is_mla else KDA(config, rngs)
        self.ffn = (MoE(config, rngs) if config.is_moe(layer)
                    else MLP(config.hidden_size, config.intermediate_size, dt, rngs))


class HybridLM(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None, *, seed: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        dt = jnp.dtype(config.dtype)
        self.config = config
        self.embed = dense_init(rngs, (config.vocab_size, config.hidden_size), dt)
        self.layers = nnx.List([Block(config, i, rngs) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.lm_head = (None if config.tie_word_embeddings
                        else dense_init(rngs, (config.hidden_size, config.vocab_size), dt))

    # ---- traced bodies -----------------------------------------------------------------------
    def _logits(self, x):
        h = self.norm(x)
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return (h @ w).astype(jnp.float32)

    def _prefill(self, tokens, state: HybridState, n_new, impl: str):
        x = self.embed[...][tokens]
        valid = jnp.arange(tokens.shape[1])[None, :] < n_new[:, None]
        old_len = state.lengths
        rec, conv, lat = [], [], []
        for blk in self.layers:
            h = blk.input_norm(x)
            if blk.is_mla:
                a, buf = blk.attn.prefill(h, state.latent[len(lat)], old_len)
                lat.append(buf)
            else:
                i = len(rec)
                a, tail, s = blk.attn.prefill(h, state.conv[i], state.recurrent[i], valid, n_new, impl)
                rec.append(s)
                conv.append(tail)
            x = x + a
            x = x + blk.ffn(blk.post_norm(x))
        new_state = HybridState(tuple(rec), tuple(conv), tuple(lat), old_len + n_new)
        return self._logits(x), new_state

    def _decode(self, tokens, state: HybridState, impl: str):
        x = self.embed[...][tokens]
        rec, conv, lat = [], [], []
        for blk in self.layers:
            h = blk.input_norm(x)
            if blk.is_mla:
                a, cache = blk.attn.decode(h, state.latent[len(lat)], state.lengths)
                lat.append(cache)
            else:
                i = len(rec)
                a, tail, s = blk.attn.decode(h, state.conv[i], state.recurrent[i], impl)
                rec.append(s)
                conv.append(tail)
            x = x + a
            x = x + blk.ffn(blk.post_norm(x))
        new_state = HybridState(tuple(rec), tuple(conv), tuple(lat), state.lengths + 1)
        return self._logits(x), new_state

    # ---- public entry points -----------------------------------------------------------------
    def prefill(self, tokens, state: HybridState | None = None, lengths=None, *, impl: str = "auto"):
        tokens = self._check_tokens(tokens, ndim=2)
        b, t = tokens.shape
        if lengths is None:
            lengths = np.full((b,), t, np.int32)
        lengths = np.asarray(lengths, np.int32)
        if lengths.shape != (b,) or (lengths < 0).any() or (lengths > t).any():
            raise JaxprfaasError(f"lengths must be {b} integers in [0, {t}], got {lengths.tolist()}")
        if state is None:
            state = HybridState.zeros(self.config, b)
        elif state.batch != b:
            raise JaxprfaasError(f"state holds {state.batch} sequences but tokens have {b} rows")
        return _prefill_jit(self, jnp.asarray(tokens), state, jnp.asarray(lengths), impl)

    def decode(self, tokens, state: HybridState, *, impl: str = "auto"):
        tokens = self._check_tokens(tokens, ndim=1)
        if state.batch != tokens.shape[0]:
            raise JaxprfaasError(f"state holds {state.batch} sequences but got {tokens.shape[0]} tokens")
        need = int(np.max(np.asarray(state.lengths))) + 1 if state.batch else 0
        if self.config.mla_layers and state.capacity < need:
            state = state.with_capacity(_round_up(need, 256))  # room for the next tokens
        return _decode_jit(self, jnp.asarray(tokens), state, impl)

    def _check_tokens(self, tokens, ndim: int) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
            shape = "[batch, time]" if ndim == 2 else "[batch]"
            raise JaxprfaasError(f"tokens must be an integer array of shape {shape}, got "
                                 f"{arr.dtype} {list(arr.shape)}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise JaxprfaasError(f"token ids must be in [0, {self.config.vocab_size}), got "
                                 f"min {arr.min()} max {arr.max()}")
        return arr.astype(np.int32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.partial(nnx.jit, static_argnames=("impl",))
def _prefill_jit(model: HybridLM, tokens, state, n_new, impl):
    return model._prefill(tokens, state, n_new, impl)


@functools.partial(nnx.jit, static_argnames=("impl",))
def _decode_jit(model: HybridLM, tokens, state, impl):
    return model._decode(tokens, state, impl)

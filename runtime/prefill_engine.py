"""`PrefillEngine`: packs prompts into ragged batches, chunks long ones, exports each state.

Each `step()` takes requests in arrival order (those already part-way through first) and gives
each the next chunk of its prompt, at most `chunk_size` tokens, until the step holds
`token_budget` tokens or `max_batch` rows. The batch is right-padded (the model's ragged
prefill: `lengths[b]` tokens of row b are real) to a power-of-two length and row count, and
each row continues from the state its earlier chunks left, so a long prompt costs bounded
activation memory and prefix reuse is the same code path.

A request whose last chunk ran in this step leaves with a `PrefillResult`: its one-sequence
`HybridState` (capacity == prompt length) and its first token, sampled from the last logits
exactly as the reference loop samples token 0. The step runs layer by layer
(`model_runner.LayerwisePrefill`), and a request's `on_layer(request_id, layer, arrays)` hook
fires as soon as that layer's state is final, with the arrays keyed like
`state_codec.layer_arrays` ("kda_state"/"conv" or "mla_latent"), so a transfer can ship
layer i while layer i+1 computes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.generate import sample_tokens, step_keys
from jaxprfaas.model.state import HybridState
from jaxprfaas.runtime.model_runner import LayerwisePrefill
from jaxprfaas.runtime.request import Request

LayerReady = Callable[[str, int, dict], None]  # (request_id, layer, {"kda_state": .., "conv": ..} | {"mla_latent": ..})


@dataclasses.dataclass
class PrefillResult:
    request: Request
    state: HybridState        # one sequence; lengths == [prompt_len]; latent capacity >= prompt_len (bucketed)
    first_token: int | None   # generated token 0 (None when max_tokens == 0)


@dataclasses.dataclass
class _Job:
    request: Request
    done: int = 0                       # prompt tokens already in `state`
    state: HybridState | None = None
    on_layer: LayerReady | None = None


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << math.ceil(math.log2(max(n, 1))))


@functools.partial(jax.jit, static_argnums=(2,))
def _row(state: HybridState, i, cap: int) -> HybridState:
    """Row i of a batch state as a one-sequence state with latent capacity `cap`
    (jitted: one small program per shape instead of a handful of eager ops per row)."""
    one = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=True), state)
    return one.with_capacity(cap)


@jax.jit
def _stack(rows) -> HybridState:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rows)


class PrefillEngine:
    def __init__(self, model, *, token_budget: int = 8192, chunk_size: int | None = None, max_batch: int = 16,
                 impl: str = "auto", len_buckets: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] | None = None, mla_block: int | None = None):
        if token_budget < 1 or max_batch < 1:
            raise JaxprfaasError(f"token_budget and max_batch must be >= 1, got {token_budget}, {max_batch}")
        self.model, self.config = model, model.config
        self.token_budget = int(token_budget)
        self.chunk_size = int(chunk_size or token_budget)
        if not 1 <= self.chunk_size <= self.token_budget:
            raise JaxprfaasError(f"chunk_size must be in [1, token_budget={token_budget}], got {chunk_size}")
        self.max_batch = int(max_batch)
        # padded step shapes: the smallest bucket that holds the step (powers of two by default)
        self.len_buckets = tuple(sorted({b for b in (len_buckets or ()) if b < self.chunk_size})) + (self.chunk_size,)
        self.batch_buckets = tuple(sorted({b for b in (batch_buckets or ()) if b < self.max_batch})) + (self.max_batch,)
        self._use_pow2 = (len_buckets is None, batch_buckets is None)
        self._zeros: dict[int, HybridState] = {}
        # mla_block: key-block size of the online-softmax MLA prefill (memory O(T*block) instead of
        # O(T*S)); None runs the model's own MLA.prefill
        self.runner = LayerwisePrefill(model, impl, mla_block)
        self.queue: collections.deque[_Job] = collections.deque()
        self.tokens_done = 0

    def add_request(self, request: Request, on_layer: LayerReady | None = None) -> None:
        request.check_vocab(self.config.vocab_size)
        if any(j.request.request_id == request.request_id for j in self.queue):
            raise JaxprfaasError(f"request {request.request_id} is already queued for prefill")
        self.queue.append(_Job(request, on_layer=on_layer))

    def cancel(self, request_id: str) -> bool:
        for j in list(self.queue):
            if j.request.request_id == request_id:
                self.queue.remove(j)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.queue)

    def run(self) -> list[PrefillResult]:
        out = []
        while self.has_work():
            out.extend(self.step())
        return out

    # ---- one packed step ---------------------------------------------------------------------
    def step(self) -> list[PrefillResult]:
        jobs, takes, budget = [], [], self.token_budget
        for j in self.queue:
            if budget <= 0 or len(jobs) == self.max_batch:
                break
            take = min(j.request.prompt_len - j.done, self.chunk_size, budget)
            jobs.append(j)
            takes.append(take)
            budget -= take
        if not jobs:
            return []
        n = len(jobs)
        t = (min(_pow2(max(takes)), _pow2(self.chunk_size)) if self._use_pow2[0]
             else next(x for x in self.len_buckets if x >= max(takes)))
        b = (min(_pow2(n, 1), self.max_batch) if self._use_pow2[1]
             else next(x for x in self.batch_buckets if x >= n))
        tokens = np.zeros((b, t), np.int32)
        n_new = np.zeros(b, np.int32)
        for i, (j, take) in enumerate(zip(jobs, takes)):
            tokens[i, :take] = j.request.prompt[j.done:j.done + take]
            n_new[i] = take
        state = self._batch_state(jobs, b)
        finishing = [i for i, (j, take) in enumerate(zip(jobs, takes)) if j.done + take == j.request.prompt_len]
        hook = self._hook(jobs, finishing)
        logits, state = self.runner.run(jnp.asarray(tokens), state, jnp.asarray(n_new), hook)
        self.tokens_done += int(sum(takes))

        first = self._first_tokens(logits, jobs, finishing)
        results = []
        for i, (j, take) in enumerate(zip(jobs, takes)):
            j.done += take
            row = _row(state, i, _pow2(j.done))
            if i in finishing:
                self.queue.remove(j)
                results.append(PrefillResult(j.request, row, first.get(i)))
            else:
                j.state = row
        return results

    def _batch_state(self, jobs: Sequence[_Job], b: int) -> HybridState:
        """The rows' states stacked, padded to b rows and a power-of-two latent capacity."""
        longest = max(j.done for j in jobs)
        cap = _pow2(longest) if longest else 0
        if cap not in self._zeros:
            self._zeros[cap] = HybridState.zeros(self.config, 1, cap)
        zero = self._zeros[cap]
        rows = [(_row(j.state, 0, cap) if j.state is not None else zero) for j in jobs]
        rows += [zero] * (b - len(rows))
        return _stack(tuple(rows)) if len(rows) > 1 else rows[0]

    def _hook(self, jobs, finishing):
        watch = [(i, jobs[i]) for i in finishing if jobs[i].on_layer is not None]
        if not watch:
            return None

        def on_layer(layer, kind, a, b):
            for i, j in watch:
                if kind == "kda":
                    arrays = {"kda_state": a[i:i + 1], "conv": b[i:i + 1]}
                else:
                    arrays = {"mla_latent": a[i:i + 1, :j.request.prompt_len]}
                j.on_layer(j.request.request_id, layer, arrays)
        return on_layer

    def _first_tokens(self, logits, jobs, finishing) -> dict[int, int]:
        """Token 0 of each finishing request, sampled like the reference loop's first step
        (all rows at once, padding rows greedy, so one program per batch bucket)."""
        live = [i for i in finishing if jobs[i].request.params.max_tokens > 0]
        if not live:
            return {}
        b = logits.shape[0]
        temp, topk, topp = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32)
        seeds = np.zeros(b, np.uint32)
        for i in live:
            p = jobs[i].request.params
            temp[i], topk[i], topp[i], seeds[i] = p.temperature, p.top_k, p.top_p, p.seed
        toks = np.asarray(sample_tokens(logits, jnp.asarray(temp), jnp.asarray(topk), jnp.asarray(topp),
                                        step_keys(seeds, np.zeros(b, np.int32))))
        return {i: int(toks[i]) for i in live}

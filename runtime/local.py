"""The local PD path: a prefill engine feeding a decode engine in one process, no network.

This is the baseline the disaggregated deployments are compared with, and what
`jaxprfaas generate` runs: each loop iteration is one packed prefill step (its finished states
go straight into the decode engine's pool through `import_state`, the same entry point a remote
prefill's transfer uses) and one continuous-batching decode step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.generate import SamplingParams
from jaxprfaas.runtime.cache_pool import DEFAULT_PAGE_SIZE, CachePool, PoolLayout
from jaxprfaas.runtime.decode_engine import DecodeEngine
from jaxprfaas.runtime.prefill_engine import PrefillEngine
from jaxprfaas.runtime.request import FinishReason, Request, TokenEvent, as_requests


class LocalPD:
    """`submit(request)` at any time; `step()` advances prefill and decode by one step each."""

    def __init__(self, model, *, max_model_len: int = 4096, pool_bytes: int | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, max_batch: int = 64, token_budget: int = 4096,
                 chunk_size: int | None = None, prefill_batch: int = 16, impl: str = "auto",
                 batch_buckets: Sequence[int] | None = None, context_buckets: Sequence[int] | None = None,
                 prefill_len_buckets: Sequence[int] | None = None,
                 prefill_batch_buckets: Sequence[int] | None = None,
                 on_event: Callable[[TokenEvent], None] | None = None):
        config = model.config
        if pool_bytes is None:
            if jax.default_backend() == "cpu":  # no memory stats on CPU: room for max_batch full sequences
                probe = PoolLayout(config, 1, 1, page_size)
                pool_bytes = max_batch * (probe.slot_bytes + probe.pages_for(max_model_len) * probe.page_bytes)
                layout = PoolLayout.from_bytes(config, pool_bytes, page_size=page_size, max_seqs=max_batch)
            else:
                layout = PoolLayout.from_device(config, page_size=page_size, max_seqs=max_batch)
        else:
            layout = PoolLayout.from_bytes(config, pool_bytes, page_size=page_size, max_seqs=max_batch)
        self.prefill = PrefillEngine(model, token_budget=token_budget, chunk_size=chunk_size,
                                     max_batch=prefill_batch, impl=impl, len_buckets=prefill_len_buckets,
                                     batch_buckets=prefill_batch_buckets)
        self.decode = DecodeEngine(model, CachePool(layout), max_batch=max_batch, max_model_len=max_model_len,
                                   batch_buckets=batch_buckets, context_buckets=context_buckets, impl=impl,
                                   on_event=on_event)
        self.on_event = on_event
        self._events: list[TokenEvent] = []

    def submit(self, request: Request) -> None:
        if request.prompt_len >= self.decode.max_model_len:
            raise JaxprfaasError(f"request {request.request_id}: prompt of {request.prompt_len} tokens "
                                 f"needs max_model_len > {request.prompt_len} (it is {self.decode.max_model_len})")
        self.decode.pool.check_fits_ever(request.request_id, self.decode._reserve_tokens(request))
        self.prefill.add_request(request)

    def cancel(self, request_id: str) -> bool:
        if self.prefill.cancel(request_id):
            self._events.append(TokenEvent(request_id, None, 0, FinishReason.CANCELLED))
            return True
        return self.decode.cancel(request_id)

    def has_work(self) -> bool:
        return bool(self.prefill.has_work() or self.decode.has_work() or self._events)

    def step(self) -> list[TokenEvent]:
        for res in self.prefill.step():
            if res.first_token is None:  # max_tokens == 0: nothing to generate
                ev = TokenEvent(res.request.request_id, None, 0, FinishReason.LENGTH)
                self._events.append(ev)
                if self.on_event is not None:
                    self.on_event(ev)
            else:
                self.decode.import_state(res.request, res.state, res.first_token)
        events, self._events = self._events + self.decode.step(), []
        return events

    def run(self):
        """Step until idle, yielding events as they happen."""
        while self.has_work():
            yield from self.step()


def generate_with_engines(model, prompts: Sequence[Sequence[int]],
                          params: SamplingParams | Sequence[SamplingParams], **kw) -> list[list[int]]:
    """Generated tokens of every prompt (stop token included), like `model.generate.generate`."""
    requests = as_requests(prompts, params)
    if not requests:
        return []
    longest = max(r.prompt_len + max(r.params.max_tokens, 1) for r in requests)
    kw.setdefault("max_model_len", -(-longest // DEFAULT_PAGE_SIZE) * DEFAULT_PAGE_SIZE)
    kw.setdefault("max_batch", min(64, len(requests)))
    pd = LocalPD(model, **kw)
    for r in requests:
        pd.submit(r)
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for ev in pd.run():
        if ev.token is not None:
            out[ev.request_id].append(ev.token)
    return [out[r.request_id] for r in requests]

"""Decode worker (PD-D): receives states over gRPC, decodes, streams tokens to the router.

Two servers: the StateReceiver (where prefill workers push states) and the DecodeWorker
service (where the router asks for tokens). A Decode call waits, with a deadline, until its
request's state has landed, hands it to the decode engine, and streams tokens as they come.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from jaxprfaas.config import DeploymentConfig
from jaxprfaas.model.generate import SamplingParams
from jaxprfaas.runtime.proto import serving_pb2 as pb
from jaxprfaas.runtime.proto import serving_pb2_grpc as pbg

log = logging.getLogger("jaxprfaas")
_POLL_S = 0.005


def sampling_from_pb(s: pb.Sampling) -> SamplingParams:
    return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                          top_p=s.top_p if s.top_p > 0 else 1.0, seed=s.seed,
                          stop_token_ids=tuple(s.stop_token_ids))


class ReferenceBackend:
    """Decodes one request at a time with the model's own decode (no batching)."""

    def __init__(self, model):
        self.model = model
        self._q: queue.Queue = queue.Queue()
        self.active = 0
        threading.Thread(target=self._loop, daemon=True, name="decode").start()

    def submit(self, request_id: str, state, last_token: int, params: SamplingParams, emit) -> None:
        self._q.put((state, last_token, params, emit))

    def _loop(self) -> None:
        import numpy as np
        from jaxprfaas.model.generate import sample_tokens, step_keys
        import jax.numpy as jnp
        while True:
            state, tok, p, emit = self._q.get()
            self.active = 1
            try:
                need = int(np.asarray(state.lengths)[0]) + p.max_tokens + 1
                state = state.with_capacity(-(-need // 256) * 256)  # a few capacities, few programs
                out = []
                for step in range(p.max_tokens):
                    logits, state = self.model.decode(np.array([tok], np.int32), state)
                    tok = int(np.asarray(sample_tokens(
                        logits, jnp.asarray([p.temperature], jnp.float32), jnp.asarray([p.top_k], jnp.int32),
                        jnp.asarray([p.top_p], jnp.float32), step_keys([p.seed], [step])))[0])
                    out.append(tok)
                    stop = tok in p.stop_token_ids
                    last = stop or len(out) >= p.max_tokens
                    emit([tok], last, "stop" if stop else "length")
                    if last:
                        break
                if p.max_tokens == 0:
                    emit([], True, "length")
            except Exception as e:  # noqa: BLE001 - reported to the caller
                log.exception("decode failed")
                emit([], True, f"error: {e}")
            finally:
                self.active = 0


class DecodeService(pbg.DecodeWorkerServicer):
    def __init__(self, cfg: DeploymentConfig, model, sink, backend):
        self.cfg, self.model, self.sink, self.backend = cfg, model, sink, backend
        self.waiting = 0
        self._lock = threading.Lock()

    def _wait_state(self, request_id: str, timeout_s: float, ctx):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and ctx.is_active():
            state = self.sink.poll(request_id)
            if state is not None:
                return state
            time.sleep(_POLL_S)
        return None

    def Decode(self, task: pb.DecodeTask, ctx):
        with self._lock:
            self.waiting += 1
        try:
            state = self._wait_state(task.request_id, task.state_timeout_s or 60.0, ctx)
        finally:
            with self._lock:
                self.waiting -= 1
        if state is None:
            self.sink.discard(task.request_id)
            ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"state of {task.request_id} did not land within {task.state_timeout_s or 60.0:.0f} s")
        events: queue.Queue = queue.Queue()
        self.backend.submit(task.request_id, state, task.last_token, sampling_from_pb(task.sampling),
                            lambda toks, fin, why: events.put((toks, fin, why)))
        while True:
            toks, fin, why = events.get()
            yield pb.TokenEvent(token_ids=toks, finished=fin, finish_reason=why if fin else "")
            if fin:
                return

    def Stats(self, request, ctx) -> pb.StatsReply:
        return pb.StatsReply(active=getattr(self.backend, "active", 0), waiting=self.waiting)


class LandedStates:
    """Adapts the transfer's InMemorySink: committed states wait here until their Decode call."""

    def __init__(self, config):
        from jaxprfaas.runtime.transfer import InMemorySink
        self.inner = InMemorySink(config, keep=True)

    def poll(self, request_id: str):
        try:
            return self.inner.take(request_id)
        except KeyError:
            return None

    def discard(self, request_id: str) -> None:
        self.inner.abort(request_id, "decode gave up waiting")
        self.inner.states.pop(request_id, None)


def make_backend(model, cfg: DeploymentConfig):
    """(landed-state sink, decode backend) for a decode node."""
    import numpy as np
    from jaxprfaas.model.state import HybridState
    model.decode(np.ones((1,), np.int32), HybridState.zeros(model.config, 1, capacity=256))  # warm up
    return LandedStates(model.config), ReferenceBackend(model)

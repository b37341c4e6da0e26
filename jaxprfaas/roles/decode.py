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


class EngineBackend:
    """A `DecodeEngine` (continuous batching over the cache pool) driven by one thread.

    Decode RPC threads hand in (request, state, first token); the driver imports them between
    steps, runs a step whenever there is work, and routes each token event to its request."""

    def __init__(self, model, cfg: DeploymentConfig):
        from jaxprfaas.runtime.decode_engine import DecodeEngine
        role = cfg.clusters.pd.decode
        self.engine = DecodeEngine(model, pool_bytes=int(cfg.cache.pool_mib * 2**20), page_size=cfg.cache.page_size,
                                   max_batch=role.max_batch, max_model_len=cfg.cache.max_model_len)
        self._inbox: queue.Queue = queue.Queue()
        self._listeners: dict[str, object] = {}
        self._stop = threading.Event()
        self.active = 0
        threading.Thread(target=self._drive, daemon=True, name="decode-engine").start()

    def warmup(self) -> int:
        return self.engine.warmup()

    def submit(self, request, state, first_token: int, emit) -> None:
        self._inbox.put(("add", request, state, first_token, emit))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id, None, None, None))

    def _drive(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            try:
                block = not eng.has_work()
                while True:
                    op, req, state, first, emit = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
                    block = False
                    if op == "cancel":
                        eng.cancel(req)
                        continue
                    self._listeners[req.request_id] = emit
                    try:
                        eng.import_state(req, state, first)
                    except Exception as e:  # noqa: BLE001 - the caller gets the message
                        self._listeners.pop(req.request_id, None)
                        emit([], True, f"error: {e}")
            except queue.Empty:
                pass
            if eng.has_work():
                try:
                    self._deliver(eng.step())
                except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                    log.exception("decode step failed")
                    for rid, emit in list(self._listeners.items()):
                        eng.cancel(rid)
                        emit([], True, f"error: {e}")
                    self._listeners.clear()
            self.active = len(eng.running)

    def _deliver(self, events) -> None:
        for ev in events:
            emit = self._listeners.get(ev.request_id)
            if emit is None:
                continue
            fin = ev.finished is not None
            # the first token (index 0) reached the client through the router already
            toks = [ev.token] if ev.token is not None and ev.index > 0 else []
            if toks or fin:
                why = (f"error: {ev.error}" if ev.error else ev.finished.value) if fin else ""
                emit(toks, fin, why)
            if fin:
                self._listeners.pop(ev.request_id, None)

    def close(self) -> None:
        self._stop.set()


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
        from jaxprfaas.runtime.request import Request
        params = sampling_from_pb(task.sampling)
        if params.max_tokens == 0:   # nothing to decode: the state only needed freeing
            yield pb.TokenEvent(finished=True, finish_reason="length")
            return
        events: queue.Queue = queue.Queue()
        request = Request(tuple(task.prompt), params, task.request_id)
        self.backend.submit(request, state, task.first_token, lambda toks, fin, why: events.put((toks, fin, why)))
        ctx.add_callback(lambda: self.backend.cancel(task.request_id))  # client went away
        while True:
            toks, fin, why = events.get()
            yield pb.TokenEvent(token_ids=toks, finished=fin, finish_reason=why if fin else "")
            if fin:
                return

    def Stats(self, request, ctx) -> pb.StatsReply:
        return pb.StatsReply(active=getattr(self.backend, "active", 0), waiting=self.waiting)


class LandedStates:
    """Adapts the transfer's InMemorySink: committed states wait here until their Decode call.
    A state nobody asks for within `ttl_s` (its router died, say) is dropped, so none leaks."""

    def __init__(self, config, ttl_s: float = 300.0):
        from jaxprfaas.runtime.transfer import InMemorySink
        self.inner = InMemorySink(config, keep=True)
        self.ttl_s = ttl_s
        self._seen: dict[str, float] = {}
        threading.Thread(target=self._reap, daemon=True, name="landed-reaper").start()

    def _reap(self) -> None:
        while True:
            time.sleep(min(5.0, self.ttl_s / 4))
            now = time.monotonic()
            for rid in list(self.inner.states):
                first = self._seen.setdefault(rid, now)
                if now - first > self.ttl_s and self.inner.states.pop(rid, None) is not None:
                    log.warning("dropped the state of %s: no decode request for it in %.0f s", rid, self.ttl_s)
            for rid in [r for r in self._seen if r not in self.inner.states]:
                self._seen.pop(rid, None)

    def poll(self, request_id: str):
        try:
            return self.inner.take(request_id)
        except KeyError:
            return None

    def discard(self, request_id: str) -> None:
        self.inner.abort(request_id, "decode gave up waiting")
        self.inner.states.pop(request_id, None)


def make_backend(model, cfg: DeploymentConfig):
    """(landed-state sink, decode backend) for a decode node, compiled before it serves."""
    backend = EngineBackend(model, cfg)
    backend.warmup()
    return LandedStates(model.config), backend

"""Prefill worker: a PrfaaS pod instance or a PD-P node.

It prefills what the router hands it and streams the resulting HybridState, layer by layer, to
the decode node the router chose. A PrfaaS worker sends over the emulated cross-datacenter link
(rate, latency, several connections, TLS/token as configured); a PD-P worker sends over the
unshaped intra-cluster path. It never decides routing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures

import grpc

from jaxprfaas.config import DeploymentConfig
from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.generate import SamplingParams
from jaxprfaas.runtime.proto import serving_pb2 as pb
from jaxprfaas.runtime.proto import serving_pb2_grpc as pbg

log = logging.getLogger("jaxprfaas")


def transport_security(cfg: DeploymentConfig):
    from jaxprfaas.runtime.transfer import TransportSecurity
    tls = cfg.link.tls
    return TransportSecurity.from_dict({
        "tls": None if tls is None else {k: v for k, v in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)) if v},
        "token": cfg.link.token, "insecure": cfg.link.insecure}, where=f"{cfg.source}: link")


class PrefillService(pbg.PrefillWorkerServicer):
    """Prefill RPCs feed one `PrefillEngine` (packed, chunked, layer-wise) driven by one thread."""

    def __init__(self, cfg: DeploymentConfig, cluster: str, model):
        from jaxprfaas.runtime.link import Link
        from jaxprfaas.runtime.prefill_engine import PrefillEngine
        from jaxprfaas.runtime.transfer import check_transport_security
        self.cfg, self.cluster, self.model = cfg, cluster, model
        self.cross = cluster == "prfaas" and cfg.link.cross_datacenter
        self.security = transport_security(cfg)
        check_transport_security(self.security, cross_datacenter=self.cross, link=f"{cfg.source}: link")
        self.link = Link.from_gbps(cfg.link.gbps, cfg.link.latency_ms) if cluster == "prfaas" else None
        role = cfg.clusters.prfaas.prefill if cluster == "prfaas" else cfg.clusters.pd.prefill
        # A few fixed step shapes (all compiled by warmup()) instead of one per (rows, length).
        self.len_buckets = tuple(sorted({min(64, role.token_budget), role.token_budget}))
        self.batch_buckets = tuple(sorted({1, min(4, role.max_batch), role.max_batch}))
        self.engine = PrefillEngine(model, token_budget=role.token_budget, max_batch=role.max_batch,
                                    len_buckets=self.len_buckets, batch_buckets=self.batch_buckets)
        self._senders: dict[str, object] = {}
        self._lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.sent_bytes = 0
        self.queued_tokens = 0
        self._driver = threading.Thread(target=self._drive, daemon=True, name="prefill-engine")

    def warmup(self) -> None:
        """Compile every (rows, length) step shape, then start serving (runs before the driver)."""
        from jaxprfaas.runtime.request import Request
        for t in self.len_buckets:
            for b in self.batch_buckets:
                head = max(1, min(t, self.engine.token_budget - (b - 1)) - (0 if t == self.len_buckets[0] else 1))
                for i, n in enumerate([head] + [1] * (b - 1)):
                    self.engine.add_request(Request(tuple([1] * n), SamplingParams(max_tokens=1), f"warm-{b}-{t}-{i}"))
                self.engine.run()
        self._driver.start()

    def _sender(self, target: str):
        from jaxprfaas.runtime.transfer import StateSender
        with self._lock:
            s = self._senders.get(target)
            if s is None:
                sec = self.security
                s = StateSender(target, self.model.config,
                                streams=self.cfg.link.streams if self.cluster == "prfaas" else 1,
                                tls=sec.tls if self.cross else None,
                                token=(sec.tokens[0] if sec.tokens and self.cross else None),
                                link=self.link, link_name=f"{self.cluster}->{target}")
                self._senders[target] = s
            return s

    def _drive(self) -> None:
        """The engine's one thread: take new requests, run a packed step, resolve finished ones."""
        waiting: dict[str, futures.Future] = {}
        while not self._stop.is_set():
            try:
                block = not self.engine.has_work()
                while True:
                    req, hook, fut = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
                    block = False
                    try:
                        self.engine.add_request(req, on_layer=hook)
                        waiting[req.request_id] = fut
                    except Exception as e:  # noqa: BLE001 - goes back to the caller
                        fut.set_exception(e)
            except queue.Empty:
                pass
            if not self.engine.has_work():
                continue
            try:
                for res in self.engine.step():
                    waiting.pop(res.request.request_id).set_result(res.first_token)
            except Exception as e:  # noqa: BLE001 - fail what was in flight, keep serving
                log.exception("prefill step failed")
                for rid in list(waiting):
                    self.engine.cancel(rid)
                    waiting.pop(rid).set_exception(e)

    def Prefill(self, task: pb.PrefillTask, ctx) -> pb.PrefillResult:
        from jaxprfaas.roles.decode import sampling_from_pb
        from jaxprfaas.runtime.request import Request
        t0 = time.perf_counter()
        tokens = tuple(task.token_ids)
        tx = self._sender(task.decode_target).open(task.request_id, [len(tokens)])
        fut: futures.Future = futures.Future()
        with self._lock:
            self.queued_tokens += len(tokens)
        try:
            req = Request(tokens, sampling_from_pb(task.sampling), task.request_id)
            self._inbox.put((req, lambda rid, layer, arrays: tx.send_layer(layer, arrays), fut))
            first = fut.result(timeout=600)
            prefill_s = time.perf_counter() - t0
            result = tx.finish()
        except Exception as e:  # report to the router; the transfer frees its side itself
            tx.abort(str(e))
            log.warning("prefill of %s failed: %s", task.request_id, e)
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, JaxprfaasError) else grpc.StatusCode.INTERNAL,
                      f"prefill of {task.request_id} failed: {e}")
        finally:
            with self._lock:
                self.queued_tokens -= len(tokens)
        with self._lock:
            self.sent_bytes += result.wire_bytes
        return pb.PrefillResult(bytes=result.payload_bytes, prefill_s=prefill_s, transfer_s=result.seconds,
                                tokens=len(tokens), first_token=first or 0, has_first_token=first is not None)

    def Stats(self, request, ctx) -> pb.StatsReply:
        from jaxprfaas.runtime.link import egress_snapshot
        rate = sum(v for k, v in egress_snapshot().items() if k.startswith(self.cluster + "->"))
        return pb.StatsReply(egress_bytes=self.sent_bytes, egress_bps=rate, waiting=self.queued_tokens)

    def close(self) -> None:
        self._stop.set()
        for s in self._senders.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

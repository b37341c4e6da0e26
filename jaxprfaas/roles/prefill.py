"""Prefill worker: a PrfaaS pod instance or a PD-P node.

It prefills what the router hands it and streams the resulting HybridState, layer by layer, to
the decode node the router chose. A PrfaaS worker sends over the emulated cross-datacenter link
(rate, latency, several connections, TLS/token as configured); a PD-P worker sends over the
unshaped intra-cluster path. It never decides routing.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np

from jaxprfaas.config import DeploymentConfig
from jaxprfaas.runtime.proto import serving_pb2 as pb
from jaxprfaas.runtime.proto import serving_pb2_grpc as pbg

log = logging.getLogger("jaxprfaas")


def bucket(n: int, smallest: int = 16) -> int:
    """The padded length a prompt of n tokens is compiled for (x4 steps from `smallest`)."""
    b = smallest
    while b < n:
        b *= 4
    return b


def transport_security(cfg: DeploymentConfig):
    from jaxprfaas.runtime.transfer import TransportSecurity
    tls = cfg.link.tls
    return TransportSecurity.from_dict({
        "tls": None if tls is None else {k: v for k, v in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)) if v},
        "token": cfg.link.token, "insecure": cfg.link.insecure}, where=f"{cfg.source}: link")


class PrefillService(pbg.PrefillWorkerServicer):
    def __init__(self, cfg: DeploymentConfig, cluster: str, model, engine=None):
        from jaxprfaas.runtime.link import Link
        from jaxprfaas.runtime.transfer import check_transport_security
        self.cfg, self.cluster, self.model, self.engine = cfg, cluster, model, engine
        self.cross = cluster == "prfaas" and cfg.link.cross_datacenter
        self.security = transport_security(cfg)
        check_transport_security(self.security, cross_datacenter=self.cross, link=f"{cfg.source}: link")
        self.link = Link.from_gbps(cfg.link.gbps, cfg.link.latency_ms) if cluster == "prfaas" else None
        self._senders: dict[str, object] = {}
        self._lock = threading.Lock()
        self._compute = threading.Lock()   # one prefill at a time on this worker's devices
        self._queued_s = 0.0
        self.sent_bytes = 0

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

    def Prefill(self, task: pb.PrefillTask, ctx) -> pb.PrefillResult:
        tokens = np.asarray(task.token_ids, np.int32)
        tx = self._sender(task.decode_target).open(task.request_id, [len(tokens)])
        try:
            with self._compute:
                t0 = time.perf_counter()
                self._prefill(tokens, tx)
                prefill_s = time.perf_counter() - t0
            result = tx.finish()
        except Exception as e:  # report to the router; the transfer frees its side itself
            tx.abort(str(e))
            log.exception("prefill of %s failed", task.request_id)
            ctx.abort(grpc.StatusCode.INTERNAL, f"prefill of {task.request_id} failed: {e}")
        with self._lock:
            self.sent_bytes += result.wire_bytes
        return pb.PrefillResult(bytes=result.payload_bytes, prefill_s=prefill_s,
                                transfer_s=result.seconds, tokens=len(tokens))

    def _prefill(self, tokens: np.ndarray, tx) -> None:
        """Run the prefill and hand each layer's final arrays to the transfer as soon as it is done."""
        from jaxprfaas.runtime import state_codec as codec
        from jaxprfaas.model.state import HybridState
        config = self.model.config
        if self.engine is not None and len(tokens):
            self.engine.prefill_one(tokens, on_layer=lambda layer, arrays: tx.send_layer(layer, arrays))
            return
        if len(tokens):
            # pad to a bucket so a handful of programs serve every prompt length
            padded = np.zeros((1, bucket(len(tokens))), np.int32)
            padded[0, :len(tokens)] = tokens
            _, state = self.model.prefill(padded, lengths=[len(tokens)])
        else:
            state = HybridState.zeros(config, 1)
        state = state.trimmed()
        for layer in range(config.num_hidden_layers):
            tx.send_layer(layer, codec.layer_arrays(config, state, layer))

    def Stats(self, request, ctx) -> pb.StatsReply:
        from jaxprfaas.runtime.link import egress_snapshot
        rate = sum(v for k, v in egress_snapshot().items() if k.startswith(self.cluster + "->"))
        return pb.StatsReply(egress_bytes=self.sent_bytes, egress_bps=rate)

    def close(self) -> None:
        for s in self._senders.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

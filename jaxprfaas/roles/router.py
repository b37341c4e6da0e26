"""Router: the deployment's front door (gRPC `Frontend.Generate`) and its placement brain.

Per request it asks the KV index for prefix hits, builds a snapshot of the workers (queued
prefill work, decode load, PrfaaS egress utilisation) and calls the scheduler's pure
`route(policy, snapshot, request)`. It then starts the chosen decode node's `Decode` (which
waits for the state) and the chosen prefill worker's `Prefill` (which ships the state), and
streams tokens back; the last event carries the route, TTFT, bytes moved and timings.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from concurrent import futures

import grpc

from jaxprfaas.config import DeploymentConfig
from jaxprfaas.runtime.proto import serving_pb2 as pb
from jaxprfaas.runtime.proto import serving_pb2_grpc as pbg
from jaxprfaas.scheduler import router as sched
from jaxprfaas.scheduler.kv_index import KVIndex, block_hashes
from jaxprfaas.scheduler.profiles import DecodeCapacity, KvSize, PrefillCurve, Profile

log = logging.getLogger("jaxprfaas")
ROUTE_NAME = {sched.PRFAAS: "prfaas", sched.PD: "local"}


@dataclasses.dataclass
class Worker:
    index: int
    address: str               # DecodeWorker / PrefillWorker service
    receiver: str = ""         # decode nodes: their StateReceiver
    stub: object = None
    outstanding: int = 0       # requests in flight on this worker (router's own count)
    busy_s: float = 0.0        # estimated queued prefill work


def live_profile(model_config, max_batch: int, name: str, prefill_tok_s: float) -> Profile:
    """A profile for routing estimates: state sizes from the model, prefill rate as configured."""
    from jaxprfaas.model.state import state_bytes_split
    fixed, per_token = state_bytes_split(model_config)
    return Profile(name=name, gpus_per_instance=1, prefill=PrefillCurve.power_law(1.0 / prefill_tok_s, 1.0),
                   kv=KvSize.linear(fixed, per_token), decode=DecodeCapacity(bs_max=max_batch, t_decode=0.01))


class RouterService(pbg.FrontendServicer):
    def __init__(self, cfg: DeploymentConfig, model_config, prfaas: list[Worker], pd_prefill: list[Worker],
                 decode: list[Worker]):
        self.cfg, self.model_config = cfg, model_config
        self.prfaas, self.pd_prefill, self.decode = prfaas, pd_prefill, decode
        for w in prfaas + pd_prefill:
            w.stub = pbg.PrefillWorkerStub(grpc.insecure_channel(w.address))
        for w in decode:
            w.stub = pbg.DecodeWorkerStub(grpc.insecure_channel(w.address))
        p = cfg.policy
        self.policy = sched.Policy(threshold=p.threshold, scarce_utilization=p.scarce_utilization,
                                   ttft_slo_s=p.ttft_slo_s, max_input_len=p.max_input_len)
        mb = cfg.clusters.pd.decode.max_batch
        self.pd_profile = live_profile(model_config, mb, "pd", p.pd_prefill_tok_s)
        self.prfaas_profile = live_profile(model_config, mb, "prfaas", p.prfaas_prefill_tok_s) if prfaas else None
        self.kv_index = KVIndex(block_size=cfg.cache.block_size)
        self.link_bps = cfg.link.gbps * 1e9 / 8 if cfg.link.gbps > 0 else float("inf")
        self._egress_bps = 0.0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pool = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="router")
        self._stop = threading.Event()
        self._recent: collections.deque = collections.deque(maxlen=4096)  # (arrival, uncached, max_tokens)
        threading.Thread(target=self._poll_egress, daemon=True).start()
        self.controller = self._make_controller(cfg)
        if self.controller is not None:
            threading.Thread(target=self._control_loop, daemon=True, name="controller").start()

    # ---- the short-term control loop (scheduler.controller), live ---------------------------------
    def _make_controller(self, cfg: DeploymentConfig):
        if not cfg.policy.controller or not cfg.policy.controller.get("enabled", True) or not self.prfaas:
            return None
        from jaxprfaas.scheduler import throughput_model as tm
        from jaxprfaas.scheduler.controller import Controller, ControllerConfig
        ccfg = ControllerConfig.from_dict(cfg.policy.controller)
        system = tm.System(pd=self.pd_profile, n_pd=len(self.pd_prefill) + len(self.decode), l_out=16.0,
                           prfaas=self.prfaas_profile, n_prfaas=len(self.prfaas),
                           b_out=self.link_bps if self.link_bps != float("inf") else 0.0)
        return Controller(ccfg, system, self.policy.threshold, len(self.pd_prefill))

    def _observe(self):
        import numpy as np
        from jaxprfaas.scheduler.controller import Observation
        c = self.controller.cfg
        now = time.monotonic()
        with self._lock:
            recent = list(self._recent)[-c.window:]
            q_pf = sum(w.busy_s for w in self.prfaas) / max(len(self.prfaas), 1)
            q_pd = sum(w.busy_s for w in self.pd_prefill) / max(len(self.pd_prefill), 1)
        arrivals = [a for a, _, _ in recent if now - a <= c.rate_window_s]
        span = min(c.rate_window_s, max(now - arrivals[0], 1e-3)) if arrivals else c.rate_window_s
        bw = self.link_bps if self.link_bps != float("inf") else 1e12
        return Observation(now=now, threshold=self.policy.threshold, n_p=len(self.pd_prefill),
                           n_d=len(self.decode), recent_uncached=np.array([u for _, u, _ in recent], float),
                           recent_output=np.array([o for _, _, o in recent], float),
                           arrival_rate=len(arrivals) / span, link_util=min(1.0, self._egress_bps / bw),
                           link_backlog_s=0.0, prfaas_queue_s=q_pf, pd_p_queue_s=q_pd)

    def _control_loop(self) -> None:
        period = self.controller.cfg.short_period_s
        while not self._stop.wait(period):
            try:
                t_new = self.controller.short_tick(self._observe())
            except Exception:  # noqa: BLE001 - the loop must survive a bad tick
                log.exception("controller tick failed")
                continue
            if t_new is not None:
                with self._lock:
                    old = self.policy.threshold
                    self.policy = dataclasses.replace(self.policy, threshold=int(round(t_new)))
                log.info("controller: threshold %d -> %d (%s)", old, self.policy.threshold,
                         self.controller.log[-1][2] if self.controller.log else "")

    # ---- snapshot of the live deployment ---------------------------------------------------------
    def _poll_egress(self) -> None:
        while not self._stop.wait(0.2):
            total = 0.0
            for w in self.prfaas:
                try:
                    total += w.stub.Stats(pb.StatsRequest(), timeout=1.0).egress_bps
                except grpc.RpcError:
                    pass
            self._egress_bps = total

    def _snapshot(self) -> sched.Snapshot:
        now = time.monotonic()
        view = lambda ws: [sched.PrefillView(w.index, busy_until=now + w.busy_s) for w in ws]  # noqa: E731
        link = None
        if self.prfaas:
            bw = self.link_bps if self.link_bps != float("inf") else 1e12
            link = sched.LinkView(bandwidth=bw, latency=self.cfg.link.latency_ms / 1e3,
                                  utilization=min(1.0, self._egress_bps / bw))
        dec = [sched.DecodeView(w.index, bs_max=self.cfg.clusters.pd.decode.max_batch, active=w.outstanding)
               for w in self.decode]
        return sched.Snapshot(now=now, pd_profile=self.pd_profile, pd_prefill=view(self.pd_prefill),
                              decode=dec, prfaas_profile=self.prfaas_profile,
                              prfaas_prefill=view(self.prfaas), link=link)

    # ---- the frontend ------------------------------------------------------------------------------
    def Generate(self, req: pb.GenerateRequest, ctx):
        t0 = time.monotonic()
        rid = req.request_id or f"r{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        tokens = list(req.token_ids)
        bad = self._check(tokens, req.sampling)
        if bad:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
        keys = block_hashes(tokens, self.cfg.cache.block_size)
        matches = self.kv_index.longest_match(keys)
        hits = {c: {loc[1]: m.tokens for loc, m in matches.items() if loc[0] == c} for c in (sched.PD, sched.PRFAAS)}
        with self._lock:
            self._recent.append((t0, len(tokens), req.sampling.max_tokens))
            threshold = int(self.policy.threshold)
            decision = sched.route(self.policy, self._snapshot(),
                                   sched.Request(id=hash(rid) & 0x7FFFFFFF, input_len=len(tokens),
                                                 output_len=req.sampling.max_tokens, hits=hits))
            if decision.accepted:
                pre = (self.prfaas if decision.cluster == sched.PRFAAS else self.pd_prefill)[decision.node]
                dec = self.decode[decision.decode_node]
                rate = self.cfg.policy.prfaas_prefill_tok_s if decision.cluster == sched.PRFAAS \
                    else self.cfg.policy.pd_prefill_tok_s
                pre.outstanding += 1
                pre.busy_s += len(tokens) / rate
                dec.outstanding += 1
        if not decision.accepted:
            yield pb.GenerateEvent(finished=True, summary=pb.Summary(
                route="rejected", reason=decision.reason, finish_reason="rejected", prompt_tokens=len(tokens)))
            return
        try:
            yield from self._serve(rid, tokens, req.sampling, decision, pre, dec, t0, ctx, threshold)
        finally:
            with self._lock:
                pre.outstanding -= 1
                pre.busy_s = max(0.0, pre.busy_s - len(tokens) / rate)
                dec.outstanding -= 1

    def _serve(self, rid, tokens, sampling, decision, pre: Worker, dec: Worker, t0, ctx, threshold: int):
        """Prefill (ships the state, returns token 0) -> first token out -> Decode streams the rest."""
        timeout = 300.0
        rid = f"{rid}@{uuid.uuid4().hex[:8]}"  # transfer ids stay unique even if clients reuse theirs
        task = pb.PrefillTask(request_id=rid, token_ids=tokens, decode_target=dec.receiver,
                              cross_datacenter=decision.cluster == sched.PRFAAS, sampling=sampling)
        try:
            result = pre.stub.Prefill(task, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if e.code() == grpc.StatusCode.INVALID_ARGUMENT else grpc.StatusCode.INTERNAL
            ctx.abort(code, e.details())
        ttft = time.monotonic() - t0
        n_out, finish = 0, "length"
        if result.has_first_token:
            n_out = 1
            yield pb.GenerateEvent(token_ids=[result.first_token])
        stream = dec.stub.Decode(pb.DecodeTask(request_id=rid, first_token=result.first_token, prompt=tokens,
                                               sampling=sampling, state_timeout_s=60.0), timeout=timeout * 4)
        ctx.add_callback(stream.cancel)   # the client went away: stop decoding
        try:
            for ev in stream:
                n_out += len(ev.token_ids)
                if ev.finished:
                    finish = ev.finish_reason
                if ev.token_ids:
                    yield pb.GenerateEvent(token_ids=list(ev.token_ids))
        except grpc.RpcError as e:
            ctx.abort(grpc.StatusCode.INTERNAL, f"request {rid}: decode failed: {e.details()}")
        if finish.startswith("error"):
            ctx.abort(grpc.StatusCode.INTERNAL, f"request {rid}: {finish}")
        route = ROUTE_NAME[decision.cluster]
        yield pb.GenerateEvent(finished=True, summary=pb.Summary(
            route=route, reason=decision.reason, ttft_s=ttft, bytes_transferred=result.bytes,
            prefill_s=result.prefill_s, transfer_s=result.transfer_s, total_s=time.monotonic() - t0,
            finish_reason=finish, prefill_node=pre.index, decode_node=dec.index, prompt_tokens=len(tokens),
            uncached_tokens=decision.uncached or len(tokens), threshold=threshold))

    def _check(self, tokens, sampling) -> str | None:
        if not tokens:
            return "a request needs at least one token"
        v = self.model_config.vocab_size
        if min(tokens) < 0 or max(tokens) >= v:
            return f"token ids must be in [0, {v}), got min {min(tokens)} max {max(tokens)}"
        if sampling.temperature < 0 or not 0 <= sampling.top_p <= 1:
            return "temperature must be >= 0 and top_p in (0, 1]"
        return None

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

"""Discrete-event simulation of a deployment: PrfaaS pods, PD-P, PD-D and the link between them.

The real router (`router.route`) places every request and, when enabled, the real controller
re-tunes t and converts PD nodes while the simulation runs. What is modelled:
  * a prefill node serves its queue FIFO, one request at a time, for T_prefill(uncached length);
  * a PrfaaS state streams over the shared cross-datacenter link while it is produced
    (`FluidLink`); a PD-P state crosses RDMA at the node's bandwidth;
  * a decode node runs up to BS_max requests at once, each taking L_out * T_decode (the SLO
    step time, as in Eq. 5); a landed state waits FIFO for a slot, TTFT ends at its first token;
  * optional prefix caching: trace requests carry block keys, a per-cluster LRU of blocks feeds
    the global KV index, and the router sees each cluster's and node's usable prefix.
No request is ever dropped: each completes or is rejected by the router with a reason.

Speed: arrivals are read from arrays in order, only ~3 heap events per request, node objects
are the router's snapshot views (no copies), so ~100k requests take seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math

import numpy as np

from jaxprfaas.scheduler import router as rt
from jaxprfaas.scheduler import throughput_model as tm
from jaxprfaas.scheduler.controller import Controller, ControllerConfig, Observation
from jaxprfaas.scheduler.fluid_link import FluidLink
from jaxprfaas.scheduler.kv_index import KVIndex
from jaxprfaas.scheduler.workload import Workload

_PF_END, _LAND, _DONE, _TICK, _LONG = 0, 1, 2, 3, 4


class Node:
    """One instance; a PD node switches between the prefill and decode roles."""

    __slots__ = ("node", "cluster", "role", "busy_until", "accepting", "bs_max", "active",
                 "waiting", "queue", "convert_to")

    def __init__(self, node: int, cluster: str, role: str, bs_max: int = 0):
        self.node, self.cluster, self.role = node, cluster, role
        self.busy_until = 0.0
        self.accepting = True
        self.bs_max = bs_max
        self.active = 0
        self.waiting = 0
        self.queue: collections.deque = collections.deque()
        self.convert_to: str | None = None


@dataclasses.dataclass
class SimConfig:
    system: tm.System
    threshold: float                 # -inf: everything to PrfaaS; +inf or no PrfaaS: all local
    n_p: int
    policy: rt.Policy | None = None  # threshold is taken from `threshold`
    link_latency: float = 0.0
    controller: ControllerConfig | None = None
    block_size: int = 512
    cache_blocks_per_node: int = 0   # prefix-cache capacity (0: no prefix caching)
    meter_dt: float = 1.0            # link meter bucket, seconds
    util_window: float = 5.0         # the router's utilisation signal averages this long

    @property
    def n_d(self) -> int:
        return self.system.n_pd - self.n_p


@dataclasses.dataclass
class SimResult:
    arrival: np.ndarray
    ttft: np.ndarray        # NaN unless completed
    finish: np.ndarray      # NaN unless completed
    land: np.ndarray        # when the state reached the decode node
    cluster: np.ndarray     # 1 PrfaaS, 0 PD-P, -1 rejected
    uncached: np.ndarray
    reasons: collections.Counter
    link_util: list         # per meter bucket
    meter_dt: float
    t_decode: float
    threshold_log: list     # (time, threshold)
    split_log: list         # (time, n_p, n_d)
    queue_log: list         # (time, prfaas queue s/node, pd-p queue s/node, decode waiting)
    controller_log: list

    @property
    def completed(self) -> int:
        return int(np.isfinite(self.finish).sum())

    @property
    def rejected(self) -> int:
        return int((self.cluster < 0).sum())

    @property
    def lost(self) -> int:
        return int(self.arrival.size - self.completed - self.rejected)

    def sustained_throughput(self, lo_frac: float = 0.25) -> float:
        """The largest arrival rate the observed stages sustain with this traffic mix:
        min over stages of (stage deliveries per second / share of traffic it carries), over
        the arrival window after a warm-up. Equals the arrival rate when nothing saturates."""
        t_end = float(self.arrival[-1])
        a, b = lo_frac * t_end, t_end
        w = b - a
        ok = self.cluster >= 0
        terms = []
        for c in (0, 1):
            share = float(np.mean(self.cluster[ok] == c)) if ok.any() else 0.0
            if share > 0:
                n = np.sum((self.cluster == c) & (self.land >= a) & (self.land < b))
                terms.append(n / w / share)
        terms.append(np.sum((self.finish >= a) & (self.finish < b)) / w)
        return float(min(terms))

    def summary(self) -> dict:
        done = np.isfinite(self.finish)
        tt = self.ttft[done]
        span = float(np.nanmax(self.finish) - self.arrival[0]) if done.any() else float("nan")
        pct = (lambda q: float(np.percentile(tt, q))) if tt.size else (lambda q: float("nan"))
        util = np.asarray(self.link_util[: int(self.arrival[-1] / self.meter_dt) + 1])
        return {
            "completed": self.completed, "rejected": self.rejected, "lost": self.lost,
            "throughput": self.completed / span if done.any() and span > 0 else 0.0,
            "sustained": self.sustained_throughput(),
            "ttft_mean": float(tt.mean()) if tt.size else float("nan"),
            "ttft_p50": pct(50), "ttft_p90": pct(90), "ttft_p99": pct(99),
            "tpot": self.t_decode,
            "link_util_mean": float(util.mean()) if util.size else 0.0,
            "link_util_max": float(util.max()) if util.size else 0.0,
            "prfaas_share": float(np.mean(self.cluster[self.cluster >= 0] == 1)) if (self.cluster >= 0).any() else 0.0,
            # queue depths sampled every controller period: seconds of prefill work per node,
            # and states waiting for a decode slot
            "prfaas_queue_s_max": max((q[1] for q in self.queue_log), default=0.0),
            "pd_p_queue_s_max": max((q[2] for q in self.queue_log), default=0.0),
            "decode_waiting_max": max((q[3] for q in self.queue_log), default=0),
            "reject_reasons": dict(self.reasons),
        }


def simulate(cfg: SimConfig, wl: Workload) -> SimResult:
    sysm = cfg.system
    n_req = len(wl)
    pd_prof, pf_prof = sysm.pd, sysm.prfaas
    dec = pd_prof.decode
    t_dec = dec.t_decode
    rdma = pd_prof.rdma_gbps * 1e9 / 8
    policy = dataclasses.replace(cfg.policy or rt.Policy(threshold=cfg.threshold), threshold=cfg.threshold)

    pd_nodes = [Node(i, rt.PD, "P" if i < cfg.n_p else "D", dec.bs_max) for i in range(sysm.n_pd)]
    pf_nodes = [Node(i, rt.PRFAAS, "P") for i in range(sysm.n_prfaas if pf_prof else 0)]
    link = FluidLink(sysm.b_out, cfg.link_latency, cfg.meter_dt) if pf_prof and sysm.b_out else None
    back = FluidLink(sysm.b_out, cfg.link_latency, cfg.meter_dt) if link else None  # PD -> PrfaaS
    snap = rt.Snapshot(now=0.0, pd_profile=pd_prof, pd_prefill=[], decode=[],
                       prfaas_profile=pf_prof, prfaas_prefill=pf_nodes,
                       link=rt.LinkView(sysm.b_out, cfg.link_latency) if link else None)

    def regroup():
        snap.pd_prefill = [n for n in pd_nodes if n.role == "P"]
        snap.decode = [n for n in pd_nodes if n.role == "D"]
    regroup()

    # prefix caching
    index = KVIndex(cfg.block_size) if cfg.cache_blocks_per_node and wl.keys is not None else None
    lru = {rt.PD: collections.OrderedDict(), rt.PRFAAS: collections.OrderedDict()}
    cap = {rt.PD: cfg.cache_blocks_per_node * sysm.n_pd, rt.PRFAAS: cfg.cache_blocks_per_node * len(pf_nodes)}

    def publish(cluster: str, node: int, keys, state_every: int):
        index.add(cluster, node, keys, state_every)
        od = lru[cluster]
        for k in keys:
            od[(k, node)] = None
            od.move_to_end((k, node))
        while len(od) > cap[cluster]:
            (k, nd), _ = od.popitem(last=False)
            index.evict(cluster, nd, [k])

    arrival = wl.arrival
    ttft = np.full(n_req, np.nan)
    finish = np.full(n_req, np.nan)
    land = np.full(n_req, np.nan)
    cluster_of = np.full(n_req, -1, dtype=np.int8)
    uncached = np.zeros(n_req, dtype=np.int64)
    ship_of = np.zeros(n_req)
    dnode: list[Node | None] = [None] * n_req
    reasons: collections.Counter = collections.Counter()
    heap: list = []
    seq = 0

    # controller state
    ctl_cfg = cfg.controller
    period = ctl_cfg.short_period_s if ctl_cfg else 10.0
    ctl = Controller(ctl_cfg, sysm, cfg.threshold, cfg.n_p) if ctl_cfg and ctl_cfg.enabled else None
    win = (ctl_cfg or ControllerConfig()).window
    rate_window = (ctl_cfg or ControllerConfig()).rate_window_s
    recent_unc: collections.deque = collections.deque(maxlen=win)
    recent_out: collections.deque = collections.deque(maxlen=win)
    threshold_log = [(0.0, policy.threshold)]
    split_log = [(0.0, cfg.n_p, cfg.n_d)]
    queue_log: list = []
    heapq.heappush(heap, (period, seq, _TICK, -1)); seq += 1
    if ctl is not None:
        heapq.heappush(heap, (ctl_cfg.long_period_s, seq, _LONG, -1)); seq += 1
    outstanding = 0  # requests accepted but not finished
    egress_pending = 0.0  # PrfaaS state bytes committed to the link and not yet landed

    def start_decode(i: int, d: Node, now: float):
        nonlocal seq
        d.active += 1
        d.waiting -= 1
        ttft[i] = now + t_dec - arrival[i]
        heapq.heappush(heap, (now + wl.output_len[i] * t_dec, seq, _DONE, i)); seq += 1

    def queue_seconds(nodes, now):
        return sum(max(n.busy_until - now, 0.0) for n in nodes) / len(nodes) if nodes else 0.0

    def recent_rate(now: float) -> float:
        w = max(period, rate_window)
        k1 = np.searchsorted(arrival, now, side="right")
        k0 = np.searchsorted(arrival, now - w, side="right")
        return (k1 - k0) / min(w, now) if now > 0 else 0.0

    def planned_n_p() -> int:
        """PD-P nodes once the pending conversions finish."""
        return sum(1 for n in pd_nodes if (n.role == "P") != (n.convert_to is not None))

    def drain_conversions(now: float):
        changed = False
        for n in pd_nodes:
            if n.convert_to == "D" and n.busy_until <= now:
                n.role, n.convert_to, n.accepting = "D", None, True
                changed = True
            elif n.convert_to == "P" and n.active == 0 and n.waiting == 0 and not n.queue:
                n.role, n.convert_to, n.accepting = "P", None, True
                n.busy_until = now
                changed = True
        if changed:
            regroup()
            split_log.append((now, len(snap.pd_prefill), len(snap.decode)))

    i = 0
    hits_empty: dict = {}
    while True:
        t_next = arrival[i] if i < n_req else math.inf
        if heap and heap[0][0] <= t_next:
            now, _, kind, r = heapq.heappop(heap)
            if kind >= _TICK and i >= n_req and not outstanding:
                continue  # nothing left to observe
            if kind == _PF_END:
                t_land = link.completion(now)
                land[r] = t_land
                heapq.heappush(heap, (t_land, seq, _LAND, r)); seq += 1
                if index is not None and wl.keys[r]:
                    publish(rt.PRFAAS, -1, wl.keys[r], 1)
            elif kind == _LAND:
                d = dnode[r]
                if cluster_of[r] == 1:
                    egress_pending -= ship_of[r]
                if d.active < d.bs_max and not d.queue:
                    start_decode(r, d, now)
                else:
                    d.queue.append(r)
                if index is not None and wl.keys[r]:
                    # the decode node now holds the whole prefix (its state only at the end)
                    publish(rt.PD, d.node, wl.keys[r], 1 if cluster_of[r] == 0 else 0)
            elif kind == _DONE:
                d = dnode[r]
                d.active -= 1
                finish[r] = now
                outstanding -= 1
                while d.queue and d.active < d.bs_max:
                    start_decode(d.queue.popleft(), d, now)
            elif kind == _TICK:
                prf_q = queue_seconds(pf_nodes, now)
                pdp_q = queue_seconds(snap.pd_prefill, now)
                queue_log.append((now, prf_q, pdp_q, sum(len(d.queue) for d in snap.decode)))
                if ctl is not None:
                    n_p_eff = planned_n_p()
                    obs = Observation(
                        now=now, threshold=policy.threshold, n_p=n_p_eff, n_d=sysm.n_pd - n_p_eff,
                        recent_uncached=np.fromiter(recent_unc, float, len(recent_unc)),
                        recent_output=np.fromiter(recent_out, float, len(recent_out)),
                        arrival_rate=recent_rate(now),
                        link_util=link.utilization(now, period) if link else 0.0,
                        link_backlog_s=egress_pending / link.bandwidth if link else 0.0,
                        prfaas_queue_s=prf_q, pd_p_queue_s=pdp_q)
                    t_new = ctl.short_tick(obs)
                    if t_new is not None:
                        policy = dataclasses.replace(policy, threshold=t_new)
                        threshold_log.append((now, t_new))
                    drain_conversions(now)
                if i < n_req or outstanding:
                    heapq.heappush(heap, (now + period, seq, _TICK, -1)); seq += 1
            elif kind == _LONG:
                n_p_eff = planned_n_p()
                obs = Observation(
                    now=now, threshold=policy.threshold, n_p=n_p_eff, n_d=sysm.n_pd - n_p_eff,
                    recent_uncached=np.fromiter(recent_unc, float, len(recent_unc)),
                    recent_output=np.fromiter(recent_out, float, len(recent_out)),
                    arrival_rate=0.0, link_util=0.0, link_backlog_s=0.0, prfaas_queue_s=0.0,
                    pd_p_queue_s=0.0)
                target = ctl.long_tick(obs)
                if target is not None and target != n_p_eff:
                    if target > n_p_eff:   # decode -> prefill: the least loaded decode node
                        cands = [n for n in pd_nodes if n.role == "D" and n.convert_to is None]
                        pick = min(cands, key=lambda n: n.active + n.waiting) if len(cands) > 1 else None
                        if pick is not None:
                            pick.convert_to, pick.accepting = "P", False
                    else:
                        cands = [n for n in pd_nodes if n.role == "P" and n.convert_to is None]
                        pick = min(cands, key=lambda n: n.busy_until) if len(cands) > 1 or pf_nodes else None
                        if pick is not None:
                            pick.convert_to, pick.accepting = "D", False
                    drain_conversions(now)
                if i < n_req or outstanding:
                    heapq.heappush(heap, (now + ctl_cfg.long_period_s, seq, _LONG, -1)); seq += 1
            continue
        if i >= n_req:
            break

        # ---- an arrival --------------------------------------------------------------------
        now = t_next
        r = i
        i += 1
        snap.now = now
        if link is not None:
            snap.link.utilization = link.utilization(now, cfg.util_window)
            snap.link.backlog_bytes = link.q
        hits = hits_empty
        if index is not None and wl.keys[r]:
            hits = {}
            for (cl, nd), m in index.longest_match(wl.keys[r]).items():
                hits.setdefault(cl, {})[nd] = min(m.tokens, int(wl.input_len[r]))
            if rt.PRFAAS in hits:  # the PrfaaS pool is one shared store (node -1)
                best = max(hits[rt.PRFAAS].values())
                hits[rt.PRFAAS] = {n.node: best for n in pf_nodes}
        req = rt.Request(r, int(wl.input_len[r]), int(wl.output_len[r]), hits)
        dcs = rt.route(policy, snap, req)
        if not dcs.accepted:
            reasons[dcs.reason.split(":")[0].split(" ")[0]] += 1
            continue
        outstanding += 1
        on_prfaas = dcs.cluster == rt.PRFAAS
        cluster_of[r] = 1 if on_prfaas else 0
        uncached[r] = dcs.uncached
        if hits:  # the length the routing rule compares with t
            l_pd = max(hits.get(rt.PD, {}).values(), default=0)
            l_pf = max(hits.get(rt.PRFAAS, {}).values(), default=0) if policy.cross_cluster_cache else 0
            recent_unc.append(int(wl.input_len[r]) - max(l_pd, l_pf))
        else:
            recent_unc.append(int(wl.input_len[r]))
        recent_out.append(int(wl.output_len[r]))
        node = (pf_nodes if on_prfaas else pd_nodes)[dcs.node]
        d = pd_nodes[dcs.decode_node]
        d.waiting += 1
        dnode[r] = d
        ready = now
        if dcs.cache_transfer_bytes:
            ready = (link if dcs.cache_transfer_from == rt.PRFAAS else back).push(now, dcs.cache_transfer_bytes)
        elif dcs.peer_pull_bytes:
            ready = now + dcs.peer_pull_bytes / rdma
        start = max(ready, node.busy_until)
        t_pf = (pf_prof if on_prfaas else pd_prof).prefill.at(max(dcs.uncached, 1))
        end = start + t_pf
        node.busy_until = end
        if on_prfaas:
            link.add_producer(start, end, dcs.ship_bytes)
            egress_pending += dcs.ship_bytes
            ship_of[r] = dcs.ship_bytes
            heapq.heappush(heap, (end, seq, _PF_END, r)); seq += 1
        else:
            t_land = end + dcs.ship_bytes / rdma
            land[r] = t_land
            heapq.heappush(heap, (t_land, seq, _LAND, r)); seq += 1

    return SimResult(arrival=arrival, ttft=ttft, finish=finish, land=land, cluster=cluster_of,
                     uncached=uncached, reasons=reasons,
                     link_util=link.utilization_series() if link else [], meter_dt=cfg.meter_dt,
                     t_decode=t_dec, threshold_log=threshold_log, split_log=split_log,
                     queue_log=queue_log, controller_log=ctl.log if ctl else [])


def config_for(kind: str, system: tm.System, point: tm.OperatingPoint, **kw) -> SimConfig:
    """A SimConfig at a planned operating point, for a deployment kind of the case study."""
    if kind == "naive_heterogeneous":
        pol = kw.pop("policy", None) or rt.Policy(threshold=-math.inf)
        return SimConfig(system, -math.inf, 0, policy=dataclasses.replace(pol, load_balance=False), **kw)
    if kind == "homogeneous_pd":
        local = dataclasses.replace(system, prfaas=None, n_prfaas=0, b_out=0.0)
        return SimConfig(local, math.inf, point.n_p, **kw)
    return SimConfig(system, point.threshold, point.n_p, **kw)

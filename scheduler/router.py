"""Per-request placement: a pure function (policy, cluster snapshot, request) -> decision.

The rules are the paper's (reference/prfaas.md §2):
  * base rule: uncached length l > t -> PrfaaS pod, else local PD-P;
  * bandwidth scarce (link utilisation >= `scarce_utilization`): each cluster's cache is judged
    on its own: l_total - l_pd <= t -> PD-P, else PrfaaS with PrfaaS's own prefix;
  * bandwidth abundant: l_prefix = max(l_prfaas, l_pd); l_total - l_prefix <= t -> PD-P, else
    PrfaaS; when the longer prefix lives in the other cluster it is moved across (a
    cross-cluster cache transfer);
and Mooncake's Algorithm 1 inside the chosen cluster: the node minimising estimated
TTFT = queue + transfer + prefill, where a node may pull a longer prefix from a peer over RDMA
when the peer's is `balancing_ratio` times longer. The decode node is the least loaded; early
rejection fires when the estimated TTFT (prefill side plus decode-slot wait) exceeds the SLO.

Pure: it reads the snapshot, never mutates it, and keeps no state (round-robin for the naive
deployment uses the request id), so the simulator and the live frontend share it and a test can
drive it with hand-built snapshots. The snapshot's node objects are duck-typed: the simulator
passes its live node objects, which carry the same attributes as the views below.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Mapping, Sequence

from jaxprfaas.scheduler.profiles import Profile

PRFAAS, PD = "prfaas", "pd"
_BUSY = operator.attrgetter("busy_until")


@dataclasses.dataclass(frozen=True)
class Policy:
    threshold: float                    # t: uncached length above which prefill goes to PrfaaS
    scarce_utilization: float = 0.7     # link utilisation at/above which bandwidth is scarce
    cross_cluster_cache: bool = True    # move the longer prefix across clusters when abundant
    balancing_ratio: float = 1.5        # pull a peer's prefix when best/own exceeds this (inf: never)
    ttft_slo_s: float | None = None     # early rejection above this estimated TTFT (None: off)
    max_input_len: int | None = None    # reject longer prompts outright
    load_balance: bool = True           # False: round-robin nodes (the naive baseline)


@dataclasses.dataclass
class PrefillView:
    node: int
    busy_until: float = 0.0             # absolute time its queued prefill work drains
    accepting: bool = True              # False while draining for a role change


@dataclasses.dataclass
class DecodeView:
    node: int
    bs_max: int
    active: int = 0                     # requests decoding now
    waiting: int = 0                    # requests assigned, waiting for a slot or their KV
    accepting: bool = True


@dataclasses.dataclass
class LinkView:
    bandwidth: float                    # bytes/s
    latency: float = 0.0                # seconds, one way
    utilization: float = 0.0            # recent fraction of bandwidth in use (the scheduler's meter)
    backlog_bytes: float = 0.0          # bytes queued or in flight


@dataclasses.dataclass
class Snapshot:
    now: float
    pd_profile: Profile
    pd_prefill: Sequence                # PrefillView-like
    decode: Sequence                    # DecodeView-like
    prfaas_profile: Profile | None = None
    prfaas_prefill: Sequence = ()
    link: LinkView | None = None        # PrfaaS -> PD direction (egress)


@dataclasses.dataclass(frozen=True)
class Request:
    id: int
    input_len: int
    output_len: int = 1024
    # usable prefix tokens per cluster and node, from the KV index: {"pd": {node: tokens}, ...}
    hits: Mapping[str, Mapping[int, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str                         # the rule that placed it, or why it was rejected
    cluster: str | None = None          # "prfaas" | "pd"
    node: int | None = None             # prefill node
    decode_node: int | None = None
    regime: str = "local"               # "scarce" | "abundant" | "local" (no PrfaaS cluster)
    prefix: int = 0                     # prefix tokens reused by the chosen node
    uncached: int = 0                   # tokens the chosen node prefills
    cache_transfer_bytes: float = 0.0   # cross-cluster prefix move (to the computing cluster)
    cache_transfer_from: str | None = None
    peer_pull_bytes: float = 0.0        # intra-cluster prefix pull over RDMA
    ship_bytes: float = 0.0             # state shipped to the decode node after prefill
    est_ttft: float = 0.0


def _best(hits: Mapping[int, int] | None) -> int:
    return max(hits.values(), default=0) if hits else 0


def route(policy: Policy, snap: Snapshot, req: Request) -> Decision:
    l_total = int(req.input_len)
    if policy.max_input_len is not None and l_total > policy.max_input_len:
        return Decision(False, f"too_long: {l_total} > {policy.max_input_len} tokens")
    hits_pd, hits_pf = req.hits.get(PD, {}), req.hits.get(PRFAAS, {})
    l_pd, l_pf = _best(hits_pd), _best(hits_pf)
    has_prfaas = snap.prfaas_profile is not None and any(n.accepting for n in snap.prfaas_prefill)
    has_local = any(n.accepting for n in snap.pd_prefill)
    kv = snap.pd_profile.kv
    xfer_bytes, xfer_from = 0.0, None

    # ---- which cluster prefills (reference §2.1, §2.3) ----------------------------------
    if not has_prfaas:
        regime, cluster, prefix, reason = "local", PD, l_pd, "local: no PrfaaS cluster"
    else:
        util = snap.link.utilization if snap.link else 0.0
        regime = "scarce" if util >= policy.scarce_utilization else "abundant"
        if regime == "scarce" or not policy.cross_cluster_cache:
            if l_total - l_pd <= policy.threshold and has_local:
                cluster, prefix, reason = PD, l_pd, f"{regime}: l_total - l_pd = {l_total - l_pd} <= t"
            else:
                cluster, prefix, reason = PRFAAS, l_pf, f"{regime}: l_total - l_pd = {l_total - l_pd} > t"
        else:
            l_prefix = max(l_pf, l_pd)
            holder = PRFAAS if l_pf > l_pd else PD
            if l_total - l_prefix <= policy.threshold and has_local:
                cluster, reason = PD, f"abundant: l_total - l_prefix = {l_total - l_prefix} <= t"
            else:
                cluster, reason = PRFAAS, f"abundant: l_total - l_prefix = {l_total - l_prefix} > t"
            prefix = l_prefix
            own = l_pd if cluster == PD else l_pf
            if holder != cluster and l_prefix > own:
                xfer_bytes, xfer_from = kv.at(l_prefix) - kv.at(own) + kv.fixed, holder
                reason += f"; move {l_prefix}-token prefix {holder}->{cluster}"
    if not has_local and cluster == PD:
        return Decision(False, "no_prefill_capacity: no accepting PD-P node", regime=regime)

    # ---- which node (Mooncake Algorithm 1) -------------------------------------------------
    profile = snap.prfaas_profile if cluster == PRFAAS else snap.pd_profile
    nodes = [n for n in (snap.prfaas_prefill if cluster == PRFAAS else snap.pd_prefill) if n.accepting]
    node_hits = hits_pf if cluster == PRFAAS else hits_pd
    rdma = profile.rdma_gbps * 1e9 / 8
    link = snap.link
    xfer_s = 0.0
    if xfer_bytes:
        # The other direction of the cross-cluster link; we meter only the egress one.
        xfer_s = xfer_bytes / link.bandwidth + link.latency if link else 0.0
    # what the decode node must receive: everything past the PD cluster's own prefix
    ship = kv.at(l_total) - kv.at(l_pd) + kv.fixed if l_pd > 0 else kv.at(l_total)

    def estimate(n):
        own = node_hits.get(n.node, 0)
        if xfer_from is not None:
            use, pull = prefix, 0.0
        elif prefix > own and (prefix / own if own else math.inf) > policy.balancing_ratio:
            use, pull = prefix, kv.at(prefix) - kv.at(own) + kv.fixed
        else:
            use, pull = own, 0.0
        start = max(snap.now, n.busy_until) - snap.now + max(xfer_s, pull / rdma)
        done = start + profile.prefill.at(max(l_total - use, 1))
        if cluster == PRFAAS and link is not None:
            # layer-wise pipelining: shipping overlaps the prefill, so the later of the two
            done = max(done, (link.backlog_bytes + ship) / link.bandwidth) + link.latency
        else:
            done += ship / rdma
        return done, use, pull

    if policy.load_balance:
        # Nodes without a prefix of their own differ only in queue length, so only the least
        # busy of them needs an estimate (keeps a request O(nodes) in C, not in Python).
        cands = [n for n in nodes if n.node in node_hits] if node_hits else []
        cands.append(min(nodes, key=_BUSY))
        scored = [(estimate(n), n) for n in cands]
        (ttft, use, pull), chosen = min(scored, key=lambda s: (s[0][0], s[1].busy_until, s[1].node))
    else:
        chosen = nodes[req.id % len(nodes)]
        ttft, use, pull = estimate(chosen)

    # ---- decode node: least loaded, then early rejection -------------------------------
    dec = [d for d in snap.decode if d.accepting]
    if not dec:
        return Decision(False, "no_decode_capacity: no accepting PD-D node", regime=regime)
    if policy.load_balance:
        d = min(dec, key=lambda d: ((d.active + d.waiting) / d.bs_max, d.node))
    else:
        d = dec[req.id % len(dec)]
    dc = snap.pd_profile.decode
    t_dec = dc.t_decode if dc else 0.0
    excess = d.active + d.waiting + 1 - d.bs_max
    if excess > 0 and dc:
        # slots free at bs_max / (L_out * T_decode) per second on that node
        wait = excess * req.output_len * t_dec / d.bs_max
        ttft = max(ttft, wait)
    ttft += t_dec
    if policy.ttft_slo_s is not None and ttft > policy.ttft_slo_s:
        side = "decode" if excess > 0 and ttft - t_dec <= excess * req.output_len * t_dec / d.bs_max + 1e-9 \
            else "prefill"
        return Decision(False, f"ttft_slo ({side}): estimated {ttft:.2f} s > {policy.ttft_slo_s:g} s",
                        cluster=cluster, regime=regime, est_ttft=ttft)
    return Decision(True, reason, cluster=cluster, node=chosen.node, decode_node=d.node,
                    regime=regime, prefix=use, uncached=max(l_total - use, 0),
                    cache_transfer_bytes=xfer_bytes, cache_transfer_from=xfer_from,
                    peer_pull_bytes=pull, ship_bytes=ship, est_ttft=ttft)

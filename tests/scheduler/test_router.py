"""Router rules on hand-built snapshots: each rule, both bandwidth regimes, rejection."""

import pytest

from jaxprfaas.scheduler import profiles as pr
from jaxprfaas.scheduler import router as rt

KV = pr.KvSize.linear(1e6, 1e3)  # 1 MB fixed + 1 KB/token
PF = pr.Profile("pf", 8, pr.PrefillCurve.power_law(1e-4, 1.0), KV, rdma_gbps=800)      # 0.1 ms/token
PD = pr.Profile("pd", 8, pr.PrefillCurve.power_law(3e-4, 1.0), KV, pr.DecodeCapacity(4, 0.025), 800)
T = 10_000


def snap(util=0.0, pf_busy=(0.0, 0.0), pd_busy=(0.0, 0.0), decode=((0, 0), (0, 0)), now=0.0,
         backlog=0.0, prfaas=True):
    return rt.Snapshot(
        now=now, pd_profile=PD,
        pd_prefill=[rt.PrefillView(i, b) for i, b in enumerate(pd_busy)],
        decode=[rt.DecodeView(10 + i, 4, a, w) for i, (a, w) in enumerate(decode)],
        prfaas_profile=PF if prfaas else None,
        prfaas_prefill=[rt.PrefillView(i, b) for i, b in enumerate(pf_busy)] if prfaas else [],
        link=rt.LinkView(1e9, 0.01, util, backlog) if prfaas else None)


def test_base_rule_uncached_length_against_threshold():
    pol = rt.Policy(threshold=T)
    short = rt.route(pol, snap(), rt.Request(1, T))
    long = rt.route(pol, snap(), rt.Request(2, T + 1))
    assert short.accepted and short.cluster == rt.PD and short.uncached == T
    assert long.accepted and long.cluster == rt.PRFAAS and long.uncached == T + 1
    assert long.ship_bytes == pytest.approx(KV(T + 1))  # nothing cached: the whole state ships


def test_prefix_in_pd_makes_a_long_prompt_local():
    # 25K total, 20K cached in PD: uncached 5K <= t -> PD-P, in both regimes
    req = rt.Request(1, 25_000, hits={rt.PD: {1: 20_000}})
    for util in (0.0, 0.9):
        d = rt.route(rt.Policy(threshold=T), snap(util=util), req)
        assert d.cluster == rt.PD and d.prefix == 20_000 and d.uncached == 5_000
        assert d.regime == ("abundant" if util < 0.7 else "scarce")


def test_scarce_judges_each_cluster_on_its_own():
    # 25K total, 20K cached only in PrfaaS. Scarce: l_total - l_pd = 25K > t -> PrfaaS, which
    # uses its own prefix; nothing crosses clusters but the new state.
    req = rt.Request(1, 25_000, hits={rt.PRFAAS: {0: 20_000, 1: 20_000}})
    d = rt.route(rt.Policy(threshold=T), snap(util=0.8), req)
    assert d.regime == "scarce" and d.cluster == rt.PRFAAS
    assert d.prefix == 20_000 and d.uncached == 5_000 and d.cache_transfer_bytes == 0
    # 8K total, 6K cached in PrfaaS only: scarce ignores it -> 8K <= t -> PD-P, no cache move
    d = rt.route(rt.Policy(threshold=T), snap(util=0.8), rt.Request(2, 8_000, hits={rt.PRFAAS: {0: 6_000}}))
    assert d.cluster == rt.PD and d.prefix == 0 and d.cache_transfer_bytes == 0


def test_abundant_uses_the_longer_prefix_and_moves_it():
    # 25K total, 20K cached in PrfaaS, 2K in PD: abundant -> l_prefix = 20K, 5K <= t -> PD-P,
    # and the 20K prefix is moved PrfaaS -> PD (fixed state + tokens 2K..20K)
    req = rt.Request(1, 25_000, hits={rt.PRFAAS: {0: 20_000}, rt.PD: {0: 2_000}})
    d = rt.route(rt.Policy(threshold=T), snap(util=0.1), req)
    assert d.regime == "abundant" and d.cluster == rt.PD
    assert d.prefix == 20_000 and d.uncached == 5_000
    assert d.cache_transfer_from == rt.PRFAAS
    assert d.cache_transfer_bytes == pytest.approx(KV.delta(2_000, 20_000))
    # the same request with cross-cluster moves disabled keeps to each cluster's own cache
    d = rt.route(rt.Policy(threshold=T, cross_cluster_cache=False), snap(util=0.1), req)
    assert d.cluster == rt.PRFAAS and d.prefix == 20_000 and d.cache_transfer_bytes == 0
    # ... and ships the state past PD's 2K prefix
    assert d.ship_bytes == pytest.approx(KV.delta(2_000, 25_000))


def test_abundant_long_uncached_goes_to_prfaas_with_pd_prefix_moved():
    req = rt.Request(1, 50_000, hits={rt.PD: {1: 20_000}})
    d = rt.route(rt.Policy(threshold=T), snap(util=0.1), req)
    assert d.cluster == rt.PRFAAS and d.prefix == 20_000 and d.uncached == 30_000
    assert d.cache_transfer_from == rt.PD and d.cache_transfer_bytes == pytest.approx(KV.delta(0, 20_000))


def test_node_choice_minimises_estimated_ttft():
    # PD-P node 0 is busy for 5 s, node 1 is idle -> node 1
    d = rt.route(rt.Policy(threshold=T), snap(pd_busy=(5.0, 0.0)), rt.Request(1, 5_000))
    assert d.node == 1
    # node 0 holds a 4.5K prefix (saves 1.35 s of a 1.5 s prefill) but is busy 1 s: still wins
    req = rt.Request(2, 5_000, hits={rt.PD: {0: 4_500}})
    d = rt.route(rt.Policy(threshold=T, balancing_ratio=float("inf")), snap(pd_busy=(1.0, 0.0)), req)
    assert d.node == 0 and d.prefix == 4_500
    # with balancing on, idle node 1 pulls node 0's prefix over RDMA instead (Algorithm 1)
    d = rt.route(rt.Policy(threshold=T), snap(pd_busy=(1.0, 0.0)), req)
    assert d.node == 1 and d.prefix == 4_500 and d.peer_pull_bytes == pytest.approx(KV.delta(0, 4_500))


def test_decode_node_is_least_loaded():
    d = rt.route(rt.Policy(threshold=T), snap(decode=((4, 2), (1, 0))), rt.Request(1, 100))
    assert d.decode_node == 11


def test_early_rejection_prefill_and_decode_side():
    pol = rt.Policy(threshold=T, ttft_slo_s=5.0)
    # PrfaaS nodes backed up 10 s -> estimated TTFT > 5 s
    d = rt.route(pol, snap(pf_busy=(10.0, 10.0)), rt.Request(1, 20_000))
    assert not d.accepted and d.reason.startswith("ttft_slo (prefill)")
    # decode full: 4 active + 8 waiting on 4 slots, 1024 tokens * 25 ms per turn
    d = rt.route(pol, snap(decode=((4, 8), (4, 8))), rt.Request(2, 100, 1024))
    assert not d.accepted and d.reason.startswith("ttft_slo (decode)")
    # without an SLO the same requests are accepted
    assert rt.route(rt.Policy(threshold=T), snap(pf_busy=(10.0, 10.0)), rt.Request(1, 20_000)).accepted
    d = rt.route(rt.Policy(threshold=T, max_input_len=1000), snap(), rt.Request(3, 2000))
    assert not d.accepted and d.reason.startswith("too_long")


def test_no_prfaas_cluster_and_naive_round_robin():
    d = rt.route(rt.Policy(threshold=T), snap(prfaas=False), rt.Request(1, 90_000))
    assert d.cluster == rt.PD and d.regime == "local"
    naive = rt.Policy(threshold=float("-inf"), load_balance=False)
    s = snap(pd_busy=())
    picks = [rt.route(naive, s, rt.Request(i, 100)) for i in range(4)]
    assert all(p.cluster == rt.PRFAAS for p in picks)
    assert [p.node for p in picks] == [0, 1, 0, 1] and [p.decode_node for p in picks] == [10, 11, 10, 11]


def test_route_is_pure():
    s = snap(util=0.5, pf_busy=(1.0, 2.0))
    before = repr(s)
    a = rt.route(rt.Policy(threshold=T), s, rt.Request(1, 30_000))
    assert repr(s) == before and rt.route(rt.Policy(threshold=T), s, rt.Request(1, 30_000)) == a

"""The simulator against the analytic model, single-request timings, and no request lost."""

import dataclasses
import json

import numpy as np
import pytest

from jaxprfaas.scheduler import router as rt
from jaxprfaas.scheduler import simulator, throughput_model as tm, workload
from jaxprfaas.scheduler.controller import ControllerConfig
from jaxprfaas.scheduler.distributions import Empirical


@pytest.mark.parametrize("name", ["prfaas_pd", "homogeneous_pd", "naive_heterogeneous"])
def test_saturation_throughput_matches_analytic_lambda_max(paper, name):
    """Steady (uniform) arrivals above capacity: the rate the stages sustain equals Lambda_max
    of the model evaluated on the same lengths with E[T(L)] (mode "exact") within 3%, and the
    paper's T(E[L]) model within 6% (the gap is Jensen's inequality on T; see README)."""
    from jaxprfaas.scheduler import casestudy
    dep = paper.deployments[name]
    point = casestudy.plan(dep, paper.lengths)
    cfg = simulator.config_for(dep.kind, dep.system, point, link_latency=paper.link_latency)
    wl = workload.synthetic(6000, 1.3 * point.lambda_max, paper.lengths, paper.l_out, "uniform", seed=11)
    res = simulator.simulate(cfg, wl)
    assert res.lost == 0 and res.rejected == 0
    emp = Empirical(wl.input_len)
    t = {"prfaas_pd": point.threshold, "homogeneous_pd": emp.hi + 1, "naive_heterogeneous": emp.lo - 1}[name]
    exact = tm.evaluate(cfg.system, emp, [t], cfg.n_p, "exact").lambda_max[0]
    sim = res.sustained_throughput()
    assert sim == pytest.approx(exact, rel=0.03)
    assert sim == pytest.approx(point.lambda_max, rel=0.06)


def test_below_capacity_everything_keeps_up(paper):
    dep = paper.deployments["prfaas_pd"]
    from jaxprfaas.scheduler import casestudy
    point = casestudy.plan(dep, paper.lengths)
    cfg = simulator.config_for(dep.kind, dep.system, point, link_latency=paper.link_latency)
    wl = workload.synthetic(4000, 0.7 * point.lambda_max, paper.lengths, paper.l_out, "uniform", seed=2)
    s = simulator.simulate(cfg, wl).summary()
    assert s["throughput"] == pytest.approx(0.7 * point.lambda_max, rel=0.03)
    assert s["prfaas_share"] == pytest.approx(point.p, abs=0.03)
    # the link carries exactly the states of the PrfaaS requests: rate * p * E[S_kv | L > t]
    assert s["link_util_mean"] < 0.2


def _tiny_system(n_pd=2, n_pf=1, b_out=1e9):
    from jaxprfaas.scheduler import profiles as pr
    kv = pr.KvSize.linear(1e6, 1e3)
    pd = pr.Profile("pd", 8, pr.PrefillCurve.power_law(1e-3, 1.0), kv, pr.DecodeCapacity(1, 0.01), rdma_gbps=8)
    pf = pr.Profile("pf", 8, pr.PrefillCurve.power_law(1e-4, 1.0), kv, rdma_gbps=8)
    return tm.System(pd=pd, n_pd=n_pd, l_out=100, prfaas=pf, n_prfaas=n_pf, b_out=b_out)


def test_single_request_timings_by_hand():
    system = _tiny_system()
    cfg = simulator.SimConfig(system, threshold=5000, n_p=1, link_latency=0.05)
    wl = workload.Workload(np.array([0.0, 100.0]), np.array([1000, 10000]), np.array([100, 100]))
    r = simulator.simulate(cfg, wl)
    # PD-P: prefill 1 s + state 2 MB over 1 GB/s RDMA (2 ms) + first decode step 10 ms
    assert r.ttft[0] == pytest.approx(1.0 + 2e6 / 1e9 + 0.01)
    # PrfaaS: prefill 1 s streams 11 MB at 11 MB/s < 1 GB/s, lands at the end + 50 ms latency
    assert r.ttft[1] == pytest.approx(1.0 + 0.05 + 0.01)
    assert r.finish[1] - r.arrival[1] == pytest.approx(1.05 + 100 * 0.01)
    assert list(r.cluster) == [0, 1]


def test_decode_slots_queue_fifo():
    system = _tiny_system(n_pd=2, n_pf=0, b_out=0.0)
    system = dataclasses.replace(system, prfaas=None)
    cfg = simulator.SimConfig(system, threshold=float("inf"), n_p=1)
    # three 100-token prompts at once: prefill 0.1 s each on one node; 1 decode slot, 1 s each
    wl = workload.Workload(np.zeros(3), np.full(3, 100), np.full(3, 100))
    r = simulator.simulate(cfg, wl)
    land = 0.1 * np.arange(1, 4) + 2 * (1e6 + 1e5) / 1e9 / 2
    starts = [land[0], land[0] + 1.0, land[0] + 2.0]
    np.testing.assert_allclose(r.ttft, np.array(starts) + 0.01, rtol=1e-9)


def _trace(tmp_path, n=600, seed=0):
    """Mooncake-style JSONL: sessions whose turns extend the previous turn's prompt."""
    rng = np.random.default_rng(seed)
    lines, sessions, nxt = [], {}, 0
    for i in range(n):
        s = int(rng.integers(0, 60))
        ids = sessions.get(s, [])
        if not ids or rng.random() < 0.2:
            ids = []
        new = int(rng.integers(1, 40))
        ids = ids + list(range(nxt, nxt + new))
        nxt += new
        sessions[s] = ids
        lines.append(json.dumps({"timestamp": int(i * 400), "input_length": len(ids) * 512 - int(rng.integers(0, 500)),
                                 "output_length": 200, "hash_ids": ids}))
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_trace_with_prefix_hits_reuses_cache_and_loses_nothing(paper, tmp_path):
    wl = workload.load_trace(_trace(tmp_path))
    dep = paper.deployments["prfaas_pd"]
    from jaxprfaas.scheduler import casestudy
    point = casestudy.plan(dep, paper.lengths)
    base = simulator.config_for(dep.kind, dep.system, point, link_latency=paper.link_latency)
    cached = dataclasses.replace(base, cache_blocks_per_node=2000)
    tuned = dataclasses.replace(cached, controller=ControllerConfig(min_window=100))
    r0, r1, r2 = (simulator.simulate(c, wl) for c in (base, cached, tuned))
    assert r0.lost == r1.lost == r2.lost == 0 and r1.completed == r2.completed == len(wl)
    assert (r0.uncached == wl.input_len).all()
    hit = r1.uncached < wl.input_len
    assert hit.mean() > 0.3                    # repeated sessions hit their prefix
    # shorter uncached lengths fall under the no-cache threshold: PD-P gets more of the work,
    s0, s1, s2 = r0.summary(), r1.summary(), r2.summary()
    assert s1["prfaas_share"] < s0["prfaas_share"] - 0.2
    # and only re-searching t on the uncached lengths (the controller) turns hits into TTFT
    assert r2.threshold_log[-1][1] < point.threshold
    assert s2["ttft_mean"] < s0["ttft_mean"] < s1["ttft_mean"]


@pytest.mark.parametrize("arrivals", ["poisson", "bursty"])
def test_no_request_lost_under_overload_with_rejection_and_controller(paper, arrivals):
    dep = paper.deployments["prfaas_pd"]
    from jaxprfaas.scheduler import casestudy
    point = casestudy.plan(dep, paper.lengths)
    cfg = simulator.config_for(dep.kind, dep.system, point, link_latency=paper.link_latency,
                               policy=rt.Policy(threshold=0, ttft_slo_s=20.0),
                               controller=ControllerConfig(long_period_s=200))
    wl = workload.synthetic(5000, 1.5 * point.lambda_max, paper.lengths, paper.l_out, arrivals, seed=4)
    r = simulator.simulate(cfg, wl)
    assert r.lost == 0
    assert r.completed + r.rejected == len(wl) and r.rejected > 0
    assert set(r.reasons) <= {"ttft_slo"}
    done = np.isfinite(r.finish)
    assert (r.cluster[done] >= 0).all() and np.isnan(r.finish[r.cluster < 0]).all()

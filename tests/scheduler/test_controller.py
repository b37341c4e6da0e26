"""The dual-timescale controller in the simulator loop: length shift, burst, role conversion."""

import dataclasses

import numpy as np
import pytest

from jaxprfaas.scheduler import simulator, throughput_model as tm, workload
from jaxprfaas.scheduler.controller import Controller, ControllerConfig, Observation
from jaxprfaas.scheduler.distributions import TruncatedLogNormal


def _obs(**kw):
    base = dict(now=100.0, threshold=19584.0, n_p=3, n_d=5, recent_uncached=np.array([]),
                recent_output=np.array([]), arrival_rate=2.0, link_util=0.1, link_backlog_s=0.0,
                prfaas_queue_s=0.0, pd_p_queue_s=0.0)
    base.update(kw)
    return Observation(**base)


def test_quiet_system_keeps_its_threshold(paper):
    system = paper.deployments["prfaas_pd"].system
    ctl = Controller(ControllerConfig(), system, 19584.0, 3)
    lens = paper.lengths.sample(2000, np.random.default_rng(0))
    assert ctl.short_tick(_obs(recent_uncached=lens, recent_output=np.full(2000, 1024.0))) is None
    assert ctl.short_tick(_obs(recent_uncached=lens[:50])) is None   # too few samples to plan on


def test_search_without_backlog_is_the_eq7_optimum(paper):
    system = paper.deployments["prfaas_pd"].system
    ctl = Controller(ControllerConfig(threshold_step=64), system, 19584.0, 3)
    lens = paper.lengths.sample(20000, np.random.default_rng(1))
    from jaxprfaas.scheduler.distributions import Empirical
    emp = Empirical(lens)
    t = ctl.search(_obs(recent_uncached=lens, recent_output=np.full(lens.size, 1024.0)), emp)
    assert t == pytest.approx(tm.best_threshold(system, emp, 3, 64).threshold, abs=64)
    # a PD-P backlog pushes work to PrfaaS (lower t); a PrfaaS backlog the other way
    lo = ctl.search(_obs(recent_uncached=lens, pd_p_queue_s=60.0), emp)
    hi = ctl.search(_obs(recent_uncached=lens, prfaas_queue_s=60.0), emp)
    assert lo < t < hi


def test_threshold_follows_a_length_shift(paper):
    """Mid-run the uncached lengths grow (mu 9.9 -> 10.4): t moves to the new Eq. (7) optimum."""
    dep = paper.deployments["prfaas_pd"]
    point = tm.plan_prfaas_pd(dep.system, paper.lengths)
    new = TruncatedLogNormal(10.4, 1.0, 128, 131072)
    target = tm.best_threshold(dep.system, new, point.n_p, step=128).threshold
    assert target > 1.3 * point.threshold
    wl = workload.synthetic(8000, 2.0, paper.lengths, paper.l_out, "poisson", seed=5,
                            shift_at=4000, shift_lengths=new)
    ctl = ControllerConfig(long_period_s=1e9)  # short-term loop only: the split stays
    r = simulator.simulate(simulator.SimConfig(dep.system, point.threshold, point.n_p,
                                               controller=ctl), wl)
    t_shift = wl.arrival[4000]
    before = [t for when, t in r.threshold_log if when < t_shift]
    assert before[-1] == pytest.approx(point.threshold, rel=0.1)
    assert r.threshold_log[-1][1] == pytest.approx(target, rel=0.1)
    assert r.split_log[-1][1:] == (point.n_p, point.n_d)
    # and the static deployment does worse on the shifted traffic
    static = simulator.simulate(simulator.SimConfig(dep.system, point.threshold, point.n_p), wl)
    assert r.summary()["ttft_p90"] < static.summary()["ttft_p90"]


def test_link_stays_below_saturation_under_a_burst(paper):
    """8 Gbps link: the planner's optimum is egress-bound (link 100% at Lambda_max). A 1.6x
    burst saturates the link without the controller; with it the 60 s utilisation stays < 0.95."""
    dep = paper.deployments["prfaas_pd"]
    system = dataclasses.replace(dep.system, b_out=8e9 / 8)
    point = tm.plan_prfaas_pd(system, paper.lengths)
    assert point.bottleneck == "prfaas-egress"
    wl = workload.synthetic(8000, 1.5, paper.lengths, paper.l_out, "bursty", seed=3,
                            burst=workload.Burst(factor=1.6, on_s=120, period_s=1200))

    def util60(ctl):
        r = simulator.simulate(simulator.SimConfig(system, point.threshold, point.n_p, link_latency=0.02,
                                                   controller=ctl), wl)
        assert r.lost == 0
        u = np.convolve(np.asarray(r.link_util), np.ones(60) / 60, mode="valid")
        return u.max(), r

    off, _ = util60(ControllerConfig(enabled=False))
    on, r = util60(ControllerConfig())
    assert off > 0.99
    assert on < 0.95
    assert any("bandwidth" in what for _, _, what in r.controller_log)


def test_long_term_loop_converts_prefill_to_decode_when_outputs_grow(paper):
    dep = paper.deployments["prfaas_pd"]
    point = tm.plan_prfaas_pd(dep.system, paper.lengths)
    # outputs double mid-run: decode (Eq. 5) becomes the bottleneck, Eq. (8) wants more N_d
    wl = workload.synthetic(6000, 2.2, paper.lengths, paper.l_out, "poisson", seed=6,
                            shift_at=2000, shift_output_len=2048)
    r = simulator.simulate(simulator.SimConfig(dep.system, point.threshold, point.n_p,
                                               controller=ControllerConfig(long_period_s=200)), wl)
    assert r.lost == 0
    n_d_final = r.split_log[-1][2]
    assert n_d_final > point.n_d
    assert all(n_p + n_d == dep.system.n_pd for _, n_p, n_d in r.split_log)
    assert any(what.startswith("N_p") for _, loop, what in r.controller_log if loop == "long")

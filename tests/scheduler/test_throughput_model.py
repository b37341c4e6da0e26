"""The paper's Eqs. (1)-(8) on hand-computed cases, and the planner's optimum."""

import math

import numpy as np
import pytest

from jaxprfaas.scheduler import profiles as pr
from jaxprfaas.scheduler import throughput_model as tm
from jaxprfaas.scheduler.distributions import Empirical, TruncatedLogNormal


def _linear_profile(sec_per_token, kv_fixed, kv_per_token, decode=None):
    # T(l) = c * l exactly (a power law with b = 1)
    return pr.Profile("test", 8, pr.PrefillCurve.power_law(sec_per_token, 1.0),
                      pr.KvSize.linear(kv_fixed, kv_per_token), decode)


def test_eq1_phi_kv_table5():
    prof = pr.Profile("h200", 8, pr.PrefillCurve((32768.0,), (1.84,)),
                      pr.KvSize((32768.0,), (701.3 * pr.MIB,)))
    assert pr.gbps(tm.phi_kv(prof, 32768)) == pytest.approx(3.197, abs=1e-3)


def test_eq2_cluster_egress_paper_examples():
    # 512 GPUs at P = 8 is 64 instances; MiniMax-M2.5 at 32K makes 59.93 Gbps each -> 3.84 Tbps
    prof = pr.Profile("x", 8, pr.PrefillCurve((1.0,), (1.0,)), pr.KvSize((1.0,), (pr.bytes_per_s(59.93),)))
    assert pr.gbps(tm.cluster_egress(512, 8, prof, 1.0)) == pytest.approx(3835.5, rel=1e-4)


def test_eq3_to_eq6_hand_case():
    # PrfaaS: 4 instances, T(l_long) = 2 s -> compute 2 req/s; S = 1 GB, B = 1.5 GB/s -> egress 1.5
    assert tm.theta_prfaas(4, 2.0, 1e9, 1.5e9) == pytest.approx(1.5)
    assert tm.theta_prfaas(4, 2.0, 1e9, 3e9) == pytest.approx(2.0)
    assert tm.theta_pd_p(3, 1.5) == pytest.approx(2.0)
    dec = pr.DecodeCapacity(bs_max=20, t_decode=0.025)
    assert tm.theta_pd_d(5, dec, 1024) == pytest.approx(5 * 20 / (0.025 * 1024))  # 3.90625
    # Lambda = min(1.5 / 0.5, 2.0 / 0.5, 3.90625) = 3.0
    assert float(tm.lambda_max(1.5, 2.0, 3.90625, 0.5)) == pytest.approx(3.0)
    assert float(tm.lambda_max(0.0, 2.0, 9.0, 0.0)) == pytest.approx(2.0)  # p = 0: PrfaaS never binds
    assert float(tm.lambda_max(2.0, 0.0, 9.0, 1.0)) == pytest.approx(2.0)  # p = 1: PD-P never binds
    assert float(tm.eq7_gap(1.5, 2.0, 0.5)) == pytest.approx(-1.0)
    assert float(tm.eq8_gap(1.5, 2.0, 3.5)) == pytest.approx(0.0)


def test_evaluate_on_two_point_distribution():
    # half the requests 1000 tokens, half 4000; t = 2000 splits them: p = 0.5
    dist = Empirical([1000, 4000])
    pf = _linear_profile(1e-3, 0.0, 1e5)              # T_h200(4000) = 4 s, S(4000) = 4e8 B
    pd = _linear_profile(2e-3, 0.0, 1e5, pr.DecodeCapacity(10, 0.1))  # T_h20(1000) = 2 s
    system = tm.System(pd=pd, n_pd=4, l_out=100, prfaas=pf, n_prfaas=2, b_out=2e8)
    c = tm.evaluate(system, dist, [2000.0], n_p=2)
    assert c.p[0] == 0.5 and c.l_long[0] == 4000 and c.l_short[0] == 1000
    assert c.theta_prfaas_compute[0] == pytest.approx(2 / 4.0)       # 0.5
    assert c.theta_prfaas_egress[0] == pytest.approx(2e8 / 4e8)      # 0.5
    assert c.theta_pd_p[0] == pytest.approx(2 / 2.0)                 # 1.0
    assert c.theta_pd_d == pytest.approx(2 * 10 / (0.1 * 100))       # 2.0
    assert c.lambda_max[0] == pytest.approx(min(0.5 / 0.5, 1.0 / 0.5, 2.0))  # 1.0


def test_exact_mode_averages_times_not_lengths():
    dist = Empirical([1000, 3000])
    pd = pr.Profile("sq", 8, pr.PrefillCurve.power_law(1e-6, 2.0), pr.KvSize.linear(0, 1),
                    pr.DecodeCapacity(100, 0.01))
    system = tm.System(pd=pd, n_pd=2, l_out=10)
    paper = tm.plan_homogeneous(system, dist, "paper")
    exact = tm.plan_homogeneous(system, dist, "exact")
    assert paper.theta_pd_p == pytest.approx(1 / (1e-6 * 2000 ** 2))               # T(E[L]) = 4 s
    assert exact.theta_pd_p == pytest.approx(1 / (1e-6 * (1000 ** 2 + 3000 ** 2) / 2))  # E[T] = 5 s


def test_truncated_lognormal_case_study_mean():
    d = TruncatedLogNormal(9.90, 1.00, 128, 131072)
    assert d.mean == pytest.approx(27486, abs=1)
    rng = np.random.default_rng(0)
    s = d.sample(400_000, rng)
    p, l_long, l_short = d.split(np.array([20000.0]))
    assert p[0] == pytest.approx(np.mean(s > 20000), abs=3e-3)
    assert l_long[0] == pytest.approx(s[s > 20000].mean(), rel=5e-3)
    assert l_short[0] == pytest.approx(s[s <= 20000].mean(), rel=5e-3)


def test_planner_optimum_satisfies_eq7_within_grid_step(paper):
    dep = paper.deployments["prfaas_pd"]
    step = 64.0
    best = tm.plan_prfaas_pd(dep.system, paper.lengths, step)
    c = tm.evaluate(dep.system, paper.lengths, [best.threshold - step, best.threshold, best.threshold + step], best.n_p)
    gap = tm.eq7_gap(c.theta_prfaas, c.theta_pd_p, c.p)
    # Theta_prfaas/p - Theta_pd-p/(1-p) changes sign within one grid step of t*
    assert gap[0] * gap[2] < 0
    assert min(abs(gap[0]), abs(gap[1]), abs(gap[2])) / best.lambda_max < 0.02
    # and no other split does better (exhaustive), the neighbours strictly worse here
    for n_p in (best.n_p - 1, best.n_p + 1):
        other = tm.best_threshold(dep.system, paper.lengths, n_p, step)
        assert other.lambda_max < best.lambda_max
    # the implied H20 point of the paper: l_short at the optimum ~ 10.2K tokens
    assert best.l_short == pytest.approx(10200, rel=0.02)


def test_eq8_split_balance_brackets_optimum(paper):
    # With N_p + N_d fixed, prefill capacity rises and decode falls with N_p: the best integer
    # split sits where Theta_prfaas + Theta_pd-p - Theta_pd-d changes sign (Eq. 8).
    dep = paper.deployments["prfaas_pd"]
    best = tm.plan_prfaas_pd(dep.system, paper.lengths)
    lo = tm.best_threshold(dep.system, paper.lengths, best.n_p)
    hi = tm.best_threshold(dep.system, paper.lengths, best.n_p + 1)
    assert tm.eq8_gap(lo.theta_prfaas, lo.theta_pd_p, lo.theta_pd_d) < 0
    assert tm.eq8_gap(hi.theta_prfaas, hi.theta_pd_p, hi.theta_pd_d) > 0


def test_case_study_baselines_by_hand(paper):
    h20 = paper.deployments["homogeneous_pd"].system.pd
    h200 = paper.deployments["naive_heterogeneous"].system.prfaas
    homo = tm.plan_homogeneous(paper.deployments["homogeneous_pd"].system, paper.lengths)
    # 12 H20: prefill 1/T(27486) per instance, decode 800/1024 per instance -> 9 P + 3 D
    per_p = 1 / h20.prefill(27485.68)
    assert (homo.n_p, homo.n_d) == (9, 3)
    assert homo.lambda_max == pytest.approx(min(9 * per_p, 3 * 800 / 1024), rel=1e-6)
    naive = tm.plan_naive(paper.deployments["naive_heterogeneous"].system, paper.lengths)
    assert (naive.n_p, naive.n_d, naive.p) == (0, 8, 1.0)
    s = h200.kv(27485.68)
    assert naive.lambda_max == pytest.approx(min(4 / h200.prefill(27485.68), 12.5e9 / s, 6.25), rel=1e-6)
    assert math.isclose(naive.egress_gbps, pr.gbps(naive.lambda_max * s), rel_tol=1e-6)


def test_eq2_egress_need_at_the_optimum(paper):
    dep = paper.deployments["prfaas_pd"]
    best = tm.plan_prfaas_pd(dep.system, paper.lengths)
    need = tm.cluster_egress(32, 8, dep.system.prfaas, best.l_long)   # 32 H200 = 4 instances
    assert best.production_gbps == pytest.approx(pr.gbps(need), rel=1e-9)
    # compute-bound at the optimum: the link carries exactly what the pod produces, far below 100
    assert best.bottleneck == "prfaas-compute"
    assert best.egress_gbps == pytest.approx(best.production_gbps, rel=0.01) and best.egress_gbps < 20

"""The PrfaaS steady-state throughput model (paper §3.4, Eqs. 1-8) and its grid-search planner.

Each equation is a plain function, named after it, so a test can check it on a hand-computed
case. `evaluate` applies them over a whole grid of thresholds t for one N_p/N_d split;
`plan_*` run the paper's exhaustive two-dimensional search (t x N_p) for PrfaaS-PD and evaluate
the two baselines (homogeneous PD, naive heterogeneous) with the same equations.

`mode="paper"` is the paper's model: representative lengths, T(E[L | .]) and S_kv(E[L | .]).
`mode="exact"` replaces them with E[T(L) | .] and E[S_kv(L) | .], the saturation throughput of
a queue serving independent lengths; the simulator converges to this one (see README: the two
differ by Jensen's inequality because T is not linear in l).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

from jaxprfaas.scheduler.distributions import LengthDistribution
from jaxprfaas.scheduler.profiles import DecodeCapacity, Profile, gbps

Mode = Literal["paper", "exact"]


# ---- the equations -------------------------------------------------------------------------

def phi_kv(profile: Profile, l):
    """Eq. (1): KV throughput of one instance, bytes/s = S_kv(l) / T_prefill(l)."""
    return profile.kv(l) / profile.prefill(l)


def cluster_egress(n_gpus: int, gpus_per_instance: int, profile: Profile, l_avg):
    """Eq. (2): egress a prefill cluster needs so its GPUs never idle, bytes/s (N/P * Phi_kv)."""
    return n_gpus / gpus_per_instance * phi_kv(profile, l_avg)


def theta_prfaas(n_prfaas, t_long, s_long, b_out):
    """Eq. (3): min(N_prfaas / T_prefill(l_long), B_out / S_kv(l_long)), req/s."""
    return np.minimum(n_prfaas / t_long, b_out / s_long)


def theta_pd_p(n_p, t_short):
    """Eq. (4): N_p / T_prefill(l_short), req/s."""
    return n_p / t_short


def theta_pd_d(n_d, decode: DecodeCapacity, l_out: float):
    """Eq. (5): N_d * BS_max / (T_decode * L_out), req/s."""
    return n_d * decode.bs_max / (decode.t_decode * l_out)


def _per_share(theta, share):
    """theta / share with the convention that a stage carrying no traffic never binds."""
    theta, share = np.asarray(theta, float), np.asarray(share, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(share > 0, theta / np.where(share > 0, share, 1.0), np.inf)


def lambda_max(th_prfaas, th_pd_p, th_pd_d, p):
    """Eq. (6): min(Theta_prfaas / p, Theta_pd-p / (1 - p), Theta_pd-d)."""
    return np.minimum(np.minimum(_per_share(th_prfaas, p), _per_share(th_pd_p, 1 - np.asarray(p))), th_pd_d)


def eq7_gap(th_prfaas, th_pd_p, p):
    """Eq. (7) residual Theta_prfaas / p - Theta_pd-p / (1 - p): zero at the optimal t."""
    return _per_share(th_prfaas, p) - _per_share(th_pd_p, 1 - np.asarray(p))


def eq8_gap(th_prfaas, th_pd_p, th_pd_d):
    """Eq. (8) residual Theta_prfaas + Theta_pd-p - Theta_pd-d: zero at the optimal N_p/N_d."""
    return th_prfaas + th_pd_p - th_pd_d


# ---- a system and its evaluation over thresholds ------------------------------------------

@dataclasses.dataclass(frozen=True)
class System:
    """What the planner may not change: the hardware and the link (§4.4 fixed inputs)."""

    pd: Profile                 # local PD cluster instance profile (PD-P and PD-D roles)
    n_pd: int                   # N_p + N_d
    l_out: float                # mean output length
    prfaas: Profile | None = None
    n_prfaas: int = 0
    b_out: float = 0.0          # PrfaaS egress, bytes/s


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """One (t, N_p, N_d) and everything the model says about it."""

    threshold: float | None     # None: no length routing (all local, or all PrfaaS)
    n_prfaas: int
    n_p: int
    n_d: int
    p: float
    l_long: float
    l_short: float
    theta_prfaas: float
    theta_prfaas_compute: float
    theta_prfaas_egress: float
    theta_pd_p: float
    theta_pd_d: float
    lambda_max: float
    egress_bytes_per_req: float  # mean bytes a PrfaaS request ships, S_kv(l_long) in paper mode

    @property
    def bottleneck(self) -> str:
        terms = {"prfaas-compute": _per_share(self.theta_prfaas_compute, self.p),
                 "prfaas-egress": _per_share(self.theta_prfaas_egress, self.p),
                 "pd-p": _per_share(self.theta_pd_p, 1 - self.p),
                 "pd-d": self.theta_pd_d}
        return min(terms, key=lambda k: float(terms[k]))

    @property
    def egress_gbps(self) -> float:
        """Cross-cluster egress at Lambda_max (Lambda * p * S_kv(l_long)), Gbps."""
        return float(gbps(self.lambda_max * self.p * self.egress_bytes_per_req))

    @property
    def production_gbps(self) -> float:
        """Eq. (2): the egress the PrfaaS pod needs so its GPUs never idle,
        N_prfaas / T_prefill(l_long) * S_kv(l_long) (= N/P * Phi_kv(l_long)), Gbps."""
        return float(gbps(self.theta_prfaas_compute * self.egress_bytes_per_req)) if self.n_prfaas else 0.0

    def as_dict(self) -> dict:
        def num(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
        return {"threshold": num(self.threshold), "n_prfaas": self.n_prfaas, "n_p": self.n_p,
                "n_d": self.n_d, "p": self.p, "lambda_max": self.lambda_max,
                "theta_prfaas": self.theta_prfaas, "theta_pd_p": self.theta_pd_p,
                "theta_pd_d": self.theta_pd_d, "egress_gbps": self.egress_gbps,
                "production_gbps": self.production_gbps,
                "l_long": num(self.l_long), "l_short": num(self.l_short),
                "bottleneck": self.bottleneck}


@dataclasses.dataclass
class Curves:
    """Eqs. (3)-(6) at every t of a grid for one split (arrays share the grid's shape)."""

    t: np.ndarray
    p: np.ndarray
    l_long: np.ndarray
    l_short: np.ndarray
    theta_prfaas_compute: np.ndarray
    theta_prfaas_egress: np.ndarray
    theta_pd_p: np.ndarray
    theta_pd_d: float
    s_long: np.ndarray

    @property
    def theta_prfaas(self):
        return np.minimum(self.theta_prfaas_compute, self.theta_prfaas_egress)

    @property
    def lambda_max(self):
        return lambda_max(self.theta_prfaas, self.theta_pd_p, self.theta_pd_d, self.p)

    @property
    def prefill_capacity(self):
        """min(Theta_prfaas / p, Theta_pd-p / (1 - p)): Fig. 5(b)'s two curves' lower envelope."""
        return np.minimum(_per_share(self.theta_prfaas, self.p), _per_share(self.theta_pd_p, 1 - self.p))


def evaluate(system: System, dist: LengthDistribution, t, n_p: int, mode: Mode = "paper") -> Curves:
    t = np.atleast_1d(np.asarray(t, dtype=float))
    n_d = system.n_pd - n_p
    p, l_long, l_short = dist.split(t)
    pd = system.pd
    if mode == "paper":
        t_short = pd.prefill(np.nan_to_num(l_short, nan=1.0))
        s_long = system.prfaas.kv(np.nan_to_num(l_long, nan=1.0)) if system.prfaas else np.zeros_like(t)
        t_long = system.prfaas.prefill(np.nan_to_num(l_long, nan=1.0)) if system.prfaas else np.ones_like(t)
    elif mode == "exact":
        _, t_short = dist.expect_split(pd.prefill, t)
        t_short = np.nan_to_num(t_short, nan=1.0)
        if system.prfaas:
            t_long, _ = dist.expect_split(system.prfaas.prefill, t)
            s_long, _ = dist.expect_split(system.prfaas.kv, t)
            t_long, s_long = np.nan_to_num(t_long, nan=1.0), np.nan_to_num(s_long, nan=1.0)
        else:
            t_long, s_long = np.ones_like(t), np.zeros_like(t)
    else:
        raise ValueError(f"mode must be 'paper' or 'exact', got {mode!r}")
    if system.prfaas and system.n_prfaas:
        comp = system.n_prfaas / t_long
        egr = _per_share(system.b_out, s_long) if system.b_out else np.zeros_like(t)
    else:
        comp, egr = np.zeros_like(t), np.zeros_like(t)
    dec = theta_pd_d(n_d, pd.decode, system.l_out) if pd.decode else np.inf
    return Curves(t=t, p=p, l_long=l_long, l_short=l_short, theta_prfaas_compute=comp,
                  theta_prfaas_egress=egr, theta_pd_p=theta_pd_p(n_p, t_short),
                  theta_pd_d=float(dec), s_long=s_long)


def _point(c: Curves, i: int, system: System, n_p: int, threshold) -> OperatingPoint:
    th = float(c.theta_prfaas[i])
    return OperatingPoint(
        threshold=threshold, n_prfaas=system.n_prfaas, n_p=n_p, n_d=system.n_pd - n_p,
        p=float(c.p[i]), l_long=float(c.l_long[i]), l_short=float(c.l_short[i]),
        theta_prfaas=th, theta_prfaas_compute=float(c.theta_prfaas_compute[i]),
        theta_prfaas_egress=float(c.theta_prfaas_egress[i]), theta_pd_p=float(c.theta_pd_p[i]),
        theta_pd_d=c.theta_pd_d, lambda_max=float(c.lambda_max[i]),
        egress_bytes_per_req=float(c.s_long[i]))


# ---- the planners ---------------------------------------------------------------------------

def threshold_grid(dist: LengthDistribution, step: float) -> np.ndarray:
    """Thresholds from the shortest to the longest length, `step` tokens apart."""
    lo = math.floor(dist.lo / step) * step
    return np.arange(lo, dist.hi + step, step, dtype=float)


def plan_prfaas_pd(system: System, dist: LengthDistribution, step: float = 64.0,
                   mode: Mode = "paper", n_p_choices=None, t_grid=None) -> OperatingPoint:
    """Exhaustive grid search over t and N_p (paper §4.4). Ties in Lambda_max (a decode-bound
    plateau) go to the t with the most prefill headroom, i.e. the Eq. (7) crossing."""
    grid = threshold_grid(dist, step) if t_grid is None else np.asarray(t_grid, float)
    best, best_key = None, None
    for n_p in (range(0, system.n_pd) if n_p_choices is None else n_p_choices):
        c = evaluate(system, dist, grid, n_p, mode)
        lam, cap = c.lambda_max, c.prefill_capacity
        # lexicographic: Lambda_max (to 1e-9 relative), then prefill capacity
        top = lam.max()
        cand = np.flatnonzero(lam >= top * (1 - 1e-9))
        i = int(cand[np.argmax(cap[cand])])
        key = (round(float(top), 9), float(cap[i]))
        if best_key is None or key > best_key:
            best, best_key = _point(c, i, system, n_p, float(grid[i])), key
    return best


def best_threshold(system: System, dist: LengthDistribution, n_p: int, step: float = 64.0,
                   mode: Mode = "paper", t_grid=None) -> OperatingPoint:
    """The optimal t for a fixed split (Fig. 5(b)); what the short-term controller re-searches."""
    return plan_prfaas_pd(system, dist, step, mode, n_p_choices=[n_p], t_grid=t_grid)


def plan_homogeneous(system: System, dist: LengthDistribution, mode: Mode = "paper") -> OperatingPoint:
    """All prefill local (p = 0); only the N_p/N_d split is searched."""
    local = dataclasses.replace(system, prfaas=None, n_prfaas=0, b_out=0.0)
    t = np.array([dist.hi + 1.0])
    best = None
    for n_p in range(1, system.n_pd):
        pt = _point(evaluate(local, dist, t, n_p, mode), 0, local, n_p, None)
        if best is None or pt.lambda_max > best.lambda_max:
            best = pt
    return best


def plan_naive(system: System, dist: LengthDistribution, mode: Mode = "paper") -> OperatingPoint:
    """All prefill on PrfaaS (p = 1), every PD instance decodes: no routing, no balancing."""
    t = np.array([dist.lo - 1.0])
    return _point(evaluate(system, dist, t, 0, mode), 0, system, 0, None)

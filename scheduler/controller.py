"""Dual-timescale control (paper §3.4.3): re-search t quickly, re-split N_p/N_d slowly.

Short-term loop, every `short_period_s`: it fires when
  * the PrfaaS egress nears saturation (utilisation >= `util_high`, or a backlog of more than
    `backlog_high_s` seconds of transfers),
  * a prefill queue surges (>= `queue_high_s` seconds of work per node, PrfaaS or PD-P), or
  * the recent uncached-length distribution has drifted: the fraction above the current t
    differs from the fraction the last plan assumed by more than `drift_tol`.
Then it re-searches t on the window of recent uncached lengths and the measured arrival rate:
the t minimising the worst projected stage load, backlog/horizon + lambda*share/Theta, over the
PrfaaS pod, the link (counted at `util_target` of B_out) and PD-P. Without backlog that is the
paper's Eq. (7) optimum (with link headroom); under a burst it moves work away from the stage
that is backed up and keeps the link below saturation when any t can. After pressure it
re-searches once more when everything is calm (utilisation below `util_low`: hysteresis).
Moves smaller than `min_rel_change` are skipped, so noise never makes t dither.

Long-term loop, every `long_period_s`: on the same window (and the observed output lengths),
the planner re-searches (t, N_p); if the best split beats the current one's Lambda_max by more
than `rebalance_gain`, it converts `convert_step` PD nodes between prefill and decode (Eq. 8).
The simulator drains a converting node before it changes role.

The paper publishes none of these periods or thresholds; the defaults are ours, chosen from
the sweeps described in the README's "Scheduler" section.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxprfaas.scheduler import throughput_model as tm
from jaxprfaas.scheduler.distributions import Empirical


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    enabled: bool = True
    short_period_s: float = 10.0     # short-term loop period
    long_period_s: float = 300.0     # long-term loop period
    window: int = 1000               # recent accepted requests the loops plan on
    min_window: int = 200            # fewer than this: do nothing
    util_high: float = 0.85          # bandwidth trigger: link utilisation at or above this
    util_low: float = 0.60           # pressure released once below this (hysteresis)
    util_target: float = 0.80        # the re-search treats this much of B_out as the link's capacity
    backlog_high_s: float = 2.0      # bandwidth trigger: link backlog above this many seconds
    queue_high_s: float = 30.0       # queue-surge trigger, seconds of prefill work per node
    horizon_s: float = 120.0         # backlogs are to be drained over this horizon
    rate_window_s: float = 30.0      # the arrival rate is measured over this long
    drift_tol: float = 0.05          # |p_hat(t) - p_plan| that counts as a distribution shift
    min_rel_change: float = 0.05     # smallest relative move of t worth making
    rebalance_gain: float = 0.05     # long-term: convert only for a predicted gain above this
    convert_step: int = 1            # nodes converted per long-term period
    threshold_step: float = 128.0    # grid step of the re-search
    mode: str = "paper"

    @staticmethod
    def from_dict(d: dict | None) -> "ControllerConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(ControllerConfig)}
        unknown = set(d) - names
        if unknown:
            from jaxprfaas.errors import ConfigError
            raise ConfigError(f"controller: unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return ControllerConfig(**d)


@dataclasses.dataclass
class Observation:
    """What the running system reports to the controller at a tick."""

    now: float
    threshold: float
    n_p: int
    n_d: int
    recent_uncached: np.ndarray      # uncached lengths of the last `window` accepted requests
    recent_output: np.ndarray        # their output lengths
    arrival_rate: float              # req/s over the last `rate_window_s`
    link_util: float                 # egress utilisation over the last short period
    link_backlog_s: float            # egress committed but not delivered, / bandwidth
    prfaas_queue_s: float            # mean queued prefill seconds per PrfaaS node
    pd_p_queue_s: float              # mean queued prefill seconds per PD-P node


class Controller:
    def __init__(self, cfg: ControllerConfig, system: tm.System, threshold: float, n_p: int):
        self.cfg = cfg
        self.system = system
        self.p_plan: float | None = None
        self.pressed = False  # the last move answered bandwidth or queue pressure
        self.log: list[tuple[float, str, str]] = []  # (time, loop, what happened)
        self._init_t, self._init_np = threshold, n_p

    def _window(self, obs: Observation) -> Empirical | None:
        if obs.recent_uncached.size < self.cfg.min_window:
            return None
        return Empirical(np.maximum(obs.recent_uncached, 1))

    def _system(self, obs: Observation) -> tm.System:
        l_out = float(obs.recent_output.mean()) if obs.recent_output.size else self.system.l_out
        return dataclasses.replace(self.system, l_out=l_out, n_pd=obs.n_p + obs.n_d)

    # -- short-term ------------------------------------------------------------------------
    def short_tick(self, obs: Observation) -> float | None:
        """A new threshold, or None to keep the current one."""
        c = self.cfg
        dist = self._window(obs)
        if dist is None or self.system.prfaas is None:
            return None
        p_hat = float(np.mean(obs.recent_uncached > obs.threshold))
        if self.p_plan is None:
            self.p_plan = p_hat
        bw_hot = obs.link_util >= c.util_high or obs.link_backlog_s >= c.backlog_high_s
        surge = max(obs.prfaas_queue_s, obs.pd_p_queue_s) >= c.queue_high_s
        drift = abs(p_hat - self.p_plan) > c.drift_tol
        calm = (obs.link_util < c.util_low and obs.link_backlog_s < c.backlog_high_s / 4
                and max(obs.prfaas_queue_s, obs.pd_p_queue_s) < c.queue_high_s / 4)
        release = self.pressed and calm
        if not (bw_hot or surge or drift or release):
            return None
        self.pressed = (bw_hot or surge) or (self.pressed and not calm)
        t_new = self.search(obs, dist)
        why = " ".join(w for w, f in (("bandwidth", bw_hot), ("queue", surge), ("drift", drift),
                                      ("release", release)) if f)
        if t_new is None or abs(t_new - obs.threshold) < c.min_rel_change * max(obs.threshold, c.threshold_step):
            self.p_plan = p_hat
            return None
        self.p_plan = float(np.mean(obs.recent_uncached > t_new))
        self.log.append((obs.now, "short", f"{why}: t {obs.threshold:.0f} -> {t_new:.0f}"))
        return t_new

    def search(self, obs: Observation, dist: Empirical) -> float | None:
        """t minimising the worst projected stage load over the next `horizon_s`:
        max_s(backlog_s / H + rho_s(t)), rho_s = lambda * share_s(t) / Theta_s(t), with the link
        counted as a stage of capacity `util_target` * B_out. With no backlog this is the Eq. (7)
        crossing (the t maximising min_s Theta_s / share_s); a backlog shifts load away from the
        stage that holds it. The link term is also a constraint (<= 1) whenever some t meets it:
        bandwidth is the one resource the paper says must not congest."""
        c = self.cfg
        lam = obs.arrival_rate
        if lam <= 0:
            return None
        system = self._system(obs)
        grid = tm.threshold_grid(dist, c.threshold_step)
        cv = tm.evaluate(system, dist, grid, obs.n_p, c.mode)
        with np.errstate(divide="ignore", invalid="ignore"):
            rho_pf = np.where(cv.p > 0, lam * cv.p / cv.theta_prfaas_compute, 0.0)
            rho_pd = np.where(cv.p < 1, lam * (1 - cv.p) / cv.theta_pd_p, 0.0)
            rho_link = (lam * cv.p * cv.s_long / (c.util_target * system.b_out)
                        if system.b_out > 0 else np.zeros_like(grid))
        h = c.horizon_s
        link = obs.link_backlog_s / h + np.nan_to_num(rho_link, nan=np.inf)
        cost = np.maximum.reduce([obs.prfaas_queue_s / h + np.nan_to_num(rho_pf, nan=np.inf), link,
                                  obs.pd_p_queue_s / h + np.nan_to_num(rho_pd, nan=np.inf)])
        # the link is a constraint, not just a cost: keep it under target whenever some t can
        ok = link <= 1.0
        cost = np.where(ok, cost, np.inf) if ok.any() else link
        best = cost.min()
        ties = np.flatnonzero(cost <= best * (1 + 1e-9))
        # among equally good t, the one nearest the current (no needless moves)
        return float(grid[ties[np.argmin(np.abs(grid[ties] - obs.threshold))]])

    # -- long-term ---------------------------------------------------------------------------
    def long_tick(self, obs: Observation) -> int | None:
        """A target N_p (one step from the current), or None."""
        c = self.cfg
        dist = self._window(obs)
        if dist is None:
            return None
        system = self._system(obs)
        n = system.n_pd
        choices = range(0 if system.prfaas else 1, n)
        best = tm.plan_prfaas_pd(system, dist, c.threshold_step, c.mode, n_p_choices=choices) \
            if system.prfaas else tm.plan_homogeneous(system, dist, c.mode)
        if system.prfaas:
            cur = tm.best_threshold(system, dist, obs.n_p, c.threshold_step, c.mode).lambda_max
        else:
            cur = tm.evaluate(system, dist, [dist.hi + 1], obs.n_p, c.mode).lambda_max[0]
        if best.n_p == obs.n_p or best.lambda_max < cur * (1 + c.rebalance_gain):
            return None
        step = min(c.convert_step, abs(best.n_p - obs.n_p))
        target = obs.n_p + step if best.n_p > obs.n_p else obs.n_p - step
        target = min(max(target, 0 if system.prfaas else 1), n - 1)
        self.log.append((obs.now, "long", f"N_p {obs.n_p} -> {target} (best {best.n_p}, "
                                          f"Lambda {cur:.3f} -> {best.lambda_max:.3f})"))
        return target

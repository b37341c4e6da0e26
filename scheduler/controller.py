"""Dual-timescale control (paper §3.4.3): re-search t quickly, re-split N_p/N_d slowly.

Short-term loop, every `short_period_s`: it fires when
  * the PrfaaS egress nears saturation (utilisation >= `util_high`, or a backlog of more than
    `backlog_high_s` seconds of transfers),
  * a prefill queue surges (>= `queue_high_s` seconds of work per node, PrfaaS or PD-P), or
  * the recent uncached-length distribution has drifted: the fraction above the current t
    differs from the fraction the last plan assumed by more than `drift_tol`.
Then it re-searches t on the window of recent uncached lengths (Eq. 7 at the current split).
Under bandwidth pressure a guard also raises t until the projected egress
lambda_hat * p(t) * E[S_kv | L > t] fits in `util_target` of the link, and holds it until
utilisation falls below `util_low` (hysteresis). Moves smaller than `min_rel_change` are
skipped, so noise never makes t dither.

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
    window: int = 2000               # recent accepted requests the loops plan on
    min_window: int = 200            # fewer than this: do nothing
    util_high: float = 0.85          # bandwidth guard engages at this link utilisation
    util_low: float = 0.60           # ... and releases below this (hysteresis)
    util_target: float = 0.80        # guard sizes t for this utilisation
    backlog_high_s: float = 2.0      # or when the link backlog exceeds this many seconds
    queue_high_s: float = 30.0       # queue-surge trigger, seconds of prefill work per node
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
    arrival_rate: float              # req/s over the last short period
    link_util: float                 # egress utilisation over the last short period
    link_backlog_s: float            # egress backlog / bandwidth
    prfaas_queue_s: float            # mean queued prefill seconds per PrfaaS node
    pd_p_queue_s: float              # mean queued prefill seconds per PD-P node


class Controller:
    def __init__(self, cfg: ControllerConfig, system: tm.System, threshold: float, n_p: int):
        self.cfg = cfg
        self.system = system
        self.p_plan: float | None = None
        self.guard = False
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
        release = self.guard and obs.link_util < c.util_low and obs.link_backlog_s < c.backlog_high_s / 4
        if not (bw_hot or surge or drift or release):
            return None
        if bw_hot:
            self.guard = True
        elif release:
            self.guard = False
        system = self._system(obs)
        grid = tm.threshold_grid(dist, c.threshold_step)
        best = tm.best_threshold(system, dist, obs.n_p, mode=c.mode, t_grid=grid)
        t_new = best.threshold
        if self.guard and system.b_out > 0:
            p, l_long, _ = dist.split(grid)
            s_long, _ = dist.expect_split(system.prfaas.kv.__call__, grid)
            egress = obs.arrival_rate * p * np.nan_to_num(s_long)
            ok = np.flatnonzero(egress <= c.util_target * system.b_out)
            if ok.size:
                t_new = max(t_new, float(grid[ok[0]]))
        why = " ".join(w for w, f in (("bandwidth", bw_hot), ("queue", surge), ("drift", drift),
                                      ("release", release)) if f)
        if abs(t_new - obs.threshold) < c.min_rel_change * max(obs.threshold, c.threshold_step):
            self.p_plan = p_hat
            return None
        self.p_plan = float(np.mean(obs.recent_uncached > t_new))
        self.log.append((obs.now, "short", f"{why}: t {obs.threshold:.0f} -> {t_new:.0f}"))
        return t_new

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

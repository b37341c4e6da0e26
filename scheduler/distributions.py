"""Distributions of the uncached input length L (Table 4's random variable).

The throughput model needs, for a grid of thresholds t, the split p = P(L > t) and the
representative lengths l_long = E[L | L > t], l_short = E[L | L <= t]; its "exact" variant and
the controller also need E[f(L) | L > t] for a profile curve f. Every distribution here answers
those questions vectorised over t, and draws samples for the simulator. The truncated
log-normal is answered in closed form (the paper's case study); an empirical distribution
(a histogram, a trace, or the controller's window of recent requests) by prefix sums.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from jaxprfaas.errors import ConfigError

ArrayFn = Callable[[np.ndarray], np.ndarray]


def _phi(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, vectorised (math.erf has no numpy form; erfc via np.vectorize)."""
    return 0.5 * (1.0 + _erf(np.asarray(z, dtype=float) / math.sqrt(2.0)))


_erf = np.vectorize(math.erf, otypes=[float])


class LengthDistribution:
    """Base: subclasses give `nodes()` (support points, weights) and `sample()`.

    Conditional statistics default to the nodes; subclasses may override them analytically.
    Conventions: "long" means L > t, "short" means L <= t (the paper's routing rule).
    """

    lo: float
    hi: float

    # -- to implement ------------------------------------------------------------------
    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    # -- derived -------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        x, w = self.nodes()
        return float(np.dot(x, w))

    def split(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, l_long, l_short) at each threshold t. Undefined means are NaN."""
        return self._split_by_nodes(np.asarray(t, dtype=float), lambda x: x)

    def expect_split(self, f: ArrayFn, t) -> tuple[np.ndarray, np.ndarray]:
        """(E[f(L) | L > t], E[f(L) | L <= t]) at each threshold t (NaN where empty)."""
        _, hi, lo = self._split_by_nodes(np.asarray(t, dtype=float), f)
        return hi, lo

    def _split_by_nodes(self, t: np.ndarray, f: ArrayFn):
        x, w = self.nodes()
        fx = np.asarray(f(x), dtype=float)
        cw = np.concatenate([[0.0], np.cumsum(w)])
        cf = np.concatenate([[0.0], np.cumsum(w * fx)])
        k = np.searchsorted(x, t, side="right")  # nodes <= t are "short"
        w_short, f_short = cw[k], cf[k]
        w_long, f_long = cw[-1] - w_short, cf[-1] - f_short
        with np.errstate(invalid="ignore", divide="ignore"):
            long_mean = np.where(w_long > 1e-15, f_long / np.where(w_long > 0, w_long, 1), np.nan)
            short_mean = np.where(w_short > 1e-15, f_short / np.where(w_short > 0, w_short, 1), np.nan)
        p = np.clip(w_long / cw[-1], 0.0, 1.0)
        return p, long_mean, short_mean


class TruncatedLogNormal(LengthDistribution):
    """ln L ~ N(mu, sigma^2), truncated to [lo, hi] (paper §4: mu 9.90, sigma 1.00, [128, 128K])."""

    def __init__(self, mu: float, sigma: float, lo: float, hi: float, n_nodes: int = 8192):
        if sigma <= 0 or not 0 < lo < hi:
            raise ConfigError(f"lognormal: need sigma > 0 and 0 < min < max, got {sigma}, {lo}, {hi}")
        self.mu, self.sigma, self.lo, self.hi = float(mu), float(sigma), float(lo), float(hi)
        self._n_nodes = n_nodes
        self._nodes: tuple[np.ndarray, np.ndarray] | None = None
        self._z = _phi((math.log(hi) - mu) / sigma) - _phi((math.log(lo) - mu) / sigma)

    def __repr__(self) -> str:
        return f"TruncatedLogNormal(mu={self.mu}, sigma={self.sigma}, lo={self.lo:g}, hi={self.hi:g})"

    def _partial_mean(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """E[L; a < L <= b] (untruncated lognormal, unnormalised)."""
        m, s = self.mu, self.sigma
        c = math.exp(m + s * s / 2)
        return c * (_phi((np.log(b) - m - s * s) / s) - _phi((np.log(a) - m - s * s) / s))

    def _mass(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m, s = self.mu, self.sigma
        return _phi((np.log(b) - m) / s) - _phi((np.log(a) - m) / s)

    @property
    def mean(self) -> float:
        return float(self._partial_mean(np.array(self.lo), np.array(self.hi)) / self._z)

    def split(self, t):
        t = np.clip(np.asarray(t, dtype=float), self.lo, self.hi)
        lo, hi = np.full_like(t, self.lo), np.full_like(t, self.hi)
        m_short, m_long = self._mass(lo, t), self._mass(t, hi)
        with np.errstate(invalid="ignore", divide="ignore"):
            l_short = np.where(m_short > 1e-15, self._partial_mean(lo, t) / np.maximum(m_short, 1e-300), np.nan)
            l_long = np.where(m_long > 1e-15, self._partial_mean(t, hi) / np.maximum(m_long, 1e-300), np.nan)
        return np.clip(m_long / self._z, 0.0, 1.0), l_long, l_short

    def nodes(self):
        # Midpoint rule in log space with exact bin masses: good to ~1e-5 relative on smooth f.
        if self._nodes is None:
            edges = np.exp(np.linspace(math.log(self.lo), math.log(self.hi), self._n_nodes + 1))
            w = self._mass(edges[:-1], edges[1:]) / self._z
            x = self._partial_mean(edges[:-1], edges[1:]) / np.maximum(w * self._z, 1e-300)
            self._nodes = (x, w / w.sum())
        return self._nodes

    def sample(self, n, rng):
        out = np.empty(0)
        while out.size < n:  # rejection: a few percent fall outside [lo, hi] for the case study
            draw = rng.lognormal(self.mu, self.sigma, size=int((n - out.size) * 1.1) + 16)
            out = np.concatenate([out, draw[(draw >= self.lo) & (draw <= self.hi)]])
        return np.rint(out[:n]).astype(np.int64)


class Empirical(LengthDistribution):
    """Equally weighted samples (a trace, a histogram's expansion, or the controller's window)."""

    def __init__(self, samples, weights=None):
        x = np.asarray(samples, dtype=float)
        if x.size == 0:
            raise ConfigError("empirical length distribution: no samples")
        w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
        order = np.argsort(x, kind="stable")
        self._x, self._w = x[order], w[order] / w.sum()
        self.lo, self.hi = float(self._x[0]), float(self._x[-1])

    def __repr__(self) -> str:
        return f"Empirical(n={self._x.size}, mean={self.mean:.0f})"

    def nodes(self):
        return self._x, self._w

    def sample(self, n, rng):
        return np.rint(rng.choice(self._x, size=n, p=self._w)).astype(np.int64)


class Fixed(Empirical):
    """Every request has the same length (the degenerate case the equations check against)."""

    def __init__(self, length: float):
        super().__init__([length])


def from_spec(spec) -> LengthDistribution:
    """Build from YAML: `{dist: lognormal, mu, sigma, min, max}`, `{dist: fixed, value}`,
    `{dist: histogram, values: [...], weights: [...]}` or `{dist: samples, values: [...]}`;
    a bare number means fixed."""
    if isinstance(spec, (int, float)):
        return Fixed(float(spec))
    if not isinstance(spec, dict) or "dist" not in spec:
        raise ConfigError(f"length distribution: need a mapping with 'dist', got {spec!r}")
    kind = spec["dist"]
    try:
        if kind == "lognormal":
            return TruncatedLogNormal(spec["mu"], spec["sigma"], spec.get("min", 1), spec.get("max", 1 << 20))
        if kind == "fixed":
            return Fixed(float(spec["value"]))
        if kind in ("histogram", "samples"):
            return Empirical(spec["values"], spec.get("weights"))
    except KeyError as e:
        raise ConfigError(f"length distribution {kind!r}: missing key {e.args[0]!r}") from None
    raise ConfigError(f"length distribution: unknown dist {kind!r} (lognormal|fixed|histogram|samples)")

"""Request streams for the simulator: arrival times, lengths and (for traces) prefix block keys.

Arrivals are uniform (the paper's steady state), Poisson, bursty (a periodic square wave of
Poisson rates whose mean is the nominal rate) or read from a Mooncake-format JSONL trace
(`timestamp` ms, `input_length`, `output_length`, `hash_ids`: one id per 512-token block, equal
ids meaning equal prefixes). A mid-run shift swaps the length distributions from a given
request on, to exercise the controller.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxprfaas.errors import ConfigError
from jaxprfaas.scheduler.distributions import LengthDistribution, from_spec


@dataclasses.dataclass
class Workload:
    arrival: np.ndarray                 # seconds, nondecreasing
    input_len: np.ndarray               # tokens
    output_len: np.ndarray              # tokens
    keys: list | None = None            # per request: block keys (None: no prefix structure)
    block_size: int = 512

    def __len__(self) -> int:
        return int(self.arrival.size)


@dataclasses.dataclass(frozen=True)
class Burst:
    factor: float = 3.0      # rate multiplier inside a burst
    on_s: float = 60.0       # burst length
    period_s: float = 600.0  # one burst per period (at its start)

    def rates(self, rate: float) -> tuple[float, float]:
        """(rate inside, rate outside) so the long-run mean is `rate`."""
        frac = self.on_s / self.period_s
        hi = rate * self.factor
        lo = max((rate - hi * frac) / (1 - frac), 0.0) if frac < 1 else hi
        return hi, lo


def arrivals(kind: str, rate: float, n: int, rng: np.random.Generator, burst: Burst | None = None) -> np.ndarray:
    if rate <= 0:
        raise ConfigError(f"arrival rate must be > 0, got {rate}")
    if kind == "uniform":
        return np.arange(n, dtype=float) / rate
    if kind == "poisson":
        return np.cumsum(rng.exponential(1.0 / rate, size=n))
    if kind == "bursty":
        b = burst or Burst()
        hi, lo = b.rates(rate)
        out, t = np.empty(n), 0.0
        for i in range(n):
            # thinning-free: exact for piecewise-constant rates, stepping across boundaries
            e = rng.exponential(1.0)
            while True:
                phase = t % b.period_s
                r = hi if phase < b.on_s else lo
                edge = (b.on_s if phase < b.on_s else b.period_s) - phase
                if r > 0 and e / r <= edge:
                    t += e / r
                    break
                e -= r * edge
                t += edge
            out[i] = t
        return out
    raise ConfigError(f"unknown arrivals {kind!r} (uniform|poisson|bursty|trace)")


def synthetic(n: int, rate: float, lengths: LengthDistribution, output_len: float,
              kind: str = "poisson", seed: int = 0, burst: Burst | None = None,
              shift_at: int | None = None, shift_lengths: LengthDistribution | None = None,
              shift_output_len: float | None = None) -> Workload:
    rng = np.random.default_rng(seed)
    t = arrivals(kind, rate, n, rng, burst)
    inp = lengths.sample(n, rng)
    out = np.full(n, int(round(output_len)), dtype=np.int64)
    if shift_at is not None and 0 <= shift_at < n:
        if shift_lengths is not None:
            inp[shift_at:] = shift_lengths.sample(n - shift_at, rng)
        if shift_output_len is not None:
            out[shift_at:] = int(round(shift_output_len))
    return Workload(t, inp, out)


def load_trace(path: str | Path, limit: int | None = None, speed: float = 1.0,
               block_size: int = 512) -> Workload:
    """A Mooncake-style JSONL trace. `speed` > 1 replays it faster."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such trace file: {p}")
    ts, inp, out, keys = [], [], [], []
    with p.open() as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ts.append(float(r["timestamp"]) / 1e3 if "timestamp" in r else float(r["t"]))
                inp.append(int(r["input_length"]))
                out.append(int(r.get("output_length", 1)))
                keys.append(list(r.get("hash_ids", ())))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{p}:{ln}: bad trace record ({e})") from None
            if limit and len(ts) >= limit:
                break
    if not ts:
        raise ConfigError(f"{p}: empty trace")
    t = np.asarray(ts) / speed
    order = np.argsort(t, kind="stable")
    return Workload(t[order] - t[order][0], np.asarray(inp)[order], np.asarray(out)[order],
                    [keys[i] for i in order], block_size)


def from_config(sim: dict, lengths: LengthDistribution, output_len: float, *, rate: float | None = None,
                n: int | None = None, seed: int | None = None, kind: str | None = None) -> Workload:
    """The `simulate:` section of a case study, with CLI overrides."""
    kind = kind or sim.get("arrivals", "poisson")
    n = int(n or sim.get("requests", 10000))
    seed = int(sim.get("seed", 0) if seed is None else seed)
    if kind == "trace":
        if "trace" not in sim:
            raise ConfigError("simulate.arrivals is 'trace' but simulate.trace (a JSONL path) is missing")
        return load_trace(sim["trace"], limit=n, speed=float(sim.get("trace_speed", 1.0)))
    rate = float(rate if rate is not None else sim.get("rate", 1.0))
    burst = Burst(**sim["burst"]) if isinstance(sim.get("burst"), dict) else None
    shift = sim.get("shift") or {}
    at = None
    if shift:
        at = int(shift.get("at_fraction", 0.5) * n)
    return synthetic(n, rate, lengths, output_len, kind, seed, burst, at,
                     from_spec(shift["input_length"]) if "input_length" in shift else None,
                     shift.get("output_length"))

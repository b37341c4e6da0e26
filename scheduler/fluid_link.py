"""The cross-datacenter link as a fluid FIFO queue, for the simulator.

Each PrfaaS prefill feeds the link at its KV production rate S_kv / T_prefill while it runs
(layer-wise pipelining: shipping overlaps compute), cache moves feed it all at once; the link
drains at most `bandwidth` bytes/s. Bytes leave in the order they were produced, so a state's
last byte (produced when its prefill ends at time T) leaves at T + Q(T) / bandwidth, where Q is
the backlog. Concurrent transfers therefore share the link (work-conserving, never above
capacity), and a link slower than the aggregate production rate builds a backlog, which is what
Eq. (3)'s min(compute, egress) says at saturation.

State is integrated lazily: rate changes are queued and applied when time advances, so a
request costs O(log n) however many transfers are in flight. A meter records bytes sent per
`meter_dt` bucket: the utilisation signal the router and controller read, and the plot.
"""

from __future__ import annotations

import heapq
import math


class FluidLink:
    def __init__(self, bandwidth: float, latency: float = 0.0, meter_dt: float = 1.0):
        if bandwidth <= 0:
            raise ValueError("link bandwidth must be > 0")
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self.meter_dt = float(meter_dt)
        self.t = 0.0           # state is integrated up to here
        self.q = 0.0           # backlog bytes at self.t
        self.rate_in = 0.0     # current aggregate production rate
        self.sent = 0.0        # cumulative bytes delivered
        self.buckets: list[float] = []  # bytes sent in [k*dt, (k+1)*dt)
        self._changes: list[tuple[float, int, float]] = []
        self._seq = 0

    # -- inputs --------------------------------------------------------------------------
    def add_producer(self, start: float, end: float, nbytes: float) -> None:
        """`nbytes` produced at a constant rate over [start, end] (start >= current time)."""
        if nbytes <= 0:
            return
        if end - start <= 1e-12:
            self.advance(start)
            self.q += nbytes
            return
        r = nbytes / (end - start)
        self._seq += 1
        heapq.heappush(self._changes, (start, self._seq, r))
        self._seq += 1
        heapq.heappush(self._changes, (end, self._seq, -r))

    def push(self, now: float, nbytes: float) -> float:
        """Enqueue `nbytes` at once (a cache move); returns when its last byte lands."""
        self.advance(now)
        self.q += nbytes
        return now + self.q / self.bandwidth + self.latency

    def completion(self, now: float) -> float:
        """Landing time of a transfer whose last byte was produced now."""
        self.advance(now)
        return now + self.q / self.bandwidth + self.latency

    # -- integration ---------------------------------------------------------------------
    def advance(self, until: float) -> None:
        ch = self._changes
        while ch and ch[0][0] <= until:
            t, _, dr = heapq.heappop(ch)
            self._integrate(t)
            self.rate_in += dr
        self._integrate(until)
        if abs(self.rate_in) < 1e-6 and not ch:
            self.rate_in = 0.0

    def _integrate(self, t1: float) -> None:
        t0 = self.t
        if t1 <= t0:
            return
        dt, r, b = t1 - t0, max(self.rate_in, 0.0), self.bandwidth
        if r >= b:
            self.q += (r - b) * dt
            self._emit(t0, t1, b)
        elif self.q > 0:
            te = self.q / (b - r)
            if te >= dt:
                self.q -= (b - r) * dt
                self._emit(t0, t1, b)
            else:
                self.q = 0.0
                self._emit(t0, t0 + te, b)
                self._emit(t0 + te, t1, r)
        else:
            self._emit(t0, t1, r)
        self.t = t1

    def _emit(self, t0: float, t1: float, rate: float) -> None:
        if rate <= 0 or t1 <= t0:
            return
        self.sent += rate * (t1 - t0)
        dt, bk = self.meter_dt, self.buckets
        k0, k1 = int(t0 / dt), int(t1 / dt)
        if len(bk) <= k1:
            bk.extend([0.0] * (k1 + 1 - len(bk)))
        if k0 == k1:
            bk[k0] += rate * (t1 - t0)
            return
        bk[k0] += rate * ((k0 + 1) * dt - t0)
        for k in range(k0 + 1, k1):
            bk[k] += rate * dt
        bk[k1] += rate * (t1 - k1 * dt)

    # -- signals ---------------------------------------------------------------------------
    def utilization(self, now: float, window: float) -> float:
        """Mean utilisation over the last `window` seconds of complete meter buckets."""
        self.advance(now)
        k1 = int(now / self.meter_dt)
        k0 = max(k1 - max(int(math.ceil(window / self.meter_dt)), 1), 0)
        if k1 <= k0:
            return 0.0
        bk = self.buckets
        s = sum(bk[k0:min(k1, len(bk))])
        return s / (self.bandwidth * self.meter_dt * (k1 - k0))

    def backlog(self, now: float) -> float:
        self.advance(now)
        return self.q

    def utilization_series(self) -> list[float]:
        cap = self.bandwidth * self.meter_dt
        return [b / cap for b in self.buckets]

"""The cross-datacenter link as the sender sees it: emulated rate and latency, and metered egress.

`Link` emulates, on the sender side, a wire of a given rate and one-way latency: a token bucket
(kept as a virtual "wire free at" clock, so sleeping late never loses credit beyond the burst)
says when the last byte of a frame leaves, the latency says when it lands; acks come back one
latency later. All streams of one destination share one `Link`, as they share one real wire.
It is for tests, the demo and benchmarks; production traffic runs with `link=None`.

`EgressMeter` counts bytes put on a link over a sliding window; the scheduler reads it (as a
plain number, it never imports this module's users) to route by the link's load.

Neither class sleeps or blocks: callers decide how to wait (always with a deadline).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable


class Link:
    """A rate-limited, delayed wire shared by every stream to one destination."""

    def __init__(self, rate_bps: float = 0.0, latency_s: float = 0.0, burst_bytes: int | None = None,
                 corrupt: Callable[[int, int], bool] | None = None):
        """`rate_bps`: bits/s (0 = unlimited); `latency_s`: one-way; `burst_bytes`: bucket depth
        (default 1 ms of traffic, at least 64 KiB); `corrupt(seq, attempt)`: fault injection, True
        flips a payload bit of that transmission (a lossy wire for tests; None in production)."""
        if rate_bps < 0 or latency_s < 0:
            raise ValueError(f"link rate and latency must be >= 0, got {rate_bps} bit/s, {latency_s} s")
        self.rate_bps = float(rate_bps)
        self.latency_s = float(latency_s)
        self.burst_bytes = burst_bytes if burst_bytes is not None else max(64 << 10, int(rate_bps / 8 / 1000))
        self.corrupt = corrupt
        self._free_at = 0.0  # when the wire finishes the bytes already scheduled
        self._lock = threading.Lock()

    @staticmethod
    def from_gbps(gbps: float, latency_ms: float = 0.0, **kw) -> "Link | None":
        """A link of `gbps` (0 = unshaped) and `latency_ms`; None when there is nothing to emulate."""
        if gbps <= 0 and latency_ms <= 0 and not kw.get("corrupt"):
            return None
        return Link(gbps * 1e9, latency_ms / 1e3, **kw)

    @property
    def shaped(self) -> bool:
        return self.rate_bps > 0

    def schedule(self, nbytes: int, now: float | None = None) -> float:
        """Put `nbytes` on the wire now; return the monotonic time its last byte lands."""
        now = time.monotonic() if now is None else now
        if self.rate_bps <= 0:
            return now + self.latency_s
        with self._lock:
            # token bucket as a virtual clock: up to burst_bytes of idle credit carries over
            start = max(self._free_at, now - self.burst_bytes * 8 / self.rate_bps)
            self._free_at = start + nbytes * 8 / self.rate_bps
            return self._free_at + self.latency_s

    def ack_due(self, received_at: float) -> float:
        """When an ack the receiver sent at `received_at` reaches the sender."""
        return received_at + self.latency_s

    def corrupts(self, seq: int, attempt: int) -> bool:
        return bool(self.corrupt and self.corrupt(seq, attempt))


class EgressMeter:
    """Bytes put on one link: total, and bytes/s over the last `window_s` seconds."""

    def __init__(self, window_s: float = 1.0):
        self.window_s = window_s
        self.total_bytes = 0
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def record(self, nbytes: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.total_bytes += nbytes
            self._events.append((now, nbytes))
            self._trim(now)

    def bytes_per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self.window_s

    def gbps(self, now: float | None = None) -> float:
        return self.bytes_per_s(now) * 8 / 1e9

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._events.popleft()


_METERS: dict[str, EgressMeter] = {}
_METERS_LOCK = threading.Lock()


def egress_meter(link_name: str, window_s: float = 1.0) -> EgressMeter:
    """The process-wide meter of the link called `link_name` (created on first use)."""
    with _METERS_LOCK:
        return _METERS.setdefault(link_name, EgressMeter(window_s))


def egress_snapshot(now: float | None = None) -> dict[str, float]:
    """{link name: bytes/s over its window} for every link this process sends on."""
    with _METERS_LOCK:
        meters = dict(_METERS)
    return {name: m.bytes_per_s(now) for name, m in meters.items()}


def utilization(nbytes: int, seconds: float, rate_bps: float, latency_s: float = 0.0) -> float | None:
    """How fully a transfer used its link: the time a perfect link of this rate and one-way
    latency needs (serialize every byte, plus the first byte's trip out and the last ack's trip
    back) over the time it took. Equals achieved/link rate once transfers are long; None unshaped."""
    if rate_bps <= 0 or seconds <= 0:
        return None
    return (nbytes * 8 / rate_bps + 2 * latency_s) / seconds

"""The fluid link: production-rate streaming, sharing, backlog and the utilisation meter."""

import pytest

from jaxprfaas.scheduler.fluid_link import FluidLink


def test_single_stream_below_capacity_lands_at_prefill_end():
    link = FluidLink(bandwidth=100.0, latency=0.5)
    link.add_producer(0.0, 10.0, 500.0)        # 50 B/s < 100 B/s: pipelined, no backlog
    assert link.completion(10.0) == pytest.approx(10.5)
    assert link.sent == pytest.approx(500.0)


def test_concurrent_streams_share_and_build_backlog():
    link = FluidLink(bandwidth=100.0)
    link.add_producer(0.0, 10.0, 1000.0)       # 100 B/s
    link.add_producer(0.0, 10.0, 1000.0)       # another 100 B/s: 200 in, 100 out
    assert link.backlog(10.0) == pytest.approx(1000.0)
    assert link.completion(10.0) == pytest.approx(20.0)   # the backlog drains at 100 B/s
    assert link.backlog(15.0) == pytest.approx(500.0)
    assert link.backlog(25.0) == 0.0
    assert link.sent == pytest.approx(2000.0)
    # never above capacity: 10 s buckets at 100% then the drain
    u = link.utilization_series()
    assert max(u) <= 1.0 + 1e-12 and sum(u) == pytest.approx(20.0)


def test_push_queues_behind_the_backlog_and_meter_averages():
    link = FluidLink(bandwidth=10.0, latency=0.0, meter_dt=1.0)
    assert link.push(0.0, 50.0) == pytest.approx(5.0)
    assert link.push(1.0, 10.0) == pytest.approx(1.0 + (40.0 + 10.0) / 10.0)
    assert link.utilization(10.0, 10.0) == pytest.approx(0.6)

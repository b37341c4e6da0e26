"""A landed state nobody claims is dropped after its TTL; a claimed one is handed over once."""

import time

from jaxprfaas.model import ModelConfig
from jaxprfaas.roles.decode import LandedStates


def test_unclaimed_states_expire_and_claimed_ones_are_taken_once():
    landed = LandedStates(ModelConfig.preset("tiny"), ttl_s=0.4)
    landed.inner.states["orphan"] = object()
    landed.inner.states["claimed"] = marker = object()
    assert landed.poll("claimed") is marker and landed.poll("claimed") is None
    deadline = time.monotonic() + 5
    while "orphan" in landed.inner.states and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "orphan" not in landed.inner.states

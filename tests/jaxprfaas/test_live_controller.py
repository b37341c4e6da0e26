"""The router runs the scheduler's short-term loop live: after the prompt-length distribution
shifts, the threshold moves, and routing follows the new threshold."""

import numpy as np

from jaxprfaas import LLM, SamplingParams


def test_threshold_follows_a_length_shift():
    ctl = {"short_period_s": 0.3, "min_window": 8, "window": 24, "threshold_step": 16, "rate_window_s": 60}
    rng = np.random.default_rng(0)
    with LLM("tiny", deployment="local-demo", **{"threshold": 96}, controller=ctl) as llm:
        short = [rng.integers(3, 512, int(n)).tolist() for n in rng.integers(20, 60, 10)]
        first = llm.generate(short, SamplingParams(max_tokens=2))
        assert {o.metrics["threshold"] for o in first} == {96}
        long = [rng.integers(3, 512, int(n)).tolist() for n in rng.integers(200, 400, 24)]
        for i in range(0, len(long), 4):
            llm.generate(long[i:i + 4], SamplingParams(max_tokens=2))
        import time
        time.sleep(1.0)   # a tick or two on the shifted window
        probe = [rng.integers(3, 512, int(n)).tolist() for n in (30, 120, 250, 380)]
        after = llm.generate(probe, SamplingParams(max_tokens=2))
    t_new = after[0].metrics["threshold"]
    assert t_new != 96
    assert all(o.metrics["threshold"] == t_new for o in after)
    for o in after:   # every route follows the threshold in force
        assert o.route == ("prfaas" if len(o.prompt_token_ids) > t_new else "local")

"""The reference generation loop: greedy equals transformers; seeded sampling is reproducible."""

import numpy as np
import pytest

import hf_oracle as H
from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.checkpoint import load_hf_checkpoint
from jaxprfaas.model.generate import SamplingParams, generate


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    tf = H.make_reference(d, seed=11)
    return tf, load_hf_checkpoint(d, dtype="float32")


def test_greedy_batch_equals_transformers(pair):
    tf, ours = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (5, 70, 1, 33)]
    out = generate(ours, prompts, SamplingParams(max_tokens=6), impl="xla")
    assert out == [H.tf_greedy(tf, p, 6) for p in prompts]


def test_sampling_is_seeded_and_params_are_per_request(pair):
    _, ours = pair
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    sp = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1),
          SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=2)]
    a = generate(ours, prompts, sp, impl="xla")
    b = generate(ours, prompts, sp, impl="xla")
    assert a == b
    # a request's tokens do not depend on its batch neighbours
    assert generate(ours, prompts[1:], sp[1:], impl="xla") == a[1:]
    # top_k=1 is greedy whatever the temperature
    g = generate(ours, prompts, SamplingParams(max_tokens=8), impl="xla")
    assert generate(ours, prompts, SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=9), impl="xla") == g


def test_stop_tokens_and_limits(pair):
    _, ours = pair
    g = generate(ours, [[5, 6, 7]], SamplingParams(max_tokens=8), impl="xla")[0]
    stop = g[3]
    out = generate(ours, [[5, 6, 7]], SamplingParams(max_tokens=8, stop_token_ids=(stop,)), impl="xla")[0]
    assert out == g[:g.index(stop) + 1]
    with pytest.raises(JaxprfaasError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(JaxprfaasError, match="at least one token"):
        generate(ours, [[]], SamplingParams(), impl="xla")

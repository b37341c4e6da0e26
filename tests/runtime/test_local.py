"""The local PD path (prefill engine -> decode engine, one process) equals the reference loop,
with requests submitted while others decode, mixed sampling params and a cancellation."""

import numpy as np
import pytest

from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.generate import SamplingParams, generate
from jaxprfaas.model.hybrid_lm import HybridLM
from jaxprfaas.runtime.local import LocalPD, generate_with_engines
from jaxprfaas.runtime.request import FinishReason, Request

CFG = ModelConfig.preset("tiny")
LENS = [7, 30, 2, 21, 12, 3]
PARAMS = [
    SamplingParams(max_tokens=6),
    SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=11),
    SamplingParams(max_tokens=0),
    SamplingParams(max_tokens=7, temperature=0.8, top_k=30, seed=12, stop_token_ids=tuple(range(200, 260))),
    SamplingParams(max_tokens=4),
    SamplingParams(max_tokens=6, temperature=1.5, seed=13),
]
# one decode program (8 rows) and prefill steps of 16 tokens x 4 rows: few compilations on CPU
ENGINE_KW = dict(impl="xla", max_batch=8, batch_buckets=(8,), max_model_len=64, page_size=16, token_budget=32,
                 chunk_size=16, prefill_batch=4, prefill_len_buckets=(16,), prefill_batch_buckets=(4,))


@pytest.fixture(scope="module")
def model():
    return HybridLM(CFG, seed=21)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return generate(model, prompts, PARAMS, impl="xla")


def test_generate_with_engines_equals_reference(model, prompts, reference):
    assert generate_with_engines(model, prompts, PARAMS, **ENGINE_KW) == reference
    assert reference[2] == []                                  # max_tokens=0 yields nothing


def test_staggered_submissions_and_cancel_during_prefill(model, prompts, reference):
    pd = LocalPD(model, **ENGINE_KW)
    streamed = []
    reqs = [Request(tuple(p), sp, request_id=f"r{i}", on_token=streamed.append)
            for i, (p, sp) in enumerate(zip(prompts, PARAMS))]
    out = {r.request_id: [] for r in reqs}
    finished = {}
    pd.submit(reqs[0])
    pd.submit(reqs[1])
    step = 0
    while step < 3 or pd.has_work():
        if step == 1:                                          # r3 arrives and is cancelled before prefill ends
            pd.submit(reqs[3])
            pd.submit(reqs[4])
            assert pd.cancel("r3")
        if step == 2:
            pd.submit(reqs[5])
        for ev in pd.step():
            if ev.token is not None:
                out[ev.request_id].append(ev.token)
            if ev.finished:
                finished[ev.request_id] = ev.finished
        step += 1
        assert step < 100
    for i in (0, 1, 4, 5):
        assert out[f"r{i}"] == reference[i]
    assert finished["r3"] == FinishReason.CANCELLED and out["r3"] == []
    assert [e.token for e in streamed if e.request_id == "r1" and e.token is not None] == reference[1]
    assert pd.decode.pool.used_bytes == 0 and not pd.decode.pool.seqs

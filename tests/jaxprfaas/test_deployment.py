"""End to end with real processes on loopback: a transformers-converted checkpoint served by a
PrfaaS-PD deployment gives transformers' greedy tokens on both routes; state bytes over the
link equal the codec's size; closing the LLM leaves no process behind."""

import os

import numpy as np
import pytest

import hf_oracle as H
from jaxprfaas import LLM, SamplingParams
from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model import ModelConfig
from jaxprfaas.runtime import state_codec as codec


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tf = H.make_reference(d, seed=21)
    llm = LLM(str(d), deployment="local-demo", threshold=40, dtype="float32", link_gbps=0.05)
    yield tf, d, llm
    pids = llm.deployment.pids
    llm.close()
    assert pids and not [p for p in pids if alive(p)], "processes left behind"


def test_mixed_batch_equals_transformers_on_both_routes(served):
    tf, ckpt, llm = served
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, n).tolist() for n in (7, 90, 1, 41, 130, 25)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5))
    assert {o.route for o in outs} == {"prfaas", "local"}
    assert [o.route for o in outs] == ["local" if len(p) <= 40 else "prfaas" for p in prompts]
    assert [o.token_ids for o in outs] == [H.tf_greedy(tf, p, 5) for p in prompts]
    config = ModelConfig.from_hf(ckpt).replace(dtype="float32")
    for o, p in zip(outs, prompts):
        shipped = sum(piece.nbytes for piece in codec.manifest(config, [len(p)]))
        assert o.metrics["bytes_transferred"] == shipped
        assert o.metrics["ttft_s"] > 0 and o.finish_reason == "length"


def test_bad_requests_are_clear_errors(served):
    _, _, llm = served
    with pytest.raises(JaxprfaasError, match=r"token ids must be in \[0, 512\)"):
        llm.generate([[1, 2, 999]])
    with pytest.raises(JaxprfaasError, match="need a tokenizer"):
        llm.generate(["hello"])
    with pytest.raises(JaxprfaasError, match="at least one token"):
        llm.generate([[]])


def test_client_streams_tokens(served):
    import asyncio
    from jaxprfaas import Client
    _, _, llm = served
    expect = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4))[0].token_ids

    async def collect():
        return [t async for t in Client(llm.address).stream([5, 6, 7, 8], SamplingParams(max_tokens=4))]
    assert asyncio.run(collect()) == expect


def test_text_prompts_with_a_tokenizer(served, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from jaxprfaas import Client
    _, _, llm = served
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = "the lazy fox jumps over the quick dog"
    with Client(llm.address, tokenizer=tmp_path) as client:
        out = client.generate([text], SamplingParams(max_tokens=4))[0]
    ids = tok.encode(text).ids
    assert out.prompt_token_ids == ids
    assert out.token_ids == llm.generate([ids], SamplingParams(max_tokens=4))[0].token_ids
    assert out.text == tok.decode(out.token_ids)
    with pytest.raises(JaxprfaasError, match="no tokenizer at"):
        Client(llm.address, tokenizer=tmp_path / "missing")

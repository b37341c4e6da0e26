"""Prefill engine: packed, chunked prefill exports the same states and first tokens as one
ragged model.prefill; the token budget holds; the layer hook fires in layer order with the
final arrays of each finishing request."""

import jax
import numpy as np
import pytest

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.generate import SamplingParams
from jaxprfaas.model.hybrid_lm import HybridLM
from jaxprfaas.runtime.prefill_engine import PrefillEngine
from jaxprfaas.runtime.request import Request

CFG = ModelConfig.preset("tiny")
LENS = [5, 40, 1, 33, 17]


@pytest.fixture(scope="module")
def model():
    return HybridLM(CFG, seed=9)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def whole(model, prompts):
    tokens = np.zeros((len(LENS), max(LENS)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return model.prefill(tokens, lengths=np.array(LENS), impl="xla")


def close(a, b, tol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-6), np.abs(a - b).max()


def test_chunked_packed_prefill_equals_whole_prefill(model, prompts, whole):
    logits, ref = whole
    eng = PrefillEngine(model, token_budget=32, chunk_size=16, max_batch=2, len_buckets=(16,),
                        batch_buckets=(2,), impl="xla")
    hooks = {}
    for i, p in enumerate(prompts):
        eng.add_request(Request(tuple(p), SamplingParams(max_tokens=4), request_id=f"r{i}"),
                        on_layer=lambda rid, layer, arrays: hooks.setdefault(rid, []).append((layer, arrays)))
    results, steps, done = {}, 0, 0
    while eng.has_work():
        for res in eng.step():
            results[res.request.request_id] = res
        assert eng.tokens_done - done <= 32                  # the budget holds every step
        done, steps = eng.tokens_done, steps + 1
    # 2 rows a step: [r0 5, r1 16] [r1 16, r2 1] [r1 8, r3 16] [r3 16, r4 16] [r3 1, r4 1]
    assert done == sum(LENS) and steps == 5
    for i, n in enumerate(LENS):
        res = results[f"r{i}"]
        st = res.state
        assert st.batch == 1 and int(st.lengths[0]) == n and st.capacity >= n
        assert res.first_token == int(np.argmax(np.asarray(logits[i, n - 1])))   # greedy token 0
        for a, b in zip(st.recurrent + st.conv, ref.recurrent + ref.conv):
            close(a[0], b[i])
        for a, b in zip(st.latent, ref.latent):
            close(a[0, :n], b[i, :n])
        # the hook saw every layer once, in order, with the exported arrays
        seen = hooks[f"r{i}"]
        assert [l for l, _ in seen] == list(range(CFG.num_hidden_layers))
        for layer, arrays in seen:
            if CFG.is_mla(layer):
                j = CFG.mla_layers.index(layer)
                assert arrays["mla_latent"].shape == (1, n, CFG.latent_dim)
                close(arrays["mla_latent"][0], st.latent[j][0, :n])
            else:
                k = CFG.kda_layers.index(layer)
                close(arrays["kda_state"], st.recurrent[k])
                close(arrays["conv"], st.conv[k])


def test_bad_requests_and_settings_are_refused(model):
    with pytest.raises(JaxprfaasError, match="chunk_size must be in"):
        PrefillEngine(model, token_budget=16, chunk_size=32)
    eng = PrefillEngine(model, token_budget=16, impl="xla")
    with pytest.raises(JaxprfaasError, match="token ids must be in"):
        eng.add_request(Request((1, 999), request_id="bad"))
    with pytest.raises(JaxprfaasError, match="at least one token"):
        Request(())
    eng.add_request(Request((1, 2), request_id="a"))
    with pytest.raises(JaxprfaasError, match="already queued"):
        eng.add_request(Request((1, 2), request_id="a"))
    assert eng.cancel("a") and not eng.has_work() and eng.step() == []


def test_blockwise_mla_prefill_equals_the_models(model):
    from jaxprfaas.runtime.model_runner import mla_prefill_blockwise
    attn = model.layers[CFG.mla_layers[0]].attn
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 24, CFG.hidden_size)).astype(np.float32)
    cache = rng.standard_normal((2, 40, CFG.latent_dim)).astype(np.float32)
    old = np.array([37, 0], np.int32)                      # a continued row and a fresh one
    want, want_buf = jax.jit(attn.prefill)(x, cache, old)   # jitted: two programs, not dozens of eager ops
    got, buf = jax.jit(lambda *a: mla_prefill_blockwise(attn, *a, block=16))(x, cache, old)  # 64 keys: 4 blocks
    np.testing.assert_array_equal(np.asarray(buf), np.asarray(want_buf))
    close(got, want, tol=1e-5)

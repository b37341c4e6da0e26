"""Decode engine: continuous batching equals the reference loop token for token, with requests
arriving at different steps, mixed sampling params, a pool too small for all of them at once
(so some queue), no recompilation after warm-up, cancellation that frees everything."""

import numpy as np
import pytest

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.generate import SamplingParams, generate, sample_tokens, step_keys
from jaxprfaas.model.hybrid_lm import HybridLM
from jaxprfaas.runtime.cache_pool import CachePool, PoolLayout, PoolTooSmall
from jaxprfaas.runtime.decode_engine import DecodeEngine
from jaxprfaas.runtime.request import FinishReason, Request

CFG = ModelConfig.preset("tiny")
LENS = [5, 23, 1, 40, 17, 9, 31, 12]
ARRIVE = [0, 0, 1, 2, 2, 4, 5, 7]          # decode step at which each request is imported
STOPS = tuple(range(100, 160))            # ~12% of the vocabulary: some sequences stop early
PARAMS = [
    SamplingParams(max_tokens=10),
    SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=1),
    SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=2),
    SamplingParams(max_tokens=8, stop_token_ids=STOPS),
    SamplingParams(max_tokens=3),
    SamplingParams(max_tokens=11, temperature=1.3, seed=3, stop_token_ids=STOPS),
    SamplingParams(max_tokens=7, temperature=0.9, top_k=50, top_p=0.8, seed=4),
    SamplingParams(max_tokens=1),
]


@pytest.fixture(scope="module")
def model():
    return HybridLM(CFG, seed=5)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return generate(model, prompts, PARAMS, impl="xla")


@pytest.fixture(scope="module")
def prefilled(model, prompts):
    """(one-sequence state, token 0) per request, from one ragged prefill like the reference's."""
    tokens = np.zeros((len(prompts), max(LENS)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    logits, state = model.prefill(tokens, lengths=np.array(LENS), impl="xla")
    last = logits[np.arange(len(LENS)), np.array(LENS) - 1]
    first = np.asarray(sample_tokens(last, np.array([p.temperature for p in PARAMS], np.float32),
                                     np.array([p.top_k for p in PARAMS], np.int32),
                                     np.array([p.top_p for p in PARAMS], np.float32),
                                     step_keys([p.seed for p in PARAMS], [0] * len(PARAMS))))
    return [(state.select([i]), int(first[i])) for i in range(len(LENS))]


@pytest.fixture(scope="module")
def engine(model):
    # 8 slots but 8 pages of 16 tokens: the workload needs 17 pages, so requests must queue
    pool = CachePool(PoolLayout(CFG, num_slots=8, num_pages=8, page_size=16))
    eng = DecodeEngine(model, pool, max_batch=8, max_model_len=64, batch_buckets=(4,), impl="xla")
    eng.warmup()
    return eng


def run(engine, prompts, prefilled, cancel_at=None):
    """Import requests at their arrival steps, step until idle; returns (tokens, events, trace)."""
    reqs = [Request(tuple(p), sp, request_id=f"r{i}") for i, (p, sp) in enumerate(zip(prompts, PARAMS))]
    out = {r.request_id: [] for r in reqs}
    finished, trace, step = {}, [], 0
    while step <= max(ARRIVE) or engine.has_work():
        for i, r in enumerate(reqs):
            if ARRIVE[i] == step:
                engine.import_state(r, *prefilled[i])
        if cancel_at and step == cancel_at[0]:
            for rid in cancel_at[1]:
                assert engine.cancel(rid)
        trace.append((len(engine.running), len(engine.waiting), engine.pool.used_bytes))
        for ev in engine.step():
            if ev.token is not None:
                out[ev.request_id].append(ev.token)
            if ev.finished:
                finished[ev.request_id] = ev.finished
        step += 1
        assert step < 200, "engine did not drain"
    return [out[r.request_id] for r in reqs], finished, trace


def test_continuous_batching_equals_reference_without_recompiling(engine, prompts, prefilled, reference):
    compiled = engine.compile_count
    assert engine.batch_buckets == (4, 8)
    got, finished, trace = run(engine, prompts, prefilled)
    assert got == reference                                    # greedy and seeded, token for token
    assert engine.compile_count == compiled                    # no program after warm-up
    assert len({r for r, _, _ in trace}) >= 3                  # the batch size really varied
    assert max(w for _, w, _ in trace) > 0                     # and the small pool made requests queue
    assert engine.pool.used_bytes == 0 and not engine.pool.seqs  # every slot and page came back
    assert finished["r7"] == FinishReason.LENGTH               # max_tokens=1 ends at the prefill token
    assert any(got[i][-1] in STOPS and finished[f"r{i}"] == FinishReason.STOP for i in (3, 5))
    # seeded sampling is reproducible run to run (and equal to the reference loop above)
    again, _, _ = run(engine, prompts, prefilled)
    assert again == got


def test_cancel_mid_decode_frees_slots_and_pages(engine, prompts, prefilled, reference):
    seen = []
    got, finished, trace = run(engine, prompts, prefilled, cancel_at=(3, ["r1", "r2"]))
    assert finished["r1"] == finished["r2"] == FinishReason.CANCELLED
    assert len(got[1]) < len(reference[1]) and got[1] == reference[1][:len(got[1])]
    others = [i for i in range(len(LENS)) if i not in (1, 2)]
    assert [got[i] for i in others] == [reference[i] for i in others]   # neighbours unharmed
    assert engine.pool.used_bytes == 0 and engine.pool.slots_in_use == 0
    # cancelling frees at once: the pool holds fewer bytes right after the call
    r = Request(tuple(prompts[3]), PARAMS[3], request_id="c", on_token=seen.append)
    engine.import_state(r, *prefilled[3])
    engine.step()
    held = engine.pool.used_bytes
    assert held > 0 and engine.cancel("c") and engine.pool.used_bytes == 0
    assert not engine.cancel("c") and seen[-1].finished == FinishReason.CANCELLED
    assert [e.finished for e in engine.step()] == [FinishReason.CANCELLED]   # delivered by the next step too
    assert not engine.has_work()


def test_max_model_len_and_bad_imports(model, engine, prompts, prefilled):
    state, tok = prefilled[3]                                 # 40 tokens; max_model_len is 64
    long = Request(tuple(prompts[3]), SamplingParams(max_tokens=100), request_id="long")
    engine.import_state(long, state, tok)
    evs = list(engine.stream())
    assert len(evs) == 64 - 40 + 1 and evs[-1].finished == FinishReason.LENGTH
    assert engine.pool.used_bytes == 0
    # a pool of 2 pages can never hold 40 + 9 rows: refused at once, not queued forever
    small = DecodeEngine(model, CachePool(PoolLayout(CFG, num_slots=1, num_pages=2, page_size=16)),
                         max_batch=1, max_model_len=64, impl="xla")
    with pytest.raises(PoolTooSmall, match="49 tokens need 4 pages of 16 tokens but the pool has 2 pages"):
        small.import_state(Request(tuple(prompts[3]), SamplingParams(max_tokens=10), request_id="big"), state, tok)
    assert not small.has_work()
    # long max_model_len: the page table comes in context buckets (4K, 16K, 64K, max), not one width
    wide = DecodeEngine(model, CachePool(PoolLayout(CFG, num_slots=1, num_pages=2, page_size=64)),
                        max_batch=1, max_model_len=100_000, impl="xla")
    assert wide.page_buckets == (64, 256, 1024, 1563)
    with pytest.raises(JaxprfaasError, match="state holds 40 tokens but the prompt has 5"):
        engine.import_state(Request(tuple(prompts[0]), PARAMS[0], request_id="x"), state, tok)
    with pytest.raises(JaxprfaasError, match="one-sequence state"):
        from jaxprfaas.model.state import HybridState
        engine.import_state(Request((1, 2), PARAMS[0], request_id="y"), HybridState.concat([state, state]), tok)
    assert not engine.has_work() and engine.pool.used_bytes == 0


def test_pool_sink_receives_a_remote_state_chunk_by_chunk(engine, prompts, prefilled, reference):
    from jaxprfaas.runtime import state_codec as codec
    from jaxprfaas.runtime.decode_engine import PoolSink
    from jaxprfaas.runtime.transfer import SinkFull, TransferMeta
    i = 1                                                    # 23 tokens, sampled with a seed
    state, tok = prefilled[i]
    req = Request(tuple(prompts[i]), PARAMS[i], request_id="remote")
    sink = PoolSink(engine, lambda rid, annex: (req, tok))
    pieces = codec.manifest(CFG, [LENS[i]])
    refs = codec.plan(pieces, codec.MIN_CHUNK_BYTES)
    meta = TransferMeta(request_id="remote", lengths=(LENS[i],), pieces=pieces, prefix_rows=0, prefix_key="",
                        num_chunks=len(refs))
    # a full pool refuses with SinkFull (the sender retries later) and holds nothing
    engine.pool.allocate("hog", 16 * 8)
    with pytest.raises(SinkFull, match="free: 7 slots, 0 pages"):
        sink.begin("remote", meta)
    engine.pool.free("hog")
    sink.begin("remote", meta)
    sink.begin("remote", meta)                               # a resume keeps the reservation
    arrays = {layer: codec.layer_arrays(CFG, state, layer) for layer in range(CFG.num_hidden_layers)}
    for ref in reversed(refs):                               # any order; each piece lands when complete
        view = codec.payload_view(arrays[ref.piece.layer][ref.piece.kind], ref)
        sink.write("remote", ref.seq, ref.piece, ref.offset, view)
    assert sink.commit("remote") == codec.digest(arrays[p.layer][p.kind] for p in pieces)
    out = [e.token for e in engine.stream() if e.request_id == "remote" and e.token is not None]
    assert out == reference[i]
    assert engine.pool.used_bytes == 0
    # an aborted transfer gives its reservation back at the next pump
    sink.begin("remote", meta)
    assert engine.pool.used_bytes > 0
    sink.abort("remote", "sender gone")
    engine.step()
    assert engine.pool.used_bytes == 0 and not engine.has_work()
    engine.sinks.remove(sink)

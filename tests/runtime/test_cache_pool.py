"""Cache pool: exact bytes, alloc/free without leaks, refcounted sharing, clear refusals, and
writes that land in the right slot and pages without touching anyone else's."""

import numpy as np
import pytest

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.model.state import HybridState, state_nbytes
from jaxprfaas.runtime.cache_pool import CachePool, PoolFull, PoolLayout, PoolTooSmall

CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=5, mla_layers=(1, 4))


def test_layout_bytes_are_exact_and_match_the_state_contract():
    lay = PoolLayout(CFG, num_slots=3, num_pages=7, page_size=16)
    pool = CachePool(lay)
    assert pool.device_bytes == lay.capacity_bytes == 3 * lay.slot_bytes + 7 * lay.page_bytes
    # one slot + the pages of n tokens is exactly a HybridState of n tokens (less its lengths int)
    assert lay.slot_bytes + lay.page_bytes == state_nbytes(CFG, 16) - 4
    # from bytes: max_seqs slots (each keeps room for one page at least), pages for the rest
    big = PoolLayout.from_bytes(CFG, 10 * lay.slot_bytes + 13 * lay.page_bytes + 7, page_size=16, max_seqs=10)
    assert (big.num_slots, big.num_pages) == (10, 13)
    short = PoolLayout.from_bytes(CFG, 4 * (lay.slot_bytes + 2 * lay.page_bytes), page_size=16, max_seqs=10,
                                  min_tokens_per_seq=32)
    assert (short.num_slots, short.num_pages) == (4, 8)
    with pytest.raises(PoolTooSmall, match="cannot hold one sequence"):
        PoolLayout.from_bytes(CFG, lay.slot_bytes, page_size=16)


def test_alloc_free_refcounts_and_refusals():
    pool = CachePool(PoolLayout(CFG, num_slots=2, num_pages=6, page_size=16))
    a = pool.allocate("a", 40)                       # 3 pages
    assert len(a.pages) == 3 and pool.used_bytes == pool.layout.slot_bytes + 3 * pool.layout.page_bytes
    assert not pool.can_allocate(64)                 # 4 pages > 3 free
    with pytest.raises(PoolFull, match="needs 1 slot \\+ 4 pages; free: 1 slots, 3 pages"):
        pool.allocate("b", 64)
    with pytest.raises(PoolTooSmall, match="can never fit"):
        pool.allocate("huge", 16 * 7)
    with pytest.raises(JaxprfaasError, match="already holds"):
        pool.allocate("a", 1)
    pool.allocate("b", 0)
    pool.share_pages("a", "b", 2)                    # prefix sharing: refcounts, not copies
    assert pool.pages_in_use == 3
    with pytest.raises(PoolFull, match="0 slots"):
        pool.allocate("c", 1)
    pool.free("a")
    assert pool.pages_in_use == 2                    # b still holds the shared two
    pool.extend("b", 16 * 5)
    assert len(pool.seqs["b"].pages) == 5
    with pytest.raises(PoolFull):
        pool.extend("b", 16 * 7)
    pool.free("b")
    pool.free("b")                                   # idempotent
    assert pool.used_bytes == 0 and pool.slots_in_use == 0 and pool.pages_in_use == 0


def test_writes_round_trip_and_leave_neighbours_alone():
    rng = np.random.default_rng(0)
    pool = CachePool(PoolLayout(CFG, num_slots=3, num_pages=8, page_size=16))
    states = {}
    for sid, n in (("x", 37), ("y", 16), ("z", 5)):
        pool.allocate(sid, n + 3)
        st = HybridState.zeros(CFG, 1, n)
        st = st.replace(
            recurrent=tuple(rng.standard_normal(r.shape).astype(np.float32) for r in st.recurrent),
            conv=tuple(rng.standard_normal(c.shape).astype(np.float32) for c in st.conv),
            latent=tuple(rng.standard_normal(l.shape).astype(np.float32) for l in st.latent),
            lengths=np.array([n], np.int32))
        pool.write_state(sid, st)
        states[sid] = (st, n)
    pool.free("y")                                   # freed pages get reused by w ...
    pool.allocate("w", 30)
    rows = rng.standard_normal((30, CFG.latent_dim)).astype(np.float32)
    pool.write_latent("w", 1, 0, rows[:11])          # host rows, written in two pieces
    pool.write_latent("w", 1, 11, rows[11:])
    np.testing.assert_array_equal(np.asarray(pool.read_state("w", 30).latent[1][0]), rows)
    for sid in ("x", "z"):                           # ... and x, z are untouched
        st, n = states[sid]
        back = pool.read_state(sid, n)
        for a, b in zip(back.recurrent + back.conv + back.latent, st.recurrent + st.conv + st.latent):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[:, :n] if a.ndim == 3 and a.shape[1] == n
                                          else np.asarray(b))
    with pytest.raises(JaxprfaasError, match="outside its"):
        pool.write_latent("z", 0, 4, rows[:20])  # z holds one page of 16
    with pytest.raises(JaxprfaasError, match="recurrent must be"):
        pool.write_kda("z", 0, np.zeros((3, 3), np.float32), np.zeros((3, 96), np.float32))
    with pytest.raises(JaxprfaasError, match="holds no pool memory"):
        pool.write_kda("nope", 0, None, None)

"""Global KV index: rolling block hashes, longest usable match, events, thread safety."""

import threading

import numpy as np

from jaxprfaas.scheduler.kv_index import KVIndex, block_hashes


def test_block_hashes_are_prefix_keys():
    a = list(range(1000))
    b = list(range(512)) + [7] * 488
    ha, hb = block_hashes(a, 128), block_hashes(b, 128)
    assert len(ha) == 7 and len(hb) == 7           # the partial tail block is not keyed
    assert ha[:4] == hb[:4] and ha[4] != hb[4]      # equal up to the first differing block
    # a block equal in content but after a different prefix gets a different key
    c = [9] * 128 + list(range(128))
    assert block_hashes(c, 128)[1] != block_hashes(a, 128)[0]
    assert block_hashes(np.asarray(a), 128) == ha   # lists and arrays agree


def test_longest_match_per_cluster_and_node():
    idx = KVIndex(block_size=100)
    keys = block_hashes(range(1000), 100)
    idx.add("pd", 0, keys[:6])
    idx.add("pd", 1, keys[:3])
    idx.add("prfaas", 0, keys[:8])
    m = idx.longest_match(keys)
    assert m[("pd", 0)].tokens == 600 and m[("pd", 1)].tokens == 300 and m[("prfaas", 0)].tokens == 800
    best = idx.best_per_cluster(keys)
    assert best["pd"].location == ("pd", 0) and best["prfaas"].blocks == 8
    other = block_hashes([5] * 1000, 100)
    assert idx.longest_match(other) == {}


def test_match_ends_where_a_kda_state_snapshot_exists():
    idx = KVIndex(block_size=10)
    keys = list(range(10))
    idx.add("pd", 0, keys, state_every=4)           # states after blocks 4, 8 and 10
    assert idx.longest_match(keys[:7])[("pd", 0)].blocks == 4
    assert idx.longest_match(keys)[("pd", 0)].blocks == 10
    idx.add("pd", 1, keys[:6], state_every=0)       # only at its end (block 6)
    assert idx.longest_match(keys[:5]).get(("pd", 1)) is None
    assert idx.longest_match(keys)[("pd", 1)].blocks == 6


def test_evict_cuts_the_prefix_and_counts():
    idx = KVIndex(block_size=1)
    idx.add("pd", 0, [1, 2, 3, 4])
    assert idx.blocks_held("pd", 0) == 4
    idx.evict("pd", 0, [3])
    assert idx.longest_match([1, 2, 3, 4])[("pd", 0)].blocks == 2
    assert idx.blocks_held("pd", 0) == 3
    idx.drop_node("pd", 0)
    assert idx.blocks_held("pd", 0) == 0 and len(idx) == 0


def test_concurrent_add_evict_match_is_consistent():
    idx = KVIndex(block_size=1)
    n_threads, rounds = 8, 300
    errors = []

    def worker(node):
        try:
            keys = [(node, i) for i in range(20)]
            shared = list(range(10))
            for r in range(rounds):
                idx.add("pd", node, shared + keys)
                m = idx.longest_match(shared)
                assert all(v.blocks <= 10 for v in m.values())
                if r % 2:
                    idx.evict("pd", node, keys[10:])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    # every node ended on an odd round (evicted its last 10 own keys): 10 shared + 10 own each
    for n in range(n_threads):
        assert idx.blocks_held("pd", n) == 20
        assert idx.longest_match(list(range(10)))[("pd", n)].blocks == 10
    assert len(idx) == 10 + 10 * n_threads

"""Prefill continues from a state; ragged batches equal each sequence alone; state sizes are exact."""

import numpy as np
import pytest

from jaxprfaas.model import ModelConfig, state_bytes_split, state_nbytes
from jaxprfaas.model.hybrid_lm import HybridLM
from jaxprfaas.model.state import HybridState

CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=5, mla_layers=(1, 4))


@pytest.fixture(scope="module")
def model():
    return HybridLM(CFG, seed=3)


def close(a, b, tol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-6), np.abs(a - b).max()


def valid_latent(state, row):
    n = int(state.lengths[row])
    return [np.asarray(l[row, :n]) for l in state.latent]


@pytest.mark.parametrize("split", [64, 37, 128, 1])   # on and off chunk boundaries
def test_split_prefill_equals_whole(model, split):
    x = np.random.default_rng(split).integers(3, CFG.vocab_size, (2, 150))
    full, s_full = model.prefill(x, impl="xla")
    a, s = model.prefill(x[:, :split], impl="xla")
    b, s = model.prefill(x[:, split:], s, impl="xla")
    close(np.concatenate([a, b], axis=1), full)
    for r0, r1 in zip(s.recurrent, s_full.recurrent):
        close(r0, r1)
    for c0, c1 in zip(s.conv, s_full.conv):
        close(c0, c1)
    for row in range(2):
        for l0, l1 in zip(valid_latent(s, row), valid_latent(s_full, row)):
            close(l0, l1)


def test_ragged_batch_equals_each_alone(model):
    rng = np.random.default_rng(7)
    lengths = [150, 3, 64, 97]
    x = np.zeros((4, 150), np.int64)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.integers(3, CFG.vocab_size, n)
    logits, state = model.prefill(x, lengths=lengths, impl="xla")
    for i, n in enumerate(lengths):
        alone, s1 = model.prefill(x[i:i + 1, :n], impl="xla")
        close(logits[i, :n], alone[0])
        for r0, r1 in zip(state.recurrent, s1.recurrent):
            close(r0[i], r1[0])
        for c0, c1 in zip(state.conv, s1.conv):
            close(c0[i], c1[0])
        for l0, l1 in zip(valid_latent(state, i), valid_latent(s1, 0)):
            close(l0, l1)
    # a ragged continuation: each row continues from its own length, then decodes
    more = rng.integers(3, CFG.vocab_size, (4, 5))
    _, s2 = model.prefill(more, state, lengths=[5, 2, 0, 4], impl="xla")
    assert np.asarray(s2.lengths).tolist() == [155, 5, 64, 101]
    step, _ = model.decode(more[:, 0], s2, impl="xla")
    for i, (n, m) in enumerate(zip(lengths, [5, 2, 0, 4])):
        seq = np.concatenate([x[i, :n], more[i, :m], more[i, :1]])
        alone, _ = model.prefill(seq[None], impl="xla")
        close(step[i], alone[0, -1])


def test_nbytes_equals_actual_bytes(model):
    for length in (0, 1, 70):
        x = np.random.default_rng(length).integers(3, CFG.vocab_size, (1, max(length, 1)))
        _, s = model.prefill(x[:, :length], impl="xla") if length else (None, HybridState.zeros(CFG, 1))
        s = s.with_capacity(length)
        assert s.size_bytes == state_nbytes(CFG, length)
    s = HybridState.zeros(CFG, 3, capacity=40)
    assert s.size_bytes == state_nbytes(CFG, 40, batch=3)


def test_48b_state_size_matches_reference_numbers():
    cfg = ModelConfig.preset("kimi-linear-48b-a3b")
    fixed, per_token = state_bytes_split(cfg)
    assert per_token == 7 * 576 * 2 == 8064                       # 7 MLA layers, bf16 latent
    assert fixed == 20 * (32 * 128 * 128 * 4 + 3 * 3 * 4096 * 2) + 4  # 20 KDA layers: fp32 state + conv
    assert fixed == 43_417_604
    llama70b_per_token = 80 * 8 * 128 * 2 * 2
    assert round(llama70b_per_token / per_token, 1) == 40.6

"""The Flax model equals transformers' KimiLinearForCausalLM, loaded from an original-name checkpoint."""

import numpy as np
import pytest

import hf_oracle as H
from jaxprfaas.model.checkpoint import load_hf_checkpoint

# Several shapes: MLA at irregular positions, top-k > 1, dense first layers, grouped routing.
SHAPES = {
    "tiny": dict(num_layers=4, mla=(4,), first_dense=1, experts=8, topk=2),
    "irregular": dict(num_layers=6, mla=(1, 5), first_dense=2, experts=8, topk=3, heads=3, head_dim=16),
    "grouped": dict(num_layers=5, mla=(3, 5), first_dense=0, experts=16, topk=4, n_group=4, topk_group=2,
                    n_shared=2),
}


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    shards = 3 if request.param == "irregular" else 1
    tf = H.make_reference(d, seed=len(request.param), shards=shards, **SHAPES[request.param])
    return tf, load_hf_checkpoint(d, dtype="float32")


def test_prefill_logits_equal_transformers(pair):
    tf, ours = pair
    x = np.random.default_rng(1).integers(3, 512, (2, 70))   # T not a multiple of 64, batch 2
    logits, state = ours.prefill(x, impl="xla")
    assert rel_err(logits, H.tf_logits(tf, x)) < 1e-4
    assert np.asarray(state.lengths).tolist() == [70, 70]


def test_decode_continues_prefill_like_full_forward(pair):
    tf, ours = pair
    x = np.random.default_rng(2).integers(3, 512, (2, 69))
    ref = H.tf_logits(tf, x)
    logits, state = ours.prefill(x[:, :65], impl="xla")
    assert rel_err(logits, ref[:, :65]) < 1e-4
    for t in range(65, 69):
        step, state = ours.decode(x[:, t], state, impl="xla")
        assert rel_err(step, ref[:, t]) < 1e-4, t

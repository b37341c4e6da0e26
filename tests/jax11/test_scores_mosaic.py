"""The Mosaic GPU scores kernel in JAX 0.11's Mosaic GPU interpreter on the CPU, against the
portable kernel (`chunk_intra.scores(..., form="split")`), and through Mosaic GPU's real lowering
for an H100. Run under JAX 0.11.2 (JAX 0.10 has another Mosaic GPU API)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk_intra as ci
from jaxprfaas.pallas_kernels.scores_mosaic import scores_mosaic

NAMES = ("akk", "aqk", "qg", "kg", "kb", "beta", "gl", "flags")


def _inputs(B, T, H, K, key, lo, hi, strong_chunks=()):
    ks = jax.random.split(jax.random.PRNGKey(key), 4)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[2], (B, T, H, K), minval=lo, maxval=hi))
    if strong_chunks:  # some chunks decay by up to 30 nats a token in some channels
        u = jax.random.uniform(jax.random.PRNGKey(key + 7), (B, T, H, K))
        strong = -30.0 * u * (u > 0.6)
        rows = np.zeros((T,), bool)
        for c in strong_chunks:
            rows[c * 64:(c + 1) * 64] = True
        g = jnp.where(jnp.asarray(rows)[None, :, None, None], strong + g, g)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    return q, k, g, beta


def _both(q, k, g, beta, l2=True, precise=True):
    K = q.shape[-1]
    ref = ci.scores(q, k, g, beta, None, scale=K ** -0.5, l2=l2, form="split", interpret=True)
    out = scores_mosaic(q, k, g, beta, scale=K ** -0.5, l2=l2, precise=precise, interpret=True)
    return [np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for x in ref], \
        [np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for x in out]


def _close(name, x, y, tol=2e-2):
    assert x.shape == y.shape, (name, x.shape, y.shape)
    assert np.isfinite(x).all(), name
    err, big = np.abs(x - y).max(), np.abs(y).max()
    assert err <= tol * big + 1e-6, (name, err, big)


@pytest.mark.parametrize("B,T,l2,precise", [(1, 128, True, True), (2, 192, True, True), (1, 128, False, True),
                                             (1, 128, True, False)])
def test_mosaic_scores_equal_the_portable_ones(B, T, l2, precise):
    ref, out = _both(*_inputs(B, T, 2, 128, key=B + T, lo=-6.0, hi=-1.0), l2=l2, precise=precise)
    for name, x, y in zip(NAMES, out, ref):
        if name == "flags":
            np.testing.assert_array_equal(x, y)
        else:
            # Akk feeds the solve: with `precise` its products are split bf16 triples (≈2⁻¹⁶)
            _close(name, x, y, tol=1e-4 if name == "akk" and precise else 2e-2)


def test_mosaic_scores_with_strong_gates():
    """Up to 30 nats a token in chunks 1 and 2: unflagged entries right, all finite."""
    B, T, H = 1, 192, 2
    ref, out = _both(*_inputs(B, T, H, 128, key=3, lo=-6.0, hi=0.0, strong_chunks=(1, 2)))
    flags = ref[NAMES.index("flags")]
    np.testing.assert_array_equal(out[NAMES.index("flags")], flags)
    assert flags.sum() > 0 and flags.sum() < flags.size  # both kinds of sub-chunks are tested
    # the flagged sub-chunks' diagonal blocks may hold any finite value
    keep = np.ones((B, H, T, 64), bool)
    for b, h, s in zip(*np.nonzero(flags)):
        keep[b, h, s * 16:(s + 1) * 16, (s % 4) * 16:(s % 4 + 1) * 16] = False
    for name, x, y in zip(NAMES, out, ref):
        if name in ("akk", "aqk"):
            assert np.isfinite(x).all(), name
            _close(name, np.where(keep, x, 0.0), np.where(keep, y, 0.0))
        elif name != "flags":
            _close(name, x, y)


def test_mosaic_scores_then_the_diagonal_fixup():
    """`chunk_intra.diag_fixup` on the Mosaic kernel's flags rewrites its flagged blocks: then all of
    Akk and Aqk equal the portable kernels' (all finite)."""
    B, T, H, K = 1, 128, 2, 128
    q, k, g, beta = _inputs(B, T, H, K, key=11, lo=-6.0, hi=0.0, strong_chunks=(0,))
    kw = dict(scale=K ** -0.5, l2=True, interpret=True)
    ref = ci.scores(q, k, g, beta, None, form="split", **kw)
    out = scores_mosaic(q, k, g, beta, **kw)
    assert int(out[7].sum()) > 0
    fixed = [ci.diag_fixup(q, k, g, beta, None, o[7], o[0], o[1], **kw) for o in (ref, out)]
    for name, x, y in zip(("akk", "aqk"), fixed[1], fixed[0]):
        _close(name, np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("precise", [True, False])
def test_mosaic_scores_lower_for_an_h100(precise):
    """Through Mosaic GPU's own lowering (layouts, swizzles, TMA descriptors), not the interpreter."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
    from test_gpu_lowering import _h100_context

    B, T, H, K = 1, 256, 2, 128
    z = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    f = jax.jit(lambda q, k, g, b: scores_mosaic(q, k, g, b, scale=K ** -0.5, l2=True, precise=precise))
    with _h100_context():
        text = f.trace(z(B, T, H, K), z(B, T, H, K), jnp.zeros((B, T, H, K)),
                       jnp.zeros((B, T, H))).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic" in text.lower()

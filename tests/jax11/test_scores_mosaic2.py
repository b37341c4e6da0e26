"""The two-warpgroup Mosaic GPU scores kernel (`scores_mosaic2`) against the portable kernel
(`chunk_intra.scores(..., form="split", kk_bf16=True)`): in JAX 0.11's Mosaic GPU interpreter on
the CPU (with its race detector), through Mosaic GPU's real lowering for an H100, and on a GPU
against the Triton kernel where one is present. Run under JAX 0.11.2."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprfaas.pallas_kernels import chunk_intra as ci
from jaxprfaas.pallas_kernels.scores_mosaic2 import scores_mosaic2

NAMES = ("akk", "aqk", "qg", "kg", "kb", "beta", "gl", "flags")
K = 128


def _inputs(B, T, H, key, lo=-6.0, hi=-1.0, strong_chunks=()):
    """Random bf16 q, k, gates −e^u (u uniform in [lo, hi]) and β; `strong_chunks` decay by up to
    30 nats a token in 40% of the channels."""
    ks = jax.random.split(jax.random.PRNGKey(key), 5)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K)).astype(jnp.bfloat16)
    g = -jnp.exp(jax.random.uniform(ks[2], (B, T, H, K), minval=lo, maxval=hi))
    if strong_chunks:
        u = jax.random.uniform(ks[4], (B, T, H, K))
        rows = np.zeros((T,), bool)
        for c in strong_chunks:
            rows[c * 64:(c + 1) * 64] = True
        g = jnp.where(jnp.asarray(rows)[None, :, None, None], g - 30.0 * u * (u > 0.6), g)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    return q, k, g, beta


def _np(xs):
    return [np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for x in xs]


def _both(q, k, g, beta, l2=True, interpret=True):
    kw = dict(scale=K ** -0.5, l2=l2, interpret=interpret)
    ref = ci.scores(q, k, g, beta, None, form="split", kk_bf16=True, **kw)
    return _np(ref), _np(scores_mosaic2(q, k, g, beta, **kw))


def _close(name, x, y):
    """Akk within 1e-2 of the largest entry (both bf16 products), the rest 2e-2, all finite."""
    assert x.shape == y.shape, (name, x.shape, y.shape)
    assert np.isfinite(x).all(), name
    err, big = np.abs(x - y).max(), np.abs(y).max()
    assert err <= (1e-2 if name == "akk" else 2e-2) * big + 1e-6, (name, err, big)


def _check(ref, out, B, T, H):
    """Flags equal; every output close, except the flagged sub-chunks' diagonal blocks of Akk and
    Aqk, which may hold any finite value (`diag_fixup` rewrites them)."""
    flags = ref[NAMES.index("flags")]
    np.testing.assert_array_equal(out[NAMES.index("flags")], flags)
    keep = np.ones((B, H, T, 64), bool)
    for b, h, s in zip(*np.nonzero(flags)):
        keep[b, h, s * 16:(s + 1) * 16, (s % 4) * 16:(s % 4 + 1) * 16] = False
    for name, x, y in zip(NAMES[:-1], out, ref):
        if name in ("akk", "aqk"):
            assert np.isfinite(x).all(), name
            x, y = np.where(keep, x, 0.0), np.where(keep, y, 0.0)
        _close(name, x, y)
    return flags


@pytest.mark.parametrize("B,T,l2", [(1, 128, True), (2, 192, True), (1, 128, False)])
def test_equals_the_portable_kernel(B, T, l2):
    H = 2
    q, k, g, beta = _inputs(B, T, H, key=B + T)
    ref, out = _both(q, k, g, beta, l2=l2)
    flags = _check(ref, out, B, T, H)
    assert flags.sum() == 0
    if not l2:  # e^{Γ_C − Γ} is exactly 1 at each chunk's last row: kg there is the key itself
        keys = np.asarray(jnp.transpose(k, (0, 2, 1, 3)).astype(jnp.float32))
        np.testing.assert_array_equal(out[NAMES.index("kg")][:, :, 63::64], keys[:, :, 63::64])


@pytest.mark.parametrize("l2", [True, False])
def test_strong_gates(l2):
    """Up to 30 nats a token in chunks 1 and 2: flags equal, the unflagged entries right, all finite."""
    B, T, H = 1, 192, 2
    ref, out = _both(*_inputs(B, T, H, key=3, lo=-6.0, hi=0.0, strong_chunks=(1, 2)), l2=l2)
    flags = _check(ref, out, B, T, H)
    assert 0 < flags.sum() < flags.size  # both kinds of sub-chunks are tested


def test_then_the_diagonal_fixup():
    """`chunk_intra.diag_fixup` on this kernel's flags: then all of Akk and Aqk equal the portable
    kernels'."""
    B, T, H = 1, 128, 2
    q, k, g, beta = _inputs(B, T, H, key=11, lo=-6.0, hi=0.0, strong_chunks=(0,))
    kw = dict(scale=K ** -0.5, l2=True, interpret=True)
    ref = ci.scores(q, k, g, beta, None, form="split", kk_bf16=True, **kw)
    out = scores_mosaic2(q, k, g, beta, **kw)
    assert int(out[7].sum()) > 0
    fixed = [_np(ci.diag_fixup(q, k, g, beta, None, o[7], o[0], o[1], **kw)) for o in (ref, out)]
    for name, x, y in zip(("akk", "aqk"), fixed[1], fixed[0]):
        _close(name, x, y)


def test_no_races():
    """The interpreter's race detector: TMA copies, mbarriers and the reuse of shared memory across
    the two warpgroups (each modelled as one thread; wgmmas are synchronous there)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    q, k, g, beta = _inputs(1, 64, 1, key=5)
    params = plgpu.InterpretGPUParams(detect_races=True)
    jax.block_until_ready(scores_mosaic2(q, k, g, beta, scale=K ** -0.5, l2=True, interpret=params))
    assert not gpu_callbacks.get_races().races_found


def test_rejects_unsupported_inputs():
    def call(T, D):
        x, f = jnp.zeros((1, T, 2, D), jnp.bfloat16), jnp.zeros((1, T, 2, D))
        scores_mosaic2(x, x, f, jnp.zeros((1, T, 2)), scale=1.0, l2=True)
    with pytest.raises(ValueError, match="Tp % 64"):
        call(100, K)
    with pytest.raises(ValueError, match="bf16 q, k"):
        call(64, 64)


@pytest.mark.parametrize("l2", [True, False])
def test_lowers_for_an_h100(l2, monkeypatch):
    """Through Mosaic GPU's own lowering (layouts, swizzles, TMA descriptors), not the interpreter;
    its shared memory (102,448 bytes when written) leaves room for two CTAs an SM (227 KB)."""
    import sys
    from pathlib import Path

    from jax.experimental.mosaic.gpu import core
    sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
    from test_gpu_lowering import _h100_context

    sizes = []
    size = core._smem_tree_size
    monkeypatch.setattr(core, "_smem_tree_size", lambda t: sizes.append(size(t)) or sizes[-1])
    B, T, H = 1, 256, 2
    z = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    f = jax.jit(lambda q, k, g, b: scores_mosaic2(q, k, g, b, scale=K ** -0.5, l2=l2))
    with _h100_context():
        text = f.trace(z(B, T, H, K), z(B, T, H, K), jnp.zeros((B, T, H, K)),
                       jnp.zeros((B, T, H))).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic" in text.lower()
    assert sizes and max(sizes) <= 110 * 1024, sizes


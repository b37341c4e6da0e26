"""Pins a fact the kernel plan relies on: JAX's Mosaic GPU interpret mode (`InterpretGPUParams`,
jax 0.10+) runs Hopper-style Mosaic GPU kernels on a CPU — TMA copies completing on an mbarrier
into swizzled shared memory, a wgmma into a register accumulator, a shared->global copy — so a
Mosaic GPU KDA kernel could be tested in CI the way the portable Pallas kernels are."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.experimental.pallas as pl  # noqa: E402
import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: E402
import jax.numpy as jnp  # noqa: E402

try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # moved or exported publicly in later versions
    InterpretGPUParams = plgpu.InterpretGPUParams


def _swizzled(shape):
    return plgpu.SMEM(shape, jnp.bfloat16, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def test_tma_barrier_wgmma_kernel_runs_interpreted_on_cpu():
    M = N = K = 64

    def body(a_gmem, b_gmem, o_gmem):
        def scoped(a_smem, b_smem, o_smem, bar):
            plgpu.copy_gmem_to_smem(a_gmem, a_smem, bar)
            plgpu.copy_gmem_to_smem(b_gmem, b_smem, bar)
            plgpu.barrier_wait(bar)

            def mm(acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            o_smem[...] = pl.run_scoped(mm, plgpu.ACC((M, N), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, _swizzled((M, K)), _swizzled((K, N)), plgpu.SMEM((M, N), jnp.float32),
                      plgpu.Barrier(num_arrivals=2))

    import inspect
    out_kw = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"  # 0.11 / 0.10
    kernel = plgpu.kernel(body, **{out_kw: jax.ShapeDtypeStruct((M, N), jnp.float32)},
                          interpret=InterpretGPUParams())
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((K, N)), jnp.bfloat16)
    out = np.asarray(kernel(a, b))
    ref = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)

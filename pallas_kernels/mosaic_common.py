"""What the Mosaic GPU kernels (`state_mosaic.py`, `solve_mosaic.py`) share:
the module itself, imported on first use (JAX 0.10's Mosaic GPU API differs, and the portable
kernels never need it), the WGMMA register layout and bf16 wgmma operands in shared memory."""
from __future__ import annotations

import jax.numpy as jnp


def plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return plgpu


def wgmma_layout():
    return plgpu().Layout.WGMMA


def tiles(shape, m=64):
    """Shared memory for a bf16 wgmma operand: [8, m] tiles, each row of m values swizzled (2m
    bytes). wgmma needs both operands swizzled alike and its K a multiple of m: 64 (128-byte
    swizzle) for 64-column tiles, 32 or 16 for narrower ones."""
    p = plgpu()
    return p.SMEM(shape, jnp.bfloat16, transforms=(p.TilingTransform((8, m)), p.SwizzleTransform(2 * m)))

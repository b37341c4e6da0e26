"""Decode step time vs cache-pool size (tiny model, CPU or GPU).

A decode step touches only the running sequences' pages, so its time must not depend on how
big the pool is. The anchor is the same step on the smallest pool, in the same run; the ratio
is what matters (it was ~18x at 64 MiB vs 8 MiB before the MLA row write moved ahead of the
page gather: XLA copied the whole donated pool every step).

    python benchmarks/decode_pool_size.py [--batch 8] [--pages 64]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from jaxprfaas.model.checkpoint import load_model
from jaxprfaas.runtime.decode_engine import DecodeEngine, _padding_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--pools-mib", default="8,64,256")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    model = load_model("tiny")
    print(f"jax {jax.__version__} on {jax.default_backend()} ({platform.processor() or platform.machine()}); "
          f"tiny model, batch {a.batch}, {a.pages} pages of 16 per sequence")
    base = None
    for mib in [int(x) for x in a.pools_mib.split(",")]:
        eng = DecodeEngine(model, pool_bytes=mib << 20, page_size=16, max_batch=16, max_model_len=a.pages * 16)
        args = _padding_batch(a.batch, a.pages)
        np.asarray(eng._call(*args))  # compile
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            np.asarray(eng._call(*args))
            times.append(time.perf_counter() - t)
        med = float(np.median(times)) * 1e3
        base = base or med
        print(f"pool {mib:4d} MiB ({eng.pool.layout.num_pages:6d} pages): {med:7.2f} ms/step  "
              f"ratio to smallest pool {med / base:5.2f}")


if __name__ == "__main__":
    main()

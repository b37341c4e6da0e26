"""Decode throughput of the serving engine: tokens/s and achieved HBM bandwidth vs batch size.

Runs `DecodeEngine.step()` (paged MLA over the pool, KDA slots via fused_recurrent_kda, in-graph
sampling, the host bookkeeping included) on the Kimi-Linear-48B-A3B layer shapes with random
bf16 weights and as many layers as fit (3 KDA : 1 MLA), every sequence holding `--context`
tokens of cache. Anchor, measured in the same run: a large device-to-device copy (bytes read +
written). The byte model counts what a step must move at least: every dense weight, the routed
experts that `batch` tokens are expected to touch under uniform routing, the lm_head, each
sequence's KDA state (read + write) and its MLA latent rows (read).

    python benchmarks/decode.py --smoke                  # CPU, tiny shapes
    python benchmarks/decode.py --out decode.json        # GPU: 48B-A3B shapes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ensure_package():
    """Import jaxprfaas from this checkout even when it is not pip-installed (device machines)."""
    try:
        import jaxprfaas.runtime.decode_engine  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import jaxprfaas
        jaxprfaas.__path__.append(str(ROOT))  # jaxprfaas.model -> ROOT/model, and so on


_ensure_package()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxprfaas.model.config import ModelConfig  # noqa: E402
from jaxprfaas.model.generate import SamplingParams  # noqa: E402
from jaxprfaas.model.hybrid_lm import HybridLM  # noqa: E402
from jaxprfaas.runtime.cache_pool import CachePool, PoolLayout  # noqa: E402
from jaxprfaas.runtime.decode_engine import DecodeEngine  # noqa: E402
from jaxprfaas.runtime.request import Request  # noqa: E402


def shape_config(layers: int, smoke: bool) -> ModelConfig:
    base = ModelConfig.preset("tiny").replace(dtype="bfloat16") if smoke else ModelConfig.preset("kimi-linear-48b-a3b")
    return base.replace(num_hidden_layers=layers, mla_layers=tuple(i for i in range(layers) if i % 4 == 3))


def param_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _pb(param) -> int:
    v = param.get_value()
    return math.prod(v.shape) * jnp.dtype(v.dtype).itemsize


def layer_bytes(config: ModelConfig) -> dict:
    """Exact parameter bytes by part, from an abstract 4-layer model (no memory touched)."""
    c4 = config.replace(num_hidden_layers=4, mla_layers=(3,))
    m = nnx.eval_shape(lambda: HybridLM(c4, seed=0))
    moe = m.layers[1].ffn
    expert = _pb(moe.w1) // c4.num_experts * 3
    return {
        "top": _pb(m.embed) + param_bytes(nnx.state(m.norm)) + (_pb(m.lm_head) if m.lm_head is not None else 0),
        "lm_head": _pb(m.lm_head if m.lm_head is not None else m.embed),
        "kda_layer": param_bytes(nnx.state(m.layers[1])),
        "mla_layer": param_bytes(nnx.state(m.layers[3])),
        "dense_ffn_extra": param_bytes(nnx.state(m.layers[0])) - param_bytes(nnx.state(m.layers[1])),
        "expert": expert,
        "experts_all": expert * c4.num_experts,
    }


def auto_layers(config: ModelConfig, max_batch: int, context: int, limit: int, page_size: int) -> int:
    lb = layer_bytes(config)
    per4 = 3 * lb["kda_layer"] + lb["mla_layer"]
    probe = PoolLayout(config.replace(num_hidden_layers=4, mla_layers=(3,)), 1, 1, page_size)
    pool4 = max_batch * (probe.slot_bytes + probe.pages_for(context + 64) * probe.page_bytes)
    # pool + the step's temporaries (gathered pages and states, ~1.5x the pool) per 4 layers
    room = 0.88 * limit - lb["top"] - 2 ** 30
    n = int(room // (per4 + 2.5 * pool4)) * 4
    return max(4, min(n, 28))


def step_bytes(config: ModelConfig, lb: dict, batch: int, context: int, pool: CachePool) -> int:
    c = config
    n_kda, n_mla = len(c.kda_layers), len(c.mla_layers)
    n_moe = sum(1 for i in range(c.num_hidden_layers) if c.is_moe(i))
    touched = c.num_experts * (1 - (1 - c.num_experts_per_token / c.num_experts) ** batch)
    weights = (n_kda * lb["kda_layer"] + n_mla * lb["mla_layer"] + lb["dense_ffn_extra"]
               - n_moe * lb["experts_all"] + n_moe * touched * lb["expert"] + lb["lm_head"])
    kda = 2 * batch * pool.layout.slot_bytes
    item = jnp.dtype(c.dtype).itemsize
    mla = batch * n_mla * (context + 1) * c.latent_dim * item
    return int(weights + kda + mla)


def copy_bandwidth(nbytes: int) -> float:
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    f(x).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(ts)


def fill_random(pool: CachePool) -> None:
    key = jax.random.key(1)
    pool.arrays = jax.tree.map(lambda a: (0.1 * jax.random.normal(key, a.shape, jnp.float32)).astype(a.dtype)
                               if a.dtype == jnp.float32 else
                               (0.1 * jax.random.normal(key, a.shape, jnp.bfloat16)).astype(a.dtype), pool.arrays)


def run_batch(engine: DecodeEngine, batch: int, context: int, steps: int, vocab: int) -> list[float]:
    for rid in list(engine.running):
        engine.cancel(rid)
    engine.step()  # flush cancel events
    params = SamplingParams(max_tokens=10 ** 6, temperature=0.7, top_p=0.95, seed=3)
    for i in range(batch):
        r = Request(tuple([7] * context), params, request_id=f"b{batch}-{i}")
        engine.pool.allocate(r.request_id, context + steps + 8)
        engine.adopt(r, first_token=(11 * i) % vocab)
    for _ in range(2):                       # compile + warm
        engine.step()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()                        # ends in a device->host copy of the tokens: synchronous
        ts.append(time.perf_counter() - t)
    return ts


def time_module(module, fn, args, reps: int = 10) -> float:
    """Median seconds of jitted fn(module, *args), the module's weights passed as arguments."""
    gd, st = nnx.split(module)
    f = jax.jit(lambda st, *xs: fn(nnx.merge(gd, st), *xs))
    jax.block_until_ready(f(st, *args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(st, *args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def profile_ops(model, config, batch, context, pool):
    """Device time of each kind of layer op at this batch, timed alone (jitted, median of 10)."""
    from jaxprfaas.runtime.model_runner import _kda_decode_paged, _mla_decode_paged
    d = config.hidden_size
    x = (0.1 * jax.random.normal(jax.random.key(2), (batch, d), jnp.float32)).astype(jnp.dtype(config.dtype))
    slots = jnp.arange(batch, dtype=jnp.int32)
    ps = pool.page_size
    n_pages = -(-(context + 8) // ps)
    table = jnp.arange(batch * n_pages, dtype=jnp.int32).reshape(batch, n_pages) % pool.layout.num_pages
    lengths = jnp.full((batch,), context, jnp.int32)
    kda_blk = model.layers[config.kda_layers[1] if len(config.kda_layers) > 1 else 0]
    mla_blk = model.layers[config.mla_layers[0]]
    a = pool.arrays
    # (module, fn(module, *arrays), arrays): weights go in as arguments, never as constants
    # captured by a closure (XLA would constant-fold them: minutes of compile, no timing)
    ops = {
        "kda_attn (paged)": (kda_blk.attn, lambda m, x, c, r, s: _kda_decode_paged(m, x, c, r, s, "auto")[0],
                             (x, a.conv[0], a.recurrent[0], slots)),
        "mla_attn (paged, gather)": (mla_blk.attn, lambda m, x, l, t, n, s: _mla_decode_paged(m, x, l, t, n, s >= 0)[0],
                                     (x, a.latent[0], table, lengths, slots)),
        "moe_ffn": (kda_blk.ffn, lambda m, x: m(x), (x,)),
        "lm_head": (model, lambda m, x: m._logits(x), (x,)),
    }
    out = {}
    for name, (module, fn, args) in ops.items():
        out[name] = time_module(module, fn, args)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--layers", default="auto")
    p.add_argument("--batches", default="64,1,256,16,128,4,32")
    p.add_argument("--context", type=int, default=4096, help="cache tokens per sequence")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--impl", default="auto")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new batch size after this")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--ragged-dot", choices=["xla", "triton"], default="xla",
                   help="MoE grouped-matmul lowering on GPU (runtime.model_runner.use_triton_ragged_dot)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    from jaxprfaas.runtime.model_runner import select_ragged_dot
    a.ragged_dot = select_ragged_dot(a.ragged_dot)
    t0 = time.time()
    batches = [int(b) for b in a.batches.split(",")]
    if a.smoke:
        batches = [b for b in batches if b <= 8] or [1]
        a.context, a.steps = min(a.context, 64), min(a.steps, 4)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit", 8 << 30)
    cfg0 = shape_config(4, a.smoke)
    layers = (4 if a.smoke else auto_layers(cfg0, max(batches), a.context, limit, a.page_size)) \
        if a.layers == "auto" else int(a.layers)
    config = shape_config(layers, a.smoke)
    info = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "layers": layers, "kda_layers": len(config.kda_layers),
            "mla_layers": len(config.mla_layers), "context": a.context, "page_size": a.page_size,
            "impl": a.impl, "ragged_dot": a.ragged_dot, "bytes_limit": limit, "command": " ".join(sys.argv)}
    print(json.dumps(info), flush=True)
    bw = copy_bandwidth(64 << 20 if a.smoke else 4 << 30)
    info["copy_GBps"] = bw / 1e9
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s", flush=True)

    model = HybridLM(config, seed=0)
    lb = layer_bytes(config)
    info["weight_bytes"] = param_bytes(nnx.state(model))
    max_b = max(batches)
    pages = max_b * -(-(a.context + a.steps + 8) // a.page_size)
    pool = CachePool(PoolLayout(config, max_b, pages, a.page_size))
    fill_random(pool)
    eng = DecodeEngine(model, pool, max_batch=max_b, max_model_len=a.context + a.steps + 8,
                       batch_buckets=batches, impl=a.impl)
    info["pool_bytes"] = pool.capacity_bytes
    rows = []
    for b in batches:
        if time.time() - t0 > a.budget_s:
            print(f"batch {b}: skipped (time budget)", flush=True)
            continue
        tc = time.time()
        ts = run_batch(eng, b, a.context, a.steps, config.vocab_size)
        med = statistics.median(ts)
        nbytes = step_bytes(config, lb, b, a.context, pool)
        row = {"batch": b, "step_ms": med * 1e3, "step_ms_min": min(ts) * 1e3, "tokens_per_s": b / med,
               "bytes_per_step": nbytes, "GBps": nbytes / med / 1e9, "frac_copy_bw": nbytes / med / bw,
               "wall_s": time.time() - tc}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:  # after every row, so a run cut short still leaves its numbers
            a.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    for rid in list(eng.running):
        eng.cancel(rid)
    prof = {}
    pb = min(a.profile_batch, max_b)
    if time.time() - t0 < a.budget_s * 1.1:
        prof = profile_ops(model, config, pb, a.context, pool)
        n_moe = sum(1 for i in range(config.num_hidden_layers) if config.is_moe(i))
        est = {"kda_attn x%d" % len(config.kda_layers): prof["kda_attn (paged)"] * len(config.kda_layers),
               "mla_attn x%d" % len(config.mla_layers): prof["mla_attn (paged, gather)"] * len(config.mla_layers),
               "moe_ffn x%d" % n_moe: prof["moe_ffn"] * n_moe, "lm_head": prof["lm_head"]}
        print(f"per-op profile at batch {pb} (each op timed alone, ms): "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in est.items()), flush=True)
        prof = {"batch": pb, "op_ms": {k: v * 1e3 for k, v in prof.items()},
                "per_step_ms": {k: v * 1e3 for k, v in est.items()}}
    print("\nbatch  step_ms  tokens/s   GB/s  %copy", flush=True)
    for r in sorted(rows, key=lambda r: r["batch"]):
        print(f"{r['batch']:5d} {r['step_ms']:8.2f} {r['tokens_per_s']:9.0f} {r['GBps']:6.0f} "
              f"{100 * r['frac_copy_bw']:5.1f}", flush=True)
    print(f"compiled decode programs: {eng.compile_count}; total {time.time() - t0:.0f} s", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"info": info, "rows": rows, "profile": prof}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill throughput of the serving engine: tokens/s and MFU at 4K / 32K / 128K tokens.

Runs `PrefillEngine` (chunked, layer-wise, the blockwise MLA prefill, KDA through `chunk_kda`)
on one prompt of each length with the Kimi-Linear-48B-A3B layer shapes, random bf16 weights and
`--layers` layers (3 KDA : 1 MLA). Model FLOPs count each useful operation once: projections
and routed + shared experts (2 x active params per token), the KDA chunk form (Kimi Linear
report Eq. 13, C = 64) and causal MLA attention (2 * H * (192 + 128) per query-key pair, half
the square); recomputation (kv_b expansion per chunk, padding) is not counted. Anchor,
measured in the same run: an 8192^3 bf16 matmul. A per-layer profile of each final chunk
comes from the engine's own layer hook (synchronising after every layer).

    python benchmarks/prefill.py --smoke
    python benchmarks/prefill.py --out prefill.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _ensure_package, shape_config, time_module  # noqa: E402  (same shim, shapes, timer)

_ensure_package()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxprfaas.model.hybrid_lm import HybridLM  # noqa: E402
from jaxprfaas.model.generate import SamplingParams  # noqa: E402
from jaxprfaas.runtime import model_runner  # noqa: E402
from jaxprfaas.runtime.prefill_engine import PrefillEngine  # noqa: E402
from jaxprfaas.runtime.request import Request  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 datasheet (SXM)


def prefill_flops(c, length: int) -> dict:
    d, hk, k, h = c.hidden_size, c.kda_dim, c.kda_head_dim, c.kda_num_heads
    nh = c.num_attention_heads
    kda_proj = 3 * d * hk + d * k + k * hk + d * h + d * k + k * hk + hk * d
    kda_core = h * (6 * k * k + 3 * 64 * k + 64 * 64)           # per token (Eq. 13 / T)
    mla_proj = d * nh * c.qk_head_dim + d * c.latent_dim + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim) \
        + nh * c.v_head_dim * d
    mla_pairs = length * (length + 1) / 2
    mla_attn = 2 * nh * (c.qk_head_dim + c.v_head_dim) * mla_pairs
    moe = d * c.num_experts + (c.num_experts_per_token + c.num_shared_experts) * 3 * d * c.moe_intermediate_size
    dense = 3 * d * c.intermediate_size
    out = {"kda": len(c.kda_layers) * length * (2 * kda_proj + 2 * kda_core),
           "mla": len(c.mla_layers) * (length * 2 * mla_proj + mla_attn),
           "ffn": length * 2 * sum(moe if c.is_moe(i) else dense for i in range(c.num_hidden_layers))}
    out["total"] = sum(out.values())
    return out


def moe_flops(c, tokens: int) -> float:
    return 2 * tokens * (c.hidden_size * c.num_experts + (c.num_experts_per_token + c.num_shared_experts) * 3
                         * c.hidden_size * c.moe_intermediate_size)


def matmul_peak(n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts)


def time_ffn(model, config, chunk: int) -> float:
    x = (0.1 * jax.random.normal(jax.random.key(3), (1, chunk, config.hidden_size), jnp.float32)).astype(
        jnp.dtype(config.dtype))
    return time_module(model.layers[1].ffn, lambda m, v: m(v), (x,), reps=5)


def run_one(engine: PrefillEngine, tokens, rid: str, profile: bool):
    times = []
    hook = None
    if profile:
        def hook(_rid, layer, arrays):
            jax.block_until_ready(arrays)
            times.append((layer, time.perf_counter()))
    engine.add_request(Request(tuple(tokens), SamplingParams(max_tokens=1), request_id=rid), on_layer=hook)
    t0 = time.perf_counter()
    steps = []
    res = []
    while engine.has_work():
        ts = time.perf_counter()
        res = engine.step()
        steps.append(time.perf_counter() - ts)
    jax.block_until_ready(res[0].state)
    wall = time.perf_counter() - t0
    per_layer = []
    if profile and times:
        start = t0 + sum(steps[:-1])
        prev = start
        for layer, t in times:
            per_layer.append((layer, t - prev))
            prev = t
    return wall, steps, per_layer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--mla-block", type=int, default=2048)
    p.add_argument("--impl", default="auto")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this")
    p.add_argument("--ragged-dot", choices=["xla", "triton"], default="xla",
                   help="MoE grouped-matmul lowering on GPU (runtime.model_runner.use_triton_ragged_dot)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    from jaxprfaas.runtime.model_runner import select_ragged_dot
    a.ragged_dot = select_ragged_dot(a.ragged_dot)
    t0 = time.time()
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.smoke:
        lengths, a.chunk, a.mla_block, a.layers = [64, 256], 64, 32, 4
    dev = jax.devices()[0]
    config = shape_config(a.layers, a.smoke)
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
    info = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "layers": a.layers, "kda_layers": len(config.kda_layers),
            "mla_layers": len(config.mla_layers), "chunk": a.chunk, "mla_block": a.mla_block, "impl": a.impl, "ragged_dot": a.ragged_dot,
            "peak_bf16_datasheet": peak, "command": " ".join(sys.argv)}
    print(json.dumps(info), flush=True)
    mm = matmul_peak(512 if a.smoke else 8192)
    info["matmul_TFLOPs"] = mm / 1e12
    print(f"bf16 matmul anchor: {mm / 1e12:.0f} TFLOP/s", flush=True)
    model = HybridLM(config, seed=0)
    engine = PrefillEngine(model, token_budget=a.chunk, chunk_size=a.chunk, max_batch=1, impl=a.impl,
                           mla_block=a.mla_block)
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        if time.time() - t0 > a.budget_s:
            print(f"length {n}: skipped (time budget)", flush=True)
            continue
        toks = rng.integers(3, config.vocab_size, n).tolist()
        compiled = model_runner.trace_counts["prefill_block"]
        cold, _, _ = run_one(engine, toks, f"cold-{n}", profile=False)
        row = {"length": n, "cold_s": cold, "new_block_programs": model_runner.trace_counts["prefill_block"] - compiled}
        if time.time() - t0 < a.budget_s or cold < 20:
            warm, steps, _ = run_one(engine, toks, f"warm-{n}", profile=False)
            row.update(warm_s=warm, steps=len(steps))
        else:
            warm = cold
            row.update(warm_s=None, note="cold run only (includes compilation)")
        fl = prefill_flops(config, n)
        row.update(tokens_per_s=n / warm, model_TFLOP=fl["total"] / 1e12,
                   flops_split={k: v / fl["total"] for k, v in fl.items() if k != "total"},
                   TFLOPs=fl["total"] / warm / 1e12, mfu_vs_matmul=fl["total"] / warm / mm)
        if peak:
            row["mfu"] = fl["total"] / warm / peak
        if time.time() - t0 < a.budget_s:
            _, _, per_layer = run_one(engine, toks, f"prof-{n}", profile=True)
            kinds = {"kda": [], "mla": []}
            for layer, dt in per_layer[1:]:  # layer 0 carries the embedding and the dense MLP
                kinds["mla" if config.is_mla(layer) else "kda"].append(dt)
            row["last_chunk_layer_ms"] = {k: 1e3 * statistics.median(v) for k, v in kinds.items() if v}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:  # after every row, so a run cut short still leaves its numbers
            a.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    if time.time() - t0 < a.budget_s:
        info["moe_ffn_ms_per_chunk"] = 1e3 * time_ffn(model, config, a.chunk)
        print(f"MoE FFN alone on one {a.chunk}-token chunk: {info['moe_ffn_ms_per_chunk']:.1f} ms "
              f"({moe_flops(config, a.chunk) / 1e9:.0f} GFLOP of model FLOPs)", flush=True)
    print("\nlength  warm_s  tokens/s  TFLOP/s  MFU(datasheet)  MFU(vs matmul)", flush=True)
    for r in rows:
        print(f"{r['length']:6d} {r['warm_s'] or r['cold_s']:7.2f} {r['tokens_per_s']:9.0f} {r['TFLOPs']:8.1f} "
              f"{100 * r.get('mfu', float('nan')):14.1f} {100 * r['mfu_vs_matmul']:14.1f}", flush=True)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

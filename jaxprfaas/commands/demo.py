"""`jaxprfaas demo`: the embedded PrfaaS-PD deployment under a mixed workload, checked end to end.

Starts `configs/deployments/local-demo.yaml` (a PrfaaS prefill pod and a local PD cluster, each
role its own process, a shaped "cross-datacenter" link), sends requests whose lengths follow
the paper's log-normal (mu 9.90, sigma 1.00, truncated to [128, 128K]) scaled down to the tiny
model, shows live progress, prints a per-route summary and checks every output against
single-process generation. Exits 1 if any output differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deployment", default="local-demo", help="deployment preset or YAML")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate (requests/s)")
    p.add_argument("--scale", type=float, default=256.0, help="divide the paper's lengths by this")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threshold", type=int, default=None, help="override the routing threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON summary line")


def workload(n: int, scale: float, vocab: int, max_tokens: int, seed: int):
    """Prompts with paper-shaped lengths; every third request samples (seeded), the rest are greedy."""
    from jaxprfaas.model.generate import SamplingParams
    rng = np.random.default_rng(seed)
    lengths = []
    while len(lengths) < n:
        x = rng.lognormal(9.90, 1.00)
        if 128 <= x <= 131072:
            lengths.append(max(1, int(round(x / scale))))
    prompts = [rng.integers(3, vocab, size=l).tolist() for l in lengths]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i) if i % 3 == 2
              else SamplingParams(max_tokens=max_tokens) for i in range(n)]
    return prompts, params


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else 0.0


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from jaxprfaas.api import LLM
    from jaxprfaas.model.checkpoint import load_model
    from jaxprfaas.model.generate import generate

    con = Console(stderr=True)
    overrides = {} if args.threshold is None else {"threshold": args.threshold}
    t_start = time.monotonic()
    with con.status("starting the deployment (router, PrfaaS prefill pod, PD-P, PD-D)..."):
        llm = LLM("tiny", deployment=args.deployment, **overrides)
    cfg = llm.config
    con.print(f"deployment [bold]{cfg.name}[/] up in {time.monotonic() - t_start:.1f} s; router at {llm.address}")
    model = load_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
    prompts, params = workload(args.requests, args.scale, model.config.vocab_size, args.max_tokens, args.seed)
    outs = [None] * len(prompts)
    counts = {"prfaas": 0, "local": 0, "rejected": 0}
    lock = threading.Lock()
    rng = np.random.default_rng(args.seed + 1)
    try:
        with Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[routes]}"), console=con) as bar:
            task = bar.add_task("", total=len(prompts), routes="")
            t0 = time.monotonic()
            threads = []

            def one(i):
                out = llm.client.generate([prompts[i]], params[i])[0]
                with lock:
                    outs[i] = out
                    counts[out.route] = counts.get(out.route, 0) + 1
                    bar.update(task, advance=1, routes=f"prfaas {counts['prfaas']}  local {counts['local']}")

            for i in range(len(prompts)):
                th = threading.Thread(target=one, args=(i,))
                th.start()
                threads.append(th)
                time.sleep(rng.exponential(1.0 / args.rate))
            for th in threads:
                th.join()
            wall = time.monotonic() - t0
    finally:
        llm.close()
    with con.status("checking every output against single-process generation..."):
        ref = generate(model, prompts, params)
    verified = sum(o.token_ids == r for o, r in zip(outs, ref))
    link_bytes = sum(o.metrics["bytes_transferred"] for o in outs if o.route == "prfaas")
    tokens = sum(len(o.token_ids) for o in outs)
    link_rate = cfg.link.gbps * 1e9 / 8
    table = Table(title=f"jaxprfaas demo: {len(outs)} requests, threshold t = {cfg.policy.threshold} tokens")
    for col in ("route", "requests", "mean prompt", "TTFT p50 (s)", "TTFT p90 (s)", "state bytes"):
        table.add_column(col, justify="right")
    ttft_all = []
    for route in ("prfaas", "local"):
        sel = [o for o in outs if o.route == route]
        ttft = [o.metrics["ttft_s"] for o in sel]
        ttft_all += ttft
        table.add_row(route, str(len(sel)), f"{np.mean([len(o.prompt_token_ids) for o in sel]) if sel else 0:.0f}",
                      f"{pct(ttft, 50):.3f}", f"{pct(ttft, 90):.3f}",
                      f"{sum(o.metrics['bytes_transferred'] for o in sel):,}")
    con.print(table)
    con.print(f"throughput {tokens / wall:.1f} tokens/s over {wall:.1f} s;  cross-DC link: {link_bytes:,} B "
              f"({link_bytes / max(wall, 1e-9) / link_rate:.1%} of {cfg.link.gbps:g} Gbps on average)")
    ok = verified == len(outs)
    con.print(f"[{'green' if ok else 'red'}]{verified}/{len(outs)} outputs equal single-process generation[/]")
    if args.json:
        print(json.dumps({"requests": len(outs), "verified": verified,
                          "routes": {"prfaas": counts["prfaas"], "local": counts["local"]},
                          "ttft_p90": pct(ttft_all, 90), "link_bytes": link_bytes}))
    sys.stdout.flush()
    return 0 if ok else 1

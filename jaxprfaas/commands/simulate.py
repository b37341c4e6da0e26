"""`jaxprfaas simulate CONFIG`: run the discrete-event simulator on every deployment of a case study.

Each deployment starts at the planner's operating point (threshold, N_p/N_d) and sees the same
request stream (same arrival rate, lengths and seed). Prints completed/rejected/lost,
throughput, TTFT percentiles and link utilisation side by side; `--plots DIR` writes TTFT CDFs,
Lambda vs t and the link timeline as PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from jaxprfaas.errors import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("config", help="case-study YAML (a path, or a name in configs/case-studies/)")
    parser.add_argument("--rate", type=float, help="arrival rate, req/s (default: simulate.rate)")
    parser.add_argument("--requests", type=int, help="number of requests (default: simulate.requests)")
    parser.add_argument("--arrivals", choices=("uniform", "poisson", "bursty", "trace"),
                        help="arrival process (default: simulate.arrivals)")
    parser.add_argument("--trace", metavar="JSONL", help="replay a Mooncake-format trace "
                        "(timestamp ms, input_length, output_length, hash_ids); implies --arrivals trace")
    parser.add_argument("--cache-blocks", type=int, metavar="N",
                        help="prefix-cache capacity per node in blocks (traces with hash_ids; default: "
                             "simulate.cache_blocks_per_node, 0 = off)")
    parser.add_argument("--seed", type=int, help="random seed (default: simulate.seed)")
    parser.add_argument("--controller", choices=("on", "off"),
                        help="run the dual-timescale controller (default: controller.enabled)")
    parser.add_argument("--link-gbps", type=float, help="override the cross-cluster bandwidth")
    parser.add_argument("--deployments", help="comma-separated subset of deployments to run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots to DIR")


def _overrides(cs, args):
    if args.link_gbps is None:
        return cs
    if args.link_gbps <= 0:
        raise ConfigError("--link-gbps must be > 0")
    bw = args.link_gbps * 1e9 / 8
    deps = {n: dataclasses.replace(d, system=dataclasses.replace(d.system, b_out=bw if d.system.prfaas else 0.0))
            for n, d in cs.deployments.items()}
    return dataclasses.replace(cs, deployments=deps, link_bandwidth=bw)


def run(args) -> int:
    from jaxprfaas.scheduler import casestudy, simulator, workload
    from jaxprfaas.scheduler.controller import ControllerConfig
    from jaxprfaas.scheduler.router import Policy

    cs = _overrides(casestudy.load(args.config), args)
    deps = cs.deployments
    if args.deployments:
        want = [s.strip() for s in args.deployments.split(",") if s.strip()]
        bad = [w for w in want if w not in deps]
        if bad:
            raise ConfigError(f"unknown deployments {bad}; the config has {', '.join(deps)}")
        deps = {w: deps[w] for w in want}
    if args.requests is not None and args.requests < 1:
        raise ConfigError("--requests must be >= 1")
    sim = dict(cs.simulate)
    if args.trace:
        sim["trace"], args.arrivals = args.trace, "trace"
    if args.cache_blocks is not None:
        sim["cache_blocks_per_node"] = args.cache_blocks
    wl = workload.from_config(sim, cs.lengths, cs.l_out, rate=args.rate, n=args.requests,
                              seed=args.seed, kind=args.arrivals)
    ctl_d = dict(cs.controller)
    if args.controller is not None:
        ctl_d["enabled"] = args.controller == "on"
    ctl = ControllerConfig.from_dict(ctl_d)
    pol_keys = {f.name for f in dataclasses.fields(Policy)} - {"threshold", "load_balance"}
    unknown = set(cs.router) - pol_keys
    if unknown:
        raise ConfigError(f"router: unknown keys {sorted(unknown)}; known: {sorted(pol_keys)}")
    policy = Policy(threshold=0.0, **cs.router)

    results, points = {}, {}
    for name, dep in deps.items():
        pt = casestudy.plan(dep, cs.lengths, cs.threshold_step, cs.mode)
        points[name] = pt
        cfg = simulator.config_for(
            dep.kind, dep.system, pt, policy=policy, link_latency=cs.link_latency,
            controller=ctl if dep.kind == "prfaas_pd" else None,
            block_size=int(sim.get("block_size", 512)),
            cache_blocks_per_node=int(sim.get("cache_blocks_per_node", 0)))
        results[name] = simulator.simulate(cfg, wl)

    rate = len(wl) / float(wl.arrival[-1]) if len(wl) > 1 else float("nan")
    out = {}
    for name, res in results.items():
        s = res.summary()
        out[name] = {k: s[k] for k in ("completed", "rejected", "lost", "throughput", "ttft_mean",
                                       "ttft_p50", "ttft_p90", "ttft_p99", "link_util_mean")}
        out[name].update(lambda_max=points[name].lambda_max, sustained=s["sustained"],
                         link_util_max=s["link_util_max"], prfaas_share=s["prfaas_share"],
                         tpot=s["tpot"], reject_reasons=s["reject_reasons"],
                         prfaas_queue_s_max=s["prfaas_queue_s_max"], pd_p_queue_s_max=s["pd_p_queue_s_max"],
                         decode_waiting_max=s["decode_waiting_max"],
                         final_threshold=_num(res.threshold_log[-1][1]),
                         final_split=list(res.split_log[-1][1:]))
    if args.plots:
        from jaxprfaas.scheduler import plots
        d = Path(args.plots)
        d.mkdir(parents=True, exist_ok=True)
        written = [plots.ttft_cdf(results, d / "ttft_cdf.png", f"{cs.name}: TTFT at {rate:.2f} req/s")]
        pf = [n for n, dep in deps.items() if dep.kind == "prfaas_pd"]
        if pf:
            base = {n: points[n] for n, dep in deps.items() if dep.kind != "prfaas_pd"}
            written.append(plots.lambda_vs_t(deps[pf[0]].system, cs.lengths, points[pf[0]], base,
                                              d / "lambda_vs_t.png", cs.threshold_step,
                                              f"{cs.name}: Λ_max vs t ({pf[0]})"))
        if any(r.link_util for r in results.values()):
            written.append(plots.link_timeline(results, d / "link_util.png", f"{cs.name}: link at {rate:.2f} req/s"))
        out_plots = [str(p) for p in written]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    names = list(out)
    rows = [("lambda_max (model)", "lambda_max", ".3f"), ("completed", "completed", "d"),
            ("rejected", "rejected", "d"), ("lost", "lost", "d"),
            ("throughput (req/s)", "throughput", ".3f"), ("sustained (req/s)", "sustained", ".3f"),
            ("TTFT mean (s)", "ttft_mean", ".2f"), ("TTFT p50 (s)", "ttft_p50", ".2f"),
            ("TTFT p90 (s)", "ttft_p90", ".2f"), ("TTFT p99 (s)", "ttft_p99", ".2f"),
            ("link util mean", "link_util_mean", ".3f"), ("link util max (1 s)", "link_util_max", ".3f"),
            ("PrfaaS share", "prfaas_share", ".3f"),
            ("max PrfaaS queue (s/node)", "prfaas_queue_s_max", ".1f"),
            ("max PD-P queue (s/node)", "pd_p_queue_s_max", ".1f"),
            ("max decode waiting", "decode_waiting_max", "d")]
    w0 = max(len(r[0]) for r in rows)
    cols = [max(len(n), 12) for n in names]
    print(f"case study {cs.name}: {len(wl)} requests, {args.arrivals or sim.get('arrivals', 'poisson')} "
          f"arrivals at {rate:.3f} req/s, controller {'on' if ctl.enabled else 'off'}")
    print(" " * w0 + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols)))
    for label, key, spec in rows:
        print(label.ljust(w0) + "  " + "  ".join(format(out[n][key], spec).rjust(c) for n, c in zip(names, cols)))
    if args.plots:
        print("plots: " + ", ".join(out_plots))
    return 0


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

"""Scheduler benchmarks: simulator speed, the model-vs-simulation anchor, controller sweeps.

    python benchmarks/simulator.py speed       [--requests 100000]   # wall time + anchor
    python benchmarks/simulator.py controller                        # sweeps behind the defaults
    python benchmarks/simulator.py plots       [--out docs/img]      # the README's figures

`speed` times the simulator on the paper's case study (every deployment, 100k requests each,
Poisson at 90% of its Lambda_max, then uniform at 130% to measure saturation) and prints the
analytic Lambda_max (paper and exact modes) next to the simulated sustained rate: the anchor.
Pure CPU; no accelerator involved. Figures go to benchmarks/RESULTS.md ("## Scheduler").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from jaxprfaas.scheduler import casestudy, simulator, throughput_model as tm, workload
from jaxprfaas.scheduler.controller import ControllerConfig
from jaxprfaas.scheduler.distributions import Empirical, TruncatedLogNormal


def _device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible; Python {platform.python_version()}, numpy {np.__version__}"


def speed(args) -> None:
    cs = casestudy.load(args.config)
    print(f"# device: {_device()}")
    print(f"# command: python benchmarks/simulator.py speed --requests {args.requests}")
    print(f"# load average at start: {os.getloadavg()[0]:.1f} (wall time inflates on a busy box; CPU time does not)")
    print("| deployment | arrivals | requests | wall s | CPU s | requests / CPU s | Lambda_max paper | exact (same lengths) | simulated sustained | sim/exact | sim/paper |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dep in cs.deployments.items():
        pt = casestudy.plan(dep, cs.lengths, cs.threshold_step, "paper")
        cfg = simulator.config_for(dep.kind, dep.system, pt, link_latency=cs.link_latency)
        for kind, load in (("poisson", 0.9), ("uniform", 1.3)):
            wl = workload.synthetic(args.requests, load * pt.lambda_max, cs.lengths, cs.l_out, kind, seed=1)
            t0, c0 = time.perf_counter(), time.process_time()
            res = simulator.simulate(cfg, wl)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert res.lost == 0
            sus = res.sustained_throughput()
            if kind == "uniform":
                emp = Empirical(wl.input_len)
                t = {"prfaas_pd": pt.threshold, "homogeneous_pd": emp.hi + 1}.get(dep.kind, emp.lo - 1)
                ex = tm.evaluate(cfg.system, emp, [t], cfg.n_p, "exact").lambda_max[0]
                anchor = f"{ex:.3f} | {sus:.3f} | {sus / ex:.4f} | {sus / pt.lambda_max:.4f}"
            else:
                anchor = f"- | {sus:.3f} (offered {load * pt.lambda_max:.3f}) | - | -"
            print(f"| {name} | {kind} {load:.1f}x | {len(wl)} | {wall:.2f} | {cpu:.2f} | {len(wl) / cpu:,.0f} | "
                  f"{pt.lambda_max:.3f} | {anchor} |")
    # the same PrfaaS-PD scaled 32x: 128 H200 + 256 H20 instances (3,072 GPUs), 3.2 Tbps link
    dep = cs.deployments["prfaas_pd"]
    k = 32
    system = dataclasses.replace(dep.system, n_prfaas=dep.system.n_prfaas * k, n_pd=dep.system.n_pd * k,
                                 b_out=dep.system.b_out * k)
    pt = tm.plan_prfaas_pd(system, cs.lengths, cs.threshold_step)
    cfg = simulator.SimConfig(system, pt.threshold, pt.n_p, link_latency=cs.link_latency)
    wl = workload.synthetic(args.requests, 0.9 * pt.lambda_max, cs.lengths, cs.l_out, "poisson", seed=1)
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulator.simulate(cfg, wl)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res.lost == 0
    print(f"| prfaas_pd x{k} ({(system.n_prfaas + system.n_pd) * 8} GPUs, N_p/N_d {pt.n_p}/{pt.n_d}) | "
          f"poisson 0.9x | {len(wl)} | {wall:.2f} | {cpu:.2f} | {len(wl) / cpu:,.0f} | {pt.lambda_max:.3f} | - | "
          f"{res.sustained_throughput():.3f} (offered {0.9 * pt.lambda_max:.3f}) | - | - |")


# ---- controller sweeps --------------------------------------------------------------------

def _burst_case(cs, factor: float, rate: float, n: int):
    dep = cs.deployments["prfaas_pd"]
    system = dataclasses.replace(dep.system, b_out=8e9 / 8)  # 8 Gbps: an egress-bound optimum
    pt = tm.plan_prfaas_pd(system, cs.lengths)
    wl = workload.synthetic(n, rate, cs.lengths, cs.l_out, "bursty", seed=3,
                            burst=workload.Burst(factor=factor, on_s=120, period_s=1200))
    return system, pt, wl


def _run_burst(system, pt, wl, ctl):
    r = simulator.simulate(simulator.SimConfig(system, pt.threshold, pt.n_p, link_latency=0.02, controller=ctl), wl)
    s = r.summary()
    u = np.convolve(np.asarray(r.link_util), np.ones(60) / 60, mode="valid")
    return r, (f"{u.max():.3f} | {100 * np.mean(u > 0.95):.1f}% | {s['ttft_p50']:.2f} | {s['ttft_p90']:.2f} | "
               f"{s['ttft_p99']:.2f} | {len(r.threshold_log) - 1}")


def _shift_case(cs, n: int):
    dep = cs.deployments["prfaas_pd"]
    pt = tm.plan_prfaas_pd(dep.system, cs.lengths)
    new = TruncatedLogNormal(10.4, 1.0, 128, 131072)
    target = tm.best_threshold(dep.system, new, pt.n_p, step=128).threshold
    wl = workload.synthetic(n, 2.0, cs.lengths, cs.l_out, "poisson", seed=5, shift_at=n // 2, shift_lengths=new)
    return dep.system, pt, wl, target


def _run_shift(system, pt, wl, target, ctl):
    ctl = dataclasses.replace(ctl, long_period_s=1e9)
    r = simulator.simulate(simulator.SimConfig(system, pt.threshold, pt.n_p, link_latency=0.02, controller=ctl), wl)
    t_shift = wl.arrival[len(wl) // 2]
    tl = r.threshold_log
    conv = next((when - t_shift for when, t in tl if when > t_shift and abs(t - target) <= 0.1 * target
                 and all(abs(t2 - target) <= 0.1 * target for w2, t2 in tl if w2 >= when)), float("nan"))
    s = r.summary()
    return r, (f"{conv:.0f} | {100 * (tl[-1][1] / target - 1):+.1f}% | {s['ttft_p90']:.2f} | {len(tl) - 1}")


VARIANTS = [
    ("defaults", {}),
    ("short_period_s=5", {"short_period_s": 5.0}),
    ("short_period_s=30", {"short_period_s": 30.0}),
    ("util_target=0.9", {"util_target": 0.9}),
    ("util_target=0.7", {"util_target": 0.7}),
    ("horizon_s=60", {"horizon_s": 60.0}),
    ("horizon_s=240", {"horizon_s": 240.0}),
    ("window=500", {"window": 500}),
    ("window=2000", {"window": 2000}),
    ("drift_tol=0.02", {"drift_tol": 0.02}),
    ("drift_tol=0.10", {"drift_tol": 0.10}),
    ("min_rel_change=0.01", {"min_rel_change": 0.01}),
]


def controller(args) -> None:
    cs = casestudy.load(args.config)
    print(f"# device: {_device()}")
    print("# command: python benchmarks/simulator.py controller")
    base = ControllerConfig()
    print(f"# defaults: {base}")
    for label, factor, rate in (("moderate burst (1.6x for 120 s every 20 min, peak 2.4 req/s < Lambda_max 2.63)", 1.6, 1.5),
                                ("overload burst (2x, peak 3.6 req/s > Lambda_max 2.63)", 2.0, 1.8)):
        system, pt, wl = _burst_case(cs, factor, rate, args.requests)
        print(f"\n## {label}; 8 Gbps link, {len(wl)} requests\n")
        print("| controller | max 60 s link util | time > 0.95 | TTFT p50 | p90 | p99 | t moves |")
        print("|---|---|---|---|---|---|---|")
        print(f"| off | {_run_burst(system, pt, wl, ControllerConfig(enabled=False))[1]} |")
        for name, kw in VARIANTS:
            print(f"| {name} | {_run_burst(system, pt, wl, dataclasses.replace(base, **kw))[1]} |")
    system, pt, wl, target = _shift_case(cs, args.requests)
    print(f"\n## length shift mu 9.9 -> 10.4 at request {len(wl) // 2}, 2.0 req/s, 100 Gbps; "
          f"t* {pt.threshold:.0f} -> {target:.0f}\n")
    print("| controller | s to within 10% of new t* (and stay) | final t vs t* | TTFT p90 | t moves |")
    print("|---|---|---|---|---|")
    r = simulator.simulate(simulator.SimConfig(system, pt.threshold, pt.n_p, link_latency=0.02), wl)
    print(f"| off | - | {100 * (pt.threshold / target - 1):+.1f}% | {r.summary()['ttft_p90']:.2f} | 0 |")
    for name, kw in VARIANTS:
        print(f"| {name} | {_run_shift(system, pt, wl, target, dataclasses.replace(base, **kw))[1]} |")


def plots(args) -> None:
    from jaxprfaas.scheduler import plots as pl
    cs = casestudy.load(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = casestudy.plan_all(cs)
    pf = cs.deployments["prfaas_pd"]
    pl.lambda_vs_t(pf.system, cs.lengths, points["prfaas_pd"],
                   {n: p for n, p in points.items() if n != "prfaas_pd"}, out / "scheduler_lambda_vs_t.png",
                   title="paper-1t: Λ_max vs threshold (PrfaaS-PD, best split)")
    wl = workload.synthetic(20000, 2.0, cs.lengths, cs.l_out, "poisson", seed=0)
    res = {n: simulator.simulate(simulator.config_for(d.kind, d.system, points[n], link_latency=cs.link_latency), wl)
           for n, d in cs.deployments.items()}
    pl.ttft_cdf(res, out / "scheduler_ttft_cdf.png", "paper-1t: TTFT CDF at 2.0 req/s (Poisson, 20k requests)")
    system, pt, wl = _burst_case(cs, 1.6, 1.5, 4000)
    burst = {"controller off": _run_burst(system, pt, wl, ControllerConfig(enabled=False))[0],
             "controller on": _run_burst(system, pt, wl, ControllerConfig())[0]}
    end = float(wl.arrival[-1])
    pl.link_timeline(burst, out / "scheduler_burst.png",
                     "8 Gbps link, 1.6x bursts (shaded: 120 s every 20 min)", smooth_s=60.0,
                     shade=[(a, a + 120.0) for a in np.arange(0.0, end, 1200.0)])
    system, pt, wl, target = _shift_case(cs, 8000)
    t_shift = float(wl.arrival[len(wl) // 2])
    shift = {"controller off": simulator.simulate(simulator.SimConfig(system, pt.threshold, pt.n_p, link_latency=0.02), wl),
             "controller on": _run_shift(system, pt, wl, target, ControllerConfig())[0]}
    pl.link_timeline(shift, out / "scheduler_shift.png",
                     f"length shift mu 9.9 -> 10.4 (shaded); new t* = {target / 1e3:.1f}K", smooth_s=60.0,
                     shade=[(t_shift, float(wl.arrival[-1]))])
    for p in sorted(out.glob("scheduler_*.png")):
        print(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("speed", "controller", "plots"))
    ap.add_argument("--config", default="paper-1t")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 100_000 if args.what == "speed" else 8000
    {"speed": speed, "controller": controller, "plots": plots}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`jaxprfaas plan CONFIG`: solve the PrfaaS throughput model for every deployment of a case study.

Prints each deployment's best threshold, instance split, per-stage throughputs (Eqs. 3-5),
Lambda_max (Eq. 6), its bottleneck and the cross-cluster egress it needs, side by side.
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("config", help="case-study YAML (a path, or a name in configs/case-studies/)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--mode", choices=("paper", "exact"), default=None,
                        help="paper: T(E[L|.]) as in the paper (default from the config); "
                             "exact: E[T(L)|.], what a queue of independent lengths sustains")


def _fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def run(args) -> int:
    from jaxprfaas.scheduler import casestudy

    cs = casestudy.load(args.config)
    points = casestudy.plan_all(cs, args.mode)
    if args.json:
        print(json.dumps({n: p.as_dict() for n, p in points.items()}, indent=2))
        return 0
    names = list(points)
    rows = [
        ("threshold t (tokens)", lambda p: _fmt(p.threshold, ".0f")),
        ("N_prfaas", lambda p: str(p.n_prfaas)),
        ("N_p / N_d", lambda p: f"{p.n_p} / {p.n_d}"),
        ("p = P(L > t)", lambda p: _fmt(p.p, ".3f")),
        ("l_long / l_short", lambda p: f"{_fmt(p.l_long if p.p > 0 else None, '.0f')} / "
                                       f"{_fmt(p.l_short if p.p < 1 else None, '.0f')}"),
        ("Theta_prfaas (req/s)", lambda p: _fmt(p.theta_prfaas)),
        ("Theta_pd-p (req/s)", lambda p: _fmt(p.theta_pd_p)),
        ("Theta_pd-d (req/s)", lambda p: _fmt(p.theta_pd_d)),
        ("Lambda_max (req/s)", lambda p: _fmt(p.lambda_max)),
        ("bottleneck", lambda p: p.bottleneck),
        ("egress at Lambda_max (Gbps)", lambda p: _fmt(p.egress_gbps, ".2f")),
        ("Eq. 2 egress need (Gbps)", lambda p: _fmt(p.production_gbps, ".2f")),
    ]
    base = points.get("homogeneous_pd")
    if base is not None:
        rows.append(("vs homogeneous_pd", lambda p: f"{p.lambda_max / base.lambda_max:.2f}x"))
    w0 = max(len(r[0]) for r in rows)
    cols = [max(len(n), 14) for n in names]
    print(f"case study {cs.name}: {cs.lengths!r}, L_out {cs.l_out:.0f}, "
          f"model mode {args.mode or cs.mode}")
    print(" " * w0 + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols)))
    for label, f in rows:
        print(label.ljust(w0) + "  " + "  ".join(f(points[n]).rjust(c) for n, c in zip(names, cols)))
    return 0

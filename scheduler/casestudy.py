"""A case-study YAML (`configs/case-studies/*.yaml`) as typed objects, and planning it.

A case study names the model's S_kv, the workload, the link and several deployments (each a
PrfaaS-PD, a homogeneous PD or a naive heterogeneous layout of hardware profiles); `plan`
solves the throughput model for each the same way, so they compare like for like.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxprfaas.errors import ConfigError
from jaxprfaas.scheduler import distributions, throughput_model as tm
from jaxprfaas.scheduler.profiles import KvSize, Profile, _read_yaml, bytes_per_s, kv_from_spec, load_hardware

KINDS = ("prfaas_pd", "homogeneous_pd", "naive_heterogeneous")


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    kind: str               # one of KINDS
    system: tm.System


@dataclasses.dataclass(frozen=True)
class CaseStudy:
    name: str
    kv: KvSize
    lengths: distributions.LengthDistribution
    l_out: float
    link_bandwidth: float   # bytes/s
    link_latency: float     # seconds
    threshold_step: float
    mode: str
    deployments: dict[str, Deployment]
    router: dict[str, Any]
    controller: dict[str, Any]
    simulate: dict[str, Any]
    path: Path | None = None


def plan(dep: Deployment, dist: distributions.LengthDistribution, step: float = 64.0,
         mode: str = "paper") -> tm.OperatingPoint:
    if dep.kind == "prfaas_pd":
        return tm.plan_prfaas_pd(dep.system, dist, step, mode)
    if dep.kind == "homogeneous_pd":
        return tm.plan_homogeneous(dep.system, dist, mode)
    return tm.plan_naive(dep.system, dist, mode)


def plan_all(cs: CaseStudy, mode: str | None = None) -> dict[str, tm.OperatingPoint]:
    return {n: plan(d, cs.lengths, cs.threshold_step, mode or cs.mode) for n, d in cs.deployments.items()}


def _section(d: dict, key: str, where: str, required: bool = True) -> dict:
    v = d.get(key)
    if v is None:
        if required:
            raise ConfigError(f"{where}: missing section {key!r}")
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key!r} must be a mapping")
    return v


def _cluster(d: dict, key: str, where: str, kv: KvSize) -> tuple[Profile, int]:
    c = _section(d, key, where)
    if "hardware" not in c or "instances" not in c:
        raise ConfigError(f"{where}: {key} needs 'hardware' and 'instances'")
    n = int(c["instances"])
    if n < 1:
        raise ConfigError(f"{where}: {key}.instances must be >= 1")
    return load_hardware(c["hardware"], kv), n


def load(name_or_path: str | Path) -> CaseStudy:
    from jaxprfaas.paths import config_path
    p = config_path("case-studies", str(name_or_path))
    d = _read_yaml(p)
    where = str(p)
    model = _section(d, "model", where)
    kv = kv_from_spec(_section(model, "kv", f"{where}: model"), f"{where}: model.kv", p.parent)
    wl = _section(d, "workload", where)
    if "input_length" not in wl:
        raise ConfigError(f"{where}: workload needs input_length")
    dist = distributions.from_spec(wl["input_length"])
    l_out = float(wl.get("output_length", 1024))
    link = _section(d, "link", where, required=False)
    planner = _section(d, "planner", where, required=False)
    mode = planner.get("mode", "paper")
    if mode not in ("paper", "exact"):
        raise ConfigError(f"{where}: planner.mode must be paper|exact, got {mode!r}")
    deps: dict[str, Deployment] = {}
    for name, spec in _section(d, "deployments", where).items():
        w = f"{where}: deployments.{name}"
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise ConfigError(f"{w}: kind must be one of {', '.join(KINDS)}")
        pd, n_pd = _cluster(spec, "pd", w, kv)
        if pd.decode is None:
            raise ConfigError(f"{w}: pd hardware {pd.name!r} has no decode profile")
        if spec["kind"] == "homogeneous_pd":
            if n_pd < 2:
                raise ConfigError(f"{w}: homogeneous PD needs >= 2 instances")
            system = tm.System(pd=pd, n_pd=n_pd, l_out=l_out)
        else:
            pf, n_pf = _cluster(spec, "prfaas", w, kv)
            bw = float(spec.get("link_gbps", link.get("bandwidth_gbps", 100.0)))
            system = tm.System(pd=pd, n_pd=n_pd, l_out=l_out, prfaas=pf, n_prfaas=n_pf, b_out=bytes_per_s(bw))
        deps[name] = Deployment(name, spec["kind"], system)
    if not deps:
        raise ConfigError(f"{where}: no deployments")
    return CaseStudy(
        name=str(d.get("name", p.stem)), kv=kv, lengths=dist, l_out=l_out,
        link_bandwidth=bytes_per_s(float(link.get("bandwidth_gbps", 100.0))),
        link_latency=float(link.get("latency_ms", 0.0)) / 1e3,
        threshold_step=float(planner.get("threshold_step", 64)), mode=mode, deployments=deps,
        router=_section(d, "router", where, required=False),
        controller=_section(d, "controller", where, required=False),
        simulate=_section(d, "simulate", where, required=False), path=p)

"""Deployment config: typed, validated, read from YAML (or a dict) with overrides.

A deployment names its clusters (a PrfaaS prefill pod cluster and a local PD cluster with PD-P
and PD-D roles), the cross-datacenter link between them, the model, the routing policy and the
cache sizes. Every error names the key and the file: unknown keys, wrong types and impossible
values are refused before any process starts.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from jaxprfaas.errors import ConfigError
from jaxprfaas.paths import config_path


@dataclasses.dataclass(frozen=True)
class RoleConfig:
    instances: int = 1              # processes of this role
    platform: str = "cpu"           # JAX platform each process uses: cpu | gpu
    devices: tuple[int, ...] = ()   # device ids (empty: the platform's first device)
    max_batch: int = 16             # decode: largest continuous batch; prefill: prompts per pack
    token_budget: int = 2048        # prefill: tokens per packed prefill step
    listen: tuple[str, ...] = ()    # host:port of each instance (`serve` on several hosts); empty: ephemeral


@dataclasses.dataclass(frozen=True)
class PrfaasCluster:
    prefill: RoleConfig = RoleConfig()


@dataclasses.dataclass(frozen=True)
class PdCluster:
    prefill: RoleConfig = RoleConfig()
    decode: RoleConfig = RoleConfig()


@dataclasses.dataclass(frozen=True)
class Clusters:
    pd: PdCluster = PdCluster()
    prfaas: PrfaasCluster | None = None   # absent: a homogeneous PD deployment


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    cert: str | None = None   # PEM certificate chain of this side
    key: str | None = None    # PEM private key
    ca: str | None = None     # PEM CA bundle that signs the peer (mTLS when both sides set it)


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    gbps: float = 1.0          # emulated PrfaaS -> PD bandwidth (0: unshaped)
    latency_ms: float = 5.0    # one-way latency
    streams: int = 4           # parallel gRPC connections per transfer
    cross_datacenter: bool = True
    insecure: bool = False     # allow plaintext across datacenters (loopback demos only)
    tls: TlsConfig | None = None
    token: str | None = None   # bearer token the receiver requires


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    threshold: int = 1024              # t: uncached tokens above which prefill goes to PrfaaS
    scarce_utilization: float = 0.7    # link utilisation at/above which bandwidth counts as scarce
    ttft_slo_s: float | None = None    # reject early when the estimated TTFT exceeds this
    max_input_len: int | None = None   # reject longer prompts outright
    pd_prefill_tok_s: float = 2000.0     # PD-P prefill rate the router's estimates assume
    prfaas_prefill_tok_s: float = 4000.0 # PrfaaS pod prefill rate the router's estimates assume
    controller: dict | None = None     # short-term loop settings (scheduler ControllerConfig keys); None: off


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    pool_mib: float = 256.0    # decode node's cache pool (MLA pages + KDA slots)
    page_size: int = 16        # MLA latent tokens per page
    block_size: int = 16       # prefix-cache block (KV index hash granularity)
    max_model_len: int = 2048  # longest prompt + output a decode node accepts


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    name: str = "deployment"
    model: str = "tiny"            # preset name or checkpoint directory
    dtype: str | None = None       # override the model's dtype (float32 | bfloat16)
    seed: int = 0                  # weights of a preset model
    tokenizer: str | None = None   # a tokenizer.json (or its directory): lets clients send text
    host: str = "127.0.0.1"        # where every role listens (loopback for the embedded default)
    router_port: int = 0           # 0: an ephemeral port
    clusters: Clusters = Clusters()
    link: LinkConfig = LinkConfig()
    policy: PolicyConfig = PolicyConfig()
    cache: CacheConfig = CacheConfig()
    source: str = "<dict>"         # where it was read from (for messages)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


_CHECKS: dict[str, Any] = {
    "instances": lambda v: v >= 1 or "must be >= 1",
    "platform": lambda v: v in ("cpu", "gpu") or "must be cpu or gpu",
    "max_batch": lambda v: v >= 1 or "must be >= 1",
    "token_budget": lambda v: v >= 1 or "must be >= 1",
    "gbps": lambda v: v >= 0 or "must be >= 0",
    "latency_ms": lambda v: v >= 0 or "must be >= 0",
    "streams": lambda v: 1 <= v <= 64 or "must be in 1..64",
    "threshold": lambda v: v >= 0 or "must be >= 0",
    "scarce_utilization": lambda v: 0 < v <= 1 or "must be in (0, 1]",
    "pool_mib": lambda v: v > 0 or "must be > 0",
    "page_size": lambda v: v >= 1 or "must be >= 1",
    "block_size": lambda v: v >= 1 or "must be >= 1",
    "max_model_len": lambda v: v >= 2 or "must be >= 2",
    "dtype": lambda v: v in (None, "float32", "bfloat16") or "must be float32 or bfloat16",
    "router_port": lambda v: 0 <= v < 65536 or "must be a port number",
}


def _build(cls, data: Any, where: str, path: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {path.rstrip('.') or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    for k in data:
        if k not in names:
            raise ConfigError(f"{where}: unknown key {path + k!r} (known: {', '.join(sorted(names))})")
    kw = {}
    for k, v in data.items():
        kw[k] = _value(hints[k], v, where, path + k)
        check = _CHECKS.get(k)
        if check is not None:
            ok = check(kw[k])
            if ok is not True:
                raise ConfigError(f"{where}: {path + k} {ok}, got {v!r}")
    return cls(**kw)


def _value(tp, v, where: str, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, where, key)
    if dataclasses.is_dataclass(tp):
        if tp is RoleConfig and isinstance(v, int) and not isinstance(v, bool):
            v = {"instances": v}           # `prefill: 2` is shorthand for two instances
        return _build(tp, v, where, key + ".")
    if origin is tuple:
        item = args[0]
        if not isinstance(v, list) or not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"{where}: {key} must be a list of {item.__name__}s, got {v!r}")
        return tuple(v)
    if tp is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(v).__name__}")
        return dict(v)
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
        raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {type(v).__name__} {v!r}")
    return v


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    """Apply `a.b.c=value`-style overrides (dotted keys) onto a nested dict."""
    out = dict(base)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return out


def load_deployment(spec: str | Path | Mapping | None = "local-demo",
                    overrides: Mapping[str, Any] | None = None) -> DeploymentConfig:
    """A preset name (configs/deployments/NAME.yaml), a YAML path, or a dict, plus overrides."""
    if isinstance(spec, Mapping):
        data, where = dict(spec), "<dict>"
    else:
        path = config_path("deployments", str(spec or "local-demo"))
        if not path.is_file():
            raise ConfigError(f"deployment {spec!r}: no such file {path}")
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({e})") from None
    data = _merge(data, overrides or {})
    cfg = _build(DeploymentConfig, data, where, "")
    return dataclasses.replace(cfg, source=where)

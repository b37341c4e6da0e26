"""`jaxprfaas serve --role ROLE --config CONFIG`: run one role of a deployment in this process.

Roles: `router`, `prefill --cluster prfaas|pd --index I`, `decode --index I`. The launcher
(`jaxprfaas run`) starts every role this way on loopback; on several hosts, run one per host
with `listen:` addresses in the config (the router reads the others' addresses from it).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, choices=["router", "prefill", "decode"])
    p.add_argument("--config", required=True, help="deployment YAML")
    p.add_argument("--cluster", choices=["prfaas", "pd"], default="pd", help="prefill: which cluster")
    p.add_argument("--index", type=int, default=0, help="instance index within the role")
    p.add_argument("--listen", default=None, help="host:port (default: from the config, else ephemeral)")
    p.add_argument("--ready-file", default=None, help="write {address,...} here once serving")
    p.add_argument("--peers", default=None, help="router: JSON file of worker addresses (from the launcher)")


def run(args) -> int:
    from jaxprfaas.config import load_deployment
    from jaxprfaas.roles.common import configure_platform, setup_logging

    cfg = load_deployment(args.config)
    role_cfg = _role_config(cfg, args)
    configure_platform(role_cfg)
    setup_logging(f"{args.role}{'' if args.role == 'router' else f'[{args.cluster}:{args.index}]'}")
    listen = args.listen or (role_cfg.listen[args.index] if args.index < len(role_cfg.listen) else f"{cfg.host}:0")
    from jaxprfaas.roles.main import serve_role
    peers = json.load(open(args.peers)) if args.peers else None
    serve_role(cfg, args.role, args.cluster, args.index, listen, args.ready_file, peers)
    return 0


def _role_config(cfg, args):
    from jaxprfaas.config import RoleConfig
    from jaxprfaas.errors import ConfigError
    c = cfg.clusters
    if args.role == "router":
        return RoleConfig(platform="cpu")
    if args.role == "decode":
        return c.pd.decode
    if args.cluster == "prfaas":
        if c.prfaas is None:
            raise ConfigError(f"{cfg.source}: no clusters.prfaas in this deployment")
        return c.prfaas.prefill
    return c.pd.prefill

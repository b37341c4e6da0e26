"""Start one role: load what it needs, warm it up, serve, write the ready file, drain on signal."""

from __future__ import annotations

import logging

from jaxprfaas.config import DeploymentConfig
from jaxprfaas.roles.common import RoleServer, write_ready
from jaxprfaas.runtime.proto import serving_pb2_grpc as pbg

log = logging.getLogger("jaxprfaas")


def _model(cfg: DeploymentConfig):
    from jaxprfaas.model.checkpoint import load_model
    return load_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed)


def _receiver_address(listen: str) -> str:
    host, port = listen.rsplit(":", 1)
    return f"{host}:{int(port) + 1}" if int(port) else f"{host}:0"


def enable_compilation_cache() -> None:
    """Share compiled programs between the processes of a deployment and across runs."""
    import os
    import jax
    d = os.environ.get("JAXPRFAAS_CACHE_DIR", os.path.expanduser("~/.cache/jaxprfaas/xla"))
    try:
        os.makedirs(d, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except Exception as e:  # noqa: BLE001 - a cache is an optimisation, never a failure
        log.warning("no compilation cache: %s", e)


def serve_role(cfg: DeploymentConfig, role: str, cluster: str, index: int, listen: str,
               ready_file: str | None, peers: dict | None) -> None:
    server = RoleServer(listen)
    if role != "router":
        import jax
        enable_compilation_cache()
        log.info("JAX %s on %s: %s", jax.__version__, jax.default_backend(), jax.devices())
    info: dict = {"role": role, "cluster": cluster, "index": index}
    on_drain = None
    if role == "router":
        from jaxprfaas.roles.router import RouterService, Worker
        peers = peers or _peers_from_config(cfg)
        mc = _model_config(cfg)
        svc = RouterService(cfg, mc,
                            [Worker(i, a) for i, a in enumerate(peers.get("prfaas", []))],
                            [Worker(i, a) for i, a in enumerate(peers.get("pd_prefill", []))],
                            [Worker(i, d["address"], d["receiver"]) for i, d in enumerate(peers.get("decode", []))])
        pbg.add_FrontendServicer_to_server(svc, server.server)
        on_drain = svc.close
    elif role == "prefill":
        from jaxprfaas.roles.prefill import PrefillService
        model = _model(cfg)
        svc = PrefillService(cfg, cluster, model)
        svc.warmup()
        pbg.add_PrefillWorkerServicer_to_server(svc, server.server)
        on_drain = svc.close
    elif role == "decode":
        from jaxprfaas.roles.decode import DecodeService, make_backend
        from jaxprfaas.roles.prefill import transport_security
        from jaxprfaas.runtime.transfer import serve_receiver
        model = _model(cfg)
        sink, backend = make_backend(model, cfg)
        sec = transport_security(cfg)
        cross = cfg.link.cross_datacenter and cfg.clusters.prfaas is not None
        rx = serve_receiver(sink.inner, model.config, address=_receiver_address(listen),
                            tls=sec.tls if cross else None, tokens=sec.tokens if cross else ())
        svc = DecodeService(cfg, model, sink, backend)
        pbg.add_DecodeWorkerServicer_to_server(svc, server.server)
        info["receiver"] = rx.target

        def on_drain():
            rx.stop()
            getattr(backend, "close", lambda: None)()
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(role)
    server.start()
    server.set_serving(True)
    info["address"] = server.address
    write_ready(ready_file, info)
    log.info("serving %s on %s", role, server.address)
    server.serve(on_drain)


def _model_config(cfg: DeploymentConfig):
    from pathlib import Path
    from jaxprfaas.model.config import ModelConfig
    p = Path(cfg.model)
    if (p / "jaxprfaas_config.json").is_file():
        import json
        d = json.loads((p / "jaxprfaas_config.json").read_text())
        d["mla_layers"] = tuple(d["mla_layers"])
        return ModelConfig(**d)
    mc = ModelConfig.from_hf(p) if p.is_dir() else ModelConfig.preset(cfg.model)
    return mc.replace(dtype=cfg.dtype) if cfg.dtype else mc


def _peers_from_config(cfg: DeploymentConfig) -> dict:
    c = cfg.clusters
    dec = [{"address": a, "receiver": _receiver_address(a)} for a in c.pd.decode.listen]
    return {"prfaas": list(c.prfaas.prefill.listen) if c.prfaas else [],
            "pd_prefill": list(c.pd.prefill.listen), "decode": dec}

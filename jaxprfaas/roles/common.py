"""Process plumbing shared by every role: platform selection, gRPC server + health, drain."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jaxprfaas.config import RoleConfig

log = logging.getLogger("jaxprfaas")

MAX_MESSAGE = 64 << 20
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE),
                  ("grpc.max_send_message_length", MAX_MESSAGE),
                  ("grpc.so_reuseport", 0)]


def configure_platform(role: RoleConfig) -> None:
    """Pin this process's JAX platform and devices (must run before JAX is imported)."""
    os.environ["JAX_PLATFORMS"] = "cuda" if role.platform == "gpu" else "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share a GPU
    if role.platform == "gpu" and role.devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, role.devices))


def setup_logging(name: str) -> None:
    logging.basicConfig(level=os.environ.get("JAXPRFAAS_LOG", "INFO"),
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")


class RoleServer:
    """A gRPC server with the health service; `serve()` blocks until SIGINT/SIGTERM, then drains."""

    def __init__(self, address: str, workers: int = 32):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.host = address.rsplit(":", 1)[0]
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    def serve(self, on_drain: Callable[[], None] | None = None, grace_s: float = 10.0) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        self._stop.wait()
        log.info("draining")
        self.set_serving(False)
        if on_drain is not None:
            on_drain()
        self.server.stop(grace_s).wait(grace_s + 1)
        log.info("stopped")


def write_ready(path: str | None, info: dict) -> None:
    """Atomically write the ready file the launcher waits for."""
    if not path:
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    os.replace(tmp, path)

"""Launcher: every role of a deployment as its own OS process on this host, talking gRPC.

Workers (PrfaaS prefill pods, PD-P, PD-D) start first; each writes a ready file once its model is
loaded and compiled; the router starts last with the workers' addresses. The launcher then
checks every process through the standard gRPC health service before declaring the deployment
ready. Children die with the launcher (PR_SET_PDEATHSIG), are drained with SIGTERM on `stop()`,
and killed if they don't leave in time: no orphans. Each role logs to its own file.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxprfaas.config import DeploymentConfig
from jaxprfaas.errors import JaxprfaasError


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Proc:
    def __init__(self, name: str, argv: list[str], log_path: Path, ready_path: Path, env: dict):
        self.name, self.log_path, self.ready_path = name, log_path, ready_path
        self.log = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, preexec_fn=_die_with_parent)
        self.info: dict = {}

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Deployment:
    """Start with `start()` (or `with Deployment(cfg) as d:`); `d.address` is the router's."""

    def __init__(self, cfg: DeploymentConfig, workdir: str | Path | None = None):
        self.cfg = cfg
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="jaxprfaas-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.procs: list[Proc] = []
        self.address: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 300.0) -> "Deployment":
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        config_file = self.workdir / "deployment.yaml"
        data = json.loads(json.dumps(self.cfg.to_dict()))  # tuples -> lists for YAML
        config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        c = self.cfg.clusters
        workers = []
        if c.prfaas is not None:
            workers += [("prefill", "prfaas", i) for i in range(c.prfaas.prefill.instances)]
        workers += [("prefill", "pd", i) for i in range(c.pd.prefill.instances)]
        workers += [("decode", "pd", i) for i in range(c.pd.decode.instances)]
        for role, cluster, i in workers:
            self._spawn(role, cluster, i, config_file)
        deadline = time.monotonic() + timeout_s
        self._wait_ready(self.procs, deadline)
        peers = {"prfaas": [p.info["address"] for p in self.procs if p.info["cluster"] == "prfaas"],
                 "pd_prefill": [p.info["address"] for p in self.procs
                                if p.info["role"] == "prefill" and p.info["cluster"] == "pd"],
                 "decode": [{"address": p.info["address"], "receiver": p.info["receiver"]}
                            for p in self.procs if p.info["role"] == "decode"]}
        peers_file = self.workdir / "peers.json"
        peers_file.write_text(json.dumps(peers))
        router = self._spawn("router", "pd", 0, config_file, ["--peers", str(peers_file)])
        self._wait_ready([router], deadline)
        self.address = router.info["address"]
        for p in self.procs:
            _health_check(p, deadline)

    def _spawn(self, role: str, cluster: str, index: int, config_file: Path, extra=()) -> Proc:
        name = role if role == "router" else f"{cluster}-{role}-{index}"
        ready = self.workdir / f"{name}.ready"
        argv = [sys.executable, "-m", "jaxprfaas.cli", "serve", "--role", role, "--config", str(config_file),
                "--cluster", cluster, "--index", str(index), "--ready-file", str(ready), *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = Proc(name, argv, self.log_dir / f"{name}.log", ready, env)
        self.procs.append(p)
        return p

    def _wait_ready(self, procs: list[Proc], deadline: float) -> None:
        pending = list(procs)
        while pending:
            for p in list(pending):
                if p.ready_path.is_file():
                    p.info = json.loads(p.ready_path.read_text())
                    pending.remove(p)
                elif p.popen.poll() is not None:
                    raise JaxprfaasError(f"{p.name} exited with code {p.popen.returncode} before it was ready; "
                                         f"its log ({p.log_path}) ends:\n{p.tail()}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise JaxprfaasError(f"{names} not ready in time; see logs in {self.log_dir}")
            time.sleep(0.05)

    def stop(self, grace_s: float = 15.0) -> None:
        """Drain every process with SIGTERM; kill what is still there after `grace_s`."""
        for p in reversed(self.procs):         # router first: no new traffic
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
            p.log.close()
        self.procs = []
        if self._tmp is not None:
            # per-role logs vanish with the temp dir unless JAXPRFAAS_LOG_DIR asks to keep them
            dest = os.environ.get("JAXPRFAAS_LOG_DIR")
            if dest:
                import shutil
                shutil.copytree(self.log_dir, dest, dirs_exist_ok=True)
            self._tmp.cleanup()
            self._tmp = None

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.procs]

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _health_check(p: Proc, deadline: float) -> None:
    with grpc.insecure_channel(p.info["address"]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise JaxprfaasError(f"{p.name} at {p.info['address']} never reported SERVING")
            time.sleep(0.1)

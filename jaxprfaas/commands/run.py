"""`jaxprfaas run CONFIG`: start a deployment (until Ctrl-C), or run a batch job file.

A file with a top-level `job:` mapping is a batch job (configs/jobs/); anything else is a
deployment (configs/deployments/), started with every role as its own process on this host.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

import yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="deployment or job YAML (or a deployment preset name)")
    p.add_argument("--no-progress", action="store_true", help="jobs: no progress bar")
    p.add_argument("--workdir", default=None,
                   help="deployments: where per-role logs and ready files go (default jaxprfaas-run/NAME)")


def run(args) -> int:
    from jaxprfaas.errors import ConfigError
    path = Path(args.config)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if isinstance(data, dict) and "job" in data:
            from jaxprfaas.jobs import load_job, run_job
            summary = run_job(load_job(path), progress=not args.no_progress)
            print(json.dumps(summary))
            return 0
    from jaxprfaas.config import load_deployment
    from jaxprfaas.launcher import Deployment
    cfg = load_deployment(args.config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workdir = Path(args.workdir or Path("jaxprfaas-run") / cfg.name)
    with Deployment(cfg, workdir=workdir) as d:
        print(f"deployment {cfg.name} serving; router at {d.address}; logs in {d.log_dir} (Ctrl-C to stop)",
              flush=True)
        stop.wait()
        print("draining...", flush=True)
    return 0

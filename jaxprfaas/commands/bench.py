"""`jaxprfaas bench transfer`: push a random Kimi-Linear-shaped state through a real receiver.

By default the receiver is its own process on loopback (started and stopped here); `--target`
measures against a receiver that is already running (another host, another namespace). The
link is unshaped (`--link-gbps 0`) or emulated on the sender (`runtime/link.py`). Prints one
JSON object with `--json`, a line of text otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime.state_codec import DEFAULT_CHUNK_BYTES

MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = sub.add_parser("transfer", help="state transfer throughput through a real gRPC receiver")
    p.add_argument("--size-mib", type=float, default=64.0, help="state size to send (MiB)")
    p.add_argument("--streams", type=int, default=4, help="parallel gRPC connections")
    p.add_argument("--link-gbps", type=float, default=0.0, help="emulated link rate (0 = unshaped)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="emulated one-way latency")
    p.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / MiB, help="chunk size, 1..16 MiB")
    p.add_argument("--repeat", type=int, default=3, help="timed transfers; the best is reported")
    p.add_argument("--tls", action="store_true", help="mTLS with throwaway certificates")
    p.add_argument("--model", default="kimi-linear-48b-a3b", help="model preset whose state shape to use")
    p.add_argument("--target", help="HOST:PORT of a running receiver (default: start one on loopback)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.bench == "transfer":
        out = transfer_bench(args.size_mib, args.streams, args.link_gbps, args.latency_ms, tls=args.tls,
                             chunk_mib=args.chunk_mib, repeat=args.repeat, model=args.model, target=args.target)
        if args.json:
            print(json.dumps(out))
        else:
            util = "" if out["utilization"] is None else f", utilization {out['utilization']:.3f}"
            print(f"{out['bytes'] / MiB:.1f} MiB in {out['seconds'] * 1e3:.1f} ms: {out['gbps']:.2f} Gbit/s "
                  f"over {out['streams']} streams (link {out['link_gbps'] or 'unshaped'}{util}), "
                  f"verified={out['verified']}")
        return 0
    raise JaxprfaasError(f"unknown benchmark {args.bench!r}")


# ---- the state ---------------------------------------------------------------------------------

def sized_config(base: ModelConfig, size_bytes: int) -> tuple[ModelConfig, int]:
    """(config, tokens) whose one-sequence state is about `size_bytes`: the model's first layers
    (as many as fit whole; the last one made MLA if none of them is), then as many MLA tokens as
    fill the rest."""
    from jaxprfaas.model.state import state_nbytes  # no JAX needed for sizes

    best = None
    for n in range(1, base.num_hidden_layers + 1):
        mla = tuple(i for i in base.mla_layers if i < n) or ((n - 1,) if n > 1 else ())
        cfg = base.replace(num_hidden_layers=n, mla_layers=mla)
        fixed, per_token = state_nbytes(cfg, 0), state_nbytes(cfg, 1) - state_nbytes(cfg, 0)
        if fixed > size_bytes:
            break
        tokens = (size_bytes - fixed) // per_token if per_token else 0
        best = (cfg, int(tokens))
    if best is None:
        raise JaxprfaasError(f"{size_bytes / MiB:.2f} MiB is less than one layer of {base.num_hidden_layers}-layer state")
    return best


def random_state(config: ModelConfig, tokens: int, seed: int = 0):
    """A one-sequence state of random bits (numpy leaves; the fields a HybridState has)."""
    from jaxprfaas.runtime.state_codec import DTYPES

    rng = np.random.default_rng(seed)
    h, k, w = config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
    dt = DTYPES[config.dtype]

    def bits(shape, dtype):
        return np.frombuffer(rng.bytes(math.prod(shape) * dtype.itemsize), dtype).reshape(shape)

    return types.SimpleNamespace(
        recurrent=tuple(bits((1, h, k, k), np.dtype(np.float32)) for _ in config.kda_layers),
        conv=tuple(bits((1, w - 1, 3 * h * k), dt) for _ in config.kda_layers),
        latent=tuple(bits((1, tokens, config.latent_dim), dt) for _ in config.mla_layers),
        lengths=np.asarray([tokens], np.int32))


# ---- a receiver process ------------------------------------------------------------------------

def throwaway_pki(d: Path) -> dict[str, str]:
    """A CA plus server and client certificates for 127.0.0.1/localhost (openssl CLI)."""
    def ssl(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True, timeout=30)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    (d / "leaf.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        ssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", "leaf.ext")
    return {n: str(d / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


class ReceiverProcess:
    """`python -m jaxprfaas.runtime.transfer` on loopback, discarding what it receives."""

    def __init__(self, config: ModelConfig, workdir: Path, pki: dict[str, str] | None = None,
                 listen: str = "127.0.0.1:0", prefix: Sequence[str] = ()):
        cfg = workdir / "model.json"
        cfg.write_text(json.dumps(config.to_dict()))
        cmd = [*prefix, sys.executable, "-m", "jaxprfaas.runtime.transfer", "--listen", listen,
               "--model", str(cfg), "--discard"]
        if pki:
            cmd += ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--tls-ca", pki["ca.pem"]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise JaxprfaasError(f"receiver did not start: {line.strip()} {self.proc.stderr.read()[-2000:]}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---- the measurement -----------------------------------------------------------------------------

def transfer_bench(size_mib: float, streams: int, link_gbps: float, latency_ms: float, *, tls: bool = False,
                   chunk_mib: float = DEFAULT_CHUNK_BYTES / MiB, repeat: int = 3, model: str = "kimi-linear-48b-a3b",
                   target: str | None = None, seed: int = 0) -> dict:
    from jaxprfaas.runtime import transfer as T
    from jaxprfaas.runtime.link import Link, utilization

    if size_mib <= 0 or streams < 1 or repeat < 1 or link_gbps < 0 or latency_ms < 0:
        raise JaxprfaasError("size, streams and repeat must be positive; link rate and latency >= 0")
    config, tokens = sized_config(ModelConfig.preset(model), int(size_mib * MiB))
    state = random_state(config, tokens, seed)
    link = Link.from_gbps(link_gbps, latency_ms)
    with tempfile.TemporaryDirectory(prefix="jpf-bench-") as tmp:
        tmp = Path(tmp)
        if tls and shutil.which("openssl") is None:
            raise JaxprfaasError("--tls makes throwaway certificates with the openssl CLI, which is not installed")
        pki = throwaway_pki(tmp) if tls else None
        receiver = None if target else ReceiverProcess(config, tmp, pki)
        try:
            addr = target or f"127.0.0.1:{receiver.port}"
            creds = T.TlsFiles(pki["client.pem"], pki["client.key"], pki["ca.pem"]) if pki else None
            with T.StateSender(addr, config, streams=streams, chunk_bytes=int(chunk_mib * MiB), tls=creds,
                               link=link, link_name=f"bench-{addr}", deadline_s=600) as sender:
                tag = f"{time.time_ns()}"
                # connections up, buffers warm, and the bytes checked end to end (receiver digest);
                # the timed runs skip the digest (one more pass over the state at each end)
                check = sender.send_state(f"check-{tag}", state, verify=True)
                runs = [sender.send_state(f"bench-{tag}-{i}", state, verify=False) for i in range(repeat)]
        finally:
            if receiver is not None:
                receiver.stop()
    best = min(runs, key=lambda r: r.seconds)
    rate = link_gbps * 1e9
    return {
        "bytes": best.payload_bytes, "seconds": best.seconds,
        "gbps": best.payload_bytes * 8 / best.seconds / 1e9, "link_gbps": link_gbps,
        "utilization": utilization(best.payload_bytes, best.seconds, rate, latency_ms / 1e3),
        "streams": streams, "verified": bool(check.verified),
        "latency_ms": latency_ms, "chunk_mib": chunk_mib, "tls": tls, "wire_bytes": best.wire_bytes,
        "all_seconds": [r.seconds for r in runs], "model": model, "layers": config.num_hidden_layers,
        "tokens": tokens,
    }

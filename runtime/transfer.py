"""Cross-datacenter transfer of a request's HybridState over gRPC.

Decode side: `StateReceiver` (served by `serve_receiver`) checks each transfer's manifest,
writes verified chunks into a `StateSink` (the cache pool implements it; `InMemorySink` here),
acks or nacks every chunk, commits when the last chunk lands (or, with `explicit_commit`, on the
sender's Commit, which carries what the prefill learns last, e.g. the first sampled token), and
frees a half-received state when its lease runs out.
Prefill side: `StateSender` opens one `OutgoingTransfer` per request; the prefill engine hands
it each layer as it becomes final (`send_layer`), chunks are striped over N gRPC connections
(one TCP connection each), a nacked or lost chunk is re-sent, a broken stream resumes after
the chunks the receiver confirms it holds, and everything gives up at the transfer's deadline
with an error that says why. The sender keeps the source arrays alive until the receiver's
final ack, and drops them the moment the transfer ends either way.

Both ends follow `LEGAL_TRANSITIONS` (pending -> streaming -> landed -> acked, or failed /
expired). Security: TLS or mTLS from PEM files (`TlsFiles`) and bearer tokens
(`BearerTokenInterceptor`); `check_transport_security` is what a deployment calls so that a
cross-datacenter link never starts in plaintext unless its config says `insecure: true`.

This module never decides where a request goes (that is the scheduler) and never blocks
without a timeout. It is the public face of four files: `transfer_core` (lifecycle, errors, the
sink protocol), `transfer_receiver`, `transfer_sender` and `transfer_security`; and, run with
`python -m jaxprfaas.runtime.transfer`, a receiver as its own process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime.transfer_core import (  # noqa: F401  (the public face of the transfer)
    LEGAL_TRANSITIONS,
    MAX_FRAME_BYTES,
    SERVICE,
    TERMINAL,
    InMemorySink,
    S,
    SinkFull,
    StateSink,
    TransferError,
    TransferExpired,
    TransferFailed,
    TransferMeta,
    TransferState,
    _Lifecycle,
)
from jaxprfaas.runtime.transfer_receiver import (  # noqa: F401
    ReceiverServer,
    StateReceiver,
    serve_receiver,
)
from jaxprfaas.runtime.transfer_security import (  # noqa: F401
    BearerTokenInterceptor,
    TlsFiles,
    TransportSecurity,
    check_transport_security,
)
from jaxprfaas.runtime.transfer_sender import (  # noqa: F401
    OutgoingTransfer,
    StateSender,
    TransferResult,
)

# ---- a receiver as its own process (tests, benchmarks, the demo) ---------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxprfaas.runtime.transfer --listen HOST:PORT ...`: serve an in-memory receiver."""
    import argparse
    import json
    import signal
    import sys

    ap = argparse.ArgumentParser(prog="python -m jaxprfaas.runtime.transfer", description=main.__doc__)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--model", default="tiny", help="preset name, or a JSON file of ModelConfig fields")
    ap.add_argument("--tls-cert"), ap.add_argument("--tls-key"), ap.add_argument("--tls-ca")
    ap.add_argument("--token", action="append", default=[])
    ap.add_argument("--max-lease-s", type=float, default=30.0)
    ap.add_argument("--discard", action="store_true", help="drop committed states (benchmarks)")
    args = ap.parse_args(argv)
    if args.model.endswith(".json"):
        d = json.loads(Path(args.model).read_text())
        config = ModelConfig(**{**d, "mla_layers": tuple(d["mla_layers"])})
    else:
        config = ModelConfig.preset(args.model)
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    server = serve_receiver(InMemorySink(config, keep=not args.discard), config, address=args.listen,
                            tls=tls, tokens=args.token, max_lease_s=args.max_lease_s)
    print(f"PORT {server.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.stop(0.5)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

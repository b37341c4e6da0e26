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
without a timeout.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import hmac
import itertools
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import grpc
import numpy as np

from jaxprfaas.errors import ConfigError, JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec
from jaxprfaas.runtime.link import EgressMeter, Link, egress_meter
from jaxprfaas.runtime.proto import transfer_pb2 as pb

SERVICE = "jaxprfaas.transfer.v1.StateReceiver"
MAX_FRAME_BYTES = codec.MAX_CHUNK_BYTES + (1 << 20)  # payload + header, with room to spare
_POLL_S = 0.05  # granularity of every bounded wait


# ---- lifecycle -----------------------------------------------------------------------------

class TransferState(str, enum.Enum):
    PENDING = "pending"      # opened, nothing accepted yet
    STREAMING = "streaming"  # receiver accepted the manifest; chunks moving
    LANDED = "landed"        # every chunk is on the receiver (not yet handed to its pool)
    ACKED = "acked"          # receiver committed the state: the sender may forget it
    FAILED = "failed"        # refused, aborted, or a chunk kept failing
    EXPIRED = "expired"      # sender's deadline or receiver's lease ran out


S = TransferState
LEGAL_TRANSITIONS: Mapping[TransferState, frozenset[TransferState]] = {
    S.PENDING: frozenset({S.STREAMING, S.FAILED, S.EXPIRED}),
    S.STREAMING: frozenset({S.LANDED, S.FAILED, S.EXPIRED}),
    S.LANDED: frozenset({S.ACKED, S.FAILED, S.EXPIRED}),
    S.ACKED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in LEGAL_TRANSITIONS.items() if not nxt)


class TransferError(JaxprfaasError):
    """A transfer could not be done; the message says which request, where, and why."""


class TransferFailed(TransferError):
    pass


class TransferExpired(TransferFailed):
    pass


class SinkFull(TransferError):
    """The sink cannot hold this state now (the pool is full): the sender may retry later."""


class _Lifecycle:
    def __init__(self) -> None:
        self.state = S.PENDING
        self.history = [S.PENDING]
        self.cond = threading.Condition()

    def move(self, new: TransferState) -> bool:
        """Move to `new`; False if already terminal (first terminal state wins)."""
        with self.cond:
            if self.state in TERMINAL:
                return False
            if new not in LEGAL_TRANSITIONS[self.state]:
                raise TransferError(f"illegal transfer transition {self.state.value} -> {new.value}")
            self.state = new
            self.history.append(new)
            self.cond.notify_all()
            return True


# ---- the sink the cache pool implements -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TransferMeta:
    request_id: str
    lengths: tuple[int, ...]          # HybridState.lengths
    pieces: tuple[codec.Piece, ...]   # manifest, in layer order
    prefix_rows: int                  # MLA rows the receiver already holds (not sent)
    prefix_key: str                   # how the sink finds those rows (opaque here)
    num_chunks: int
    want_digest: bool = False         # the sender asked for codec.digest of the pieces at commit
    annex: bytes = b""                # opaque sender data for the sink (e.g. the serialized request)
    explicit_commit: bool = False     # commit on the sender's Commit (with its annex), not the last chunk

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


class StateSink(Protocol):
    """Where arriving state goes. The cache pool implements this; calls may come from many threads."""

    def begin(self, request_id: str, meta: TransferMeta) -> None:
        """Reserve room for the whole manifest (raise SinkFull to refuse); called again on resume."""

    def write(self, request_id: str, seq: int, piece: codec.Piece, offset: int, payload: memoryview) -> None:
        """Copy a verified chunk into place; `payload` is only valid during the call. Idempotent per seq."""

    def commit(self, request_id: str, annex: bytes) -> int | None:
        """All bytes are in: make the state visible to decode. `annex`: what the sender's Commit
        carried (e.g. the first sampled token; b"" on an automatic commit). Return codec.digest of
        the pieces (in manifest order) if meta.want_digest, else None."""

    def abort(self, request_id: str, reason: str) -> None:
        """Free everything held for this request (idempotent; unknown ids are fine)."""


class InMemorySink:
    """A StateSink assembling HybridStates in host memory (tests, benchmarks, until the pool lands).

    `keep=False` drops each state once committed (after its digest) and, like a real pool,
    reuses the freed buffers for later transfers: on a VM, first-touching fresh pages costs
    more than the network does.
    """

    def __init__(self, config: ModelConfig, prefixes: Mapping[str, object] | None = None, keep: bool = True):
        self.config, self.prefixes, self.keep = config, dict(prefixes or {}), keep
        self.partial: dict[str, codec.StateAssembler] = {}
        self.metas: dict[str, TransferMeta] = {}
        self.states: dict[str, object] = {}
        self.aborted: dict[str, str] = {}
        self.annexes: dict[str, tuple[bytes, bytes]] = {}  # request id -> (Begin's, Commit's)
        self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def _alloc(self, nbytes: int) -> np.ndarray:
        free = self._free.get(nbytes)
        return free.pop() if free else np.empty(nbytes, np.uint8)

    def _recycle(self, asm: codec.StateAssembler) -> None:
        if len(self._free) < 64:
            for buf in asm.buffers.values():
                self._free[buf.nbytes].append(buf)

    @property
    def held_bytes(self) -> int:
        """Bytes of half-received states (what a leak would show up in)."""
        with self._lock:
            return sum(a.nbytes for a in self.partial.values())

    def begin(self, request_id: str, meta: TransferMeta) -> None:
        if meta.prefix_rows and meta.prefix_key not in self.prefixes:
            raise codec.CodecError(f"prefix {meta.prefix_key!r} ({meta.prefix_rows} rows) is not held here")
        with self._lock:
            if request_id not in self.partial:
                self.partial[request_id] = codec.StateAssembler(self.config, meta.lengths, meta.pieces,
                                                                alloc=None if self.keep else self._alloc)
                self.metas[request_id] = meta

    def write(self, request_id, seq, piece, offset, payload) -> None:
        with self._lock:
            asm = self.partial.get(request_id)
        if asm is not None:  # the copy runs outside the lock: streams write in parallel
            asm.write(seq, piece, offset, payload)

    def commit(self, request_id: str, annex: bytes = b"") -> int | None:
        with self._lock:
            asm = self.partial.pop(request_id)
            meta = self.metas.pop(request_id)
            self.annexes[request_id] = (meta.annex, annex)
        value = asm.digest() if meta.want_digest else None
        if self.keep:
            self.states[request_id] = asm.state(self.prefixes.get(meta.prefix_key))
        else:
            with self._lock:
                self._recycle(asm)
        return value

    def abort(self, request_id: str, reason: str) -> None:
        with self._lock:
            asm = self.partial.pop(request_id, None)
            self.metas.pop(request_id, None)
            self.aborted[request_id] = reason
            if asm is not None and not self.keep:
                self._recycle(asm)

    def take(self, request_id: str):
        return self.states.pop(request_id)


# ---- receiver --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Incoming:
    meta: TransferMeta
    lease_s: float
    lease_until: float
    life: _Lifecycle = dataclasses.field(default_factory=_Lifecycle)
    received: set = dataclasses.field(default_factory=set)
    received_bytes: int = 0
    ended_at: float = 0.0
    reason: str = ""
    digest: int | None = None


class StateReceiver:
    """The decode side's gRPC service (one per node; any number of concurrent transfers)."""

    def __init__(self, sink: StateSink, config: ModelConfig, *, max_lease_s: float = 30.0,
                 tombstone_s: float = 300.0, begin_wait_s: float = 5.0):
        self.sink, self.config = sink, config
        self.fingerprint = config.fingerprint()
        self.max_lease_s, self.tombstone_s = max_lease_s, tombstone_s
        self.begin_wait_s = begin_wait_s  # how long a chunk that overtook its Begin may wait for it
        self.stats = collections.Counter()
        self._tx: dict[str, _Incoming] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="transfer-lease-reaper", daemon=True)
        self._reaper.start()

    # -- introspection
    def state_of(self, request_id: str) -> TransferState | None:
        with self._lock:
            tx = self._tx.get(request_id)
            return tx.life.state if tx else None

    def active(self) -> list[str]:
        with self._lock:
            return [r for r, t in self._tx.items() if t.life.state not in TERMINAL]

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=2)
        for rid in self.active():
            self._end(rid, S.FAILED, "receiver shut down")

    # -- RPCs
    def Begin(self, req: pb.BeginRequest, ctx: grpc.ServicerContext) -> pb.BeginReply:
        if req.version != codec.PROTOCOL_VERSION:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"protocol version mismatch: sender speaks version {req.version}, "
                      f"receiver speaks version {codec.PROTOCOL_VERSION}")
        if req.fingerprint != self.fingerprint:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"model fingerprint mismatch: sender's model is {req.fingerprint!r}, "
                      f"receiver serves {self.fingerprint!r}")
        try:
            pieces = tuple(codec.Piece.from_pb(a) for a in req.arrays)
            want = codec.manifest(self.config, list(req.lengths), req.prefix_rows)
        except codec.CodecError as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad manifest for {req.request_id}: {e}")
        if pieces != want or len(req.lengths) != req.batch:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"manifest of {req.request_id} does not match this model's state layout")
        meta = TransferMeta(req.request_id, tuple(req.lengths), pieces, req.prefix_rows,
                            req.prefix_key, int(req.num_chunks), req.want_digest, req.annex,
                            req.explicit_commit)
        lease = min(max(req.lease_ms / 1e3, 0.1), self.max_lease_s)
        with self._lock:
            tx = self._tx.get(req.request_id)
            if tx is not None and tx.life.state == S.ACKED:  # done already; its last ack was lost
                return pb.BeginReply(received=sorted(tx.received), committed=True, digest=tx.digest or 0,
                                     has_digest=tx.digest is not None)
            if tx is not None and tx.life.state not in TERMINAL and tx.meta != meta:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"transfer {req.request_id} resumed with a different manifest")
            resume = tx is not None and tx.life.state not in TERMINAL
            if not resume:
                tx = _Incoming(meta, lease, time.monotonic() + lease)
                self._tx[req.request_id] = tx
            tx.lease_until = time.monotonic() + lease
        try:
            self.sink.begin(req.request_id, meta)
        except SinkFull as e:
            self._end(req.request_id, S.FAILED, str(e))
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{req.request_id}: {e}")
        except JaxprfaasError as e:
            self._end(req.request_id, S.FAILED, str(e))
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{req.request_id}: {e}")
        if tx.life.state == S.PENDING:
            tx.life.move(S.STREAMING)
        with self._lock:
            self._lock.notify_all()  # chunks that overtook this Begin may go on
        self.stats["resumed" if resume else "begun"] += 1
        with self._lock:
            received = sorted(tx.received)
        return pb.BeginReply(received=received, lease_ms=int(lease * 1e3))

    def Push(self, frames, ctx: grpc.ServicerContext):
        for frame in frames:
            yield self._on_frame(frame)

    def Commit(self, req: pb.CommitRequest, ctx: grpc.ServicerContext) -> pb.CommitReply:
        with self._lock:
            tx = self._tx.get(req.request_id)
        if tx is None:
            ctx.abort(grpc.StatusCode.NOT_FOUND, f"unknown transfer {req.request_id}")
        if tx.life.state == S.ACKED:
            return pb.CommitReply(digest=tx.digest or 0, has_digest=tx.digest is not None)
        if tx.life.state in TERMINAL:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"transfer {req.request_id} is {tx.life.state.value}: {tx.reason}")
        if req.num_chunks != tx.meta.num_chunks:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer {req.request_id}: Commit says "
                      f"{req.num_chunks} chunks, Begin said {tx.meta.num_chunks}")
        # An explicit Commit may overtake the last chunks: hold it (renewing the lease) until they land.
        until = time.monotonic() + min(ctx.time_remaining() or self.max_lease_s, self.max_lease_s)
        with self._lock:
            while not self._complete(tx) and tx.life.state == S.STREAMING and ctx.is_active():
                if time.monotonic() >= until:
                    break
                tx.lease_until = time.monotonic() + tx.lease_s
                self._lock.wait(_POLL_S)
            missing = tx.meta.num_chunks - len(tx.received)
        if tx.life.state == S.ACKED:
            return pb.CommitReply(digest=tx.digest or 0, has_digest=tx.digest is not None)
        if tx.life.state != S.STREAMING:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"transfer {req.request_id} is {tx.life.state.value}: {tx.reason}")
        if missing or not self._complete(tx):
            ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"transfer {req.request_id}: {missing} of {tx.meta.num_chunks} chunks still missing at commit")
        error = self._commit(req.request_id, tx, req.annex)
        if error:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, error)
        return pb.CommitReply(digest=tx.digest or 0, has_digest=tx.digest is not None)

    def Renew(self, req: pb.RenewRequest, ctx: grpc.ServicerContext) -> pb.RenewReply:
        with self._lock:
            tx = self._tx.get(req.request_id)
            if tx is None or tx.life.state in TERMINAL:
                ctx.abort(grpc.StatusCode.NOT_FOUND, f"no live transfer {req.request_id}")
            tx.lease_until = time.monotonic() + tx.lease_s
        return pb.RenewReply(lease_ms=int(tx.lease_s * 1e3))

    def Abort(self, req: pb.AbortRequest, ctx: grpc.ServicerContext) -> pb.AbortReply:
        self._end(req.request_id, S.FAILED, f"aborted by sender: {req.reason}")
        return pb.AbortReply()

    # -- internals
    def _on_frame(self, frame: bytes) -> pb.Ack:
        try:
            header, payload = codec.decode_frame(frame)
        except codec.CodecError as e:
            return pb.Ack(seq=0, status=pb.BAD_CHUNK, message=str(e))
        seq = header.seq
        try:
            codec.check_header(header, fingerprint=self.fingerprint)
        except codec.VersionMismatch as e:
            return pb.Ack(seq=seq, status=pb.VERSION_MISMATCH, message=str(e))
        except codec.FingerprintMismatch as e:
            return pb.Ack(seq=seq, status=pb.FINGERPRINT_MISMATCH, message=str(e))
        rid = header.request_id
        def begun() -> bool:
            t = self._tx.get(rid)
            return t is not None and t.life.state != S.PENDING

        with self._lock:  # a chunk may overtake its Begin (another connection): wait for it a little
            self._lock.wait_for(begun, timeout=self.begin_wait_s)
            tx = self._tx.get(rid)
            if tx is not None and tx.life.state not in TERMINAL:
                tx.lease_until = time.monotonic() + tx.lease_s
        if tx is None:
            return pb.Ack(seq=seq, status=pb.UNKNOWN_TRANSFER, message=f"unknown transfer {rid}")
        if tx.life.state == S.ACKED:  # a resend after the commit: already have it
            return pb.Ack(seq=seq, status=pb.OK, committed=True, digest=tx.digest or 0,
                          has_digest=tx.digest is not None)
        if tx.life.state == S.LANDED and seq in tx.received:  # a resend while committing
            return pb.Ack(seq=seq, status=pb.OK)
        if tx.life.state != S.STREAMING:
            return pb.Ack(seq=seq, status=pb.CLOSED,
                          message=f"transfer {header.request_id} is {tx.life.state.value}: {tx.reason}")
        try:
            piece = codec.Piece.from_pb(header.array)
            if seq >= tx.meta.num_chunks:
                raise codec.CodecError(f"chunk {seq} is past the {tx.meta.num_chunks} chunks announced")
            if piece not in tx.meta.pieces or header.offset + header.length > piece.nbytes:
                raise codec.CodecError(f"chunk {seq} (layer {piece.layer} {piece.kind}, bytes "
                                       f"{header.offset}+{header.length}) is not in the manifest")
            codec.verify_payload(header, payload)
        except codec.ChecksumError as e:
            self.stats["checksum_errors"] += 1
            return pb.Ack(seq=seq, status=pb.CHECKSUM_MISMATCH, message=str(e))
        except codec.CodecError as e:
            return pb.Ack(seq=seq, status=pb.BAD_CHUNK, message=str(e))
        with self._lock:
            dup = seq in tx.received
        complete = False
        if not dup:
            self.sink.write(rid, seq, piece, header.offset, payload)
            with self._lock:
                if seq not in tx.received:
                    tx.received.add(seq)
                    tx.received_bytes += header.length
                all_in = len(tx.received) == tx.meta.num_chunks
                complete = self._complete(tx)
                if complete:
                    self._lock.notify_all()  # an explicit Commit may be waiting for this chunk
            self.stats["chunks"] += 1
            self.stats["bytes"] += header.length
            if all_in and not complete:  # the sender's chunks do not cover the manifest: never will
                msg = (f"transfer {rid}: its {tx.meta.num_chunks} chunks carry {tx.received_bytes} B, "
                       f"the manifest needs {tx.meta.total_bytes} B")
                self._end(rid, S.FAILED, msg)
                return pb.Ack(seq=seq, status=pb.BAD_CHUNK, message=msg)
        if complete and not tx.meta.explicit_commit:  # hand the state over now: no Commit round trip
            error = self._commit(rid, tx)
            if error:
                return pb.Ack(seq=seq, status=pb.CLOSED, message=error)
            return pb.Ack(seq=seq, status=pb.OK, committed=True, digest=tx.digest or 0,
                          has_digest=tx.digest is not None)
        return pb.Ack(seq=seq, status=pb.OK)

    @staticmethod
    def _complete(tx: _Incoming) -> bool:
        return len(tx.received) == tx.meta.num_chunks and tx.received_bytes == tx.meta.total_bytes

    def _commit(self, rid: str, tx: _Incoming, annex: bytes = b"") -> str | None:
        """landed -> sink.commit -> acked; the error message if that could not happen."""
        if not tx.life.move(S.LANDED):
            return f"transfer {rid} is {tx.life.state.value}: {tx.reason}"
        try:
            tx.digest = self.sink.commit(rid, annex)
        except Exception as e:  # the pool refused: free and report
            self._end(rid, S.FAILED, f"sink commit failed: {e}")
            return f"transfer {rid}: sink commit failed: {e}"
        self._end(rid, S.ACKED, "committed", abort_sink=False)
        return None

    def _end(self, request_id: str, state: TransferState, reason: str, abort_sink: bool = True) -> None:
        with self._lock:
            tx = self._tx.get(request_id)
        if tx is None or not tx.life.move(state):
            return
        tx.reason, tx.ended_at = reason, time.monotonic()
        if abort_sink:
            self.sink.abort(request_id, reason)
        self.stats[state.value] += 1
        with self._lock:
            self._lock.notify_all()  # chunks waiting for this transfer's Begin learn its fate

    def _reap(self) -> None:
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            with self._lock:
                items = list(self._tx.items())
            for rid, tx in items:
                if tx.life.state in (S.PENDING, S.STREAMING) and now > tx.lease_until:
                    self._end(rid, S.EXPIRED, f"lease of {tx.lease_s:.1f} s ran out (sender silent)")
                elif tx.life.state in TERMINAL and now - tx.ended_at > self.tombstone_s:
                    with self._lock:
                        self._tx.pop(rid, None)


# ---- security --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of one end. Server: cert+key, and ca => clients must present a cert it signed
    (mTLS). Client: ca to verify the server (None = system roots), cert+key for mTLS."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None  # client: name expected in the server cert (dialing by IP)

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"TLS {name} file {path}: {e.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ConfigError("TLS server needs cert and key PEM files")
        ca = self._read("ca")
        return grpc.ssl_server_credentials([(self._read("key"), self._read("cert"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read("ca"),
                                            private_key=self._read("key"),
                                            certificate_chain=self._read("cert"))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses any call without `authorization: Bearer <one of tokens>` (compared in constant time)."""

    def __init__(self, tokens: Sequence[str]):
        if not tokens or not all(tokens):
            raise ConfigError("bearer-token auth needs at least one non-empty token")
        self._tokens = [t.encode() for t in tokens]

    def intercept_service(self, continuation, details):
        auth = dict(details.invocation_metadata or ()).get("authorization", "")
        given = auth[7:].encode() if auth.startswith("Bearer ") else b""
        if given and any(hmac.compare_digest(given, t) for t in self._tokens):
            return continuation(details)
        msg = "missing bearer token" if not given else "invalid bearer token"

        def deny(_request_or_iterator, ctx):
            ctx.abort(grpc.StatusCode.UNAUTHENTICATED, f"state transfer refused: {msg}")

        if details.method.endswith("/Push"):
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


@dataclasses.dataclass(frozen=True)
class TransportSecurity:
    """A deployment's `transfer:` security block."""

    tls: TlsFiles | None = None
    tokens: tuple[str, ...] = ()  # receiver: accepted tokens; sender: tokens[0] is sent
    insecure: bool = False        # explicitly allow plaintext across datacenters

    @staticmethod
    def from_dict(d: Mapping | None, where: str = "transfer") -> "TransportSecurity":
        d = dict(d or {})
        unknown = set(d) - {"tls", "token", "token_file", "insecure"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        tls = d.get("tls")
        if tls is not None:
            bad = set(tls) - {"cert", "key", "ca", "server_name"}
            if bad:
                raise ConfigError(f"{where}.tls: unknown keys {sorted(bad)}")
            tls = TlsFiles(**tls)
        tokens = [d["token"]] if d.get("token") else []
        if d.get("token_file"):
            try:
                tokens += [t.strip() for t in Path(d["token_file"]).read_text().splitlines() if t.strip()]
            except OSError as e:
                raise ConfigError(f"{where}.token_file {d['token_file']}: {e.strerror}") from None
        insecure = d.get("insecure", False)
        if not isinstance(insecure, bool):
            raise ConfigError(f"{where}.insecure must be true or false, got {insecure!r}")
        return TransportSecurity(tls, tuple(tokens), insecure)


def check_transport_security(sec: TransportSecurity, *, cross_datacenter: bool, link: str = "transfer") -> None:
    """Refuse to start a cross-datacenter link in plaintext unless `insecure: true` says so."""
    if not cross_datacenter or sec.insecure:
        return
    if sec.tls is None:
        raise ConfigError(f"{link}: cross-datacenter state transfer needs TLS (tls: {{cert, key, ca}} "
                          "PEM files); refusing to start in plaintext. Set insecure: true to allow it")
    for name in ("cert", "key", "ca"):
        path = getattr(sec.tls, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{link}: TLS {name} file {path} does not exist")


# ---- server ----------------------------------------------------------------------------------

_SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_FRAME_BYTES),
                   ("grpc.max_send_message_length", MAX_FRAME_BYTES)]


class ReceiverServer:
    """A running StateReceiver: `.port`, `.receiver`, `.stop()`."""

    def __init__(self, server: grpc.Server, receiver: StateReceiver, port: int, host: str):
        self.server, self.receiver, self.port, self.host = server, receiver, port, host

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait(grace + 1)
        self.receiver.close()


def serve_receiver(sink: StateSink, config: ModelConfig, *, address: str = "127.0.0.1:0",
                   tls: TlsFiles | None = None, tokens: Sequence[str] = (), max_workers: int = 128,
                   **receiver_kw) -> ReceiverServer:
    """Start a StateReceiver on `address` (port 0 = ephemeral); TLS and tokens when given."""
    from concurrent import futures

    receiver = StateReceiver(sink, config, **receiver_kw)
    raw = lambda b: b  # noqa: E731  (Push frames stay bytes: the codec reads them as views)
    handlers = {
        "Begin": grpc.unary_unary_rpc_method_handler(receiver.Begin, pb.BeginRequest.FromString,
                                                     pb.BeginReply.SerializeToString),
        "Push": grpc.stream_stream_rpc_method_handler(receiver.Push, raw, pb.Ack.SerializeToString),
        "Commit": grpc.unary_unary_rpc_method_handler(receiver.Commit, pb.CommitRequest.FromString,
                                                      pb.CommitReply.SerializeToString),
        "Renew": grpc.unary_unary_rpc_method_handler(receiver.Renew, pb.RenewRequest.FromString,
                                                     pb.RenewReply.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(receiver.Abort, pb.AbortRequest.FromString,
                                                     pb.AbortReply.SerializeToString),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="state-rx"),
                         handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
                         interceptors=[BearerTokenInterceptor(tokens)] if tokens else None,
                         options=_SERVER_OPTIONS)
    port = (server.add_secure_port(address, tls.server_credentials()) if tls
            else server.add_insecure_port(address))
    if not port:
        raise ConfigError(f"cannot listen on {address}")
    server.start()
    return ReceiverServer(server, receiver, port, address.rsplit(":", 1)[0])



# ---- sender ----------------------------------------------------------------------------------

# Codes after which retrying cannot help: the receiver understood us and said no. A full pool
# (RESOURCE_EXHAUSTED) is one: failing at once lets the scheduler pick another decode node.
_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND}
_FATAL_ACKS = {pb.VERSION_MISMATCH, pb.FINGERPRINT_MISMATCH, pb.BAD_CHUNK, pb.CLOSED}


def _describe(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"


@dataclasses.dataclass(frozen=True)
class TransferResult:
    request_id: str
    target: str
    payload_bytes: int      # state bytes the receiver now holds
    wire_bytes: int         # frame bytes put on the link, resends included
    chunks: int
    resent: int             # transmissions beyond one per chunk
    seconds: float          # open() to the receiver's commit ack
    verified: bool | None   # receiver's end-to-end digest matched ours (None: not asked)


class _DelayLine:
    """Runs callbacks at given monotonic times on one thread (the ack leg of an emulated link)."""

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="transfer-delay-line", daemon=True)
        self._thread.start()

    def call_at(self, due: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), fn))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                wait = self._heap[0][0] - time.monotonic() if self._heap else _POLL_S
                if wait > 0:
                    self._cond.wait(min(wait, _POLL_S))
                    continue
                _, _, fn = heapq.heappop(self._heap)
            fn()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=2)


class OutgoingTransfer:
    """One request's state on its way out. Feed layers with `send_layer`, then `finish()`."""

    def __init__(self, sender: "StateSender", request_id: str, lengths: Sequence[int], prefix_rows: int,
                 prefix_key: str, deadline_s: float, verify: bool, annex: bytes = b"",
                 explicit_commit: bool = False):
        self.sender, self.request_id, self.verify = sender, request_id, verify
        self.annex, self.explicit_commit, self._commit_annex = bytes(annex), explicit_commit, None
        self.lengths = tuple(int(x) for x in lengths)
        self.prefix_rows, self.prefix_key = prefix_rows, prefix_key
        self.pieces = codec.manifest(sender.config, self.lengths, prefix_rows)
        self.refs = codec.plan(self.pieces, sender.chunk_bytes)
        self.total_bytes = sum(p.nbytes for p in self.pieces)
        self._index = {p.key: p for p in self.pieces}
        self._refs_of = collections.defaultdict(list)
        for r in self.refs:
            self._refs_of[r.piece.key].append(r)
        self._layers_left = {p.layer for p in self.pieces}
        self.life = _Lifecycle()
        self.started = time.monotonic()
        self.deadline_s, self.deadline = deadline_s, self.started + deadline_s
        self.result: TransferResult | None = None
        self.error: TransferError | None = None
        self.last_error = ""
        self.wire_bytes = 0
        self.sends = collections.Counter()   # seq -> transmissions
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._crc: dict[int, int] = {}
        self._queue: collections.deque[codec.ChunkRef] = collections.deque()
        self._acked: set[int] = set()
        n = sender.streams
        self._inflight: list[dict[int, codec.ChunkRef]] = [{} for _ in range(n)]
        self._gen = [0] * n
        self._calls: list = [None] * n
        self._finished = False
        self._committed: tuple[int, bool] | None = None  # (digest, has_digest) once the receiver committed
        self._resync = False
        self._began = False
        self._committer: threading.Thread | None = None
        self._lease_s = sender.lease_s
        self._last_activity = self.started
        self._cond = threading.Condition()
        self._done = threading.Event()
        self._cleaned = threading.Event()
        self._workers: list[threading.Thread] = []
        self._driver = threading.Thread(target=self._drive, name=f"transfer-{request_id}", daemon=True)
        self._driver.start()

    # ---- public -------------------------------------------------------------------------
    @property
    def state(self) -> TransferState:
        return self.life.state

    @property
    def acked_chunks(self) -> int:
        with self._cond:
            return len(self._acked)

    def send_layer(self, layer: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Queue model layer `layer`'s final arrays ({kind: array}); returns at once.

        The arrays are kept (not copied) until the transfer ends: hand over final values and do
        not modify them (nor donate the JAX buffers they view) before `finish()` returns."""
        if self._done.is_set():
            raise self.error or TransferFailed(f"transfer {self.request_id} is {self.state.value}")
        kinds = {k for (l, k) in self._index if l == layer}
        if not kinds:
            raise codec.CodecError(f"layer {layer} is not part of transfer {self.request_id}")
        if set(arrays) != kinds:
            raise codec.CodecError(f"layer {layer}: expected arrays {sorted(kinds)}, got {sorted(arrays)}")
        checked = {k: codec.check_array(self._index[(layer, k)], np.asarray(a)) for k, a in arrays.items()}
        with self._cond:
            if layer not in self._layers_left:
                raise codec.CodecError(f"layer {layer} of transfer {self.request_id} was already sent")
            self._layers_left.discard(layer)
            for kind, a in checked.items():
                self._arrays[(layer, kind)] = a
                self._queue.extend(self._refs_of[(layer, kind)])
            self._cond.notify_all()

    def send_layer_of(self, state, layer: int) -> None:
        """Queue layer `layer` of a HybridState whose layer is final (the prefill engine's per-layer
        hook): its KDA state and conv tail, or its MLA rows past `prefix_rows`."""
        self.send_layer(layer, codec.layer_arrays(self.sender.config, state, layer, self.prefix_rows))

    def send_state(self, state) -> None:
        """Queue every layer of a whole HybridState (the non-pipelined path)."""
        for layer in sorted(self._layers_left):
            self.send_layer(layer, codec.layer_arrays(self.sender.config, state, layer, self.prefix_rows))

    def finish(self, annex: bytes | None = None) -> TransferResult:
        """No more layers; wait for the receiver's commit ack (or raise TransferFailed/Expired).
        `annex`: bytes for the sink's commit (e.g. the first sampled token); needs explicit_commit."""
        if annex is not None and not self.explicit_commit:
            raise TransferError(f"transfer {self.request_id}: a commit annex needs open(..., explicit_commit=True)")
        with self._cond:
            self._commit_annex = b"" if annex is None else bytes(annex)
            if self._layers_left and not self._done.is_set():
                missing = sorted(self._layers_left)
                raise codec.CodecError(f"finish() on transfer {self.request_id} before layers {missing} were sent")
            self._finished = True
            self._cond.notify_all()
        with self.life.cond:
            self.life.cond.wait_for(lambda: self.life.state in TERMINAL,
                                    timeout=max(0.0, self.deadline - time.monotonic()) + 1.0)
        if self.life.state == S.ACKED:
            return self.result
        if self.error is None:  # the driver missed its own deadline: should not happen
            self._set_error(TransferExpired(self._expiry_message()), S.EXPIRED)
        raise self.error

    def abort(self, reason: str = "aborted by caller") -> None:
        self._set_error(TransferFailed(f"transfer {self.request_id} aborted: {reason}"), S.FAILED)

    def join(self, timeout: float = 5.0) -> bool:
        """Wait until the transfer has released everything (threads, arrays, calls)."""
        return self._cleaned.wait(timeout)

    # ---- driver: begin, wait for acks (renewing the lease), commit -------------------------
    def _drive(self) -> None:
        try:
            # Streams start at once: their first chunks travel while Begin does (the receiver
            # holds a chunk that overtakes its Begin), so Begin costs no round trip of its own.
            for i in range(self.sender.streams):
                t = threading.Thread(target=self._stream, args=(i,), daemon=True,
                                     name=f"transfer-{self.request_id}-s{i}")
                t.start()
                self._workers.append(t)
            self._begin(initial=True)
            self.life.move(S.STREAMING)
            while True:
                with self._cond:
                    if self._done.is_set():
                        return
                    if self._committed is not None or (self._finished and not self.explicit_commit
                                                       and len(self._acked) == len(self.refs)):
                        break
                    if self.explicit_commit and self._finished and self._committer is None:
                        # sent at once: the receiver holds it until the last chunks land
                        self._committer = threading.Thread(target=self._explicit_commit, daemon=True,
                                                           name=f"transfer-{self.request_id}-commit")
                        self._committer.start()
                    self._cond.wait(_POLL_S)
                    resync, self._resync = self._resync, False
                    idle = time.monotonic() - self._last_activity
                self._check_deadline()
                if resync:
                    self._begin(initial=False)
                elif idle > self._lease_s / 3:
                    self._renew()
            self.life.move(S.LANDED)
            self._commit()
        except TransferExpired as e:
            self._set_error(e, S.EXPIRED)
        except TransferError as e:
            self._set_error(e, S.FAILED)
        except Exception as e:  # a bug must still end the transfer, never hang it
            self._set_error(TransferFailed(f"transfer {self.request_id}: internal error {e!r}"), S.FAILED)
        finally:
            self._cleanup()

    def _set_error(self, err: TransferError, state: TransferState) -> None:
        with self._cond:
            if self.error is None and self.life.state not in TERMINAL:
                self.error = err
            self._done.set()
            self._cond.notify_all()
        self.life.move(state)

    def _expiry_message(self) -> str:
        acked = len(self._acked)
        done = sum(r.length for r in self.refs if r.seq in self._acked)
        last = f"; last error: {self.last_error}" if self.last_error else ""
        if not self._began:
            last += " (the receiver never accepted the transfer: is it up, do certificates and tokens match?)"
        return (f"transfer {self.request_id} to {self.sender.target} did not complete within its "
                f"{self.deadline_s:.1f} s deadline: {acked}/{len(self.refs)} chunks acked "
                f"({done}/{self.total_bytes} B){last}")

    def _check_deadline(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TransferExpired(self._expiry_message())
        return remaining

    def _rpc(self, name: str, request, attempts_until_deadline: bool):
        """A unary control call, retried on transient errors until the deadline when asked."""
        backoff = 0.05
        link = self.sender.link
        while True:
            remaining = self._check_deadline()
            try:
                if link is not None:  # the emulated link delays control calls too (both ways)
                    time.sleep(min(link.latency_s, remaining))
                reply = self.sender._unary[name](request, timeout=min(remaining, 5.0), metadata=self.sender.metadata)
                if link is not None:
                    time.sleep(min(link.latency_s, max(0.0, self.deadline - time.monotonic())))
                return reply
            except grpc.RpcError as e:
                if e.code() in _FATAL:
                    raise TransferFailed(f"receiver {self.sender.target} refused {name} of transfer "
                                         f"{self.request_id}: {_describe(e)}") from None
                self.last_error = _describe(e)
                if not attempts_until_deadline:
                    return None
            if self._done.wait(min(backoff, max(0.0, self.deadline - time.monotonic()))):
                raise TransferFailed(f"transfer {self.request_id} stopped")
            backoff = min(backoff * 2, 0.5)

    def _begin(self, initial: bool) -> None:
        req = pb.BeginRequest(
            version=codec.PROTOCOL_VERSION, fingerprint=self.sender.fingerprint, request_id=self.request_id,
            batch=len(self.lengths), lengths=list(self.lengths), prefix_rows=self.prefix_rows,
            prefix_key=self.prefix_key, arrays=[p.to_pb() for p in self.pieces], num_chunks=len(self.refs),
            lease_ms=int(self.sender.lease_s * 1e3), want_digest=self.verify, annex=self.annex,
            explicit_commit=self.explicit_commit)
        reply = self._rpc("Begin", req, attempts_until_deadline=initial)
        if reply is None:  # transient failure of a resync: try again on the next round
            with self._cond:
                self._resync = True
            return
        with self._cond:
            self._lease_s = reply.lease_ms / 1e3 or self._lease_s
            held = set(reply.received)
            if self._began:  # a resync: chunks the receiver lost (it restarted) go again
                for seq in self._acked - held:
                    self._queue.appendleft(self.refs[seq])
                self._acked = {s for s in self._acked if s in held}
            self._acked |= held
            if reply.committed:
                self._committed = (reply.digest, reply.has_digest)
            self._began = True
            self._last_activity = time.monotonic()
            self._cond.notify_all()

    def _renew(self) -> None:
        try:
            self.sender._unary["Renew"](pb.RenewRequest(request_id=self.request_id),
                                        timeout=min(1.0, self._check_deadline()), metadata=self.sender.metadata)
            with self._cond:
                self._last_activity = time.monotonic()
        except grpc.RpcError as e:
            self.last_error = _describe(e)
            if e.code() == grpc.StatusCode.NOT_FOUND:  # lease ran out there: start over
                with self._cond:
                    self._resync = True

    def _commit_request(self) -> pb.CommitRequest:
        return pb.CommitRequest(request_id=self.request_id, num_chunks=len(self.refs),
                                total_bytes=self.total_bytes, annex=self._commit_annex or b"")

    def _explicit_commit(self) -> None:
        try:
            reply = self._rpc("Commit", self._commit_request(), attempts_until_deadline=True)
        except TransferExpired as e:
            self._set_error(e, S.EXPIRED)
        except TransferError as e:
            self._set_error(e, S.FAILED)
        else:
            with self._cond:
                self._committed = (reply.digest, reply.has_digest)
                self._cond.notify_all()

    def _commit(self) -> None:
        """The receiver normally commits on the last chunk; ask explicitly only if that ack was lost."""
        if self._committed is None:
            reply = self._rpc("Commit", self._commit_request(), attempts_until_deadline=True)
            self._committed = (reply.digest, reply.has_digest)
        value, has_digest = self._committed
        verified = None
        if self.verify and has_digest:
            with self._cond:
                arrays = [self._arrays[p.key] for p in self.pieces]
            verified = codec.digest(arrays) == value
        self.result = TransferResult(
            self.request_id, self.sender.target, self.total_bytes, self.wire_bytes, len(self.refs),
            sum(self.sends.values()) - len(self.refs), time.monotonic() - self.started, verified)
        if verified is False:
            raise TransferFailed(f"transfer {self.request_id}: end-to-end digest differs after commit")
        self.life.move(S.ACKED)

    def _cleanup(self) -> None:
        self._done.set()
        with self._cond:
            self._cond.notify_all()
            calls = list(self._calls)
        for c in calls:
            if c is not None:
                c.cancel()
        for t in self._workers + ([self._committer] if self._committer else []):
            t.join(timeout=2)
        if self._began and self.life.state != S.ACKED:  # free the partial state there now, not at lease end
            try:
                self.sender._unary["Abort"](pb.AbortRequest(request_id=self.request_id, reason=str(self.error)),
                                            timeout=0.5, metadata=self.sender.metadata)
            except grpc.RpcError:
                pass
        with self._cond:
            self._arrays.clear()
            self._calls = [None] * len(self._calls)
            self._queue.clear()
            for d in self._inflight:
                d.clear()
        self.sender._forget(self)
        self._cleaned.set()

    # ---- streams ----------------------------------------------------------------------------
    def _stream(self, i: int) -> None:
        backoff = 0.05
        while not self._done.is_set() and time.monotonic() < self.deadline:
            with self._cond:
                self._gen[i] += 1
                gen = self._gen[i]
            try:
                call = self.sender._push[i](self._frames(i, gen), metadata=self.sender.metadata,
                                            timeout=max(0.01, self.deadline - time.monotonic()))
                with self._cond:
                    self._calls[i] = call
                for ack in call:
                    if self.sender._delay is not None:
                        due = self.sender.link.ack_due(time.monotonic())
                        self.sender._delay.call_at(due, lambda a=ack: self._on_ack(i, a))
                    else:
                        self._on_ack(i, ack)
                return  # our frames generator ended: the transfer is over
            except grpc.RpcError as e:
                if self._done.is_set():
                    return
                if e.code() in _FATAL:
                    self._set_error(TransferFailed(f"receiver {self.sender.target} refused transfer "
                                                   f"{self.request_id}: {_describe(e)}"), S.FAILED)
                    return
                self.last_error = _describe(e)
                with self._cond:  # resume: everything unacked on this stream goes back in line
                    self._gen[i] += 1
                    self._queue.extendleft(r for s, r in self._inflight[i].items() if s not in self._acked)
                    self._inflight[i].clear()
                    self._resync = True
                    self._cond.notify_all()
                self._done.wait(backoff)
                backoff = min(backoff * 2, 0.5)

    def _next_ref(self) -> codec.ChunkRef | None:
        busy = set().union(*self._inflight)
        while self._queue:
            ref = self._queue.popleft()
            if ref.seq not in self._acked and ref.seq not in busy:
                return ref
        return None

    def _frames(self, i: int, gen: int):
        """Frames for stream i: a window of chunks in flight, each released when the link says."""
        link, pending = self.sender.link, collections.deque()
        while True:
            if self._done.is_set() or self._gen[i] != gen:
                return
            now = time.monotonic()
            if pending and pending[0][0] <= now:
                _, frame = pending.popleft()
                self.sender.meter.record(len(frame), now)
                with self._cond:
                    self.wire_bytes += len(frame)
                yield frame
                continue
            with self._cond:
                ref = self._next_ref() if len(self._inflight[i]) < self.sender.window else None
                if ref is not None:
                    self._inflight[i][ref.seq] = ref
                    self.sends[ref.seq] += 1
                    attempt = self.sends[ref.seq]
                    array = self._arrays.get(ref.piece.key)
                elif not pending:
                    self._cond.wait(_POLL_S)
                    continue
            if ref is None:
                time.sleep(min(max(pending[0][0] - now, 0.0), _POLL_S))
                continue
            if array is None:  # cleaned up under us
                return
            frame, array = self._encode(ref, array, attempt), None  # hold no array between frames
            pending.append((link.schedule(len(frame)) if link else 0.0, frame))

    def _encode(self, ref: codec.ChunkRef, array: np.ndarray, attempt: int) -> bytes:
        crc = self._crc.get(ref.seq)
        if crc is None:
            crc = self._crc[ref.seq] = codec.digest([codec.payload_view(array, ref)])
        frame = codec.encode_chunk(ref, array, request_id=self.request_id,
                                   fingerprint=self.sender.fingerprint, crc=crc)
        link = self.sender.link
        if link is not None and link.corrupts(ref.seq, attempt):  # fault injection: a bit flips on the wire
            bad = bytearray(frame)
            bad[-1] ^= 0x01
            frame = bytes(bad)
        return frame

    def _on_ack(self, i: int, ack: pb.Ack) -> None:
        fatal = None
        with self._cond:
            ref = self._inflight[i].pop(ack.seq, None)
            self._last_activity = time.monotonic()
            if ack.status == pb.OK:
                self._acked.add(ack.seq)
                if ack.committed:
                    self._committed = (ack.digest, ack.has_digest)
            elif ack.status == pb.CHECKSUM_MISMATCH and ref is not None:
                if self.sends[ack.seq] >= self.sender.max_attempts:
                    fatal = (f"transfer {self.request_id}: chunk {ack.seq} (layer {ref.piece.layer} "
                             f"{ref.piece.kind}) failed its checksum {self.sends[ack.seq]} times: {ack.message}")
                else:
                    self._queue.appendleft(ref)
            elif ack.status == pb.UNKNOWN_TRANSFER:
                if ref is not None:
                    self._queue.appendleft(ref)
                self._resync = True
            elif ack.status in _FATAL_ACKS:
                fatal = f"receiver {self.sender.target} refused transfer {self.request_id}: {ack.message}"
            self._cond.notify_all()
        if fatal:
            self._set_error(TransferFailed(fatal), S.FAILED)


def _channel(target: str, tls: TlsFiles | None, index: int) -> grpc.Channel:
    options = [("grpc.max_send_message_length", MAX_FRAME_BYTES),
               ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
               # one TCP connection per stream: channels must not share a subchannel
               ("grpc.use_local_subchannel_pool", 1), ("jaxprfaas.stream", index)]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.channel_credentials(), options=options)


class StateSender:
    """The prefill side's client to one decode node (one link): N connections, any number of transfers."""

    def __init__(self, target: str, config: ModelConfig, *, streams: int = 4,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES, tls: TlsFiles | None = None,
                 token: str | None = None, link: Link | None = None, link_name: str | None = None,
                 meter: EgressMeter | None = None, deadline_s: float = 60.0, lease_s: float = 10.0,
                 window: int = 4, max_attempts: int = 5):
        if not 1 <= streams <= 64:
            raise ConfigError(f"streams must be in 1..64, got {streams}")
        if window < 1 or max_attempts < 1 or deadline_s <= 0 or lease_s <= 0:
            raise ConfigError("window, max_attempts, deadline_s and lease_s must be positive")
        self.target, self.config, self.streams = target, config, streams
        self.chunk_bytes = codec.check_chunk_bytes(chunk_bytes)
        self.fingerprint = config.fingerprint()
        self.link, self.window, self.max_attempts = link, window, max_attempts
        self.deadline_s, self.lease_s = deadline_s, lease_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.meter = meter or egress_meter(link_name or target)
        self._channels = [_channel(target, tls, i) for i in range(streams)]
        ctl = self._channels[0]
        self._unary = {
            name: ctl.unary_unary(f"/{SERVICE}/{name}", request_serializer=req.SerializeToString,
                                  response_deserializer=rep.FromString)
            for name, req, rep in (("Begin", pb.BeginRequest, pb.BeginReply),
                                   ("Commit", pb.CommitRequest, pb.CommitReply),
                                   ("Renew", pb.RenewRequest, pb.RenewReply),
                                   ("Abort", pb.AbortRequest, pb.AbortReply))}
        self._push = [ch.stream_stream(f"/{SERVICE}/Push", request_serializer=None,
                                       response_deserializer=pb.Ack.FromString) for ch in self._channels]
        self._delay = _DelayLine() if link is not None and link.latency_s > 0 else None
        self._open: dict[str, OutgoingTransfer] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, lengths: Sequence[int], *, prefix_rows: int = 0, prefix_key: str = "",
             deadline_s: float | None = None, verify: bool = False, annex: bytes = b"",
             explicit_commit: bool = False) -> OutgoingTransfer:
        """Start a transfer of a state with these `lengths`; feed it layers as they become final.

        `annex` reaches the sink's begin (TransferMeta.annex). With `explicit_commit` the receiver
        commits only on `finish(annex=...)`, whose bytes reach the sink's commit; otherwise it
        commits as soon as the last chunk lands."""
        with self._lock:
            if request_id in self._open:
                raise TransferError(f"transfer {request_id} is already open on {self.target}")
            tx = OutgoingTransfer(self, request_id, lengths, prefix_rows, prefix_key,
                                  deadline_s or self.deadline_s, verify, annex, explicit_commit)
            self._open[request_id] = tx
        return tx

    def send_state(self, request_id: str, state, *, prefix_rows: int = 0, prefix_key: str = "",
                   deadline_s: float | None = None, verify: bool = True) -> TransferResult:
        """Send a whole HybridState and wait for the receiver's ack."""
        lengths = [int(x) for x in np.asarray(state.lengths)]
        tx = self.open(request_id, lengths, prefix_rows=prefix_rows, prefix_key=prefix_key,
                       deadline_s=deadline_s, verify=verify)
        tx.send_state(state)
        return tx.finish()

    def active_transfers(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def _forget(self, tx: OutgoingTransfer) -> None:
        with self._lock:
            if self._open.get(tx.request_id) is tx:
                del self._open[tx.request_id]

    def close(self) -> None:
        with self._lock:
            open_ = list(self._open.values())
        for tx in open_:
            tx.abort("sender closed")
            tx.join(5.0)
        if self._delay is not None:
            self._delay.close()
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> "StateSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

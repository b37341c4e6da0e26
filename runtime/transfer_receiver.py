"""The decode side of a state transfer: `StateReceiver` checks each transfer's manifest, writes
verified chunks into a `StateSink`, acks or nacks every chunk and frees a half-received state
when its lease runs out; `serve_receiver` runs it as a gRPC server.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Sequence

import grpc

from jaxprfaas.errors import ConfigError, JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec
from jaxprfaas.runtime.proto import transfer_pb2 as pb
from jaxprfaas.runtime.transfer_core import (
    _POLL_S,
    MAX_FRAME_BYTES,
    SERVICE,
    TERMINAL,
    S,
    SinkFull,
    StateSink,
    TransferMeta,
    TransferState,
    _Lifecycle,
)
from jaxprfaas.runtime.transfer_security import BearerTokenInterceptor, TlsFiles

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

"""The prefill side of a state transfer: `StateSender` (one per decode node: N connections) opens an
`OutgoingTransfer` per request, takes layers as they become final, stripes chunks over the
connections, re-sends what fails, resumes broken streams and gives up at the deadline.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import threading
import time
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np

from jaxprfaas.errors import ConfigError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec
from jaxprfaas.runtime.link import EgressMeter, Link, egress_meter
from jaxprfaas.runtime.proto import transfer_pb2 as pb
from jaxprfaas.runtime.transfer_core import (
    _POLL_S,
    MAX_FRAME_BYTES,
    SERVICE,
    TERMINAL,
    S,
    TransferError,
    TransferExpired,
    TransferFailed,
    TransferState,
    _Lifecycle,
)
from jaxprfaas.runtime.transfer_security import TlsFiles

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
